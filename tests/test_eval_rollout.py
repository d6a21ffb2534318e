"""Closed-loop evaluation: To-step history, Ta-step execution of each chunk, fixed seeds, determinism,
per-episode JSON and videos; `diffpolicy eval` and its bad inputs."""

import functools
import json

import gymnasium
import numpy as np
import pytest
import torch

from diffpolicy.cli import main
from diffpolicy.envs.tasks import load_task, make_env
from diffpolicy.evaluation.rollout import evaluate, rollout
from diffpolicy.policies import ChunkPolicy, Normalizer
from diffpolicy.train.config import build_config


def untrained_policy(method="flow", seed=0):
    """A small PushT policy with a normalizer over the workspace (its behaviour is arbitrary but fixed)."""
    config = build_config("pusht", method, ["policy.backbone={type: mlp, hidden_dim: 32, num_blocks: 1}"]).policy
    corners = np.array([[0.0] * 18, [512.0] * 18], dtype=np.float32)
    normalizer = Normalizer.fit({"action": corners[:, :2], "agent_pos": corners[:, :2], "keypoints": corners})
    torch.manual_seed(seed)
    return ChunkPolicy(config, normalizer).eval()


class RecordingPolicy:
    """Test double: returns chunks whose action k of call c is (c, k) and records its inputs."""

    def __init__(self, config):
        self.config = config
        self.calls = []

    def eval(self):
        return self

    def sample(self, obs, steps=None, x_init=None, generator=None):
        batch = next(iter(obs.values())).shape[0]
        self.calls.append({k: v.clone() for k, v in obs.items()})
        call = len(self.calls) - 1
        k = torch.arange(self.config.pred_horizon, dtype=torch.float32)
        chunk = torch.stack([torch.full_like(k, float(call)), k], dim=-1)
        return chunk.expand(batch, -1, -1).clone()


class ActionLog(gymnasium.Wrapper):
    """Records executed actions and the observations returned (reset first)."""

    log: list = []
    observations: list = []

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        ActionLog.observations.append(obs["agent_pos"].copy())
        return obs, info

    def step(self, action):
        ActionLog.log.append(np.array(action))
        obs, *rest = super().step(action)
        ActionLog.observations.append(obs["agent_pos"].copy())
        return obs, *rest


def test_history_and_chunk_execution():
    card = load_task("pusht")
    config = build_config("pusht", "flow").policy
    policy = RecordingPolicy(config)
    ActionLog.log, ActionLog.observations = [], []
    results, _ = rollout(policy, lambda: ActionLog(_short_env(card, 20)), [100000], n_envs=1)
    assert results[0].length == 20
    to, ta = config.obs_horizon, config.action_horizon
    # every chunk executes Ta actions starting at index To - 1: (call, To - 1), ..., (call, To + Ta - 2)
    assert len(policy.calls) == -(-20 // ta)
    expected = [(c, to - 1 + i) for c in range(len(policy.calls)) for i in range(ta)][:20]
    assert [tuple(a) for a in np.array(ActionLog.log)] == expected
    # the first history repeats the reset observation To times; later ones are the last To steps
    first = policy.calls[0]["agent_pos"][0]
    assert first.shape == (to, 2) and torch.equal(first[0], first[1])
    assert np.array_equal(first[0].numpy(), ActionLog.observations[0])
    second = policy.calls[1]["agent_pos"][0].numpy()  # after Ta steps: observations Ta - To + 1 .. Ta
    assert np.array_equal(second, np.stack(ActionLog.observations[ta - to + 1: ta + 1]))


class DemoReplayPolicy:
    """Test double: replays a recorded demonstration, chunk c holding actions c*Ta - (To-1) ... of it."""

    def __init__(self, config, actions):
        self.config, self.actions, self.calls = config, torch.as_tensor(actions), 0

    def eval(self):
        return self

    def sample(self, obs, steps=None, x_init=None, generator=None):
        start = self.calls * self.config.action_horizon - (self.config.obs_horizon - 1)
        rows = (start + torch.arange(self.config.pred_horizon)).clamp(0, len(self.actions) - 1)
        self.calls += 1
        return self.actions[rows][None]


def test_replaying_a_demonstration_through_the_chunk_loop_reproduces_it(tmp_path):
    """Executed action t of the rollout is demonstration action t: the expert's success comes back."""
    from train_helpers import make_pusht_dataset

    from diffpolicy.data.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.open(make_pusht_dataset(tmp_path / "demo.zarr", episodes=1))
    demo = buffer.get_episode(0)
    assert bool(buffer.episode_meta("success")[0])
    card = load_task("pusht")
    policy = DemoReplayPolicy(build_config("pusht", "flow").policy, demo["action"])
    results, _ = rollout(policy, functools.partial(make_env, card), [int(buffer.episode_meta("seed")[0])], n_envs=1)
    assert results[0].success and results[0].length == len(demo["action"])
    assert results[0].episode_return == pytest.approx(float(demo["reward"].sum()), rel=1e-6)


def _short_env(card, steps):
    from gymnasium.wrappers import TimeLimit

    return TimeLimit(make_env(card).unwrapped, max_episode_steps=steps)


def test_same_seeds_same_results_and_seed_order():
    policy = untrained_policy()
    card = load_task("pusht")
    first = evaluate(policy, card, episodes=3, seed_start=100000, n_envs=2)
    again = evaluate(policy, card, episodes=3, seed_start=100000, n_envs=2)
    assert [e.to_dict() for e in first.episodes] == [e.to_dict() for e in again.episodes]
    assert [e.seed for e in first.episodes] == [100000, 100001, 100002]
    other = evaluate(policy, card, episodes=3, seed_start=100003, n_envs=2)
    assert [e.coverage for e in other.episodes] != [e.coverage for e in first.episodes]
    summary = first.summary
    assert summary["episodes"] == 3 and 0.0 <= summary["success_rate"]["ci95_low"] <= summary["success_rate"]["rate"]
    assert summary["mean_coverage"] == pytest.approx(np.mean([e.coverage for e in first.episodes]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    untrained_policy("diffusion").save_pretrained(path, metadata={"task": "pusht", "method": "diffusion"})
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_eval_command_writes_results_and_is_deterministic(tmp_path, checkpoint, capsys):
    outputs = []
    for name in ("a", "b"):
        code, stdout, _ = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--episodes", "2", "--seed",
                                  "100000", "--videos", "1", "--n-envs", "2", "--out", str(tmp_path / name),
                                  "--no-progress")
        assert code == 0 and "success rate" in stdout
        outputs.append(json.loads((tmp_path / name / "episodes.json").read_text()))
    assert outputs[0] == outputs[1]
    assert [e["seed"] for e in outputs[0]] == [100000, 100001]
    assert set(outputs[0][0]) == {"index", "seed", "success", "episode_return", "length", "coverage"}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["videos"] == ["videos/episode_000_seed_100000.mp4"]
    assert (tmp_path / "a" / "videos" / "episode_000_seed_100000.mp4").stat().st_size > 1000


def test_eval_checkpoint_of_another_task(checkpoint, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--task", "hopper")
    assert code == 2 and "trained on task 'pusht', not 'hopper'" in err


def test_eval_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and "no checkpoint at" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path))
    assert code == 2 and "expected a policy directory" in err


def test_eval_eta_overrides_the_diffusion_sampler(tmp_path, checkpoint, capsys):
    summaries = {}
    for eta in ("0", "1"):
        code, _, _ = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--episodes", "1", "--seed", "100000",
                             "--eta", eta, "--out", str(tmp_path / eta), "--no-progress")
        assert code == 0
        summaries[eta] = json.loads((tmp_path / eta / "episodes.json").read_text())
    assert summaries["0"] != summaries["1"]  # the same initial noise, other steps


def test_eval_under_other_settings_keeps_each_result_and_records_its_settings(tmp_path, capsys):
    policy_dir = tmp_path / "run" / "policy"
    untrained_policy("diffusion").save_pretrained(policy_dir, metadata={"task": "pusht", "method": "diffusion"})
    base = ["eval", "--checkpoint", str(policy_dir), "--episodes", "1", "--seed", "100000", "--no-progress"]
    for extra in ([], ["--eta", "0"], ["--eta", "1", "--inference-steps", "4"], ["--controller", "rtc", "--delay", "2"]):
        assert run_cli(capsys, *base, *extra)[0] == 0
    written = {p.name: json.loads((p / "summary.json").read_text())["settings"]
               for p in (tmp_path / "run").glob("eval_*")}
    policy_steps = untrained_policy("diffusion").config.inference_steps
    assert written == {
        "eval_seed100000_n1": {"inference_steps": policy_steps, "n_envs": 10, "eta": 1.0},
        "eval_seed100000_n1_eta0": {"inference_steps": policy_steps, "n_envs": 10, "eta": 0.0},
        "eval_seed100000_n1_steps4_eta1": {"inference_steps": 4, "n_envs": 10, "eta": 1.0},
        "eval_seed100000_n1_rtc_d2": {"inference_steps": policy_steps, "n_envs": 10, "eta": 1.0, "controller": "rtc",
                                      "delay": 2, "exec_horizon": None, "profile": None, "wall_clock": False},
    }


def test_eval_bad_sampling_settings(tmp_path, checkpoint, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--eta", "2")
    assert code == 2 and "--eta" in err and "'process.eta': expected a number <= 1" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--inference-steps", "0")
    assert code == 2 and "'inference_steps': expected an integer >= 1, got 0" in err
    flow = tmp_path / "flow"
    untrained_policy("flow").save_pretrained(flow, metadata={"task": "pusht", "method": "flow"})
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(flow), "--eta", "0.5")
    assert code == 2 and "only diffusion processes have eta" in err


def test_eval_bad_counts(checkpoint, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--episodes", "0")
    assert code == 2 and "--episodes must be >= 1" in err
