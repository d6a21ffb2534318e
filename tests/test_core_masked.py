"""MaskedDiffusion: exact forward marginals, the loss and the likelihood bound against
torch.distributions, exact confidence-ordered unmasking through the shared sampler, bad input."""

import math

import pytest
import torch
from torch.distributions import Categorical

from diffpolicy.core import CoreConfigError, CoreInputError, MaskedDiffusion, PrefixInpainting, sample
from diffpolicy.core.masked import standard_normal_cdf

V, L = 5, 12


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_tokens(batch, length, seed=0):
    return torch.randint(0, V, (batch, length), generator=gen(seed))


def fixed_logits_denoiser(logits):
    """A context-free model: the same logits `(L, V + 1)` whatever x_t and t."""
    def denoiser(x_t, t, cond):
        return logits.expand(x_t.shape[0], -1, -1)
    return denoiser


def test_marginals_are_exact_and_corrupt_draws_them():
    process = MaskedDiffusion(V)
    x0 = process.encode(random_tokens(3, L))
    t = torch.rand(3, L, generator=gen(1))
    marginal = process.marginal(x0, t)
    expected = (1 - t).unsqueeze(-1) * x0
    expected[..., V] += t
    assert torch.equal(marginal, expected)
    assert torch.allclose(marginal.sum(-1), torch.ones(3, L))
    # corrupt masks exactly the tokens whose uniform Phi(noise) falls below t, and keeps the rest
    noise = torch.randn(x0.shape, generator=gen(2))
    x_t = process.corrupt(x0, t, noise)
    masked = standard_normal_cdf(noise[..., 0]) < t
    assert torch.equal(process.is_masked(x_t), masked)
    assert torch.equal(x_t[~masked], x0[~masked])
    # and the masking frequency is t (200000 draws at t = 0.3: standard error 0.001)
    big = process.encode(random_tokens(20000, 10, seed=3))
    level = torch.full((20000, 10), 0.3)
    frac = process.is_masked(process.corrupt(big, level, torch.randn(big.shape, generator=gen(4)))).float().mean()
    assert abs(float(frac) - 0.3) < 0.005


def test_per_token_nll_is_the_weighted_categorical_log_likelihood():
    process = MaskedDiffusion(V)
    x0_ids = random_tokens(4, L)
    x0 = process.encode(x0_ids)
    t = torch.rand(4, L, generator=gen(1)) * 0.9 + 0.05
    x_t = process.corrupt(x0, t, torch.randn(x0.shape, generator=gen(2)))
    out = torch.randn(4, L, V + 1, generator=gen(3))
    nll = process.per_token_nll(out, x0, x_t, t)
    expected = -Categorical(logits=out[..., :V]).log_prob(x0_ids) / t
    masked = process.is_masked(x_t)
    assert torch.allclose(nll[masked], expected[masked], atol=1e-5)
    assert torch.equal(nll[~masked], torch.zeros_like(nll[~masked]))


def test_corrupt_count_masks_exactly_count_tokens_at_uniform_positions():
    process = MaskedDiffusion(V)
    x0 = process.encode(random_tokens(6, L))
    count = torch.tensor([0, 1, 5, 7, 11, 12])
    noise = torch.randn(x0.shape, generator=gen(2))
    x_t = process.corrupt_count(x0, count, noise)
    masked = process.is_masked(x_t)
    assert masked.sum(1).tolist() == count.tolist()
    assert torch.equal(x_t[~masked], x0[~masked])
    for row in range(6):  # the masked tokens are those of smallest noise
        smallest = set(noise[row, :, 0].argsort()[: int(count[row])].tolist())
        assert set(torch.nonzero(masked[row]).squeeze(1).tolist()) == smallest
    # every position equally likely: 3 of 12 masked in 30000 rows -> frequency 0.25 each (s.e. 0.0025)
    many = process.encode(random_tokens(30000, L, seed=5))
    frequency = process.is_masked(process.corrupt_count(many, torch.full((30000,), 3),
                                                        torch.randn(many.shape, generator=gen(6)))).float().mean(0)
    assert float((frequency - 0.25).abs().max()) < 0.012


def test_the_count_form_has_the_expectation_of_the_continuous_bound():
    """Exactly, by enumerating every mask pattern S of a short sequence under a context-dependent
    model: the continuous bound is sum_S B(|S|, L - |S| + 1) sum_{i in S} nll_i(S), the count form
    (m ~ U{1..L}, level m / L, `per_token_nll` summed over the sequence) is
    sum_m (1 / L) (1 / C(L, m)) sum_{|S| = m} (L / m) sum_{i in S} nll_i(S); they are equal."""
    length = 4
    process = MaskedDiffusion(V)
    torch.manual_seed(0)
    mixer = torch.nn.Linear(length * (V + 1), length * (V + 1))  # every output sees every input token

    def denoiser(x_t, t, cond):
        return mixer(x_t.flatten(1)).view_as(x_t)

    x0 = process.encode(random_tokens(1, length))
    continuous, count_form = 0.0, 0.0
    for pattern in range(1, 2 ** length):
        masked = torch.tensor([[bool(pattern >> i & 1) for i in range(length)]])
        m = int(masked.sum())
        x_t = torch.where(masked.unsqueeze(-1), process.all_masked(1, length), x0)
        ones = torch.ones(1, length)  # level 1: per_token_nll = the plain -log p on masked tokens
        with torch.no_grad():
            nll = float(process.per_token_nll(denoiser(x_t, ones, None), x0, x_t, ones).sum())
            level = torch.full((1, length), m / length)
            weighted = float(process.per_token_nll(denoiser(x_t, level, None), x0, x_t, level).sum())
        continuous += math.gamma(m) * math.gamma(length - m + 1) / math.gamma(length + 1) * nll
        count_form += weighted / (length * math.comb(length, m))
    assert count_form == pytest.approx(continuous, rel=1e-6)
    # and log_likelihood_bound's continuous estimate (the count form) has that expectation
    with torch.no_grad():
        draws = process.log_likelihood_bound(denoiser, x0.expand(20000, -1, -1).contiguous(), generator=gen(7))
    assert abs(float(draws.mean()) - continuous) < 4 * float(draws.std()) / math.sqrt(20000)


@pytest.mark.parametrize("steps", [None, 1, 4])
def test_likelihood_bound_is_exact_for_independent_tokens(steps):
    """With the true per-position distribution as the model, the bound's expectation is -log p(x0)
    for every step count (E[masked / t] = 1 and sum_k (1/k)(k/K) = 1)."""
    process = MaskedDiffusion(V)
    logits = torch.randn(L, V + 1, generator=gen(0))
    x0_ids = Categorical(logits=logits[:, :V]).sample((1,))  # (1, L)
    exact = -Categorical(logits=logits[:, :V]).log_prob(x0_ids).sum()
    x0 = process.encode(x0_ids.expand(4000, L).contiguous())
    bound = process.log_likelihood_bound(fixed_logits_denoiser(logits), x0, steps=steps, generator=gen(1))
    assert bound.shape == (4000,)
    if steps == 1:  # everything masked at t = 1: no randomness at all
        assert torch.allclose(bound, exact.expand(4000), atol=1e-4)
    stderr = float(bound.std()) / math.sqrt(4000)
    assert abs(float(bound.mean()) - float(exact)) < 4 * stderr + 1e-4


@pytest.mark.parametrize("steps", [1, 3, 5, 12])
def test_confidence_ordered_unmasking_is_exact_through_the_shared_sampler(steps):
    process = MaskedDiffusion(V)
    logits = torch.randn(L, V + 1, generator=gen(0)) * 3
    confidence = logits[:, :V].log_softmax(-1).max(-1).values  # (L,)
    x_init = process.all_masked(2, L)
    result = sample(fixed_logits_denoiser(logits), process, x_init, steps, record=True, generator=gen(1))
    # expected order: positions by confidence (descending, ties by position), count per step n - round(n s / t)
    order = torch.sort(confidence, descending=True, stable=True).indices.tolist()
    masked = L
    unmasked_so_far: list[int] = []
    chain = result.chain  # stacked: x (B, K+1, L, V+1), std (B, K, L, V+1)
    for k in range(steps):
        t, s = (steps - k) / steps, (steps - k - 1) / steps
        keep = math.floor(masked * s / t + 0.5)
        unmasked_so_far += order[len(unmasked_so_far):len(unmasked_so_far) + masked - keep]
        masked = keep
        now = (~process.is_masked(chain.x[:1, k + 1])[0]).nonzero().flatten().tolist()
        assert sorted(now) == sorted(unmasked_so_far), f"step {k}"
        assert torch.equal(chain.std[:, k], torch.zeros_like(chain.std[:, k]))
    tokens = process.decode(result.x0)
    assert torch.equal(tokens, logits[:, :V].argmax(-1).expand(2, L))  # temperature 0: argmax everywhere


def test_temperature_one_draws_from_the_model_distribution():
    process = MaskedDiffusion(V, temperature=1.0)
    logits = torch.randn(1, V + 1, generator=gen(0))
    x_init = process.all_masked(20000, 1)
    tokens = process.decode(sample(fixed_logits_denoiser(logits), process, x_init, 1, generator=gen(1)).x0)
    freq = torch.bincount(tokens.flatten(), minlength=V + 1).float() / 20000
    probs = logits[0, :V].softmax(-1)
    assert freq[V] == 0
    assert torch.allclose(freq[:V], probs, atol=0.012)  # standard error <= 0.0036


def test_prefix_inpainting_holds_a_prompt_and_the_denoiser_sees_it():
    process = MaskedDiffusion(V)
    prompt = process.encode(torch.tensor([[1, 2, 3]]))
    seen = []

    def denoiser(x_t, t, cond):
        seen.append(process.decode(x_t[:, :3]))
        return torch.zeros(*x_t.shape)

    result = sample(denoiser, process, process.all_masked(1, 6), 3, guidance=PrefixInpainting(prompt))
    assert all(torch.equal(s, torch.tensor([[1, 2, 3]])) for s in seen)
    assert torch.equal(process.decode(result.x0)[:, :3], torch.tensor([[1, 2, 3]]))
    assert not bool(process.is_masked(result.x0).any())


def test_bad_input_raises_clear_errors():
    with pytest.raises(CoreConfigError, match="vocab_size must be an int >= 1"):
        MaskedDiffusion(0)
    with pytest.raises(CoreConfigError, match="temperature must be a number >= 0"):
        MaskedDiffusion(4, temperature=-1)
    process = MaskedDiffusion(V)
    with pytest.raises(CoreInputError, match=r"token ids must be in 0..5"):
        process.encode(torch.tensor([[0, 6]]))
    with pytest.raises(CoreInputError, match="integer tensor"):
        process.encode(torch.zeros(1, 2))
    x = process.all_masked(1, 3)
    with pytest.raises(CoreInputError, match=r"D = vocab_size \+ 1 = 6"):
        process.marginal(torch.zeros(1, 3, 4), torch.zeros(1, 3))
    with pytest.raises(CoreInputError, match="s <= t"):
        process.step(x, torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3, 6))
    with pytest.raises(CoreInputError, match="needs standard normal noise"):
        process.step(x, torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3, 6), temperature=1.0)
    with pytest.raises(CoreConfigError, match="discrete process"):
        process.transition(x, torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3, 6))
    with pytest.raises(CoreInputError, match=r"count must be in 0..L = 3"):
        process.corrupt_count(x, torch.tensor([4]), torch.zeros(1, 3, 6))
    with pytest.raises(CoreInputError, match=r"count must be an integer tensor \(1,\)"):
        process.corrupt_count(x, torch.tensor([1.0]), torch.zeros(1, 3, 6))
    with pytest.raises(CoreConfigError, match="steps must be None or an int >= 1"):
        process.log_likelihood_bound(lambda x, t, c: x, x, steps=0)
