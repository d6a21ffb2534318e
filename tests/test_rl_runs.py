"""`rl.runs.read_run`: a fine-tuning run's curves read back with empty cells as None, its saved
settings, and clear errors for a directory that is not a run."""

import pytest

from diffpolicy.errors import InvalidValueError, MissingFileError
from diffpolicy.rl.curves import COLUMNS
from diffpolicy.rl.runs import read_run


def write_curves(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    lines = [",".join(COLUMNS)] + [",".join(str(row.get(c, "")) for c in COLUMNS) for row in rows]
    (path / "curves.csv").write_text("\n".join(lines) + "\n")


def test_columns_skip_empty_cells(tmp_path):
    write_curves(tmp_path / "sb3_ppo", [{"iteration": 1, "env_steps": 96, "train_success": 0.5},
                                        {"iteration": 2, "env_steps": 191, "eval_success": 0.25, "eval_return": -3.5}])
    run = read_run(tmp_path / "sb3_ppo")
    assert run.name == "sb3_ppo" and run.algo is None and run.config == {}
    assert run.rows[0]["eval_success"] is None and run.rows[1]["env_steps"] == 191.0
    steps, values = run.column("eval_success")
    assert steps.tolist() == [191.0] and values.tolist() == [0.25]
    assert run.column("train_success")[0].tolist() == [96.0]
    with pytest.raises(InvalidValueError, match="unknown column 'success'"):
        run.column("success")


def test_a_dreams_curve_reads_against_imagined_steps(tmp_path):
    write_curves(tmp_path / "dream", [{"iteration": 1, "env_steps": 0, "dream_steps": 8000, "eval_return": 900.5},
                                      {"iteration": 2, "env_steps": 0, "dream_steps": 16010}])
    run = read_run(tmp_path / "dream")
    assert run.column("eval_return", x="dream_steps")[0].tolist() == [8000.0]
    assert run.column("eval_return")[0].tolist() == [0.0]  # real steps: none learned from
    with pytest.raises(InvalidValueError, match="unknown column 'imagined'"):
        run.column("eval_return", x="imagined")


def test_settings_of_a_dsrl_run(tmp_path):
    write_curves(tmp_path / "dsrl", [{"iteration": 1, "env_steps": 10}])
    (tmp_path / "dsrl" / "sb3").mkdir()
    (tmp_path / "dsrl" / "sb3" / "state.json").write_text('{"config": {"eval_episodes": 20}, "counters": {}}')
    run = read_run(tmp_path / "dsrl")
    assert run.algo == "dsrl" and run.config == {"eval_episodes": 20}


def test_not_a_run(tmp_path):
    with pytest.raises(MissingFileError, match="curves.csv: no curves; expected the --out directory"):
        read_run(tmp_path)
    (tmp_path / "curves.csv").write_text("step,success\n1,0\n")
    with pytest.raises(InvalidValueError, match=r"columns \['env_steps', 'iteration'\] missing"):
        read_run(tmp_path)
