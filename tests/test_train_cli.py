"""`diffpolicy train` end to end on a tiny dataset, and its bad inputs: a clear message, exit code 2,
no traceback."""

import json

import pytest
from train_helpers import TINY, make_pusht_dataset, make_wrong_action_dataset

from diffpolicy.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht.zarr", episodes=3)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_train_writes_checkpoints_logs_and_a_loadable_policy(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--task", "pusht", "--policy", "flow", "--out", str(out),
                              "--no-progress", *TINY, f"data.path={dataset}", "data.val_fraction=0.34")
    assert code == 0, stdout
    assert "trained 20 steps" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "flow" and config["train"]["steps"] == 20
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    assert all(r["val_loss"] > 0 for r in rows if "val_loss" in r)
    assert list((out / "tb").iterdir())
    policy_dir = out / "checkpoints" / "step_00000020" / "policy"
    meta = json.loads((policy_dir / "config.json").read_text())["metadata"]
    assert (meta["task"], meta["method"], meta["step"]) == ("pusht", "flow", 20)


def test_missing_dataset_names_the_collect_command(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--task", "pusht", "--out", str(tmp_path / "run"),
                           f"data.path={tmp_path / 'absent.zarr'}")
    assert code == 2
    assert "no dataset" in err and f"diffpolicy collect --task pusht --out {tmp_path / 'absent.zarr'}" in err


def test_dataset_with_wrong_action_dimension(tmp_path, capsys):
    path = make_wrong_action_dataset(tmp_path / "wrong.zarr", action_dim=3)
    code, _, err = run_cli(capsys, "train", "--task", "pusht", "--out", str(tmp_path / "run"), f"data.path={path}")
    assert code == 2
    assert "actions have shape [3]" in err and "expects [2]" in err and "diffpolicy collect --task pusht" in err


def test_dataset_of_another_task(tmp_path, dataset, capsys):
    code, _, err = run_cli(capsys, "train", "--task", "hopper", "--out", str(tmp_path / "run"), f"data.path={dataset}")
    assert code == 2 and "missing data key(s) ['state']" in err


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "did you mean optim.lr"),
    ("train.steps=ten", "config key 'train.steps': expected an integer, got 'ten' (str)"),
    ("train.bf16=2", "config key 'train.bf16': expected a bool, got 2 (int)"),
    ("data.image_cache_gb=-1", "data.image_cache_gb"),
])
def test_bad_overrides(tmp_path, dataset, capsys, override, message):
    code, _, err = run_cli(capsys, "train", "--task", "pusht", "--out", str(tmp_path / "run"), override)
    assert code == 2 and message in err


def test_unknown_task(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--task", "no_such_task", "--out", str(tmp_path / "run"))
    assert code == 2 and "unknown task 'no_such_task'" in err


def test_existing_run_needs_resume(tmp_path, dataset, capsys):
    flags = ["train", "--task", "pusht", "--out", str(tmp_path / "run"), "--no-progress"]
    overrides = [*TINY, "train.steps=10", f"data.path={dataset}"]
    assert run_cli(capsys, *flags, *overrides)[0] == 0
    code, _, err = run_cli(capsys, *flags, *overrides)
    assert code == 2 and "--resume" in err
    code, stdout, _ = run_cli(capsys, *flags, "--resume", "train.steps=20")  # the saved config, 10 more steps
    assert code == 0 and "trained 20 steps" in stdout
    code, _, err = run_cli(capsys, *flags, "--policy", "flow", "--resume")
    assert code == 2 and "with --policy diffusion" in err


@pytest.mark.parametrize("command", ["train", "eval", "main"])
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"diffpolicy {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert command in capsys.readouterr().out


def test_train_and_resume_with_a_card_given_by_path(tmp_path, dataset, capsys):
    """A user's own task card outside envs/ trains, resumes and evaluates like a built-in one."""
    import yaml

    from diffpolicy.envs.tasks import CARDS_DIR

    raw = yaml.safe_load((CARDS_DIR / "pusht.yaml").read_text())
    raw["name"] = "my_pusht"
    card = tmp_path / "cards" / "my_pusht.yaml"
    card.parent.mkdir()
    card.write_text(yaml.safe_dump(raw))
    flags = ["train", "--task", str(card), "--policy", "flow", "--out", str(tmp_path / "run"), "--no-progress"]
    overrides = [*TINY, "train.steps=10", f"data.path={dataset}"]
    code, stdout, err = run_cli(capsys, *flags, *overrides)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *flags, "--resume", "train.steps=20")
    assert code == 0 and "trained 20 steps" in stdout, err
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000020" / "policy" / "config.json").read_text())
    assert meta["metadata"]["task"] == "my_pusht"
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "run"), "--task", str(card),
                                "--episodes", "1", "--seed", "100000", "--no-progress")
    assert code == 0, err
