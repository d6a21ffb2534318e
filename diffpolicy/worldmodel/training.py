"""Training a `LatentWorldModel` from transitions, resumably, with held-out error vs horizon.

    result = train_world_model(Transitions.load(["datasets/pusht_play.zarr"], keys), WorldModelConfig(),
                               "runs/wm_pusht", action_low, action_high)
    LatentWorldModel.load(resolve_world_model_dir("runs/wm_pusht"))

Each step draws one minibatch of windows per ensemble member (indices from a generator saved
with the run, so a resumed run repeats the uninterrupted one exactly) and takes one Adam step on
`LatentWorldModel.loss`. Every `eval_every` steps and at the end the held-out episodes are rolled
out (`heldout.heldout_errors`), the uncertainty reference is calibrated on them, and a checkpoint
is written (`checkpoints/step_*/model/` loads with `LatentWorldModel.load`; kept: the latest and
the one with the lowest held-out error at the training horizon). The run directory also holds
`curves.csv` (losses and held-out errors per evaluation), `report.json` (the latest held-out
report) and `error_vs_horizon.png`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from diffpolicy.config import check_float, check_int, fail, to_dict
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.policies.locate import INDEX_FILE, best_checkpoint
from diffpolicy.train.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    flatten_optimizer_state,
    restore_rng_state,
    state_dict_tensors,
    unflatten_optimizer_state,
)
from diffpolicy.train.clipping import clip_gradients
from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.heldout import heldout_errors, plot_errors
from diffpolicy.worldmodel.model import LatentWorldModel, ModelConfig

MODEL_DIR = "model"


@dataclass(frozen=True)
class TrainConfig:
    """steps: gradient steps; batch_size: windows per member per step; horizon K: steps each
    window is rolled out in the loss; lr, weight_decay, max_grad_norm: Adam(W); val_fraction:
    episodes held out; eval_every: steps between held-out evaluations and checkpoints;
    eval_horizon: how far the held-out error vs horizon is measured; uncertainty_quantile: the
    held-out disagreement quantile recorded as the model's reference uncertainty;
    success_fraction: the share of each minibatch drawn from the windows whose K steps hold a
    success (0: every window uniformly, as the data come; successes are rare where episodes end
    at success: 23 steps in 15,618 of PushT's play data); the model's success logit is shifted
    back to the data's rate (`success_rates`). On that PushT data it did not make the classifier
    find successes (docs/RESULTS.md): it cuts the variance of few positives, not their scarcity; seed."""

    steps: int = 5000
    batch_size: int = 128
    horizon: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 10.0
    val_fraction: float = 0.1
    eval_every: int = 1000
    eval_horizon: int = 32
    uncertainty_quantile: float = 0.99
    success_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "horizon", "eval_every", "eval_horizon"):
            check_int(f"train.{name}", getattr(self, name), 1)
        check_int("train.seed", self.seed, 0)
        check_float("train.lr", self.lr, 0, strictly=True)
        check_float("train.weight_decay", self.weight_decay, 0)
        check_float("train.max_grad_norm", self.max_grad_norm, 0, strictly=True)
        if not 0 < self.val_fraction < 1:
            raise fail("train.val_fraction", "a number in (0, 1)", self.val_fraction)
        if not 0 < self.uncertainty_quantile < 1:
            raise fail("train.uncertainty_quantile", "a number in (0, 1)", self.uncertainty_quantile)
        if not 0 <= self.success_fraction < 1:
            raise fail("train.success_fraction", "a number in [0, 1)", self.success_fraction)


@dataclass(frozen=True)
class WorldModelConfig:
    """`model`: the architecture (`ModelConfig`); `train`: the optimization (`TrainConfig`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class WorldModelRun:
    """The trained model (its latest state), the latest checkpoint, and the latest held-out report."""

    model: LatentWorldModel
    checkpoint: Path
    report: dict[str, Any]


def resolve_world_model_dir(path: str | os.PathLike) -> Path:
    """The model directory `path` names: a `model/` directory itself (`config.json`), a checkpoint
    (its `model/`), or a `diffpolicy worldmodel train` run (its best checkpoint's `model/`)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    if (path / "checkpoints" / INDEX_FILE).is_file():
        best = best_checkpoint(path / "checkpoints")
        if best is not None:
            return best / MODEL_DIR
    raise WorldModelError(f"no world model at {path}: expected a `diffpolicy worldmodel train --out` directory, "
                          f"one of its checkpoints, or a model directory (config.json + model.safetensors)")


def success_starts(data: Transitions, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window start i `(S,)`: the steps it holds (K, fewer near its episode's end) and the
    success steps among them; and the starts whose window holds a success `(P,)`."""
    start = np.arange(data.n_steps)
    end = np.minimum(start + horizon, data.episode_ends[data.episode_of(start)])
    cumulative = np.concatenate([[0], np.cumsum(data.success)])
    successes = cumulative[end] - cumulative[start]
    return end - start, successes, np.flatnonzero(successes)


def success_rates(data: Transitions, horizon: int, fraction: float) -> tuple[float, float]:
    """(rate, sampled rate): the share of success labels among the window steps the loss averages
    over, with windows drawn uniformly, and with `fraction` of them drawn from the windows that
    hold a success (`sample_batch`)."""
    steps, successes, positive = success_starts(data, horizon)
    uniform = successes.mean() / steps.mean()
    if not fraction or not len(positive):
        return float(uniform), float(uniform)
    labels = (1 - fraction) * successes.mean() + fraction * successes[positive].mean()
    return float(uniform), float(labels / ((1 - fraction) * steps.mean() + fraction * steps[positive].mean()))


def success_logit_offset(data: Transitions, horizon: int, fraction: float) -> float:
    """log-odds(rate) - log-odds(sampled rate) of `success_rates`: what turns a classifier fitted to
    the sampled windows into one calibrated to the data (prior shift; 0 when nothing is oversampled)."""
    rate, sampled = success_rates(data, horizon, fraction)
    if rate == sampled:
        return 0.0
    return math.log(rate / (1 - rate)) - math.log(sampled / (1 - sampled))


def sample_batch(data: Transitions, members: int, config: TrainConfig, history: int,
                 generator: torch.Generator, positive: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """One minibatch of `batch_size` windows per member, `(E, B, ...)` (indices from `generator`);
    with `config.success_fraction`, that share of each member's windows start at `positive`
    (`success_starts`)."""
    index = torch.randint(0, data.n_steps, (members, config.batch_size), generator=generator)
    n_positive = round(config.success_fraction * config.batch_size)
    if n_positive and positive is not None and len(positive):
        chosen = torch.randint(0, len(positive), (members, n_positive), generator=generator)
        index[:, :n_positive] = torch.as_tensor(positive)[chosen]
    windows = data.windows(index.reshape(-1).numpy(), history, config.horizon)
    return {k: torch.as_tensor(v).reshape(members, config.batch_size, *v.shape[1:]) for k, v in windows.items()}


def gradient_step(model: LatentWorldModel, optimizer: torch.optim.Optimizer, data: Transitions, config: TrainConfig,
                  generator: torch.Generator, positive: np.ndarray | None = None) -> dict[str, float]:
    """One Adam step of `model.loss` on a fresh minibatch (`sample_batch`); returns the loss terms."""
    model.train()
    batch = sample_batch(data, model.config.members, config, model.config.history, generator, positive)
    loss, terms = model.loss(batch)
    optimizer.zero_grad()
    loss.backward()
    clip_gradients(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return terms


def make_optimizer(model: LatentWorldModel, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def calibrate(model: LatentWorldModel, val: Transitions, config: TrainConfig,
              task_rule: Callable | None = None) -> dict[str, Any]:
    """Held-out report (`heldout_errors` up to `eval_horizon`, with the task's success rule where
    given); the model's reference uncertainty becomes its disagreement quantile per horizon."""
    model.eval()
    report = heldout_errors(model, val, config.eval_horizon, quantile=config.uncertainty_quantile, task_rule=task_rule)
    model.reference_uncertainty.copy_(torch.tensor(report["disagreement_quantile"]))
    return report


def train_world_model(data: Transitions, config: WorldModelConfig, run_dir: str | os.PathLike,
                      action_low: np.ndarray, action_high: np.ndarray, resume: bool = False, progress: bool = True,
                      metadata: dict[str, Any] | None = None, task_rule: Callable | None = None) -> WorldModelRun:
    """Train (or with `resume` continue) a world model on `data` into `run_dir`.

    action_low / action_high `(Da,)`: the task's action space (imagination clips to it).
    metadata: JSON values stored with the model (task name, data sources, ...).
    task_rule: the task's success rule on observations (`heldout_errors`); the held-out report and
    the curves then say how often the model predicts the data's successes (`rule_recall`), and the
    best checkpoint, the one a dream loads, is chosen by it (`checkpoint_score`).
    """
    run_dir = Path(run_dir)
    tc = config.train
    manager = CheckpointManager(run_dir / "checkpoints", keep_top_k=1, export_dir=MODEL_DIR)
    latest = manager.latest()
    if latest is not None and not resume:
        raise WorldModelError(f"{run_dir} already holds a world-model run (latest checkpoint {latest}); pass --resume "
                              "to continue it or choose another --out")
    if resume and latest is None:
        raise WorldModelError(f"--resume: {run_dir} holds no world-model checkpoint to continue")
    if data.n_episodes < 2:
        raise WorldModelError(f"train_world_model: {data.n_episodes} episode(s); at least 2 are needed (one held out)")
    train, val = data.split(tc.val_fraction, tc.seed)
    torch.manual_seed(tc.seed)
    positive = success_starts(train, tc.horizon)[2]
    if tc.success_fraction and not len(positive):
        raise WorldModelError(f"train.success_fraction={tc.success_fraction}: the {train.n_episodes} training episodes "
                              "hold no success to oversample; collect data with successes or set it to 0")
    model = LatentWorldModel(config.model, data.keys, data.dims, data.action.shape[1], action_low, action_high,
                             reference_horizon=tc.eval_horizon,
                             success_logit_offset=success_logit_offset(train, tc.horizon, tc.success_fraction))
    model.fit_normalization(train)
    summary = {"steps": data.n_steps, "episodes": data.n_episodes, "train_episodes": train.n_episodes,
               "successes": int(data.success.sum())}
    model.metadata = {**dict(metadata or {}), "data": summary, "train": to_dict(tc)}  # dream refreshes reuse "train"
    optimizer = make_optimizer(model, tc)
    generator = torch.Generator().manual_seed(tc.seed)
    step, rows = 0, []
    if resume:
        step, rows = _restore(latest, model, optimizer, generator, config, summary)
    bar = tqdm(total=tc.steps, initial=step, desc="worldmodel train", unit="step", disable=not progress,
               dynamic_ncols=True)
    report = json.loads((run_dir / "report.json").read_text()) if resume and (run_dir / "report.json").is_file() else {}
    try:
        while step < tc.steps:
            terms = gradient_step(model, optimizer, train, tc, generator, positive)
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
            if step % tc.eval_every == 0 or step == tc.steps:
                report = calibrate(model, val, tc, task_rule)
                k = min(tc.horizon, tc.eval_horizon) - 1
                rows.append({"step": step, **{f"loss_{n}": v for n, v in terms.items()},
                             "val_obs_rmse_1": report["obs_rmse"][0], f"val_obs_rmse_{k + 1}": report["obs_rmse"][k],
                             f"val_obs_rmse_{tc.eval_horizon}": report["obs_rmse"][-1],
                             "val_reward_mae_1": report["reward_mae"][0],
                             "val_success_recall": report["success_recall"],
                             "val_success_precision": report["success_precision"],
                             "val_disagreement_quantile_1": report["disagreement_quantile"][0],
                             **({"val_rule_recall": report["rule_recall"], "val_rule_precision": report["rule_precision"]}
                                if task_rule is not None else {})})
                _write_outputs(run_dir, rows, report)
                latest = _save(manager, step, model, optimizer, generator, config, summary, rows,
                               score=checkpoint_score(report, k))
                if progress:
                    bar.write(f"[worldmodel] step {step}: held-out RMSE h=1 {report['obs_rmse'][0]:.4f}, "
                              f"h={k + 1} {report['obs_rmse'][k]:.4f}, h={tc.eval_horizon} {report['obs_rmse'][-1]:.4f} "
                              f"(normalized); success recall {report['success_recall']:.2f}"
                              + (f", rule recall {report['rule_recall']:.2f}" if task_rule is not None else ""))
    finally:
        bar.close()
    return WorldModelRun(model.eval(), latest, report)


def checkpoint_score(report: dict[str, Any], k: int) -> float | None:
    """How good a checkpoint is by its held-out report: with the task's success rule, the F1 of
    the rule's verdicts on the predicted windows against the data's (accurate where the task is
    decided: on Can the lowest RMSE picked a model that predicted 27 % of the held-out successes,
    where a later one predicted 54 %, docs/RESULTS.md); else the negative RMSE at horizon k + 1."""
    if report.get("rule_positives"):
        recall, precision = report["rule_recall"], report["rule_precision"]
        return 2 * recall * precision / (recall + precision) if recall > 0 and np.isfinite(precision) else 0.0
    error = report["obs_rmse"][k]
    return -error if np.isfinite(error) else None


def _write_outputs(run_dir: Path, rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "curves.csv", out.getvalue())
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=1))
    plot_errors(report, run_dir / "error_vs_horizon.png")


def _save(manager: CheckpointManager, step: int, model: LatentWorldModel, optimizer: torch.optim.Optimizer,
          generator: torch.Generator, config: WorldModelConfig, summary: dict, rows: list, score: float) -> Path:
    tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    rng_tensors, rng_meta = capture_rng_state({"batches": generator})
    meta = {"config": to_dict(config), "data": summary, "rows": rows, "optimizer": opt_meta, "rng": rng_meta}
    return manager.save(step, export=model.save, groups={"model": state_dict_tensors(model), "optimizer": tensors,
                                                         "rng": rng_tensors}, meta=meta, score=score)


def _restore(latest: Path, model: LatentWorldModel, optimizer: torch.optim.Optimizer, generator: torch.Generator,
             config: WorldModelConfig, summary: dict) -> tuple[int, list]:
    groups, meta = CheckpointManager.load_state(latest)
    saved, now = meta["config"], to_dict(config)
    changed = sorted(f"{section}.{key}" for section in now for key in now[section]
                     if (section, key) != ("train", "steps") and saved[section].get(key) != now[section][key])
    if changed:
        raise WorldModelError(f"{latest}: the run was started with other settings ({changed}); resume with the same "
                              "ones (only train.steps, the budget, may change)")
    if meta["data"] != summary:
        raise WorldModelError(f"{latest}: the run was trained on other data ({meta['data']}), not {summary}")
    model.load_state_dict(groups["model"], strict=True)
    optimizer.load_state_dict(unflatten_optimizer_state(groups["optimizer"], meta["optimizer"]))
    restore_rng_state(groups["rng"], meta["rng"], {"batches": generator})
    return int(meta["step"]), list(meta["rows"])
