"""`chunk_latency_ms`: times whole chunks with the denoising steps it is given."""

import numpy as np
import pytest

from diffpolicy.evaluation.latency import chunk_latency_ms
from policy_helpers import DS, TO, make_policy


@pytest.mark.parametrize("steps, expected_calls_per_chunk", [(None, 8), (3, 3)])
def test_latency_runs_the_requested_denoising_steps(steps, expected_calls_per_chunk):
    policy = make_policy("flow")  # inference_steps = 8
    calls = []
    policy.backbone.register_forward_hook(lambda *_: calls.append(1))
    history = {"state": np.zeros((TO, DS), dtype=np.float32)}
    ms = chunk_latency_ms(policy, history, repeats=3, warmup=1, steps=steps)
    assert len(calls) == 4 * expected_calls_per_chunk
    assert ms > 0
