"""Closed-loop evaluation of chunk policies: vectorized rollouts on fixed seeds, success rate with
its 95 % Wilson interval, rollout videos, and a short Markdown report."""

from diffpolicy.evaluation.rollout import (
           EpisodeResult,
           Evaluation,
           evaluate,
           rollout,
           score_policy,
           summarize,
)
from diffpolicy.evaluation.stats import SuccessRate, success_rate, wilson_interval

__all__ = ["EpisodeResult", "Evaluation", "SuccessRate", "evaluate", "rollout", "score_policy", "success_rate", "summarize",
           "wilson_interval"]
