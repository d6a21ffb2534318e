"""The notebooks in notebooks/ run headless on tiny runs made here (3 PushT expert demonstrations
and a policy trained for 20 steps; on the point-reaching task of tests/rl_tasks.py, a biased
imitation policy, two 2-iteration DPPO fine-tuning runs from it and its `diffpolicy eval --controller`
evaluations), produce their key figures, and are stored without outputs. Also the PushT
first-contact helper the dataset notebook uses."""

import json
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from rl_tasks import TASK, make_bc_policy, write_card
from train_helpers import TINY, make_pusht_dataset

from diffpolicy.cli import main
from diffpolicy.envs.pusht import contact_side, first_contact

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    dataset = make_pusht_dataset(base / "pusht.zarr", episodes=3)
    code = main(["train", "--task", "pusht", "--policy", "diffusion", "--out", str(base / "train"), "--no-progress",
                 *TINY, f"data.path={dataset}"])
    assert code == 0
    return {"dataset": dataset, "run": base / "train"}


@pytest.fixture(scope="module")
def tiny_finetune(tmp_path_factory):
    """A biased imitation checkpoint of the point-reaching task and two DPPO runs from it (seeds 0
    and 1), each 2 iterations of 8 x 6 chunks with a held-out evaluation on 8 seeds after each."""
    base = tmp_path_factory.mktemp("finetune")
    card = write_card(base / "point.yaml")
    make_bc_policy("diffusion").save_pretrained(base / "bc", metadata={"task": TASK})
    runs = []
    for seed in (0, 1):
        runs.append(base / f"dppo_seed{seed}")
        code = main(["finetune", "--algo", "dppo", "--checkpoint", str(base / "bc"), "--task", card, "--out",
                     str(runs[-1]), "--env-steps", "150", "--seed", str(seed), "--no-progress", "n_steps=6",
                     "finetune_steps=3", "batch_size=16", "epochs=2", "eval_every=1", "eval_episodes=8"])
        assert code == 0
    return {"card": card, "imitation": base / "bc", "runs": runs}


def execute(name, monkeypatch, **env):
    """Run notebooks/<name> in a fresh kernel that imports this checkout; returns the executed notebook."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook


def outputs_of(notebook, mime):
    return [o["data"][mime] for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]


def test_evaluate_checkpoint_notebook(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    notebook = execute("evaluate_checkpoint.ipynb", monkeypatch, DIFFPOLICY_RUN_DIR=tiny_run["run"],
                       DIFFPOLICY_EPISODES=2, DIFFPOLICY_FAILURE_VIDEOS=1, DIFFPOLICY_NOTEBOOK_OUT=out)
    for figure in ("evaluation.png", "rollout_chunks.png"):
        assert (out / figure).stat().st_size > 10_000, figure
    assert len(list((out / "rollouts").glob("episode_000_seed_100000.mcap"))) == 1
    episodes = json.loads((out / "eval" / "episodes.json").read_text())
    assert [e["seed"] for e in episodes] == [100000, 100001]
    html = "".join(outputs_of(notebook, "text/html"))
    assert html.count("<tr>") == 3  # the per-seed table: a header and 2 seeds
    assert outputs_of(notebook, "image/png")
    assert not all(e["success"] for e in episodes)  # a 20-step policy fails: its failure video is inline
    assert html.count("<video") == 1 and "base64" in html
    assert len(list((out / "failures").glob("seed_*/videos/*.mp4"))) == 1


def test_inspect_dataset_notebook(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "inspect"
    notebook = execute("inspect_dataset.ipynb", monkeypatch, DIFFPOLICY_DATASET=tiny_run["dataset"],
                       DIFFPOLICY_NOTEBOOK_OUT=out)
    for figure in ("lengths_actions.png", "observations.png", "approach_sides.png"):
        assert (out / figure).stat().st_size > 5_000, figure
    assert len(outputs_of(notebook, "image/png")) == 3
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "episodes=3" in text and "(3/3) successful" in text


def test_finetuning_curves_notebook(tiny_finetune, tmp_path, monkeypatch):
    out = tmp_path / "curves"
    runs = tiny_finetune["runs"]
    notebook = execute("finetuning_curves.ipynb", monkeypatch, DIFFPOLICY_FINETUNE_DIRS=" ".join(map(str, runs)),
                       DIFFPOLICY_IMITATION=tiny_finetune["imitation"], DIFFPOLICY_TASK=tiny_finetune["card"],
                       DIFFPOLICY_NOTEBOOK_OUT=out)
    assert (out / "finetuning_curves.png").stat().st_size > 10_000
    assert len(outputs_of(notebook, "image/png")) == 1
    html = "".join(outputs_of(notebook, "text/html"))
    assert html.count("<tr>") == 3 and "dppo_seed0" in html and "dppo_seed1" in html
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    # The biased imitation start never reaches the goal on the runs' 8 held-out seeds.
    assert "imitation start: success 0.000" in text and "seeds 100000..100007" in text


def test_compare_controllers_notebook(tiny_finetune, tmp_path, monkeypatch):
    """Real `diffpolicy eval --controller MODE --delay D` evaluations of the point-reaching imitation
    policy, laid out <policy>/<mode>_d<delay>, read and plotted by the notebook."""
    root, out = tmp_path / "controllers", tmp_path / "compare"
    for mode in ("sync", "rtc"):
        for delay in (0, 1):
            code = main(["eval", "--checkpoint", str(tiny_finetune["imitation"]), "--task", tiny_finetune["card"],
                         "--episodes", "4", "--n-envs", "4", "--controller", mode, "--delay", str(delay),
                         "--out", str(root / "bc" / f"{mode}_d{delay}"), "--no-progress"])
            assert code == 0
    notebook = execute("compare_controllers.ipynb", monkeypatch, DIFFPOLICY_EVAL_DIRS=f"{root}/*/*",
                       DIFFPOLICY_NOTEBOOK_OUT=out)
    assert (out / "controllers.png").stat().st_size > 10_000
    assert len(outputs_of(notebook, "image/png")) == 1
    html = "".join(outputs_of(notebook, "text/html"))
    assert html.count("<tr>") == 5  # a header and 4 evaluations
    sync = json.loads((root / "bc" / "sync_d0" / "summary.json").read_text())
    assert f"<td>{sync['control']['nfe_per_action']:.3f}</td>" in html
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "4 evaluations: bc/rtc at delays [0, 1], bc/sync at delays [0, 1]" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert any("parameters" in cell.metadata.get("tags", []) for cell in code)


def test_first_contact_in_the_block_frame():
    # block at (200, 200) turned by pi/2: body x points along world y, body y along world -x
    block = [200.0, 200.0, np.pi / 2]
    far, near = [400.0, 400.0], [200.0 + 16.0, 200.0]  # near: the disk (radius 15) 1 px from the bar (body y = -16)
    states = np.array([far + block, far + block, near + block])
    step, local = first_contact(states)
    assert step == 2
    np.testing.assert_allclose(local, [0.0, -16.0], atol=1e-9)
    assert contact_side(local) == "bar edge"
    assert first_contact(states[:2]) is None
    assert [contact_side(p) for p in ([0, 130], [-40, 60], [40, 60])] == ["stem tip", "left", "right"]
