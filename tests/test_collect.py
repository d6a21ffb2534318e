"""`collect` and `diffpolicy collect`: the stored episodes, resuming, success filtering, errors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
import zarr

import diffpolicy.collection.collect as collect_module
import diffpolicy.collection.episodes as episodes_module
from diffpolicy.cli import main
from diffpolicy.collection.collect import CollectError, collect, expert_success_on
from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.envs.pusht import PushTEnv
from diffpolicy.envs.tasks import CARDS_DIR, TaskCardError, load_task


def short_pusht_card(tmp_path, max_episode_steps: int) -> str:
    """The pusht card with a shorter time limit, so that some seeds fail (seed 0 needs > 100 steps)."""
    raw = yaml.safe_load((CARDS_DIR / "pusht.yaml").read_text())
    raw["name"] = "pusht_short"
    raw["max_episode_steps"] = max_episode_steps
    path = tmp_path / "pusht_short.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_collect_writes_whole_episodes_that_replay(tmp_path):
    out = tmp_path / "pusht.zarr"
    summary = collect("pusht", episodes=3, out=out, seed_start=5, progress=False)
    assert (summary.episodes, summary.new_episodes, summary.attempted) == (3, 3, 3)
    buffer = ReplayBuffer.open(out)
    assert buffer.keys() == ["action", "agent_pos", "keypoints", "reward", "states"]
    np.testing.assert_array_equal(buffer.episode_meta("seed"), [5, 6, 7])
    assert buffer.episode_meta("success").tolist() == [True, True, True] and summary.successes == 3
    assert buffer.attrs["task"] == "pusht" and buffer.attrs["task_card"]["horizons"] == {"obs": 2, "pred": 16, "exec": 8}
    settings = buffer.attrs["collection"]
    assert settings["seed_start"] == 5 and settings["only_success"] is False and settings["discarded_seeds"] == []
    assert buffer["action"].dtype == np.float32 and buffer["states"].shape == (buffer.n_steps, 5)

    env, replay = PushTEnv(), PushTEnv()
    for index, seed in enumerate([5, 6, 7]):
        episode = buffer.get_episode(index)
        obs, info = env.reset(seed=seed)
        for t, action in enumerate(episode["action"]):  # the actions replayed from the seed
            np.testing.assert_array_equal(episode["keypoints"][t], obs["keypoints"])
            np.testing.assert_array_equal(episode["agent_pos"][t], obs["agent_pos"])
            np.testing.assert_array_equal(episode["states"][t], info["state"])
            np.testing.assert_array_equal(replay.set_state(episode["states"][t])["keypoints"], obs["keypoints"])
            obs, reward, terminated, _, info = env.step(action)
            assert episode["reward"][t] == np.float32(reward)
        assert terminated and info["is_success"]  # a stored episode ends at its success
        for key in ("agent_pos", "keypoints"):  # the observation after the last action, which no step holds
            np.testing.assert_array_equal(buffer.episode_meta(f"final_obs.{key}")[index], obs[key])


def test_collect_resumes_after_an_interruption_without_repeating_seeds(tmp_path, monkeypatch):
    out = tmp_path / "pusht.zarr"
    real_run_episode = episodes_module.run_episode
    calls = []

    def interrupted_on_third(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_episode(*args, **kwargs)

    monkeypatch.setattr(episodes_module, "run_episode", interrupted_on_third)
    with pytest.raises(KeyboardInterrupt):
        collect("pusht", episodes=4, out=out, progress=False)
    assert ReplayBuffer.open(out).episode_meta("seed").tolist() == [0, 1]
    monkeypatch.setattr(episodes_module, "run_episode", real_run_episode)

    summary = collect("pusht", episodes=4, out=out, progress=False)
    assert summary.new_episodes == 2 and summary.new_attempts == 2
    assert ReplayBuffer.open(out).episode_meta("seed").tolist() == [0, 1, 2, 3]
    again = collect("pusht", episodes=4, out=out, progress=False)  # already complete: nothing to do
    assert again.new_attempts == 0 and again.episodes == 4


def test_only_success_keeps_successes_and_resumes_past_discarded_seeds(tmp_path):
    card = short_pusht_card(tmp_path, max_episode_steps=100)
    out = tmp_path / "short.zarr"
    first = collect(card, episodes=2, out=out, only_success=True, progress=False)
    buffer = ReplayBuffer.open(out)
    kept = buffer.episode_meta("seed").tolist()
    discarded = buffer.attrs["collection"]["discarded_seeds"]
    assert buffer.episode_meta("success").all() and len(kept) == 2
    assert 0 in discarded  # seed 0 needs more than 100 steps
    assert sorted(kept + discarded) == list(range(first.attempted))  # every seed once, none skipped
    assert first.successes == 2 and first.success_rate == pytest.approx(2 / first.attempted)

    second = collect(card, episodes=3, out=out, only_success=True, progress=False)
    buffer = ReplayBuffer.open(out)
    seeds = buffer.episode_meta("seed").tolist()
    all_discarded = buffer.attrs["collection"]["discarded_seeds"]
    assert seeds[:2] == kept and len(seeds) == 3 and buffer.episode_meta("success").all()
    assert sorted(seeds + all_discarded) == list(range(second.attempted))
    assert second.new_attempts == second.attempted - first.attempted

    with_failures = collect(card, episodes=2, out=tmp_path / "all.zarr", progress=False)
    assert ReplayBuffer.open(tmp_path / "all.zarr").episode_meta("success").tolist()[0] is False
    assert with_failures.attempted == 2


def test_expert_success_counts_the_seeds_behind_the_first_episodes_only(tmp_path):
    card = short_pusht_card(tmp_path, max_episode_steps=100)
    out = tmp_path / "short.zarr"
    collect(card, episodes=3, out=out, only_success=True, progress=False)
    buffer = ReplayBuffer.open(out)
    seeds, discarded = buffer.episode_meta("seed").tolist(), buffer.attrs["collection"]["discarded_seeds"]
    for episodes in (1, 2, 3):
        below = sum(seed < seeds[episodes - 1] for seed in discarded)
        assert expert_success_on(out, episodes) == (episodes, episodes + below)
    assert expert_success_on(out, 3)[1] == len(seeds) + len(discarded)  # every attempt up to the third episode
    for bad in (0, 4, 1.5):
        with pytest.raises(CollectError, match=r"episodes must be an integer in \[1, 3\]"):
            expert_success_on(out, bad)


def test_only_success_gives_up_after_max_attempts_leaving_a_valid_store(tmp_path):
    card = short_pusht_card(tmp_path, max_episode_steps=3)  # nobody succeeds in 3 steps
    out = tmp_path / "never.zarr"
    with pytest.raises(CollectError, match="max_attempts"):
        collect(card, episodes=1, out=out, only_success=True, max_attempts=2, progress=False)
    buffer = ReplayBuffer.open(out)
    assert buffer.n_episodes == 0 and buffer.attrs["collection"]["discarded_seeds"] == [0, 1]


def test_collect_refuses_to_resume_with_other_settings(tmp_path):
    out = tmp_path / "pusht.zarr"
    collect("pusht", episodes=1, out=out, progress=False)
    with pytest.raises(CollectError, match="only_success"):
        collect("pusht", episodes=2, out=out, only_success=True, progress=False)
    with pytest.raises(CollectError, match="task"):
        collect("pusht_image", episodes=2, out=out, progress=False)
    collect("pusht", episodes=1, out=out, seed_start=9, overwrite=True, progress=False)
    assert ReplayBuffer.open(out).episode_meta("seed").tolist() == [9]


def test_collect_image_task_stores_frames_and_states(tmp_path):
    out = tmp_path / "img.zarr"
    collect("pusht_image", episodes=1, out=out, seed_start=4, progress=False)
    buffer = ReplayBuffer.open(out)
    assert buffer.keys() == ["action", "agent_pos", "image", "reward", "states"]
    images = np.asarray(buffer["image"][:])
    assert images.dtype == np.uint8 and images.shape == (buffer.n_steps, 96, 96, 3)
    env = PushTEnv(obs_type="image")
    for t in (0, buffer.n_steps // 2, buffer.n_steps - 1):
        np.testing.assert_array_equal(env.set_state(buffer["states"][t])["image"], images[t])


def test_bad_requests_raise_clear_errors(tmp_path):
    with pytest.raises(TaskCardError, match="known tasks: .*pusht"):
        collect("no_such_task", episodes=1, out=tmp_path / "x.zarr", progress=False)
    with pytest.raises(CollectError, match="episodes must be a positive integer"):
        collect("pusht", episodes=0, out=tmp_path / "x.zarr", progress=False)
    raw = yaml.safe_load((CARDS_DIR / "pusht.yaml").read_text())
    raw["observation"]["keypoints"]["shape"] = [16]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskCardError, match=r"observation.keypoints has shape \[16\] in the card.*\[18\]"):
        collect(str(bad), episodes=1, out=tmp_path / "bad.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "bad.zarr").exists()


def test_cli_collects_and_reports_unknown_tasks_without_a_traceback(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert main(["collect", "--task", "pusht", "--episodes", "1", "--out", str(out), "--no-progress"]) == 0
    assert "1 episodes (1 new)" in capsys.readouterr().out
    assert ReplayBuffer.open(out).n_episodes == 1
    assert main(["collect", "--task", "no_such_task", "--episodes", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'no_such_task'" in err and "pusht" in err and "Traceback" not in err
    assert load_task("pusht").dataset == {"episodes": 3000, "path": "datasets/pusht.zarr",
                                         "only_success": True, "seed_start": 0}


def test_action_noise_executes_perturbed_actions_and_records_the_experts(tmp_path):
    """DART: the env runs the noisy action, the store keeps the expert's clean action for that state."""
    from diffpolicy.envs.experts.pusht import PushTExpert

    out = tmp_path / "dart.zarr"
    collect("pusht", episodes=1, out=out, seed_start=3, action_noise=0.05, progress=False)
    buffer = ReplayBuffer.open(out)
    assert buffer.attrs["collection"]["action_noise"] == 0.05
    episode = buffer.get_episode(0)

    env = PushTEnv()
    obs, _ = env.reset(seed=3)
    expert = PushTExpert(env)
    expert.reset(3)
    noise = np.random.default_rng([3, collect_module.NOISE_STREAM])
    scale = 0.05 * (512.0 - 0.0) / 2
    gaps = []
    for t, recorded in enumerate(episode["action"]):
        np.testing.assert_array_equal(episode["agent_pos"][t], obs["agent_pos"])
        action = expert.act(obs).astype(np.float32)
        np.testing.assert_array_equal(recorded, action)  # the label is the expert's own action
        executed = np.clip(action + scale * noise.standard_normal(2), 0.0, 512.0).astype(np.float32)
        np.testing.assert_array_equal(episode["executed_action"][t], executed)  # what the env ran
        gaps.append(np.abs(executed - action).max())
        obs, *_ = env.step(executed)
    assert np.mean(gaps) > 5.0  # the executed actions really were perturbed (std 12.8 px)


def test_action_noise_per_dimension_and_bad_values(tmp_path):
    out = tmp_path / "dims.zarr"
    collect("pusht", episodes=1, out=out, action_noise=[0.0, 0.0], progress=False)  # zero: clean expert
    clean = collect("pusht", episodes=1, out=tmp_path / "clean.zarr", progress=False)
    np.testing.assert_array_equal(ReplayBuffer.open(out)["states"][:], ReplayBuffer.open(clean.path)["states"][:])
    assert "executed_action" not in ReplayBuffer.open(clean.path).keys()  # no noise: the executed action is the action
    for bad in (-0.1, float("nan"), [0.1, 0.1, 0.1], [[0.1]]):
        with pytest.raises(CollectError, match="action_noise must be one finite number >= 0 or 2 of them"):
            collect("pusht", episodes=1, out=tmp_path / "bad.zarr", action_noise=bad, progress=False)
    assert not (tmp_path / "bad.zarr").exists()
    with pytest.raises(CollectError, match="action_noise"):  # a store made without noise is not resumed with it
        collect("pusht", episodes=2, out=tmp_path / "clean.zarr", action_noise=0.1, progress=False)


def test_stores_made_before_action_noise_existed_still_resume(tmp_path):
    out = tmp_path / "old.zarr"
    collect("pusht", episodes=1, out=out, progress=False)
    buffer = ReplayBuffer.open(out, mode="a")
    collection = dict(buffer.attrs["collection"])
    del collection["action_noise"]  # as stores written before the setting existed
    buffer.attrs["collection"] = collection
    assert collect("pusht", episodes=2, out=out, progress=False).episodes == 2


def test_stores_made_before_final_observations_were_kept_still_resume_without_them(tmp_path):
    out = tmp_path / "old.zarr"
    collect("pusht", episodes=1, out=out, progress=False)
    meta = zarr.open_group(out / "meta", mode="a")
    for name in ("final_obs.agent_pos", "final_obs.keypoints"):
        del meta[name]  # as stores written before the meta existed
    assert collect("pusht", episodes=2, out=out, progress=False).episodes == 2
    assert ReplayBuffer.open(out).meta_keys() == ["seed", "success"]


def test_cli_takes_action_noise(tmp_path, capsys):
    out = tmp_path / "cli_dart.zarr"
    assert main(["collect", "--task", "pusht", "--episodes", "1", "--out", str(out), "--no-progress",
                 "--action-noise", "0.02", "0.03"]) == 0
    assert ReplayBuffer.open(out).attrs["collection"]["action_noise"] == [0.02, 0.03]
    assert main(["collect", "--task", "pusht", "--episodes", "1", "--out", str(tmp_path / "x.zarr"),
                 "--action-noise", "-1"]) == 2
    assert "action_noise must be one finite number >= 0" in capsys.readouterr().err
