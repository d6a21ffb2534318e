"""`diffpolicy eval`: closed-loop evaluation of a trained policy on held-out seeds.

    diffpolicy eval --checkpoint runs/pusht_diffusion                    # best checkpoint of a run
    diffpolicy eval --checkpoint runs/pusht_diffusion/checkpoints/step_00005000 --episodes 200 \
        --seed 100000 --videos 3 --out runs/pusht_diffusion/eval

`--checkpoint` is a run directory, a checkpoint directory or a `save_pretrained` directory. The
task is the one the checkpoint was trained on; `--task` checks it. Writes `summary.json`
(success rate with its 95 % Wilson interval, mean return / coverage / length), `episodes.json`
and `videos/*.mp4` of the first `--videos` episodes; the same seeds give the same results.
`--log mcap` also writes `rollouts/episode_<i>_seed_<seed>.mcap` for the first `--log-episodes`
episodes: every tick's observations, executed action, predicted chunks and reward, for Foxglove
(with `--videos`, the rendered frames of those episodes too; see `evaluation.rollout_log`).

    diffpolicy eval --checkpoint runs/pusht_mix --controller rtc --delay 3           # simulated delay
    diffpolicy eval --checkpoint runs/pusht_mix --controller streaming --wall-clock --episodes 2

`--controller MODE` runs the real-time controller's mode (`sync`, `ensemble`, `rtc`, `prefix`,
`streaming`, `warmstart`) with an inference delay of `--delay` ticks simulated deterministically
(RTC's protocol: the committed actions execute while the chunk is "being inferred"); the summary
then adds the controller's metrics (NFE per executed action, mean jerk, largest seam jump, queue
underruns). `--wall-clock` instead runs the controller's threads in real time, the environment
stepped at the robot profile's control rate (`--profile`, default: the task's name), behind its
safety filter.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from diffpolicy.control.acceleration import accelerate
from diffpolicy.control.errors import ProfileMissingError
from diffpolicy.control.execution import ControlSpec
from diffpolicy.control.modes import MODES, make_mode
from diffpolicy.control.profile import load_profile
from diffpolicy.envs.tasks import TaskCard, load_task, make_env
from diffpolicy.errors import ConfigError, InvalidValueError, UsageError
from diffpolicy.evaluation.rollout import Evaluation, evaluate, summarize
from diffpolicy.evaluation.rollout_log import McapRolloutLogger
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.nn.device import resolve_device
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir


class TaskMismatchError(InvalidValueError):
    """The checkpoint was trained on another task than the one asked for."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or save_pretrained directory")
    parser.add_argument("--task", default=None, help="expected task (default: the checkpoint's task)")
    parser.add_argument("--episodes", type=int, default=None, help="episodes (default: the card's eval.episodes)")
    parser.add_argument("--seed", type=int, default=None,
                        help="first seed; episodes use seed, seed+1, ... (default: the card's eval.seed_start)")
    parser.add_argument("--videos", type=int, default=0, help="write mp4 videos of the first K episodes")
    parser.add_argument("--out", default=None,
                        help="output directory (default: <checkpoint>/eval_seed<S>_n<N>, plus a part for each "
                             "setting passed below, e.g. _eta0 or _rtc_d3, so other settings do not overwrite it)")
    parser.add_argument("--n-envs", type=int, default=10,
                        help="environments stepped together (default 10; all episodes at once replan in one batch: "
                             "PushT's 100 episodes take a quarter of the time with --n-envs 100)")
    parser.add_argument("--inference-steps", type=int, default=None, help="denoising steps (default: the policy's)")
    parser.add_argument("--eta", type=float, default=None,
                        help="diffusion only: DDIM stochasticity in [0, 1], 1 = DDPM steps (default: the policy's)")
    parser.add_argument("--log", choices=["mcap"], default=None,
                        help="per-tick rollout logs: mcap (Foxglove) files in <out>/rollouts")
    parser.add_argument("--log-episodes", type=int, default=10, help="with --log: log the first K episodes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--controller", default=None, metavar="MODE",
                        help=f"controller mode, one of {', '.join(MODES)} (default: Diffusion Policy's loop)")
    parser.add_argument("--delay", type=int, default=0, help="simulated inference delay in ticks (with --controller)")
    parser.add_argument("--exec-horizon", type=int, default=None,
                        help="actions executed per chunk before the next inference (default: Ta)")
    parser.add_argument("--streaming-calls", type=int, default=None,
                        help="streaming: denoiser calls per inference (default: steps / rungs)")
    parser.add_argument("--warmstart-level", type=float, default=0.5, help="warmstart: renoising level t_start")
    parser.add_argument("--ensemble-decay", type=float, default=0.01, help="ensemble: ACT's m in exp(-m i)")
    parser.add_argument("--wall-clock", action="store_true",
                        help="real threads and real inference time instead of a simulated delay")
    parser.add_argument("--profile", default=None,
                        help="robot profile (name or YAML): its safety filter limits every command of the simulated "
                             "controller (default: none); --wall-clock always uses one (default: the task's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser call")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the denoiser call in CUDA graphs (CUDA only)")
    parser.add_argument("--bf16", action="store_true", help="run the denoiser under bf16 autocast")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load_policy_for_task(checkpoint: str | Path, task: str | None) -> tuple[ChunkPolicy, TaskCard, Path]:
    """Load the policy `checkpoint` names and the card of its task, checking `task` when given."""
    policy_dir = resolve_policy_dir(checkpoint)
    policy = ChunkPolicy.from_pretrained(policy_dir)
    trained_on = policy.metadata.get("task")
    if trained_on is None and task is None:
        raise TaskMismatchError(f"{policy_dir / 'config.json'} names no task in its metadata; pass --task")
    if task is not None and trained_on is not None and load_task(task).name != trained_on:
        raise TaskMismatchError(f"checkpoint {policy_dir} was trained on task {trained_on!r}, not {task!r}; "
                                f"pass a checkpoint of {task!r} or --task {trained_on}")
    card = load_task(task if task is not None else trained_on)
    cfg = policy.config
    if cfg.action_dim != card.action_dim or dict(cfg.obs_shapes) != card.obs_shapes:
        raise TaskMismatchError(
            f"checkpoint {policy_dir} expects observations {dict(cfg.obs_shapes)} and {cfg.action_dim}-D actions; "
            f"task {card.name!r} ({card.source}) has {card.obs_shapes} and {card.action_dim}-D actions")
    return policy, card, policy_dir


def mode_from_args(args: argparse.Namespace, card: TaskCard | None = None):
    """The controller mode `--controller` names, with its options (warm-start binary dims from the
    robot profile of the task when there is one)."""
    options = {"streaming": {"calls": args.streaming_calls}, "ensemble": {"decay": args.ensemble_decay},
               "warmstart": {"level": args.warmstart_level}}.get(args.controller, {})
    if args.controller == "warmstart" and card is not None:
        try:
            options["binary_dims"] = load_profile(args.profile or card.name).binary_dims
        except ProfileMissingError:
            pass
    return make_mode(args.controller, **options)


def control_spec(args: argparse.Namespace, card: TaskCard) -> ControlSpec | None:
    """`--controller / --delay / --exec-horizon` as a `ControlSpec` (None: Diffusion Policy's loop)."""
    if args.controller is None:
        if args.delay != 0 or args.exec_horizon is not None or args.profile is not None:
            raise UsageError("--delay, --exec-horizon and --profile need --controller MODE")
        return None
    profile = None if args.profile is None else load_profile(args.profile)
    return ControlSpec(mode_from_args(args, card), args.delay, args.exec_horizon, profile)


def evaluate_wall_clock(policy: ChunkPolicy, card: TaskCard, args: argparse.Namespace, episodes: int, seed: int,
                        out: Path) -> Evaluation:
    """`--wall-clock`: the controller's threads in real time (see `evaluation.wall_clock`); the
    summary records `settings_of(args, policy)`."""
    if args.controller is None:
        raise UsageError("--wall-clock needs --controller MODE")
    if args.delay != 0:
        raise UsageError("--wall-clock measures the delay; do not pass --delay")
    from diffpolicy.evaluation.wall_clock import run_wall_clock

    profile = load_profile(args.profile or card.name)
    seeds = list(range(seed, seed + episodes))
    results = run_wall_clock(policy, functools.partial(make_env, card), seeds, mode_from_args(args, card), profile,
                             horizon=args.exec_horizon)
    summary = summarize(results)
    summary["control"]["delays"] = sorted({d for r in results for d in (r.control.delays or [])})
    summary["settings"] = settings_of(args, policy)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "episodes.json", json.dumps([r.to_dict() for r in results], indent=1))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return Evaluation(summary=summary, episodes=results, videos=[])


def settings_of(args: argparse.Namespace, policy: ChunkPolicy) -> dict[str, Any]:
    """What decides an evaluation's episodes besides its seeds: the sampler the policy ran with
    (after --inference-steps / --eta), the environments stepped together (the batch a stochastic
    sampler draws its noise for) and the control loop; written into the summary."""
    process = policy.config.process
    settings: dict[str, Any] = {"inference_steps": policy.config.inference_steps,
                                "n_envs": None if args.wall_clock else args.n_envs}  # wall clock: one at a time
    if process.type == "diffusion":
        settings["eta"] = process.eta
    if args.controller is not None:
        settings.update(controller=args.controller, delay=None if args.wall_clock else args.delay,
                        exec_horizon=args.exec_horizon, profile=args.profile, wall_clock=args.wall_clock)
    return settings


def default_out(policy_dir: Path, seed: int, episodes: int, args: argparse.Namespace) -> Path:
    """`<checkpoint>/eval_seed<S>_n<N>`, plus a part for each setting passed on the command line
    (`_steps<K>`, `_eta<e>`, `_<controller>_d<delay>` or `_<controller>_wallclock`, `_ta<h>`,
    `_profile-<name>`): one checkpoint evaluated under other settings keeps each result."""
    parts = [f"eval_seed{seed}_n{episodes}"]
    if args.inference_steps is not None:
        parts.append(f"steps{args.inference_steps}")
    if args.eta is not None:
        parts.append(f"eta{args.eta:g}")
    if args.controller is not None:
        parts.append(f"{args.controller}_" + ("wallclock" if args.wall_clock else f"d{args.delay}"))
    if args.exec_horizon is not None:
        parts.append(f"ta{args.exec_horizon}")
    if args.profile is not None:
        parts.append(f"profile-{Path(args.profile).stem}")
    return policy_dir.parent / "_".join(parts)


def run(args: argparse.Namespace) -> int:
    for name in ("episodes", "n_envs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.videos < 0:
        raise UsageError(f"--videos must be >= 0, got {args.videos}")
    if args.log_episodes < 1:
        raise UsageError(f"--log-episodes must be >= 1, got {args.log_episodes}")
    policy, card, policy_dir = load_policy_for_task(args.checkpoint, args.task)
    try:
        policy.set_sampling(inference_steps=args.inference_steps, eta=args.eta)
    except ConfigError as err:
        raise UsageError(f"--inference-steps / --eta: {err}") from None
    episodes = args.episodes if args.episodes is not None else int(card.eval["episodes"])
    seed = args.seed if args.seed is not None else int(card.eval["seed_start"])
    out = Path(args.out) if args.out else default_out(policy_dir, seed, episodes, args)
    try:
        device = resolve_device(args.device)
    except InvalidValueError as err:
        raise UsageError(f"--device: {err}") from None
    policy = accelerate(policy.to(device), compile=args.compile, cuda_graphs=args.cuda_graphs, bf16=args.bf16)
    if args.wall_clock:
        if args.log is not None:
            raise UsageError("--log records the simulated rollouts; it cannot be combined with --wall-clock")
        result = evaluate_wall_clock(policy, card, args, episodes, seed, out)
    else:
        logger = McapRolloutLogger(out / "rollouts", episodes=args.log_episodes) if args.log == "mcap" else None
        try:
            result = evaluate(policy, card, episodes=episodes, seed_start=seed, n_envs=args.n_envs,
                              videos=min(args.videos, episodes), out_dir=out, device=device,
                              progress=not args.no_progress, logger=logger, control=control_spec(args, card),
                              settings=settings_of(args, policy))
        finally:
            if logger is not None:
                logger.close()
    summary = result.summary
    print(json.dumps({"checkpoint": str(policy_dir), "task": card.name, **summary}, indent=1))
    print(f"success rate {summary['success_rate']['rate']:.3f} "
          f"[{summary['success_rate']['ci95_low']:.3f}, {summary['success_rate']['ci95_high']:.3f}] "
          f"over {summary['episodes']} episodes (seeds {summary['seeds']}); results in {out}")
    if "control" in summary:
        c = summary["control"]
        print(f"controller {args.controller}" + ("" if args.wall_clock else f" at delay {args.delay}") +
              f": {c['nfe_per_action']:.3f} denoiser calls per executed action, mean jerk {c['mean_jerk']:.2f}, "
              f"largest seam jump {c['max_seam_jump']:.2f}, {c['underruns']} queue underruns"
              + (f", {c['limited_commands']} commands limited by the safety filter" if args.profile else ""))
    return 0

