"""The bimodal demo: chunk policies keep both modes in the data's proportions; a regressor averages
them into the obstacle."""

import numpy as np
import pytest

from diffpolicy.cli import main
from diffpolicy.commands.demo import (
    DETOUR,
    classify,
    demo_policy_config,
    make_bimodal_data,
    policy_predict,
    regressor_predict,
    train_chunk_policy,
    train_regressor,
)

P_LEFT, HORIZON, STEPS = 0.3, 8, 1000


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    data = make_bimodal_data(2000, P_LEFT, HORIZON, rng)
    start = make_bimodal_data(1000, P_LEFT, HORIZON, rng).start
    return data, start


def test_classify_demonstrations_and_the_straight_line(task):
    data, start = task
    stats = classify(data.start, data.chunks)
    assert np.array_equal(stats["left"], data.left)
    assert np.array_equal(stats["right"], ~data.left)
    assert not stats["between"].any() and not stats["collide"].any()
    assert abs(data.left.mean() - P_LEFT) < 0.03
    u = np.arange(1, HORIZON + 1) / HORIZON
    straight = start[:, None, :] + u[None, :, None] * (np.array([0.0, 1.0]) - start)[:, None, :]
    stats = classify(start, straight.astype(np.float32))
    assert stats["between"].all() and stats["collide"].all()
    shifted = straight.copy()
    shifted[..., 0] -= DETOUR * np.sin(np.pi * u)
    assert classify(start, shifted)["left"].all() and not classify(start, shifted)["collide"].any()


@pytest.mark.parametrize("process", ["diffusion", "flow"])
def test_chunk_policy_samples_both_modes_in_the_data_proportions(task, process):
    data, start = task
    # diffusion predicts x0 here: it learns the modes in half the steps of epsilon (the demo's default)
    config = demo_policy_config(process, HORIZON, prediction="sample")
    policy = train_chunk_policy(config, data, STEPS, seed=0)
    stats = classify(start, policy_predict(policy, start, seed=1))
    # 1000 samples: a collapsed policy gives 0 or 1, a uniform mixture 0.5; the data has 0.29
    assert abs(stats["left"].mean() - data.left.mean()) < 0.1, stats["left"].mean()
    assert stats["right"].mean() > 0.55
    assert stats["between"].mean() < 0.05 and stats["collide"].mean() < 0.05


def test_regressor_collapses_between_the_modes(task):
    data, start = task
    model, normalizer = train_regressor(data, HORIZON, STEPS, seed=0)
    stats = classify(start, regressor_predict(model, normalizer, start))
    assert stats["between"].mean() > 0.95
    assert stats["left"].mean() == 0.0
    assert stats["collide"].mean() > 0.5


def test_demo_command_prints_the_table(capsys):
    code = main(["demo", "--demos", "200", "--steps", "3", "--samples", "20", "--threads", "1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["model", "left", "right", "between", "collide", "train", "s"]
    labels = [line[:34].strip() for line in lines[2:]]
    assert labels == ["demonstrations", "diffusion (DDPM, 20 steps)", "flow matching (Euler, 10 steps)",
                      "MSE regressor"]
    for line in lines[2:]:
        left, right, between, collide = (float(x) for x in line[34:].split()[:4])
        assert abs(left + right + between - 1.0) < 1e-6 and 0.0 <= collide <= 1.0
