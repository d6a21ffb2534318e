"""Data-parallel fine-tuning under a real `torchrun` (two processes, gloo on loopback): what the
ranks exchange is the single-process computation, the ranks stay identical, a killed job resumes
exactly, and the command line refuses what cannot run in parallel."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rl_tasks import make_bc_policy, write_card

TESTS = Path(__file__).parent


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two processes on loopback; the children import the tests' helpers (`rl_tasks`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


HELPERS = textwrap.dedent("""
    import sys
    import torch
    from diffpolicy.rl import distributed
    from diffpolicy.rl.ppo import kl_exceeded
    from diffpolicy.train.distributed import process_group

    with process_group("cpu") as ctx:
        r = ctx.rank
        grads = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
        grads[0].grad = torch.full((2, 2), float(r + 1))
        grads[1].grad = torch.tensor([1.0, 2.0, 3.0]) * 10 ** r
        distributed.average_gradients(grads, ctx)
        advantages = torch.tensor([[0.5, -1.0, 2.0, 3.5, 0.0], [7.0, -2.0, 1.0, 0, 0]][r])[: 5 - 2 * r]
        out = {
            "grad0": grads[0].grad, "grad1": grads[1].grad, "grad2_none": grads[2].grad is None,
            "normalized": distributed.normalize_advantages(advantages, ctx),
            "rows": distributed.gather_rows(torch.arange(4 * (1 - r), dtype=torch.float64).reshape(-1, 2), ctx),
            "sum": distributed.sum_over_ranks(1.5 * (r + 1), ctx),
            "seed": distributed.rank_seed(3, ctx),
            # approximate KLs 0.3 and 0.1: the ranks' mean 0.2 decides, the same on both
            "kl_stop": [kl_exceeded([0.3, 0.1][r], target, ctx) for target in (0.15, 0.25, 0.0)],
        }
        torch.save(out, f"{sys.argv[1]}/rank{r}.pt")
""")


def test_what_ranks_exchange_is_the_single_process_computation(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    done = torchrun(str(script), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for out in ranks:
        assert torch.equal(out["grad0"], torch.full((2, 2), 1.5))
        assert torch.equal(out["grad1"], torch.tensor([5.5, 11.0, 16.5]))
        assert out["grad2_none"]  # a parameter without a gradient is left alone
        assert torch.equal(out["rows"], torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64))
        assert out["sum"] == 4.5
    both = torch.tensor([0.5, -1.0, 2.0, 3.5, 0.0, 7.0, -2.0, 1.0])  # rank 0's five, rank 1's three
    expected = (both - both.mean()) / (both.std() + 1e-8)
    assert torch.allclose(torch.cat([ranks[0]["normalized"], ranks[1]["normalized"]]), expected, atol=1e-6)
    assert [out["seed"] for out in ranks] == [3, 3 + 7919]
    assert [out["kl_stop"] for out in ranks] == [[True, False, False]] * 2  # rank 0 alone would stop at 0.25


FINETUNE = textwrap.dedent("""
    import sys
    import torch
    from rl_tasks import make_env
    from diffpolicy.policies import ChunkPolicy
    from diffpolicy.rl import dppo
    from diffpolicy.rl.evaluate import evaluate
    from diffpolicy.train.distributed import process_group

    policy_dir, run_dir, env_steps, out, resume = sys.argv[1:6]
    with process_group("cpu") as ctx:
        critics = []
        make_critic = dppo.Critic
        dppo.Critic = lambda policy: critics.append(make_critic(policy)) or critics[-1]
        config = dppo.DPPOConfig(lr=3e-4, finetune_steps=3, clip_start=0.05, clip_end=0.2, n_envs=4, n_steps=6,
                                 batch_size=16, epochs=2, eval_every=0, eval_episodes=11, env_steps=int(env_steps))
        result = dppo.finetune(ChunkPolicy.from_pretrained(policy_dir), make_env, config, run_dir,
                               resume=resume == "resume", progress=False, ctx=ctx)
        state = {f"actor.{k}": v for k, v in result.policy.finetuned_backbone.state_dict().items()}
        state.update({f"critic.{k}": v for k, v in critics[0].state_dict().items()})
        torch.save(state, f"{out}/rank{ctx.rank}.pt")
        if ctx.rank == 0:  # the final evaluation again, in this process alone
            seeds = range(config.eval_seed_start, config.eval_seed_start + config.eval_episodes)
            alone = evaluate(result.policy.eval().sample, result.policy.config, make_env, seeds, config.n_envs)
            torch.save(alone, f"{out}/alone.pt")
""")


def test_two_ranks_stay_identical_count_both_and_resume_exactly(tmp_path):
    make_bc_policy("diffusion", inference_steps=5).save_pretrained(tmp_path / "base", metadata={"task": "point_reach"})
    script = tmp_path / "finetune.py"
    script.write_text(FINETUNE)
    for name in ("straight", "cut"):
        (tmp_path / name).mkdir()

    def job(run: str, env_steps: int, resume: bool = False) -> None:
        done = torchrun(str(script), str(tmp_path / "base"), str(tmp_path / run / "run"), str(env_steps),
                        str(tmp_path / run), "resume" if resume else "new")
        assert done.returncode == 0, done.stderr[-3000:]

    job("straight", 300)
    rows = list(csv.DictReader((tmp_path / "straight" / "run" / "curves.csv").open()))
    assert len(rows) >= 2
    ta = make_bc_policy("diffusion", inference_steps=5).config.action_horizon
    one_rank_most = 4 * 6 * ta  # n_envs x n_steps chunks of Ta steps: the budget counts both ranks
    assert one_rank_most < int(rows[0]["env_steps"]) <= 2 * one_rank_most
    # the ranks shared the final evaluation (11 seeds in batches of 4: rank 0 plays 8, rank 1 plays 3)
    # and logged what one process alone gets from the same policy
    alone = torch.load(tmp_path / "straight" / "alone.pt")
    assert float(rows[-1]["eval_success"]) == alone["eval_success"]
    assert float(rows[-1]["eval_return"]) == alone["eval_return"]
    assert int(float(rows[-1]["eval_steps"])) == alone["eval_steps"] > 0
    straight = [torch.load(tmp_path / "straight" / f"rank{r}.pt") for r in range(2)]
    base = make_bc_policy("diffusion", inference_steps=5).backbone.state_dict()
    assert any(not torch.equal(straight[0][f"actor.{k}"], v) for k, v in base.items())  # it learned
    for key, tensor in straight[0].items():  # the ranks' gradients were averaged: identical parameters
        assert torch.equal(tensor, straight[1][key]), key

    job("cut", int(rows[0]["env_steps"]))  # stops after the first iteration, as a killed job would
    job("cut", 300, resume=True)
    for r in range(2):
        resumed = torch.load(tmp_path / "cut" / f"rank{r}.pt")
        for key, tensor in straight[r].items():
            assert torch.equal(tensor, resumed[key]), (r, key)


def test_the_command_line_runs_dppo_in_parallel_and_refuses_the_rest(tmp_path):
    card = write_card(tmp_path / "point.yaml")
    make_bc_policy("diffusion", inference_steps=5).save_pretrained(tmp_path / "base", metadata={"task": "point_reach"})
    base = ["-m", "diffpolicy.cli", "finetune", "--checkpoint", str(tmp_path / "base"), "--task", card]
    done = torchrun(*base, "--algo", "dppo", "--out", str(tmp_path / "run"), "--env-steps", "100", "--n-envs", "4",
                    "n_steps=6", "finetune_steps=3", "eval_episodes=4", "batch_size=16", "epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fine-tuned policy at") == 1  # rank 0 reports
    rows = list(csv.DictReader((tmp_path / "run" / "curves.csv").open()))
    assert rows[-1]["eval_success"] != ""
    refused = torchrun(*base, "--algo", "dsrl", "--out", str(tmp_path / "dsrl"), "--env-steps", "100")
    assert refused.returncode != 0
    assert "--algo dsrl runs in one process; torchrun is for dppo and flowppo" in refused.stderr
    assert not (tmp_path / "dsrl").exists()
    resumed = torchrun(*base, "--algo", "dppo", "--out", str(tmp_path / "run"), "--env-steps", "200", "--resume",
                       "--n-envs", "4", "n_steps=6", "finetune_steps=3", "eval_episodes=4", "batch_size=16",
                       "epochs=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = subprocess.run([sys.executable, *base, "--algo", "dppo", "--out", str(tmp_path / "run"),
                             "--env-steps", "300", "--resume", "--n-envs", "4", "n_steps=6", "finetune_steps=3",
                             "eval_episodes=4", "batch_size=16", "epochs=1"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert single.returncode == 2
    assert "the run had 2 process(es); resume it with as many (torchrun --nproc_per_node), not 1" in single.stderr


def test_a_dream_refuses_more_than_one_process():
    from diffpolicy.train.distributed import DistContext
    from diffpolicy.worldmodel.dream import DreamSession
    from diffpolicy.worldmodel.errors import WorldModelError

    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(WorldModelError, match="a dream runs in one process"):
        DreamSession("unused", "dppo", None, None, None, False, ctx, model=None, data=None, dream=None,
                     max_episode_steps=1, raw_env=None)
