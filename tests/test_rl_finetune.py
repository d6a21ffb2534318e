"""DPPO and flow PPO end to end on a tiny point-reaching task whose behaviour-cloned policy is
biased: the PPO ratio is exactly 1 for every transition before each iteration's update,
fine-tuning raises the held-out return, resuming continues bit-exactly, and bad input fails
before any environment step."""

import dataclasses

import numpy as np
import pytest
import torch
from rl_tasks import (
    FAIL_STEPS,
    MAX_STEPS,
    TASK,
    WideActionReach,
    make_bc_policy,
    make_env,
    make_failing_env,
    write_card,
    write_demonstrations,
)

from diffpolicy.cli import main
from diffpolicy.evaluation.rollout import rollout
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir
from diffpolicy.rl import chain_ppo, dppo, flow_ppo
from diffpolicy.rl.critic import Critic
from diffpolicy.rl.errors import ActionSpaceMismatchError, UnsupportedProcessError
from diffpolicy.rl.evaluate import evaluate
from diffpolicy.rl.ppo import clipped_surrogate, log_ratio
from diffpolicy.rl.session import Session

SMALL = {"n_envs": 8, "n_steps": 6, "batch_size": 16, "epochs": 4, "eval_episodes": 16}
ALGOS = {
    "dppo": (dppo, "diffusion", dppo.DPPOConfig(lr=3e-4, finetune_steps=3, clip_start=0.05, clip_end=0.2, **SMALL)),
    "flowppo": (flow_ppo, "flow", flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, std_min=0.05, std_max=0.3,
                                                         log_prob_per_dim=False, **SMALL)),
    # the default ratio: the chain's log-probability per dimension, with ReinFlow's clip
    "flowppo_per_dim": (flow_ppo, "flow", flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.01, std_min=0.05, std_max=0.3,
                                                                 **SMALL)),
    # DPPO's structure on a flow chain: the DDIM step with eta 1 and a floor, one ratio per flow step
    "flowppo_eta_per_step": (flow_ppo, "flow", flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, train_eta=1.0, std_floor=0.1,
                                                                      ratio_per_step=True, log_prob_per_dim=False,
                                                                      **SMALL)),
    # ... with more flow steps than ReinFlow's 1-4: 8, the last 4 fine-tuned (as DPPO's last 5 of 10)
    "flowppo_eta_4_of_8": (flow_ppo, "flow", flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, inference_steps=8,
                                                                    finetune_steps=4, train_eta=1.0, std_floor=0.1,
                                                                    ratio_per_step=True, log_prob_per_dim=False,
                                                                    **SMALL)),
}


def policy_for(algo):
    kind = ALGOS[algo][1]
    return make_bc_policy(kind, inference_steps=5 if kind == "diffusion" else 4)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_ppo_ratio_is_exactly_one_for_every_transition_before_the_update(algo, tmp_path, monkeypatch):
    module, _, config = ALGOS[algo]
    config = dataclasses.replace(config, env_steps=150, eval_every=0)  # two iterations
    checked = []

    def scored_then_checked(policy, critic, rollout, noise, gamma, lam, tokens=None):
        # Every transition of the iteration, scored in minibatches as the update scores them,
        # before any update: the PPO ratio (from the clamped log-ratio) is exactly 1.
        batch = chain_ppo.ppo_batch(policy, critic, rollout, noise, gamma, lam, tokens)
        steps = config.inference_steps if module is flow_ppo else policy.config.inference_steps
        assert batch.chain.x.shape[1] == steps + 1  # the whole chain is recorded ...
        assert batch.old_log_prob.shape[1] == (config.finetune_steps or steps)  # ... and its fine-tuned steps scored
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(len(checked)))
        for index in order.split(config.batch_size):
            log_prob = policy.chain_log_prob(batch.cond[index], batch.chain.index(index), noise, tokens=tokens)
            assert torch.equal(log_prob, batch.old_log_prob[index])
            ratio = log_ratio(log_prob, batch.old_log_prob[index]).exp()
            assert torch.equal(ratio, torch.ones_like(ratio))
            _, stats = clipped_surrogate(log_prob.sum(1), batch.old_log_prob[index].sum(1),
                                         torch.randn(len(index)), 0.2)  # flow PPO's whole-chain ratio
            assert stats["ratio"] == 1.0 and stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
        checked.append(len(batch))
        return batch

    monkeypatch.setattr(module, "ppo_batch", scored_then_checked)
    result = module.finetune(policy_for(algo), make_env, config, tmp_path / "run", progress=False)
    assert checked == [48, 48]  # 8 environments x 6 chunks, in each of the two iterations
    assert [row["first_ratio_error"] for row in result.history] == [0.0, 0.0]
    assert result.history[-1]["ratio"] != 1.0  # later minibatches did move the policy



@pytest.mark.parametrize("algo", ["dppo", "flowppo"])
def test_the_ratio_counts_only_the_executed_actions_unless_told_otherwise(algo, tmp_path, monkeypatch):
    """The noise on chunk positions the environment never executes cannot earn an advantage: both
    algorithms score the Ta executed positions (`executed_only`), or with it off all Tp."""
    module, _, config = ALGOS[algo]
    policy = policy_for(algo)
    start = policy.config.obs_horizon - 1
    seen = []

    def recorded(policy, critic, rollout, noise, gamma, lam, tokens=None):
        seen.append(tokens)
        return chain_ppo.ppo_batch(policy, critic, rollout, noise, gamma, lam, tokens)

    monkeypatch.setattr(module, "ppo_batch", recorded)
    for executed_only in (True, False):
        run = dataclasses.replace(config, env_steps=50, eval_every=0, executed_only=executed_only)
        module.finetune(policy_for(algo), make_env, run, tmp_path / f"run_{executed_only}", progress=False)
    assert seen == [slice(start, start + policy.config.action_horizon), None]
    assert policy.config.action_horizon < policy.config.pred_horizon  # the two differ on this task


def test_each_iteration_logs_the_exploration_noise_its_rollout_had(tmp_path):
    """`noise_std`: the mean std of the scored transitions. DDIM eta = 0 under a floor is the
    floor exactly; flow PPO's learned std lies within its bounds (at their midpoint, where the noise
    network's sigmoid starts, until an update moves it)."""
    _, _, config = ALGOS["dppo"]
    floored = dataclasses.replace(config, env_steps=50, eval_every=0, train_eta=0.0, std_floor=0.07)
    result = dppo.finetune(policy_for("dppo"), make_env, floored, tmp_path / "dppo", progress=False)
    assert result.history[0]["noise_std"] == pytest.approx(0.07)
    _, _, config = ALGOS["flowppo"]
    run = dataclasses.replace(config, env_steps=100, eval_every=0, critic_warmup=1)
    history = flow_ppo.finetune(policy_for("flowppo"), make_env, run, tmp_path / "flow", progress=False).history
    assert all(config.std_min <= row["noise_std"] <= config.std_max for row in history)
    assert history[0]["noise_std"] == pytest.approx((config.std_min + config.std_max) / 2, abs=0.03)
    assert "noise_std" in (tmp_path / "flow" / "curves.csv").read_text().splitlines()[0].split(",")

def held_out_return(policy, seeds=range(100000, 100016)):
    episodes, _ = rollout(policy, make_env, list(seeds), n_envs=8)
    return float(np.mean([e.episode_return for e in episodes])), float(np.mean([e.success for e in episodes]))


@pytest.mark.parametrize("algo,env_steps", [
    pytest.param("dppo", 2400, marks=pytest.mark.slow),  # ~20 s: keeps the file's default run under a minute
    ("flowppo", 1500),
    ("flowppo_per_dim", 1500),
    ("flowppo_eta_per_step", 1500),
])
def test_finetuning_raises_the_return_where_imitation_is_poor(algo, env_steps, tmp_path):
    module, _, config = ALGOS[algo]
    base = policy_for(algo)
    if algo == "dppo":
        base.set_sampling(eta=0.0)  # DPPO evaluates with DDIM eta = 0
    bc_return, bc_success = held_out_return(base)
    assert bc_success == 0.0  # the demonstrations are biased: imitation never reaches the goal
    result = module.finetune(policy_for(algo), make_env, dataclasses.replace(config, env_steps=env_steps, eval_every=0),
                             tmp_path / "run", progress=False)
    tuned = ChunkPolicy.from_pretrained(result.checkpoint / "policy")  # what the run saved, with its copy
    tuned_return, tuned_success = held_out_return(tuned)
    assert tuned_return > bc_return + 1.0 and tuned_success > 0.0, (bc_return, tuned_return, tuned_success)
    # The run evaluated exactly the sampler it saved.
    assert result.history[-1]["eval_return"] == evaluate(tuned.sample, tuned.config, make_env, range(100000, 100016),
                                                         8)["eval_return"]
    curves = (tmp_path / "run" / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("iteration,env_steps,cpu_s") and len(curves) == 1 + len(result.history)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_resume_continues_bit_exactly(tmp_path, monkeypatch):
    module, _, config = ALGOS["dppo"]
    # Three iterations, with the BC regulariser: its window and noise draws resume exactly too.
    store = write_demonstrations(tmp_path / "demos.zarr")
    config = dataclasses.replace(config, env_steps=230, eval_every=0, bc_coef=0.5, bc_data=store)
    straight = module.finetune(policy_for("dppo"), make_env, config, tmp_path / "straight", progress=False)

    original_save = Session.save

    def save_then_die(self, *args, **kwargs):
        path = original_save(self, *args, **kwargs)
        if self.iteration == 1:
            raise KeyboardInterrupt  # killed right after the first checkpoint
        return path

    monkeypatch.setattr(Session, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        module.finetune(policy_for("dppo"), make_env, config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(Session, "save", original_save)
    resumed = module.finetune(policy_for("dppo"), make_env, config, tmp_path / "resumed", resume=True, progress=False)
    assert len(resumed.history) == 2 and resumed.history == straight.history[1:]
    for name, tensor in straight.policy.state_dict().items():
        assert torch.equal(tensor, resumed.policy.state_dict()[name]), name

    def rows(run):
        lines = (tmp_path / run / "curves.csv").read_text().splitlines()
        return [",".join(v for i, v in enumerate(line.split(",")) if i != 2) for line in lines]  # without cpu_s

    assert rows("straight") == rows("resumed")


def test_bad_input_fails_before_any_environment_step(tmp_path, capsys):
    card = write_card(tmp_path / "point.yaml")
    flow = policy_for("flowppo")
    flow.save_pretrained(tmp_path / "flow", metadata={"task": TASK})
    other = policy_for("dppo")
    other.save_pretrained(tmp_path / "other", metadata={"task": "pusht"})
    # A checkpoint of another task.
    assert main(["finetune", "--algo", "dppo", "--checkpoint", str(tmp_path / "other"), "--task", card,
                 "--out", str(tmp_path / "a")]) == 2
    assert "trained on task 'pusht', not 'point_reach'" in capsys.readouterr().err
    # A process the algorithm does not support.
    assert main(["finetune", "--algo", "dppo", "--checkpoint", str(tmp_path / "flow"), "--task", card,
                 "--out", str(tmp_path / "b")]) == 2
    assert "dppo fine-tunes diffusion policies; this checkpoint's process is 'flow'" in capsys.readouterr().err
    with pytest.raises(UnsupportedProcessError, match="flowppo fine-tunes flow-matching policies"):
        flow_ppo.finetune(policy_for("dppo"), make_env, ALGOS["flowppo"][2], tmp_path / "c")
    # An environment whose action space differs from the policy's: no step taken.
    WideActionReach.steps_taken = 0
    wide = write_card(tmp_path / "wide.yaml", entry_point="rl_tasks:WideActionReach")
    assert main(["finetune", "--algo", "flowppo", "--checkpoint", str(tmp_path / "flow"), "--task", wide,
                 "--out", str(tmp_path / "d")]) == 2
    assert "action space is Box(-1.0, 1.0, (3,), float32), the policy acts in Box of shape (2,)" in capsys.readouterr().err
    with pytest.raises(ActionSpaceMismatchError):
        dppo.finetune(policy_for("dppo"), lambda: WideActionReach(), ALGOS["dppo"][2], tmp_path / "e")
    assert WideActionReach.steps_taken == 0
    assert main(["finetune", "--algo", "dppo", "--checkpoint", str(tmp_path / "other"), "--task", card,
                 "--threads", "0"]) == 2
    assert "--threads: expected an integer >= 1, got 0" in capsys.readouterr().err
    # Bad overrides and an existing run without --resume.
    assert main(["finetune", "--algo", "dppo", "--checkpoint", str(tmp_path / "other"), "--task", card,
                 "nosuch=1"]) == 2
    assert "unknown config key 'nosuch'" in capsys.readouterr().err
    assert main(["finetune", "--algo", "dppo", "--checkpoint", str(tmp_path / "other"), "--task", card,
                 "lr=fast"]) == 2
    assert "config key 'lr': expected a finite number (float), got 'fast'" in capsys.readouterr().err


def test_subprocess_environments_give_the_same_run(tmp_path):
    module, _, config = ALGOS["dppo"]
    config = dataclasses.replace(config, env_steps=20, n_envs=2, eval_every=0, eval_episodes=2)  # one iteration
    inline = module.finetune(policy_for("dppo"), make_env, config, tmp_path / "sync", progress=False)
    spawned = module.finetune(policy_for("dppo"), make_env, dataclasses.replace(config, asynchronous=True),
                              tmp_path / "async", progress=False)
    assert spawned.history == inline.history


def test_resume_refuses_other_settings_but_takes_a_new_budget(tmp_path):
    module, _, config = ALGOS["flowppo"]
    config = dataclasses.replace(config, env_steps=60, eval_every=0, eval_episodes=2)  # one iteration
    module.finetune(policy_for("flowppo"), make_env, config, tmp_path / "run", progress=False)
    with pytest.raises(dppo.FinetuneError, match=r"already holds a fine-tuning run .* pass --resume"):
        module.finetune(policy_for("flowppo"), make_env, config, tmp_path / "run", progress=False)
    with pytest.raises(dppo.FinetuneError, match=r"other settings \(\['clip'\]\)"):
        module.finetune(policy_for("flowppo"), make_env, dataclasses.replace(config, clip=0.1), tmp_path / "run",
                        resume=True, progress=False)
    longer = module.finetune(policy_for("flowppo"), make_env, dataclasses.replace(config, env_steps=120),
                             tmp_path / "run", resume=True, progress=False)
    assert len(longer.history) == 1


@pytest.mark.parametrize("algo", list(ALGOS))
def test_critic_warmup_leaves_the_actor_untouched_then_hands_over(algo, tmp_path, monkeypatch):
    module, _, config = ALGOS[algo]
    config = dataclasses.replace(config, env_steps=150, eval_every=0, critic_warmup=1)  # two iterations
    live, states = {}, []

    def copy_of(net):
        return {k: v.clone() for k, v in net.state_dict().items()}

    def nets():  # the actor (the fine-tuned copy; flow PPO's noise network) and the critic
        actor = [live["policy"].finetuned_backbone] + ([live["noise"].std_fn] if live["noise"].std_fn else [])
        return [copy_of(net) for net in actor], copy_of(live["critic"])

    def recording_actor(policy, noise, generator):
        live.update(policy=policy, noise=noise)
        act = chain_ppo.chain_actor(policy, noise, generator)
        return lambda obs: (states.append(nets()), act(obs))[1]

    def recording_critic(policy):
        live["critic"] = Critic(policy)
        return live["critic"]

    monkeypatch.setattr(module, "chain_actor", recording_actor)
    monkeypatch.setattr(module, "Critic", recording_critic)
    module.finetune(policy_for(algo), make_env, config, tmp_path / "run", progress=False)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert len(states) == 12  # 6 chunks per iteration
    (start_actor, start_critic), (warm_actor, warm_critic) = states[0], states[6]
    end_actor, _ = nets()
    assert all(same(a, b) for a, b in zip(start_actor, warm_actor))  # iteration 1 left the actor alone
    assert not same(start_critic, warm_critic)  # while the critic learned
    assert all(not same(a, b) for a, b in zip(warm_actor, end_actor))  # iteration 2 updated every actor part


@pytest.mark.parametrize("algo", ["dppo", "flowppo"])
def test_target_kl_stops_an_iterations_updates_before_the_step_that_passes_it(algo, tmp_path):
    module, _, config = ALGOS[algo]
    config = dataclasses.replace(config, env_steps=150, eval_every=0, critic_warmup=1)  # two iterations
    full = module.finetune(policy_for(algo), make_env, config, tmp_path / "full", progress=False).history
    assert [row["updates"] for row in full] == [12, 12]  # 48 samples in 3 minibatches, 4 epochs
    # A target no minibatch reaches changes nothing: the same minibatches, the same updates.
    loose = module.finetune(policy_for(algo), make_env, dataclasses.replace(config, target_kl=1e9),
                            tmp_path / "loose", progress=False).history
    assert loose == full
    # A target any move passes: the critic's warm-up (the actor still, KL exactly 0) takes every
    # update; then the first update moves the actor and the second minibatch stops the iteration.
    tight = module.finetune(policy_for(algo), make_env, dataclasses.replace(config, target_kl=1e-12),
                            tmp_path / "tight", progress=False).history
    assert [row["updates"] for row in tight] == [12, 1]
    assert tight[0]["approx_kl"] == 0.0 and tight[1]["approx_kl"] > 1e-12


@pytest.mark.parametrize("value", [-0.1, float("nan"), True])
def test_target_kl_must_be_a_finite_number_at_least_zero(value):
    with pytest.raises(dppo.FinetuneError, match=r"'target_kl': expected a finite number >= 0 \(0: no early stop\)"):
        dppo.DPPOConfig(target_kl=value)


@pytest.mark.parametrize("key,value,expected", [
    ("std_floor", 0.0, r"'std_floor': expected a number > 0 or None, got 0.0"),
    ("std_floor", "0.1", r"'std_floor': expected a number > 0 or None, got '0.1'"),
    ("train_eta", 0.0, r"'train_eta': expected a number in \(0, 1\] or None, got 0.0"),
    ("train_eta", 1.5, r"'train_eta': expected a number in \(0, 1\] or None, got 1.5"),
    ("inference_steps", 0, r"'inference_steps': expected an integer >= 1 or None, got 0"),
    ("inference_steps", 2.5, r"'inference_steps': expected an integer >= 1 or None, got 2.5"),
])
def test_flow_ppos_chain_and_noise_settings_are_checked(key, value, expected):
    with pytest.raises(flow_ppo.FinetuneError, match=expected):
        flow_ppo.FlowPPOConfig(**{key: value})


def test_critic_warmup_is_a_count_of_iterations():
    with pytest.raises(dppo.FinetuneError, match=r"'critic_warmup': expected an integer >= 0, got -1"):
        dppo.DPPOConfig(critic_warmup=-1)


def test_patience_stops_the_run_and_the_best_evaluation_is_what_the_run_loads(tmp_path, monkeypatch):
    """Scored by (success, return): evaluations 1, 3, 2, 2.5 with patience 2
    stop the run after the fourth iteration; the run directory loads the second iteration's policy, the
    real steps of every evaluation are summed, and a run killed in between resumes to the same stop."""
    module, _, config = ALGOS["flowppo"]
    config = dataclasses.replace(config, env_steps=100_000, eval_every=1, patience=2)
    scripted = {1: 1.0, 2: 3.0, 3: 2.0, 4: 2.5, 5: 9.0}

    def scripted_evaluate(self, policy):
        return {"eval_success": 0.0, "eval_return": scripted[self.iteration], "eval_steps": 10}

    monkeypatch.setattr(Session, "evaluate", scripted_evaluate)
    result = module.finetune(policy_for("flowppo"), make_env, config, tmp_path / "straight", progress=False)
    assert [row["eval_return"] for row in result.history] == [1.0, 3.0, 2.0, 2.5]
    assert [row["eval_env_steps"] for row in result.history] == [10, 20, 30, 40]
    assert result.best.name == "step_00000002" and result.checkpoint.name == "step_00000004"
    assert resolve_policy_dir(tmp_path / "straight") == result.best / "policy"  # what `diffpolicy eval RUN` loads

    original_save = Session.save

    def save_then_die(self, *args, **kwargs):
        path = original_save(self, *args, **kwargs)
        if self.iteration == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Session, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        module.finetune(policy_for("flowppo"), make_env, config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(Session, "save", original_save)
    resumed = module.finetune(policy_for("flowppo"), make_env, config, tmp_path / "resumed", resume=True,
                              progress=False)
    assert resumed.history == result.history[3:] and resumed.best.name == "step_00000002"
    with pytest.raises(dppo.FinetuneError, match=r"'patience': expected an integer >= 0, got -1"):
        dataclasses.replace(config, patience=-1)


def test_evaluation_counts_the_environment_steps_of_its_episodes():
    """Standing still, an episode of the failing task lasts FAIL_STEPS steps where it starts left of
    x = 0 and MAX_STEPS otherwise; 7 seeds in batches of 3 (the last one padded)."""
    config = policy_for("flowppo").config
    seeds = range(100000, 100007)

    def stand_still(obs, generator=None):
        return torch.zeros(len(obs["pos"]), config.pred_horizon, config.action_dim)

    lengths = []
    for seed in seeds:
        obs, _ = make_failing_env().reset(seed=seed)
        lengths.append(FAIL_STEPS if obs["pos"][0] < 0 else MAX_STEPS)
    assert len(set(lengths)) == 2  # both kinds of episode are counted
    assert evaluate(stand_still, config, make_failing_env, seeds, 3)["eval_steps"] == sum(lengths)
