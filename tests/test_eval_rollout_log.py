"""Per-tick MCAP rollout logs: what `rollout` hands the logger (the latest observation, the executed
action, the chunk as predicted), one readable MCAP file per episode, `diffpolicy eval --log`."""

import base64
import json

import gymnasium
import numpy as np
import pytest
from gymnasium.wrappers import TimeLimit
from mcap.reader import make_reader
from test_eval_rollout import RecordingPolicy, _short_env, run_cli, untrained_policy

from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.evaluation.rollout import rollout
from diffpolicy.evaluation.rollout_log import McapRolloutLogger, decode_raw_image
from diffpolicy.evaluation.rollout_log import read_mcap as read_mcap_topics
from diffpolicy.train.config import build_config


class StepLog(gymnasium.Wrapper):
    """Records, per seed, the executed actions and the observation current when each was executed."""

    runs: dict = {}

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        # the vector env's own autoreset passes no seed: the rollout resets with the next seed after it
        fresh = {"obs": [], "action": []}
        self.current = StepLog.runs.setdefault(kwargs["seed"], fresh) if kwargs.get("seed") is not None else fresh
        self.last = obs["agent_pos"].copy()
        return obs, info

    def step(self, action):
        self.current["obs"].append(self.last)
        self.current["action"].append(np.array(action))
        obs, *rest = super().step(action)
        self.last = obs["agent_pos"].copy()
        return obs, *rest


def read_mcap(path):
    """{topic: [(log_time_ns, message dict)]} and the schema name of each topic (read independently
    of `rollout_log.read_mcap`, which the last test checks against this)."""
    topics, schemas = {}, {}
    with open(path, "rb") as stream:
        for schema, channel, message in make_reader(stream).iter_messages(log_time_order=False):
            topics.setdefault(channel.topic, []).append((message.log_time, json.loads(message.data)))
            schemas[channel.topic] = schema.name
    return topics, schemas


def test_logger_receives_every_tick_of_every_episode(tmp_path):
    card = load_task("pusht")
    config = build_config("pusht", "flow").policy
    policy = RecordingPolicy(config)
    StepLog.runs = {}
    seeds = [100000, 100001, 100002]
    lengths = dict.fromkeys(seeds, 11)
    with McapRolloutLogger(tmp_path / "rollouts", episodes=2) as logger:
        results, _ = rollout(policy, lambda: StepLog(_short_env(card, 11)), seeds, n_envs=2, logger=logger,
                             control_hz=10.0)
    files = sorted(p.name for p in (tmp_path / "rollouts").iterdir())
    assert files == ["episode_000_seed_100000.mcap", "episode_001_seed_100001.mcap"]  # the first 2 only
    to, ta, tp = config.obs_horizon, config.action_horizon, config.pred_horizon
    for episode, seed in enumerate(seeds[:2]):
        topics, schemas = read_mcap(tmp_path / "rollouts" / files[episode])
        truth = StepLog.runs[seed]
        actions = topics["/action"]
        assert [m["step"] for _, m in actions] == list(range(lengths[seed]))
        assert [t for t, _ in actions] == [step * 100_000_000 for step in range(lengths[seed])]  # 10 Hz
        np.testing.assert_allclose([m["action"] for _, m in actions], truth["action"])
        np.testing.assert_allclose([m["value"] for _, m in topics["/observation/agent_pos"]], truth["obs"],
                                   rtol=1e-6)
        chunks = topics["/chunk"]
        assert [m["step"] for _, m in chunks] == list(range(0, lengths[seed], ta))  # one per Ta ticks
        for _, message in chunks:  # the whole chunk as predicted; execution starts at To - 1
            chunk = np.array(message["chunk"])
            assert chunk.shape == (tp, 2) and message["executed_from"] == to - 1
            executed = np.array([m["action"] for _, m in actions[message["step"]:message["step"] + ta]])
            np.testing.assert_allclose(executed, chunk[to - 1:to - 1 + len(executed)])
        rewards = [m for _, m in topics["/reward"]]
        assert rewards[-1]["return"] == pytest.approx(results[episode].episode_return)
        assert all("coverage" in m for m in rewards)
        (_, result), = topics["/episode"]
        assert result == results[episode].to_dict()
        assert schemas["/observation/keypoints"] == "diffpolicy.Value" and "/render" not in topics


def test_recorded_frames_are_foxglove_raw_images(tmp_path):
    policy = untrained_policy()
    card = load_task("pusht")
    logger = McapRolloutLogger(tmp_path)
    _, frames = rollout(policy, lambda: TimeLimit(make_env(card, render_mode="rgb_array").unwrapped, 3), [100000],
                        n_envs=1, record=1, logger=logger)
    logger.close()
    topics, schemas = read_mcap(tmp_path / "episode_000_seed_100000.mcap")
    assert schemas["/render"] == "foxglove.RawImage"
    images = [m for _, m in topics["/render"]]
    assert len(images) == 3 and images[0]["encoding"] == "rgb8"
    last = np.frombuffer(base64.b64decode(images[-1]["data"]), np.uint8).reshape(images[-1]["height"],
                                                                                  images[-1]["width"], 3)
    np.testing.assert_array_equal(last, frames[0][-1])
    np.testing.assert_array_equal(decode_raw_image(images[-1]), last)
    assert read_mcap_topics(tmp_path / "episode_000_seed_100000.mcap") == topics


def test_an_interrupted_episode_leaves_no_file(tmp_path):
    logger = McapRolloutLogger(tmp_path)
    logger.begin_episode(0, 7)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_eval_command_logs_mcap(tmp_path, capsys):
    path = tmp_path / "policy"
    untrained_policy("flow").save_pretrained(path, metadata={"task": "pusht", "method": "flow"})
    code, _, _ = run_cli(capsys, "eval", "--checkpoint", str(path), "--episodes", "2", "--seed", "100000",
                         "--log", "mcap", "--log-episodes", "1", "--out", str(tmp_path / "eval"), "--no-progress")
    assert code == 0
    logs = list((tmp_path / "eval" / "rollouts").iterdir())
    assert [p.name for p in logs] == ["episode_000_seed_100000.mcap"]
    topics, _ = read_mcap(logs[0])
    episodes = json.loads((tmp_path / "eval" / "episodes.json").read_text())
    assert len(topics["/action"]) == episodes[0]["length"] and topics["/episode"][0][1] == episodes[0]
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(path), "--log", "mcap", "--log-episodes", "0")
    assert code == 2 and "--log-episodes must be >= 1, got 0" in err


def test_image_observations_and_controller_state(tmp_path):
    from diffpolicy.evaluation.rollout_log import Tick

    image = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    with McapRolloutLogger(tmp_path) as logger:
        logger.begin_episode(3, 42)
        for step in range(2):
            logger.log_tick(3, Tick(step=step, time_s=0.05 * step, observation={"image": image, "agent_pos": np.ones(2)},
                                    action=np.zeros(2), reward=0.5, episode_return=0.5 * (step + 1), success=False,
                                    controller={"mode": "rtc", "delay_actions": 2.0 + step}))
        logger.end_episode(3, {"seed": 42, "success": False})
    topics, schemas = read_mcap(tmp_path / "episode_003_seed_42.mcap")
    assert schemas["/observation/image"] == "foxglove.RawImage"
    np.testing.assert_array_equal(decode_raw_image(topics["/observation/image"][1][1]), image)
    assert [m for _, m in topics["/controller"]] == [{"step": 0, "mode": "rtc", "delay_actions": 2.0},
                                                     {"step": 1, "mode": "rtc", "delay_actions": 3.0}]
    assert [t for t, _ in topics["/controller"]] == [0, 50_000_000]
    assert "/chunk" not in topics and topics["/episode"][0] == (50_000_000, {"seed": 42, "success": False})
