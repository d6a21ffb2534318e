"""Imitation training of a chunk policy: one loop, readable top to bottom.

    train(config, run_dir, resume=False, scorer=None) -> TrainResult

Run directory:

    config.json        the resolved `TrainConfig`
    log.jsonl          training rows {"step", "loss", "lr"}, evaluation rows {"step", "eval/..."}
    tb/                tensorboard events
    checkpoints/       see `train.checkpoints` (EMA policy via `save_pretrained` + training state)

The recipe is Diffusion Policy's: AdamW, linear warm-up into a cosine decay, gradient clipping,
an EMA of the weights (evaluated and exported), bf16 autocast on GPUs (`train.bf16`, default) and
on CPUs with native bf16 matrix multiplies when asked (`train.cpu_bf16`). The normalizer is
fitted on the training split. Every `checkpoint_every` steps the EMA policy is scored in the
environment (`eval.episodes` > 0) by the `scorer` the caller passes (the commands pass rollouts of
`diffpolicy.evaluation`; training itself does not depend on evaluation) and a checkpoint is written;
the best `keep_top_k` by success rate (ties broken by mean coverage, or by mean return where the
task has no coverage) and the latest are kept.

Exact resume: the noise of each step comes from generators seeded by (seed, step, shard), the
data order from `DistributedSampler`'s (seed + epoch) permutation and the saved position inside
the epoch, and the checkpoint restores model, EMA, optimizer, scheduler and every RNG, so a run
resumed from a checkpoint continues bit-exactly (on CPU) as if it had never stopped.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.data.sequence_sampler import SequenceSampler, split_episodes
from diffpolicy.data.torch_dataset import WindowDataset
from diffpolicy.envs.tasks import TaskCard, load_task
from diffpolicy.errors import InvalidValueError, MissingFileError
from diffpolicy.fsutil import atomic_write_text, read_jsonl
from diffpolicy.nn.ema import EMA
from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig
from diffpolicy.policies.errors import ConfigError
from diffpolicy.train.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    flatten_optimizer_state,
    restore_rng_state,
    state_dict_tensors,
    unflatten_optimizer_state,
)
from diffpolicy.train.clipping import clip_gradients
from diffpolicy.train.config import EvalConfig, TrainConfig
from diffpolicy.train.distributed import (
    DistContext,
    ResumableDistributedSampler,
    all_reduce_mean,
    process_group,
)
from diffpolicy.train.precision import NATIVE_BF16_FLAGS, native_cpu_bf16
from diffpolicy.train.schedule import warmup_cosine

VAL_BATCHES = 4  # batches of the validation loss at each checkpoint


class DatasetMissingError(MissingFileError):
    """The task's dataset has not been collected (the message says which command makes it)."""


class DatasetMismatchError(InvalidValueError):
    """The dataset does not fit the task card (action dimension, observation keys or shapes)."""


class RunDirectoryError(InvalidValueError):
    """The run directory holds another run (resume it or choose another one)."""


@dataclass
class Learner:
    """What training updates and a checkpoint saves: the policy, its EMA (and the EMA copy that is
    evaluated and exported), the optimizer and the learning-rate schedule."""

    policy: ChunkPolicy
    ema: EMA
    ema_policy: ChunkPolicy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    latest: Path | None
    best: Path | None


# ----------------------------------------------------------------------------- data


def collect_command(card: TaskCard, path: Path) -> str:
    """The `diffpolicy collect` command that makes the dataset `path` for `card`."""
    default = Path(str(card.dataset["path"]))
    return f"diffpolicy collect --task {card.name}" + ("" if path == default else f" --out {path}")


def open_dataset(path: str | os.PathLike, card: TaskCard, image_cache_gb: float = 0.0) -> ReplayBuffer:
    """Open the demonstrations at `path` and check them against the task card; their image arrays
    are read into memory when they fit in `image_cache_gb` GiB (`ReplayBuffer.open`)."""
    path = Path(path)
    if not path.exists():
        raise DatasetMissingError(f"no dataset for task {card.name!r} at {path}; "
                                  f"make it with: {collect_command(card, path)}")
    buffer = ReplayBuffer.open(path, mode="r", cache_low_dim=True, image_cache_bytes=int(image_cache_gb * 2**30))
    check_store(buffer, card.obs_shapes, card.action_dim, f"dataset {path} (task card {card.source})", "the task",
                f"Recollect with: {collect_command(card, path)} --overwrite")
    return buffer


def check_store(buffer: ReplayBuffer, obs_shapes: dict[str, tuple[int, ...]], action_dim: int, where: str,
                expecter: str, remedy: str) -> None:
    """Raise `DatasetMismatchError` unless `buffer` holds episodes with every observation key of
    `obs_shapes` (per-step shapes) and actions `(action_dim,)`. Messages start with `where`, name
    what `expecter` ("the task", "the policy") expects, and end with `remedy`."""
    keys = buffer.keys()
    made_for = buffer.attrs.get("task")
    missing = [k for k in [*obs_shapes, "action"] if k not in keys]
    if missing:
        raise DatasetMismatchError(f"{where}: missing data key(s) {missing}; the store has {keys}. "
                                   f"Was it collected for another task ({made_for!r})? {remedy}")
    action_shape = tuple(buffer["action"].shape[1:])
    if action_shape != (action_dim,):
        raise DatasetMismatchError(f"{where}: actions have shape {list(action_shape)} per step, {expecter} expects "
                                   f"[{action_dim}]; the store was made for task {made_for!r}. {remedy}")
    for key, shape in obs_shapes.items():
        got = tuple(buffer[key].shape[1:])
        if got != tuple(shape):
            raise DatasetMismatchError(f"{where}: observation {key!r} has shape {list(got)} per step, {expecter} "
                                       f"expects {list(shape)}. {remedy}")
    if buffer.n_episodes == 0:
        raise DatasetMismatchError(f"{where}: the store holds no episodes. {remedy}")


def episode_masks(buffer: ReplayBuffer, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation episode masks `(E,)` (only the first `max_episodes` are used)."""
    n = buffer.n_episodes if config.data.max_episodes is None else min(buffer.n_episodes, config.data.max_episodes)
    val_fraction = config.data.val_fraction if n >= 2 else 0.0
    train, val = split_episodes(n, val_fraction, np.random.default_rng(config.data.split_seed))
    pad = np.zeros(buffer.n_episodes - n, dtype=bool)
    return np.concatenate([train, pad]), np.concatenate([val, pad])


def fit_normalizer(buffer: ReplayBuffer, train_mask: np.ndarray, config: TrainConfig) -> Normalizer:
    """Min-max statistics of the actions and low-dim observations of the training episodes."""
    ends = np.asarray(buffer.episode_ends)
    starts = np.concatenate([[0], ends[:-1]])
    rows = np.concatenate([np.arange(s, e) for s, e, m in zip(starts, ends, train_mask) if m])
    policy = config.policy
    data = {key: np.asarray(buffer[key])[rows] for key in ("action", *policy.low_dim_keys)}
    data.update({key: np.asarray(buffer[key][0:1]) for key in policy.image_keys})  # images: fixed scaling
    return Normalizer.fit(data, image_keys=policy.image_keys)


def window_dataset(buffer: ReplayBuffer, mask: np.ndarray | None, policy: PolicyConfig) -> WindowDataset:
    """The policy's training windows of the episodes in `mask` (None: all); `dataset[indices]` is one batch."""
    return WindowDataset(SequenceSampler(buffer, list(policy.obs_shapes), policy.obs_horizon, policy.pred_horizon,
                                          action_horizon=policy.action_horizon, episode_mask=mask))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch on `device`."""
    return {"obs": {k: v.to(device, non_blocking=True) for k, v in batch["obs"].items()},
            "action": batch["action"].to(device, torch.float32, non_blocking=True),
            "action_is_pad": batch["action_is_pad"].to(device, non_blocking=True)}


# ----------------------------------------------------------------------------- loss and schedule


TRAIN_STREAM, VALIDATION_STREAM = 0, 1


def shard_generator(seed: int, step: int, shard: int, stream: int = TRAIN_STREAM) -> torch.Generator:
    """The generator of one loss shard at one step (independent of the number of processes)."""
    state = np.random.SeedSequence([stream, seed, step, shard]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ShardedLoss(nn.Module):
    """`forward(batch, step) -> mean loss over this process's samples` (the module DDP wraps).

    Global batch position p belongs to shard `p % shards`; this process (rank r of W, holding
    positions r, r + W, r + 2W, ... as `DistributedSampler` hands them out) computes the loss of
    each of its shards with that shard's generator. With `shards` a multiple of W the noise of
    every sample is the same whatever W is.
    """

    def __init__(self, policy: ChunkPolicy, seed: int, shards: int, ctx: DistContext) -> None:
        super().__init__()
        self.policy = policy
        self.seed, self.shards, self.rank, self.world = seed, shards, ctx.rank, ctx.world_size

    def forward(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        size = batch["action"].shape[0]
        if self.shards == 1:
            return self.policy.compute_loss(batch, generator=shard_generator(self.seed, step, 0))
        shard_of_row = (self.rank + torch.arange(size) * self.world) % self.shards
        total = batch["action"].new_zeros(())
        for shard in torch.unique(shard_of_row).tolist():
            rows = torch.nonzero(shard_of_row == shard).squeeze(1).to(batch["action"].device)
            sub = {"obs": {k: v[rows] for k, v in batch["obs"].items()},
                   "action": batch["action"][rows], "action_is_pad": batch["action_is_pad"][rows]}
            loss = self.policy.compute_loss(sub, generator=shard_generator(self.seed, step, shard))
            total = total + loss * len(rows)
        return total / size


# ----------------------------------------------------------------------------- the loop


Scorer = Callable[[ChunkPolicy, TaskCard, EvalConfig, torch.device], Mapping[str, Any]]
"""scorer(policy, card, eval_config, device) -> an evaluation summary with `success_rate.rate`,
`mean_return`, `mean_length` and optionally `mean_coverage` (`evaluation.rollout.Evaluation.summary`)."""


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, card: TaskCard | None = None, scorer: Scorer | None = None) -> TrainResult:
    """Train `config` into `run_dir` (resuming the latest checkpoint there when `resume`).

    `card`: the task card of `config.task` when it is not one of `envs/` (a card given by path);
    by default `load_task(config.task)`. `scorer`: scores each checkpoint's EMA policy; required
    when `config.eval.episodes` > 0.
    """
    run_dir = Path(run_dir)
    card = load_task(config.task) if card is None else card
    if card.name != config.task:
        raise ConfigError(f"train: the config trains task {config.task!r} but the card given is {card.name!r} "
                          f"({card.source})")
    if config.eval.episodes > 0 and scorer is None:
        raise ConfigError(f"config key 'eval.episodes' is {config.eval.episodes}: scoring checkpoints needs a "
                          "scorer (e.g. diffpolicy.evaluation.rollout.score_policy); pass one or set eval.episodes=0")
    with process_group(config.train.device) as ctx:
        return _train(config, card, run_dir, resume, progress, ctx, scorer)


def _train(config: TrainConfig, card: TaskCard, run_dir: Path, resume: bool, progress: bool,
           ctx: DistContext, scorer: Scorer | None) -> TrainResult:
    tc = config.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    use_bf16 = tc.bf16 if ctx.device.type == "cuda" else tc.cpu_bf16 and ctx.device.type == "cpu"
    if use_bf16 and ctx.device.type == "cpu" and not native_cpu_bf16():
        raise ConfigError("train.cpu_bf16=true: this CPU has no native bf16 matrix multiply (neither of "
                          f"{', '.join(NATIVE_BF16_FLAGS)} in /proc/cpuinfo), so bf16 would be emulated and "
                          "run slower than float32; drop train.cpu_bf16")
    manager = CheckpointManager(run_dir / "checkpoints", keep_top_k=tc.keep_top_k, keep_all=tc.keep_all)
    latest = manager.latest() if (run_dir / "checkpoints").exists() else None
    if latest is not None and not resume:
        raise RunDirectoryError(f"{run_dir} already holds a run (latest checkpoint {latest.name}); "
                                f"pass --resume to continue it or choose another --out")

    # --- data: the card's dataset, split by episode; normalizer fitted on the training split
    buffer = open_dataset(config.data.path, card, config.data.image_cache_gb)
    train_mask, val_mask = episode_masks(buffer, config)
    dataset = window_dataset(buffer, train_mask, config.policy)
    val_dataset = window_dataset(buffer, val_mask, config.policy) if val_mask.any() else None
    shards = tc.loss_shards or ctx.world_size
    if shards % ctx.world_size or tc.batch_size % shards:
        raise ConfigError(f"train.loss_shards={shards} must be a multiple of the {ctx.world_size} processes and "
                         f"divide train.batch_size={tc.batch_size}")
    local_batch = tc.batch_size // ctx.world_size
    batches_per_epoch = len(dataset) // tc.batch_size
    if batches_per_epoch == 0:
        raise ConfigError(f"{config.data.path}: {len(dataset)} training windows, fewer than one batch "
                         f"(train.batch_size={tc.batch_size}); lower train.batch_size or collect more episodes")

    # --- model, EMA, optimizer, schedule (same seed on every process; DDP checks it)
    torch.manual_seed(tc.seed)
    policy = ChunkPolicy(config.policy, fit_normalizer(buffer, train_mask, config)).to(ctx.device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                  weight_decay=config.optim.weight_decay, fused=config.optim.fused)
    learner = Learner(
        policy=policy,
        ema=EMA(policy, power=tc.ema_power, max_decay=tc.ema_max_decay),
        ema_policy=copy.deepcopy(policy).eval(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.optim.warmup_steps, tc.steps)),
    )
    loss_module: nn.Module = ShardedLoss(policy, tc.seed, shards, ctx)
    if ctx.enabled:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    step, epoch, batch_in_epoch = 0, 0, 0
    if latest is not None:
        step, epoch, batch_in_epoch = restore_training_state(latest, learner)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")
        trim_log(run_dir / "log.jsonl", step)
    clock = TrainingClock.resumed(run_dir / "log.jsonl")
    writer = _tensorboard(run_dir / "tb", step) if ctx.is_main else None

    sampler = ResumableDistributedSampler(dataset, ctx, seed=tc.seed)
    loader = DataLoader(dataset, sampler=BatchSampler(sampler, local_batch, drop_last=True), batch_size=None,
                        num_workers=config.data.num_workers, pin_memory=ctx.device.type == "cuda",
                        generator=torch.Generator().manual_seed(tc.seed))

    def batches_from(epoch: int, start: int):
        sampler.set_position(epoch, start * local_batch)
        return iter(loader)

    batches = batches_from(epoch, batch_in_epoch)
    bar = tqdm(total=tc.steps, initial=step, desc=f"train {config.task} ({config.method})", unit="step",
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    loss_sum, loss_count, last = torch.zeros((), device=ctx.device), 0, None
    interval_start = clock.start_interval()
    policy.train()
    while step < tc.steps:
        if batch_in_epoch == batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            batches = batches_from(epoch, 0)
        batch = to_device(next(batches), ctx.device)
        batch_in_epoch += 1

        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_module(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip is not None:
            clip_gradients(policy.parameters(), config.optim.grad_clip)
        optimizer.step()
        learner.scheduler.step()
        step += 1
        at_checkpoint = step % tc.checkpoint_every == 0 or step == tc.steps
        if step % tc.ema_every == 0 or at_checkpoint:
            learner.ema.update(policy, steps=step - learner.ema.step)  # caught up at every checkpoint
        loss_sum += loss.detach()
        loss_count += 1
        bar.update(1)

        if step % tc.log_every == 0 or at_checkpoint:
            mean_loss = float(all_reduce_mean(loss_sum / loss_count, ctx))
            steps_per_s = loss_count / max(1e-9, clock.end_interval(interval_start))
            loss_sum.zero_()
            loss_count = 0
            if ctx.is_main:
                lr = learner.scheduler.get_last_lr()[0]
                log_row(run_dir, writer, {"step": step, "loss": mean_loss, "lr": lr, "steps_per_s": steps_per_s,
                                          "wall_s": clock.wall_s, "cpu_s": clock.cpu_s})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")

        if at_checkpoint:
            if ctx.is_main:
                bar.clear()
                last = checkpoint(run_dir, config, card, manager, (step, epoch, batch_in_epoch), learner,
                                  val_dataset, writer, ctx.device, scorer)
                bar.refresh()
            if ctx.enabled:
                torch.distributed.barrier()
            policy.train()
        if loss_count == 0:  # an interval was logged: time the next one from here (checkpoints excluded)
            interval_start = clock.start_interval()
    bar.close()
    if writer is not None:
        writer.close()
    best = manager.best() if ctx.is_main else None
    return TrainResult(run_dir=run_dir, step=step, latest=manager.latest() if ctx.is_main else last, best=best)


# ----------------------------------------------------------------------------- checkpoints and logs


def checkpoint(run_dir: Path, config: TrainConfig, card: TaskCard, manager: CheckpointManager,
               position: tuple[int, int, int], learner: Learner, val_dataset: WindowDataset | None, writer,
               device: torch.device, scorer: Scorer | None) -> Path:
    """Validation loss and evaluation of the EMA policy, then an atomic checkpoint (rank 0 only).

    `position` is `(step, epoch, batches done in the epoch)`.
    """
    step, epoch, batch_in_epoch = position
    rng_tensors, rng_meta = capture_rng_state()  # evaluation must not disturb the training RNGs
    ema_policy = learner.ema_policy
    learner.ema.copy_to(ema_policy)
    ema_policy.eval()
    row: dict[str, Any] = {"step": step}
    if val_dataset is not None:
        row["val_loss"] = validation_loss(ema_policy, val_dataset, config, device)
    score = None
    if config.eval.episodes > 0:
        summary = scorer(ema_policy, card, config.eval, device)
        rate = summary["success_rate"]["rate"]
        score = [rate, summary.get("mean_coverage", summary["mean_return"])]  # coverage breaks ties
        row.update({"eval/success_rate": rate, "eval/mean_return": summary["mean_return"],
                    "eval/mean_length": summary["mean_length"]})
        if "mean_coverage" in summary:
            row["eval/mean_coverage"] = summary["mean_coverage"]
    restore_rng_state(rng_tensors, rng_meta)
    if len(row) > 1:
        log_row(run_dir, writer, row)
    metadata = {"task": config.task, "method": config.method, "step": step, "score": score,
                "train_config": config.to_dict()}
    opt_tensors, opt_meta = flatten_optimizer_state(learner.optimizer.state_dict())
    ema_state = learner.ema.state_dict()
    rng_tensors, rng_meta = capture_rng_state()
    return manager.save(
        step,
        export=lambda directory: ema_policy.save_pretrained(directory, metadata=metadata),
        groups={"model": state_dict_tensors(learner.policy),
                "ema": {k: v.detach().cpu().contiguous() for k, v in ema_state["shadow"].items()},
                "optimizer": opt_tensors, "rng": rng_tensors},
        meta={"epoch": epoch, "batch_in_epoch": batch_in_epoch, "scheduler": learner.scheduler.state_dict(),
              "optimizer": opt_meta, "rng": rng_meta,
              "ema": {k: ema_state[k] for k in ("step", "decay", "hyperparameters")}},
        score=score,
    )


def restore_training_state(checkpoint_dir: Path, learner: Learner) -> tuple[int, int, int]:
    """Load a checkpoint's training state into `learner`; returns `(step, epoch, batch_in_epoch)`."""
    groups, meta = CheckpointManager.load_state(checkpoint_dir)
    device = next(learner.policy.parameters()).device
    learner.policy.load_state_dict({k: v.to(device) for k, v in groups["model"].items()}, strict=True)
    learner.ema.load_state_dict({**meta["ema"], "shadow": {k: v.to(device) for k, v in groups["ema"].items()}})
    learner.optimizer.load_state_dict(unflatten_optimizer_state(groups["optimizer"], meta["optimizer"]))
    learner.scheduler.load_state_dict(meta["scheduler"])
    restore_rng_state(groups["rng"], meta["rng"])
    return int(meta["step"]), int(meta["epoch"]), int(meta["batch_in_epoch"])


@torch.no_grad()
def validation_loss(policy: ChunkPolicy, dataset: WindowDataset, config: TrainConfig, device: torch.device) -> float:
    """Mean denoising loss on up to `VAL_BATCHES` validation batches, with fixed noise."""
    size = min(config.train.batch_size, len(dataset))
    losses = []
    for i in range(min(VAL_BATCHES, len(dataset) // size)):
        batch = to_device(dataset[list(range(i * size, (i + 1) * size))], device)
        losses.append(float(policy.compute_loss(batch, generator=shard_generator(config.train.seed, i, 0, VALIDATION_STREAM))))
    return float(np.mean(losses)) if losses else float("nan")


def _tensorboard(path: Path, step: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path), purge_step=step or None)


class TrainingClock:
    """Cumulative training time over a run's resumes: wall seconds and process CPU seconds (all
    threads) of the optimizer steps, checkpoints and their evaluations left out. Logged with every
    loss row as `wall_s` / `cpu_s`; a resumed run continues from the last logged row."""

    def __init__(self, wall_s: float = 0.0, cpu_s: float = 0.0) -> None:
        self.wall_s, self.cpu_s = wall_s, cpu_s

    @classmethod
    def resumed(cls, log_path: Path) -> TrainingClock:
        rows = [row for row in (read_jsonl(log_path) if log_path.is_file() else []) if "cpu_s" in row]
        return cls(rows[-1]["wall_s"], rows[-1]["cpu_s"]) if rows else cls()

    @staticmethod
    def start_interval() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def end_interval(self, start: tuple[float, float]) -> float:
        """Add the interval since `start` to the totals; returns its wall seconds."""
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        self.wall_s += wall
        self.cpu_s += cpu
        return wall


def log_row(run_dir: Path, writer, row: dict[str, Any]) -> None:
    """Append `row` to `log.jsonl` and tensorboard."""
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])
        writer.flush()


def trim_log(path: Path, step: int) -> None:
    """Drop log rows after `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
