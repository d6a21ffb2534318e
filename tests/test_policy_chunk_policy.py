"""ChunkPolicy: the loss (exact and learning), sampling (units, clipping, warm start, guidance,
determinism), and every bad input it names."""

import dataclasses

import pytest
import torch
from policy_helpers import DA, DS, TO, TP, B, make_batch, make_config, make_normalizer, make_obs, make_policy

from diffpolicy.core.guidance import GuidedInpainting, PrefixInpainting
from diffpolicy.core.losses import min_snr_weight
from diffpolicy.policies import (
    ChunkPolicy,
    ConfigError,
    LossConfig,
    Normalizer,
    NormalizerError,
    ObservationDtypeError,
    ObservationError,
)


# ---------------------------------------------------------------------------- loss
@pytest.mark.parametrize("kind, weighting, mask_padding", [
    ("diffusion", "uniform", False), ("diffusion", "min_snr", True),
    ("flow", "min_snr", False), ("flow", "uniform", True),
])
def test_compute_loss_equals_hand_computation(kind, weighting, mask_padding):
    policy = make_policy(kind, loss=LossConfig(weighting=weighting, mask_padding=mask_padding))
    batch = make_batch()
    batch["action_is_pad"] = torch.zeros(B, TP, dtype=torch.bool)
    batch["action_is_pad"][:, 4:] = True
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(7))

    # documented draw order: t (B,) by torch.rand, then the noise (B, Tp, Da)
    g = torch.Generator().manual_seed(7)
    u = torch.rand(B, generator=g)
    t = ((torch.floor(u * 20) + 1) / 20) if kind == "diffusion" else u
    t = t[:, None].expand(B, TP)
    noise = torch.randn(B, TP, DA, generator=g)
    lo, hi = policy.normalizer.ranges["action"].min, policy.normalizer.ranges["action"].max
    x0 = (batch["action"] - (lo + hi) / 2) / ((hi - lo) / 2)
    if kind == "diffusion":
        alpha, sigma = policy.process.schedule.alpha_sigma(t)
        x_t = alpha[..., None] * x0 + sigma[..., None] * noise
        target = noise  # epsilon prediction
    else:
        x_t = (1 - t[..., None]) * x0 + t[..., None] * noise
        target = noise - x0
    s_lo, s_hi = policy.normalizer.ranges["state"].min, policy.normalizer.ranges["state"].max
    cond = ((batch["obs"]["state"] - (s_lo + s_hi) / 2) / ((s_hi - s_lo) / 2)).reshape(B, TO * DS)
    err = (policy.backbone(x_t, t, cond) - target).pow(2).mean(-1)
    if weighting == "min_snr":
        err = err * min_snr_weight(policy.process, t, 5.0)
    expected = err[:, :4].mean() if mask_padding else err.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_discrete_training_grid_draws_multiples_of_one_over_n():
    policy = make_policy("diffusion")
    t = policy._training_times(10_000, torch.zeros(()), torch.Generator().manual_seed(0))
    k = t * 20
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-5)
    assert set(k.round().int().tolist()) == set(range(1, 21))


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_compute_loss_decreases_on_a_fixed_batch(kind):
    policy = make_policy(kind)
    batch = make_batch()

    def loss_at_fixed_draws():
        return policy.compute_loss(batch, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        before = float(loss_at_fixed_draws())
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(150):
        loss = loss_at_fixed_draws()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_at_fixed_draws())
    assert after < 0.2 * before, (before, after)


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_sample_is_in_data_units_and_clipped_to_the_action_range(kind):
    policy = make_policy(kind).eval()
    actions = policy.sample(make_obs(), generator=torch.Generator().manual_seed(0))
    assert actions.shape == (B, TP, DA) and actions.dtype == torch.float32
    assert not actions.requires_grad
    # clip = 1 in normalized units is the fit range [100, 200] in data units
    assert bool(((actions >= 100 - 1e-4) & (actions <= 200 + 1e-4)).all())
    assert float(actions.std()) > 1.0  # an untrained network: samples are spread, not one point


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_sample_is_reproducible_from_the_generator(kind):
    policy = make_policy(kind).eval()
    obs = make_obs()
    first = policy.sample(obs, generator=torch.Generator().manual_seed(5))
    again = policy.sample(obs, generator=torch.Generator().manual_seed(5))
    other = policy.sample(obs, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_tokens_started_at_t0_return_x_init(kind):
    policy = make_policy(kind).eval()
    committed = 150 + 80 * torch.randn(B, TP, DA, generator=torch.Generator().manual_seed(1))  # beyond the clip range too
    t_start = torch.ones(B, TP)
    t_start[:, :3] = 0.0
    t_start[0, 4] = 0.0
    noise = torch.randn(B, TP, DA, generator=torch.Generator().manual_seed(3))
    kept = t_start == 0
    x_init = torch.where(kept[..., None], policy.normalize_action(committed), noise)
    out = policy.sample(make_obs(), x_init=x_init, t_start=t_start, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out[kept], committed[kept], rtol=1e-6, atol=1e-4)
    assert (out[~kept] - committed[~kept]).abs().min() > 1e-3
    # the other tokens are ordinary samples: clipped into the action range [100, 200]
    assert bool(((out[~kept] >= 100 - 1e-4) & (out[~kept] <= 200 + 1e-4)).all())


def test_set_sampling_switches_diffusion_between_stochastic_and_deterministic_steps(tmp_path):
    policy = make_policy("diffusion").eval()  # eta = 1 (DDPM steps)
    noise = torch.randn(B, TP, DA, generator=torch.Generator().manual_seed(8))

    def draw(step_seed):
        return policy.sample(make_obs(), x_init=noise, generator=torch.Generator().manual_seed(step_seed))

    assert not torch.allclose(draw(1), draw(2))  # step noise matters
    policy.set_sampling(eta=0.0)
    torch.testing.assert_close(draw(1), draw(2), rtol=0, atol=0)  # DDIM: only x_init matters
    policy.save_pretrained(tmp_path / "p")
    assert ChunkPolicy.from_pretrained(tmp_path / "p").config.process.eta == 0.0


def test_set_sampling_steps_sets_the_default_number_of_denoiser_calls():
    policy = make_policy("flow").eval()
    calls = []
    policy.backbone.register_forward_hook(lambda *_: calls.append(1))
    policy.set_sampling(inference_steps=3)
    policy.sample(make_obs(), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3 and policy.config.inference_steps == 3


@pytest.mark.parametrize("kind, settings, message", [
    ("flow", {"eta": 0.0}, "only diffusion processes have eta"),
    ("diffusion", {"eta": 1.5}, "'process.eta': expected a number <= 1"),
    ("diffusion", {"inference_steps": 0}, "'inference_steps': expected an integer >= 1"),
])
def test_bad_sampling_settings_are_named_and_change_nothing(kind, settings, message):
    policy = make_policy(kind)
    before = policy.config
    with pytest.raises(ConfigError, match=message):
        policy.set_sampling(**settings)
    assert policy.config is before


def test_x_init_is_the_initial_noise():
    policy = make_policy("flow").eval()  # deterministic Euler steps: only the initial noise matters
    noise = torch.randn(B, TP, DA, generator=torch.Generator().manual_seed(8))
    given = policy.sample(make_obs(), x_init=noise, generator=torch.Generator().manual_seed(9))
    drawn = policy.sample(make_obs(), generator=torch.Generator().manual_seed(8))  # draws the same noise first
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)


def test_flow_clipping_leaves_a_hard_prefix_alone():
    policy = make_policy("flow").eval()
    prefix = torch.full((B, 2, DA), 1.5)  # outside the clip range [-1, 1] in normalized units
    out = policy.sample(make_obs(), guidance=PrefixInpainting(prefix), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :2], policy.unnormalize_action(prefix))
    assert bool((out[:, 2:] <= 200 + 1e-4).all())


def test_partial_start_level_needs_x_init():
    policy = make_policy().eval()
    with pytest.raises(ValueError, match=r"t_start < 1 needs x_init"):
        policy.sample(make_obs(), t_start=0.5)


def test_sample_equals_encode_then_sample_normalized():
    policy = make_policy("flow").eval()
    obs = make_obs()
    cond = policy.encode_obs(obs)
    assert cond.shape == (B, policy.obs_encoder.output_dim)
    with torch.no_grad():
        result = policy.sample_normalized(cond, steps=5, generator=torch.Generator().manual_seed(4), record=True)
    assert result.chain.steps == 5
    expected = policy.sample(obs, steps=5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(policy.unnormalize_action(result.x0), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_gradient_guidance_runs_inside_sample(kind):
    policy = make_policy(kind).eval()
    target = torch.full((B, TP, DA), 0.5)
    guidance = GuidedInpainting(target, torch.ones(TP), max_weight=5.0)
    guided = policy.sample(make_obs(), guidance=guidance, generator=torch.Generator().manual_seed(0))
    plain = policy.sample(make_obs(), generator=torch.Generator().manual_seed(0))
    goal = policy.unnormalize_action(target)
    assert (guided - goal).abs().mean() < 0.5 * (plain - goal).abs().mean()


def test_image_observations_are_encoded():
    policy = make_policy(images=True).eval()
    obs = make_obs(images=True)
    assert policy.encode_obs(obs).shape == (B, TO * (DS + 8))
    assert policy.sample(obs, generator=torch.Generator().manual_seed(0)).shape == (B, TP, DA)


# ---------------------------------------------------------------------------- bad input
def _with(obs, key, value):
    return {**obs, key: value}


@pytest.mark.parametrize("change, error, message", [
    (lambda o: {k: v for k, v in o.items() if k != "image"}, ObservationError, r"missing \['image'\], unexpected \[\]"),
    (lambda o: _with(o, "velocity", o["state"]), ObservationError, r"missing \[\], unexpected \['velocity'\]"),
    (lambda o: _with(o, "state", o["state"][:, :1]), ObservationError,
     r"obs\['state'\]: expected shape \(B, To=2, 3\), got \(4, 1, 3\)"),
    (lambda o: _with(o, "state", o["state"][..., :2]), ObservationError,
     r"obs\['state'\]: expected shape \(B, To=2, 3\), got \(4, 2, 2\)"),
    (lambda o: _with(o, "image", o["image"][:3]), ObservationError,
     r"obs\['image'\]: expected shape \(B=4, To=2, 16, 16, 3\), got \(3, 2, 16, 16, 3\)"),
    (lambda o: _with(o, "image", o["image"].permute(0, 1, 4, 2, 3)), ObservationError,
     r"obs\['image'\]: expected shape \(B=4, To=2, 16, 16, 3\), got \(4, 2, 3, 16, 16\)"),
    (lambda o: _with(o, "image", o["image"].float()), ObservationDtypeError,
     r"obs\['image'\]: image observations must be uint8 in \[0, 255\], got torch.float32"),
    (lambda o: _with(o, "state", o["state"].long()), ObservationDtypeError,
     r"obs\['state'\]: low-dim observations must be floating point, got torch.int64"),
    (lambda o: _with(o, "state", o["state"].numpy()), ObservationDtypeError,
     r"obs\['state'\]: expected a torch.Tensor, got ndarray"),
    (lambda o: _with(o, "state", o["state"].index_put((torch.tensor([2]), torch.tensor([1]), torch.tensor([0])),
                                                      torch.tensor(float("nan")))),
     ObservationError, r"obs\['state'\] has a non-finite value nan at index \(2, 1, 0\)"),
    (lambda o: _with(o, "state", o["state"].index_put((torch.tensor([3]), torch.tensor([0]), torch.tensor([2])),
                                                      torch.tensor(float("-inf")))),
     ObservationError, r"obs\['state'\] has a non-finite value -inf at index \(3, 0, 2\)"),
    (lambda o: _with(o, "state", o["state"].bfloat16().index_put(  # no numpy dtype: torch's check
        (torch.tensor([1]), torch.tensor([1]), torch.tensor([2])), torch.tensor(float("inf"), dtype=torch.bfloat16))),
     ObservationError, r"obs\['state'\] has a non-finite value inf at index \(1, 1, 2\)"),
    (lambda o: [o], ObservationError, r"observations must be a dict"),
])
def test_bad_observations_are_named(change, error, message):
    policy = make_policy(images=True).eval()
    bad = change(make_obs(images=True))
    with pytest.raises(error, match=message):
        policy.sample(bad)
    with pytest.raises(error, match=message):
        policy.encode_obs(bad)


@pytest.mark.parametrize("change, error, message", [
    (lambda b: {**b, "action": b["action"][:, :5]}, ObservationError,
     r"batch\['action'\]: expected shape \(B=4, Tp=6, Da=2\), got \(4, 5, 2\)"),
    (lambda b: {**b, "action": b["action"].double().long()}, ObservationDtypeError,
     r"batch\['action'\]: expected a floating point tensor, got torch.int64"),
    (lambda b: {**b, "action": b["action"].index_put((torch.tensor([1]), torch.tensor([5]), torch.tensor([1])),
                                                     torch.tensor(float("inf")))},
     ObservationError, r"batch\['action'\] has a non-finite value inf at index \(1, 5, 1\)"),
    (lambda b: {**b, "action_is_pad": torch.zeros(B, TP)}, ObservationDtypeError,
     r"batch\['action_is_pad'\]: expected a bool tensor, got torch.float32"),
    (lambda b: {**b, "action_is_pad": torch.zeros(B, TP + 1, dtype=torch.bool)}, ObservationError,
     r"batch\['action_is_pad'\]: expected shape \(B=4, Tp=6\), got \(4, 7\)"),
    (lambda b: {"obs": b["obs"]}, ObservationError, r"batch keys: missing \['action'\], unexpected \[\]"),
    (lambda b: {**b, "actions": b["action"]}, ObservationError, r"unexpected \['actions'\]"),
    (lambda b: {**b, "obs": {"state": b["obs"]["state"][:2]}}, ObservationError,
     r"batch\['action'\]: expected shape \(B=2, Tp=6, Da=2\), got \(4, 6, 2\)"),
])
def test_bad_batches_are_named(change, error, message):
    policy = make_policy()
    with pytest.raises(error, match=message):
        policy.compute_loss(change(make_batch()))


def test_bad_x_init_shape_is_named():
    policy = make_policy().eval()
    with pytest.raises(ObservationError, match=r"x_init must have shape \(B=4, Tp=6, Da=2\), got \(4, 5, 2\)"):
        policy.sample(make_obs(), x_init=torch.zeros(B, 5, DA), t_start=0.5)


@pytest.mark.parametrize("normalizer, message", [
    (lambda: Normalizer({"action": (torch.zeros(DA), torch.ones(DA))}),
     r"no statistics for key 'state' \(expected shape \(3,\)\); it has \['action'\]"),
    (lambda: Normalizer({"action": (torch.zeros(3), torch.ones(3)), "state": (torch.zeros(DS), torch.ones(DS))}),
     r"statistics for key 'action' have shape \(3,\), the policy config needs \(2,\)"),
    (lambda: Normalizer({"action": (torch.zeros(DA), torch.ones(DA)), "state": (torch.zeros(DS), torch.ones(DS)),
                         "velocity": (torch.zeros(1), torch.ones(1))}),
     r"statistics for keys \['velocity'\] that the policy config does not use"),
    (lambda: Normalizer({"action": (torch.zeros(DA), torch.ones(DA)), "state": (torch.zeros(DS), torch.ones(DS))},
                        image_keys=["image"]),
     r"normalizer image keys \['image'\] differ from the config's \[\]"),
])
def test_mismatched_normalizer_is_refused(normalizer, message):
    with pytest.raises(NormalizerError, match=message):
        ChunkPolicy(make_config(), normalizer())


def test_config_must_be_a_policy_config():
    with pytest.raises(TypeError, match="config must be a PolicyConfig, got dict"):
        ChunkPolicy(dataclasses.asdict(make_config()), make_normalizer())
