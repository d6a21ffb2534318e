"""EMA: DP's warm-up decay, the averaging recurrence, buffers, exact checkpoint resume."""

import io

import pytest
import torch
from torch import nn

from diffpolicy.nn import EMA, NNConfigError, NNInputError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))
        self.register_buffer("scale", torch.ones(4))


def perturb(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), model.scale]:
            tensor.add_(torch.randn(tensor.shape, generator=gen))
        model.count += 1


@pytest.mark.parametrize("step", [0, 1, 2, 3, 10, 100, 1000, 10**5, 10**8])
def test_decay_follows_dp_formula(step):
    ema = EMA(Net())
    s = max(0, step - 1)
    expected = 0.0 if s == 0 else min(1 - (1 + s) ** -0.75, 0.9999)
    assert ema.decay_at(step) == pytest.approx(expected, abs=1e-15)


def test_decay_clamps_and_offsets():
    ema = EMA(Net(), power=0.5, max_decay=0.9, min_decay=0.2, inv_gamma=2.0, update_after_step=5)
    assert ema.decay_at(3) == 0.0 and ema.decay_at(6) == 0.0
    assert ema.decay_at(7) == pytest.approx(0.2)  # 1 - (1 + 1/2)^-0.5 = 0.18 < min_decay
    assert ema.decay_at(15) == pytest.approx(1 - (1 + 9 / 2.0) ** -0.5)
    assert ema.decay_at(10**6) == 0.9
    assert EMA(Net()).decay_at(10**6) == 0.9999


def test_update_is_the_ema_recurrence_and_copies_the_rest():
    gen = torch.Generator().manual_seed(0)
    model = Net()
    ema = EMA(model)
    reference = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    reference["scale"] = model.scale.clone()
    for step in range(6):
        perturb(model, gen)
        ema.update(model)
        decay = ema.decay_at(step)
        assert ema.decay == decay and ema.step == step + 1
        current = {**dict(model.named_parameters()), "scale": model.scale}
        for name in reference:
            reference[name] = decay * reference[name] + (1 - decay) * current[name].detach()
    for name, value in reference.items():
        torch.testing.assert_close(ema.shadow[name], value, atol=1e-6, rtol=1e-6)
    assert ema.shadow["count"].item() == 6 and ema.shadow["count"].dtype == torch.long  # copied, not averaged
    assert torch.equal(ema.shadow["frozen"], model.frozen)  # requires_grad=False: copied
    assert not torch.allclose(ema.shadow["linear.weight"], model.linear.weight)  # averaged, lags behind


@pytest.mark.parametrize("start", [0, 1, 5, 400])
def test_update_of_several_steps_is_that_many_updates_with_the_same_weights(start):
    gen = torch.Generator().manual_seed(2)
    model = Net()
    one_by_one, folded = EMA(model), EMA(model)
    for _ in range(start):  # both at step `start` with the same shadow
        perturb(model, gen)
        one_by_one.update(model)
        folded.update(model)
    perturb(model, gen)
    for _ in range(4):
        one_by_one.update(model)
    folded.update(model, steps=4)
    product = 1.0
    for step in range(start, start + 4):
        product *= folded.decay_at(step)
    assert folded.step == one_by_one.step == start + 4 and folded.decay == pytest.approx(product, rel=1e-12)
    for name, tensor in one_by_one.shadow.items():
        torch.testing.assert_close(folded.shadow[name], tensor, atol=1e-6, rtol=1e-6)
    assert folded.shadow["count"].item() == model.count.item()


@pytest.mark.parametrize("steps", [0, -2, 1.5, True])
def test_update_refuses_a_step_count_that_is_not_a_positive_integer(steps):
    ema = EMA(Net())
    with pytest.raises(NNInputError, match=rf"steps must be an integer >= 1, got {steps!r}"):
        ema.update(Net(), steps=steps)
    assert ema.step == 0


def test_ema_of_constant_model_is_the_model_and_copy_to_writes_it():
    model = Net()
    ema = EMA(model)
    for _ in range(50):
        ema.update(model)
    target = Net()
    ema.copy_to(target)
    for (name, a), b in zip(model.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(1)
    model = Net()
    ema = EMA(model)
    for _ in range(7):
        perturb(model, gen)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMA(Net())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 7 and resumed.decay == ema.decay
    for _ in range(5):
        perturb(model, gen)
        ema.update(model)
        resumed.update(model)
    for name, tensor in ema.shadow.items():
        assert torch.equal(tensor, resumed.shadow[name]), name


def test_ema_errors():
    with pytest.raises(NNConfigError, match="min_decay <= max_decay"):
        EMA(Net(), min_decay=0.5, max_decay=0.4)
    ema = EMA(Net())
    with pytest.raises(NNInputError, match=r"missing \['count', 'frozen'.*unexpected \['bias', 'weight'\]"):
        ema.update(nn.Linear(3, 4))
    state = ema.state_dict()
    with pytest.raises(NNConfigError, match="saved hyperparameters"):
        EMA(Net(), power=2 / 3).load_state_dict(state)
    state["shadow"]["linear.weight"] = torch.zeros(5, 3)
    with pytest.raises(NNInputError, match=r"'linear.weight' has shape \(5, 3\), expected \(4, 3\)"):
        EMA(Net()).load_state_dict(state)
    with pytest.raises(NNInputError, match=r"missing entries \['step'\]"):
        EMA(Net()).load_state_dict({k: v for k, v in ema.state_dict().items() if k != "step"})
