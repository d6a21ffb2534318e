"""`diffpolicy main` end to end with tiny settings: collect, train, evaluate, report; and resume."""

import json

from train_helpers import TINY

from diffpolicy.cli import main


def test_main_job_runs_end_to_end_and_resumes(tmp_path, capsys):
    out, dataset = tmp_path / "main", tmp_path / "pusht.zarr"
    argv = ["main", "--out", str(out), "--dataset", str(dataset), "--demos", "3", "--eval-episodes", "2",
            "--no-progress", *TINY]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "[4/4] report" in stdout and "success" in stdout and "ms per chunk" in stdout

    report = (out / "report.md").read_text()
    assert "success rate (95 % Wilson CI)" in report and "mean_coverage" in report
    assert "![learning curve](learning_curve.png)" in report
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Held-out success vs training CPU-minutes](held_out_success.png)" in report
    assert (out / "held_out_success.png").read_bytes()[:4] == b"\x89PNG"
    video = "eval/videos/episode_000_seed_100000.mp4"
    assert f"]({video})" in report and (out / video).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 2 and summary["training steps"] == 20 and summary["demonstrations"] == 3
    assert summary["seeds"] == "100000..100001"
    # both kept checkpoints (steps 10 and 20) on the held-out seeds, the final one shipped
    assert [point["step"] for point in summary["curve"]] == [10, 20]
    assert all(point["success_rate"]["n"] == 2 for point in summary["curve"])
    assert 0 < summary["curve"][0]["cpu_minutes"] < summary["curve"][1]["cpu_minutes"]
    assert summary["checkpoint"].endswith("step_00000020/policy")
    episodes = json.loads((out / "eval" / "episodes.json").read_text())
    assert [e["seed"] for e in episodes] == [100000, 100001]

    # a second run resumes: nothing new to collect, training already at its last step
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "(resuming)" in stdout
    assert json.loads((out / "summary.json").read_text())["training steps"] == 20


def test_main_job_trains_on_its_own_demonstrations_from_a_larger_store(tmp_path, capsys):
    from diffpolicy.collection.collect import collect
    from diffpolicy.commands.main import ACTION_NOISE

    out, dataset = tmp_path / "main", tmp_path / "pusht.zarr"
    collect("pusht", episodes=4, out=dataset, only_success=True, action_noise=ACTION_NOISE)
    argv = ["main", "--out", str(out), "--dataset", str(dataset), "--demos", "3", "--eval-episodes", "1",
            "--videos", "0", "--no-progress", *TINY]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["demonstrations"] == 3
    assert summary["expert success (demonstration seeds)"] == "3/3"  # not the store's 4/4
    assert json.loads((out / "train" / "config.json").read_text())["data"]["max_episodes"] == 3


def test_main_job_collects_dart_demonstrations_and_names_a_store_made_otherwise(tmp_path, capsys):
    """The job's store records the expert's clean actions next to the noisy executed ones; a store
    collected with other noise is refused by name before anything is trained."""
    import numpy as np

    from diffpolicy.collection.collect import collect
    from diffpolicy.commands.main import ACTION_NOISE
    from diffpolicy.data.replay_buffer import ReplayBuffer

    out, dataset = tmp_path / "main", tmp_path / "pusht_dart.zarr"
    argv = ["main", "--out", str(out), "--dataset", str(dataset), "--demos", "2", "--eval-episodes", "1",
            "--videos", "0", "--no-progress", *TINY]
    assert main(argv) == 0
    store = ReplayBuffer.open(dataset)
    assert store.attrs["collection"]["action_noise"] == ACTION_NOISE > 0
    action, executed = np.asarray(store["action"]), np.asarray(store["executed_action"])
    assert action.shape == executed.shape and not np.allclose(action, executed)
    assert json.loads((out / "summary.json").read_text())["demonstration action noise (DART)"] == ACTION_NOISE

    clean = tmp_path / "clean.zarr"
    collect("pusht", episodes=1, out=clean, only_success=True)
    other = ["main", "--out", str(tmp_path / "other"), "--dataset", str(clean), "--demos", "1", "--no-progress", *TINY]
    assert main(other) != 0
    err = capsys.readouterr().err
    assert f"collection.action_noise = 0.0, this run asks for {ACTION_NOISE}" in err
    assert not (tmp_path / "other" / "train").exists()
    assert main(["main", "--action-noise", "-1", "--out", str(tmp_path / "bad"), "--dataset", str(tmp_path / "bad.zarr"),
                 "--demos", "1", "--no-progress", *TINY]) != 0
    assert "action_noise must be one finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.zarr").exists()


def test_the_readme_reports_the_main_jobs_own_settings():
    """The README's main-job row names what `diffpolicy main` runs, so its numbers measure the default."""
    from pathlib import Path

    from diffpolicy.commands.main import ACTION_NOISE, DEMOS, STEPS, budget_overrides
    from diffpolicy.train.config import build_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| PushT, `./run main`"))
    config = build_config("pusht", "diffusion", budget_overrides("diffusion"))
    backbone = config.policy.backbone
    assert f"{DEMOS} demos (DART σ {ACTION_NOISE})" in row
    assert f"{STEPS // 1000}k steps of {config.train.batch_size}" in row
    assert f"MLP {backbone['hidden_dim']}×{backbone['num_blocks']}, {backbone['activation']}" in row
    assert config.policy.process.prediction == "sample" and "predicts the clean chunk" in row  # the card's setting
    assert f"{config.train.num_threads} threads" in row
    # diffusion trains on exactly the levels its sampler visits
    assert config.policy.process.train_steps == config.policy.inference_steps
    assert f"trained on its sampler's {config.policy.inference_steps} levels" in row
    # bf16 where the CPU multiplies it natively (the README's runs had it), float32 elsewhere
    from diffpolicy.train.precision import native_cpu_bf16

    assert config.train.cpu_bf16 == native_cpu_bf16() and "bf16 autocast" in row
    assert f"collects {DEMOS} PushT demonstrations" in readme and f"for {STEPS // 1000}k steps" in readme


def test_main_job_budget_keeps_both_methods_512_wide_and_on_their_samplers_levels():
    from diffpolicy.commands.main import budget_overrides
    from diffpolicy.train.config import build_config

    for method in ("diffusion", "flow"):
        policy = build_config("pusht", method, budget_overrides(method)).policy
        assert policy.backbone["hidden_dim"] == 512
        assert policy.process.train_steps == policy.inference_steps  # trained on its sampler's levels
    assert build_config("pusht", "flow").policy.backbone["hidden_dim"] == 768  # the card's flow recipe
