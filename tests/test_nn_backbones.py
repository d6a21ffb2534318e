"""Backbones: shapes, per-token time, gradient flow, DP parameter count, bad inputs."""

import math

import pytest
import torch
from torch import nn

from diffpolicy.nn import ConditionalUnet1D, DiT, MLPDenoiser, NNConfigError, NNInputError, SinusoidalTimeEmbedding

SMALL = {
    "unet": lambda d, l, c: ConditionalUnet1D(d, l, c, down_dims=(16, 32, 64), time_embed_dim=16),
    "dit": lambda d, l, c: DiT(d, l, c, hidden_dim=32, depth=2, num_heads=4, time_embed_dim=16),
    "mlp": lambda d, l, c: MLPDenoiser(d, l, c, hidden_dim=64, num_blocks=2, time_embed_dim=8),
}


def randomize_zero_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialized tensors (DiT's adaLN-Zero layers) random values so every path is live."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def build(kind, d, l, c, seed=0):
    torch.manual_seed(seed)
    return randomize_zero_weights(SMALL[kind](d, l, c), seed)


def inputs(b, l, d, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, l, d, generator=gen), torch.rand(b, l, generator=gen), torch.randn(b, c, generator=gen)


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("b,l,d", [(1, 1, 1), (2, 5, 3), (3, 16, 2), (2, 17, 7)])
def test_output_shape(kind, b, l, d):
    model = build(kind, d, l, 6)
    x, t, cond = inputs(b, l, d, 6)
    out = model(x, t, cond)
    assert out.shape == (b, l, d)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("horizon,token", [(16, 0), (16, 9), (11, 10)])
def test_changing_one_tokens_time_changes_that_token(kind, horizon, token):
    model = build(kind, 3, horizon, 5).eval()
    x, t, cond = inputs(2, horizon, 3, 5)
    t2 = t.clone()
    t2[:, token] = 1.0 - t2[:, token]
    with torch.no_grad():
        delta = (model(x, t2, cond) - model(x, t, cond)).abs().amax(dim=(0, 2))  # (L,)
    assert delta[token] > 1e-5


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_per_token_time_is_not_a_global_time(kind):
    """Two per-token time patterns with the same mean give different outputs."""
    model = build(kind, 2, 8, 4).eval()
    x, _, cond = inputs(3, 8, 2, 4)
    ramp = torch.linspace(0.0, 1.0, 8).expand(3, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x, ramp, cond), model(x, ramp.flip(-1), cond), atol=1e-5)


def test_mlp_shared_levels_embedded_once_match_every_token_embedded():
    """The MLP embeds a chunk's shared level once (CPU shortcut); output and gradients match the per-token
    path up to rounding (a matmul over B rows instead of B x L rounds differently)."""
    model = build("mlp", 2, 16, 4)
    x, t, cond = inputs(5, 16, 2, 4)
    shared = t[:, :1].expand(5, 16).contiguous()
    torch.testing.assert_close(model._time_features(shared), model.time_encoder(shared), rtol=1e-6, atol=1e-6)
    grads = []
    for embed in (model._time_features, model.time_encoder):
        model.zero_grad()
        features = torch.cat([x.reshape(5, -1), embed(shared).reshape(5, -1), cond], dim=-1)
        model.net(features).square().sum().backward()
        grads.append([p.grad.clone() for p in model.time_encoder.parameters()])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    mixed = shared.clone()
    mixed[:, 3] = 0.5
    assert torch.equal(model._time_features(mixed), model.time_encoder(mixed))  # per-token levels: no shortcut


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_output_depends_on_condition_and_input(kind):
    model = build(kind, 2, 8, 4).eval()
    x, t, cond = inputs(2, 8, 2, 4)
    with torch.no_grad():
        base = model(x, t, cond)
        assert not torch.allclose(base, model(x, t, cond + 1.0), atol=1e-5)
        assert not torch.allclose(base, model(x + 1.0, t, cond), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_gradients_reach_all_parameters(kind):
    model = build(kind, 3, 16, 5)
    x, t, cond = inputs(4, 16, 3, 5)
    weights = torch.randn(4, 16, 3, generator=torch.Generator().manual_seed(1))
    (model(x, t, cond) * weights).sum().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_unconditional_backbone_accepts_none(kind):
    model = build(kind, 2, 6, 0)
    x, t, _ = inputs(2, 6, 2, 0)
    assert model(x, t, None).shape == (2, 6, 2)


def test_dit_is_zero_at_initialization():
    """adaLN-Zero: gates and output projection start at zero, so the initial prediction is 0."""
    torch.manual_seed(0)
    model = SMALL["dit"](3, 8, 4)
    x, t, cond = inputs(2, 8, 3, 4)
    assert torch.equal(model(x, t, cond), torch.zeros(2, 8, 3))


def test_unet_pads_odd_horizon_with_edge_values():
    """An odd horizon runs as the edge-padded even one, cropped back."""
    torch.manual_seed(0)
    odd = ConditionalUnet1D(2, 7, 3, down_dims=(8, 16), time_embed_dim=8).eval()
    even = ConditionalUnet1D(2, 8, 3, down_dims=(8, 16), time_embed_dim=8).eval()
    even.load_state_dict(odd.state_dict())
    x, t, cond = inputs(2, 7, 2, 3)
    x8, t8 = torch.cat([x, x[:, -1:]], dim=1), torch.cat([t, t[:, -1:]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(odd(x, t, cond), even(x8, t8, cond)[:, :7])


def _dp_unet_parameter_count(input_dim, cond_dim, down_dims, embed, kernel):
    """Closed-form count of Chi et al.'s ConditionalUnet1D (cond_predict_scale=True)."""
    conv = lambda i, o, k: i * o * k + o  # noqa: E731
    linear = lambda i, o: i * o + o  # noqa: E731
    film_dim = embed + cond_dim

    def res_block(i, o):
        convs = conv(i, o, kernel) + 2 * o + conv(o, o, kernel) + 2 * o  # two Conv1d + GroupNorm
        return convs + linear(film_dim, 2 * o) + (conv(i, o, 1) if i != o else 0)

    dims = [input_dim, *down_dims]
    in_out = list(zip(dims[:-1], dims[1:]))
    total = linear(embed, 4 * embed) + linear(4 * embed, embed)
    for level, (i, o) in enumerate(in_out):
        total += res_block(i, o) + res_block(o, o) + (conv(o, o, 3) if level < len(in_out) - 1 else 0)
    total += 2 * res_block(dims[-1], dims[-1])
    for i, o in reversed(in_out[1:]):
        total += res_block(2 * o, i) + res_block(i, i) + conv(i, i, 4)  # ConvTranspose1d(i, i, 4)
    total += conv(down_dims[0], down_dims[0], kernel) + 2 * down_dims[0] + conv(down_dims[0], input_dim, 1)
    return total


def test_unet_parameter_count_matches_diffusion_policy_pusht_state():
    """DP PushT state: down dims (256, 512, 1024), time embedding 256, kernel 5, cond = To*Do = 2*20."""
    model = ConditionalUnet1D(2, 16, 40, down_dims=(256, 512, 1024), time_embed_dim=256, kernel_size=5, n_groups=8)
    count = sum(p.numel() for p in model.parameters())
    assert count == _dp_unet_parameter_count(2, 40, (256, 512, 1024), 256, 5) == 65_783_298


def test_no_batchnorm_in_backbones():
    for kind in SMALL:
        model = SMALL[kind](2, 8, 4)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), kind


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_bad_inputs_raise_clear_errors(kind):
    model = SMALL[kind](2, 8, 4)
    x, t, cond = inputs(2, 8, 2, 4)
    with pytest.raises(NNInputError, match=r"x_t must have shape \(B, L=8, D=2\), got \(2, 8, 3\)"):
        model(torch.randn(2, 8, 3), t, cond)
    with pytest.raises(NNInputError, match=r"x_t must have shape \(B, L=8, D=2\), got \(2, 9, 2\)"):
        model(torch.randn(2, 9, 2), torch.rand(2, 9), cond)
    with pytest.raises(NNInputError, match=r"t must have shape \(B=2, L=8\).*got \(2,\)"):
        model(x, t[:, 0], cond)
    with pytest.raises(TypeError, match="floating point"):
        model(x, (t * 100).long(), cond)
    with pytest.raises(NNInputError, match=r"cond must have shape \(B=2, C=4\), got \(2, 5\)"):
        model(x, t, torch.randn(2, 5))
    with pytest.raises(NNInputError, match="cond of shape .* is required, got None"):
        model(x, t, None)


def test_bad_backbone_settings_raise():
    with pytest.raises(NNConfigError, match="multiples of n_groups=8"):
        ConditionalUnet1D(2, 16, 4, down_dims=(12, 24))
    with pytest.raises(NNConfigError, match="kernel_size must be a positive odd"):
        ConditionalUnet1D(2, 16, 4, down_dims=(16,), kernel_size=4)
    with pytest.raises(NNConfigError, match="multiple of num_heads"):
        DiT(2, 16, 4, hidden_dim=30, num_heads=4)
    with pytest.raises(NNConfigError, match="num_blocks >= 1"):
        MLPDenoiser(2, 16, 4, num_blocks=0)
    with pytest.raises(NNConfigError, match=r"activation must be one of \['mish', 'silu'\], got 'relu'"):
        MLPDenoiser(2, 16, 4, activation="relu")


def test_mlp_activation_is_chosen_by_name_and_defaults_to_mish():
    def activations(model):
        return {type(m) for m in model.modules() if isinstance(m, (torch.nn.Mish, torch.nn.SiLU))}

    assert activations(MLPDenoiser(2, 16, 4)) == {torch.nn.Mish}  # checkpoints saved before the option
    silu = MLPDenoiser(2, 16, 4, activation="silu")
    assert activations(silu) == {torch.nn.SiLU}
    torch.manual_seed(0)
    mish = MLPDenoiser(2, 16, 4)
    silu.load_state_dict(mish.state_dict())  # same parameters, another function
    x, t, cond = torch.randn(3, 16, 2), torch.rand(3, 16), torch.randn(3, 4)
    assert not torch.allclose(silu(x, t, cond), mish(x, t, cond))


def test_sinusoidal_time_embedding_closed_form():
    emb = SinusoidalTimeEmbedding(8, scale=1000.0)
    t = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    out = emb(t)
    assert out.shape == (2, 2, 8)
    for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        value = 1000.0 * t[idx].item()
        freqs = [math.exp(-math.log(10000.0) * k / 3) for k in range(4)]
        expected = [math.sin(value * f) for f in freqs] + [math.cos(value * f) for f in freqs]
        torch.testing.assert_close(out[idx], torch.tensor(expected), atol=2e-4, rtol=0)
    with pytest.raises(NNConfigError, match="even integer >= 4"):
        SinusoidalTimeEmbedding(7)


def test_dit_without_time_input_ignores_t_and_has_no_time_parameters():
    timed = SMALL["dit"](3, 8, 4)
    untimed = DiT(3, 8, 4, hidden_dim=32, depth=2, num_heads=4, time_embed_dim=16, time_input=False)
    assert any(k.startswith("time_encoder.") for k in timed.state_dict())
    assert not any(k.startswith("time_encoder.") for k in untimed.state_dict())
    assert set(untimed.state_dict()) == {k for k in timed.state_dict() if not k.startswith("time_encoder.")}
    randomize_zero_weights(untimed)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 8, 3, generator=g), torch.randn(2, 4, generator=g)
    out = untimed(x, torch.rand(2, 8, generator=g), cond)
    assert torch.equal(out, untimed(x, torch.rand(2, 8, generator=g), cond))
    assert not torch.allclose(out, untimed(x, torch.rand(2, 8, generator=g), -cond))
    with pytest.raises(NNConfigError, match="time_input must be a bool"):
        DiT(3, 8, 4, time_input=1)


def test_rotary_turns_each_pair_as_a_complex_multiplication():
    from diffpolicy.nn.dit import rotary_tables, rotate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)  # (B, heads, L, head_dim)
    cos, sin = rotary_tables(7, 8)
    turned = rotate(x, cos.double(), sin.double())
    frequencies = 10_000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    phase = torch.polar(torch.ones(7, 4, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64)[:, None]
                        * frequencies)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 7, 4, 2)) * phase).flatten(-2)
    torch.testing.assert_close(turned, expected, rtol=0, atol=1e-6)  # the tables are float32


def test_rotary_attention_scores_depend_on_the_offset_not_the_position():
    from diffpolicy.nn.dit import rotary_tables, rotate

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = rotary_tables(40, 16)

    def score(p_q, p_k):
        turned_q = rotate(q, cos[p_q:p_q + 1], sin[p_q:p_q + 1])
        return float((turned_q * rotate(k, cos[p_k:p_k + 1], sin[p_k:p_k + 1])).sum())

    assert score(3, 5) == pytest.approx(score(30, 32), abs=1e-4)
    assert score(3, 5) == pytest.approx(score(0, 2), abs=1e-4)
    assert score(3, 5) != pytest.approx(score(3, 6), abs=1e-3)


def test_axial_rotary_tables_turn_by_row_then_by_column():
    from diffpolicy.nn.dit import axial_rotary_tables, rotary_tables

    cos, sin = axial_rotary_tables(3, 5, 16)
    row_cos, row_sin = rotary_tables(3, 8)
    col_cos, col_sin = rotary_tables(5, 8)
    assert cos.shape == sin.shape == (15, 8)
    for p in range(15):  # row-major: token p sits at row p // 5, column p % 5
        assert torch.equal(cos[p], torch.cat([row_cos[p // 5], col_cos[p % 5]]))
        assert torch.equal(sin[p], torch.cat([row_sin[p // 5], col_sin[p % 5]]))


def test_axial_rotary_scores_depend_on_the_grid_offset():
    from diffpolicy.nn.dit import axial_rotary_tables, rotate

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = axial_rotary_tables(6, 6, 16)

    def score(a, b):  # tokens given as (row, col)
        p, r = 6 * a[0] + a[1], 6 * b[0] + b[1]
        return float((rotate(q, cos[p:p + 1], sin[p:p + 1]) * rotate(k, cos[r:r + 1], sin[r:r + 1])).sum())

    assert score((1, 2), (2, 4)) == pytest.approx(score((3, 0), (4, 2)), abs=1e-4)  # the same (1, 2) offset
    # neighbours in the sequence but not on the grid: (0, 5) -> (1, 0) is not the offset (0, 1)
    assert score((0, 5), (1, 0)) != pytest.approx(score((0, 0), (0, 1)), abs=1e-3)
    assert score((0, 0), (1, 0)) != pytest.approx(score((0, 0), (0, 1)), abs=1e-3)


def test_dit_grid_is_axial_rotary_and_checked():
    dit = DiT(3, 12, 4, hidden_dim=32, depth=1, num_heads=2, time_embed_dim=16, position="rotary", grid=(3, 4))
    from diffpolicy.nn.dit import axial_rotary_tables

    assert torch.equal(dit.rotary_cos, axial_rotary_tables(3, 4, 16)[0])
    assert "pos_embedding" not in dict(dit.named_parameters())
    # "both": the learned embedding (the same parameters as a learned DiT) and the rotary turns
    both = DiT(3, 12, 4, hidden_dim=32, depth=1, num_heads=2, time_embed_dim=16, position="both", grid=(3, 4))
    randomize_zero_weights(both)
    learned = DiT(3, 12, 4, hidden_dim=32, depth=1, num_heads=2, time_embed_dim=16)
    learned.load_state_dict(both.state_dict(), strict=True)
    x, t, cond = inputs(2, 12, 3, 4)
    assert not torch.allclose(both(x, t, cond), learned(x, t, cond), atol=1e-4)
    bad = [{"grid": (3, 4)},                                          # learned positions take no grid
           {"grid": (3, 3), "position": "rotary"},                    # 9 cells for 12 tokens
           {"grid": (3, 4, 1), "position": "rotary"},
           {"grid": (3, 4), "position": "rotary", "hidden_dim": 20}]  # head width 10: 5 pairs, no halves
    for kwargs in bad:
        with pytest.raises(NNConfigError, match=r"grid must be \(rows, cols\) with rows \* cols = horizon = 12"):
            DiT(3, 12, 4, **{"hidden_dim": 32, "num_heads": 2, **kwargs})


def test_rotary_dit_has_no_position_parameters_and_sees_order():
    learned = SMALL["dit"](3, 8, 4)
    rotary = DiT(3, 8, 4, hidden_dim=32, depth=2, num_heads=4, time_embed_dim=16, position="rotary")
    assert set(rotary.state_dict()) == set(learned.state_dict()) - {"pos_embedding"}
    randomize_zero_weights(rotary)
    x, t, cond = inputs(2, 8, 3, 4)
    out = rotary(x, t, cond)
    reversed_out = rotary(x.flip(1), t.flip(1), cond).flip(1)  # without position it would be equal
    assert not torch.allclose(out, reversed_out, atol=1e-4)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rotary.parameters())
    with pytest.raises(NNConfigError, match="position must be 'learned', 'rotary' or 'both'"):
        DiT(3, 8, 4, position="sinusoidal")
    with pytest.raises(NNConfigError, match="even head width"):
        DiT(3, 8, 4, hidden_dim=12, num_heads=4, position="rotary")
