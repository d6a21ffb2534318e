"""Held-out quality of a world model: prediction error vs horizon, ensemble disagreement vs
horizon, reward error and success-classifier quality, and the calibration of the uncertainty
cut-off that dreams use.

Every window starts from real observations at a held-out step and is rolled out open-loop in the
latent with the actions the data executed; the prediction at horizon k is the members' mean.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.model import LatentWorldModel


@torch.no_grad()
def heldout_errors(model: LatentWorldModel, data: Transitions, horizon: int, max_windows: int = 2048,
                   quantile: float = 0.99, task_rule: Callable | None = None) -> dict:
    """Roll every held-out window (at most `max_windows`, evenly spaced steps) `horizon` steps.

    Returns a JSON-able report: `horizon` [1..K]; per horizon `obs_rmse` (normalized units, the
    members' mean vs the data), `key_rmse` {key: [...]} (data units), `disagreement_median` and
    `disagreement_quantile` (at `quantile`), `reward_mae` (data units); pooled over horizons
    `success_accuracy`, `success_precision`, `success_recall` (mean member probability > 0.5),
    `success_positives`; `windows`. With `task_rule` (the task's success rule on observations,
    `{key: (N, d)} -> (reward, success (N,) bool)`, what a dream with `dream.task_reward` pays), per
    window: does the rule hold on the data within the K steps, and on the members' mean prediction:
    `rule_recall` (of the windows where the data succeeds, the share the prediction succeeds in
    too), `rule_precision`, `rule_positives`. Where episodes end at success, this is the model's
    accuracy where the task is decided: the last K steps before each success.
    """
    if data.n_steps == 0:
        raise WorldModelError("heldout_errors: no held-out steps (raise val_fraction or give more episodes)")
    index = np.unique(np.linspace(0, data.n_steps - 1, min(max_windows, data.n_steps)).round().astype(np.int64))
    batch = {k: torch.as_tensor(v) for k, v in data.windows(index, model.config.history, horizon).items()}
    latent = model.encode(batch["obs_history"])
    target = model.normalize_obs(batch["next_obs"])
    slices = model.obs_slices
    report: dict = {"horizon": list(range(1, horizon + 1)), "obs_rmse": [], "key_rmse": {k: [] for k in model.obs_keys},
                    "disagreement_median": [], "disagreement_quantile": [], "reward_mae": []}
    predicted, labels = [], []
    rule_data, rule_predicted = np.zeros(len(index), bool), np.zeros(len(index), bool)
    for k in range(horizon):
        pred = model.step(latent, batch["action"][:, k])
        latent = pred.latent
        obs_ok, step_ok = batch["obs_mask"][:, k], batch["step_mask"][:, k]
        mean = pred.obs.mean(0)
        spread = model.disagreement(pred.obs)[obs_ok]
        report["obs_rmse"].append(_rms((mean - target[:, k])[obs_ok]))
        predicted_obs = model.unnormalize_obs(mean)
        raw_error = (predicted_obs - batch["next_obs"][:, k])[obs_ok]
        for key, part in slices.items():
            report["key_rmse"][key].append(_rms(raw_error[:, part]))
        report["disagreement_median"].append(float(spread.median()) if len(spread) else float("nan"))
        report["disagreement_quantile"].append(float(torch.quantile(spread, quantile)) if len(spread) else float("nan"))
        report["reward_mae"].append(float((pred.reward.mean(0) - batch["reward"][:, k])[step_ok].abs().mean())
                                    if step_ok.any() else float("nan"))
        predicted.append((torch.sigmoid(pred.success_logit).mean(0) > 0.5)[step_ok])
        labels.append(batch["success"][:, k][step_ok])
        if task_rule is not None:
            rule_data |= _rule_success(task_rule, slices, batch["next_obs"][:, k]) & obs_ok.numpy()
            rule_predicted |= _rule_success(task_rule, slices, predicted_obs) & obs_ok.numpy()
    predicted, labels = torch.cat(predicted), torch.cat(labels)
    hits = int((predicted & labels).sum())
    report.update({
        "success_accuracy": float((predicted == labels).float().mean()),
        "success_precision": hits / int(predicted.sum()) if predicted.any() else float("nan"),
        "success_recall": hits / int(labels.sum()) if labels.any() else float("nan"),
        "success_positives": int(labels.sum()), "windows": int(len(index)), "quantile": quantile,
    })
    if task_rule is not None:
        hits = int((rule_data & rule_predicted).sum())
        report.update({"rule_recall": hits / int(rule_data.sum()) if rule_data.any() else float("nan"),
                       "rule_precision": hits / int(rule_predicted.sum()) if rule_predicted.any() else float("nan"),
                       "rule_positives": int(rule_data.sum())})
    return report


def _rule_success(task_rule: Callable, slices: dict[str, slice], obs: torch.Tensor) -> np.ndarray:
    """`(N,)` bool: the task's rule on flat observations `(N, sum(obs_dims))` (data units), split by key."""
    flat = obs.numpy()
    return np.asarray(task_rule({key: flat[:, part] for key, part in slices.items()})[1], dtype=bool).reshape(len(flat))


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt()) if x.numel() else float("nan")


def plot_errors(report: dict, path) -> None:
    """`error_vs_horizon.png`: normalized RMSE and disagreement vs horizon (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(report["horizon"], report["obs_rmse"], marker="o", label="prediction RMSE (held out)")
    ax.plot(report["horizon"], report["disagreement_median"], linestyle="--", label="ensemble disagreement (median)")
    ax.set_xlabel("horizon (environment steps, open loop)")
    ax.set_ylabel("normalized units")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
