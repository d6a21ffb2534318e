"""`MaskedDiffusion`: the absorbing-state (masked) discrete diffusion process for token sequences.

Tokens live in the core's token layout as one-hot vectors: a sequence of L tokens over a
vocabulary of V symbols is x `(B, L, V + 1)`, the last entry being the MASK symbol. The network
output is logits `(B, L, V + 1)` (the MASK logit is ignored). Time t in [0, 1] is the masking
probability (linear schedule, alpha(t) = 1 - t the keep probability; Austin et al. 2021, Sahoo
et al. 2024 "MDLM", Shi et al. 2024 "MD4"):

    q(x_t | x0) = (1 - t) onehot(x0) + t onehot(MASK)        per token, independently.

Loss and bound (MDLM, linear schedule): for a masked token the continuous-time negative ELBO
weights -log p(x0 | x_t) by 1 / t; `per_token_nll` gives that integrand, and
`log_likelihood_bound` its expectation, in continuous time or on a grid of K steps, where

    -log p(x0) <= sum_{k=1..K} (1 / k) E_{x_{k/K}} [ sum over masked tokens -log p(x0_i | x_{k/K}) ]

(the step from t = k/K to s = (k-1)/K unmasks a masked token with probability (t - s) / t = 1 / k).
Integrating the continuous bound over t, the number of masked tokens m is uniform on 0..L and
given m the masked set is uniform, so the bound per character equals

    E_{m ~ U{1..L}} E_{m random positions masked} [ (1 / m) sum over masked tokens -log p(x0_i | x_t) ],

which `log_likelihood_bound` estimates (`corrupt_count`, then `per_token_nll` at the level
t = m / L) without the heavy tail of a 1 / t weight at a drawn t: one draw is at most the largest
-log p (Hoogeboom et al. 2022, "Autoregressive Diffusion Models": the same bound in any-order form).

Sampling runs through the core sampler (`core.samplers.sample`) like every process: `step` from
level t to s unmasks, in each row, the `n - round(n s / t)` masked tokens the model is most
confident about (n = masked tokens in the row that move, t > s), each to its argmax token
(`temperature` 0) or a Gumbel-max draw from the model's distribution (`temperature` > 0, Gumbel
noise made from the sampler's standard normal noise). Unmasked tokens never change. A
`PrefixInpainting` guidance holds a prompt fixed. The step has std 0, so a recorded chain's
Gaussian log_prob is 0 (the discrete step has no density there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffpolicy.core.checking import must_check_values
from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.processes import Process, StepResult, check_like, check_tokens, check_x

_EPS = 1e-6


def ranks(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """The rank of each entry within its row `(B, L)` -> int64 `(B, L)`: 0 for the largest
    (`descending`) or the smallest score; ties: the earlier position first."""
    order = torch.sort(scores, dim=1, descending=descending, stable=True).indices
    position = torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(1, order, position)


def standard_normal_cdf(noise: torch.Tensor) -> torch.Tensor:
    """Phi(noise): standard normal draws -> uniform draws on (0, 1), elementwise."""
    return 0.5 * (1.0 + torch.erf(noise / math.sqrt(2.0)))


class MaskedDiffusion(Process):
    """Absorbing-state diffusion over a vocabulary of `vocab_size` symbols (module docstring).

    Args:
        vocab_size: V >= 1; token ids are 0..V-1, the MASK id is V; token vectors have V + 1 entries.
        temperature: >= 0; 0 unmasks to the argmax token, > 0 draws from softmax(logits / temperature).
    """

    prediction = "logits"

    def __init__(self, vocab_size: int, temperature: float = 0.0):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise CoreConfigError(f"MaskedDiffusion: vocab_size must be an int >= 1, got {vocab_size!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise CoreConfigError(f"MaskedDiffusion: temperature must be a number >= 0, got {temperature!r}")
        self.vocab_size, self.temperature = vocab_size, float(temperature)

    def __repr__(self) -> str:
        return f"MaskedDiffusion(vocab_size={self.vocab_size}, temperature={self.temperature})"

    @property
    def mask_id(self) -> int:
        """The id of the MASK symbol (= vocab_size)."""
        return self.vocab_size

    @property
    def token_dim(self) -> int:
        """D = V + 1, the size of a token vector."""
        return self.vocab_size + 1

    # ------------------------------------------------------------------ token layout
    def encode(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Token ids `(B, L)` in 0..V (V = MASK) -> one-hot `(B, L, V + 1)`."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise CoreInputError(f"MaskedDiffusion.encode: tokens must be an integer tensor (B, L), got "
                                 f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                                 f"{tuple(getattr(tokens, 'shape', ()))}")
        if must_check_values() and bool(((tokens < 0) | (tokens > self.mask_id)).any()):
            bad = tokens[(tokens < 0) | (tokens > self.mask_id)][0]
            raise CoreInputError(f"MaskedDiffusion.encode: token ids must be in 0..{self.mask_id} "
                                 f"({self.mask_id} = MASK), got {int(bad)}")
        return F.one_hot(tokens.long(), self.token_dim).to(dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot tokens `(B, L, V + 1)` -> ids `(B, L)` (V where masked)."""
        self._check_layout(x, "decode", "x")
        return x.argmax(-1)

    def is_masked(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, L, V + 1)` -> bool `(B, L)`: which tokens are MASK."""
        self._check_layout(x, "is_masked", "x")
        return x[..., self.mask_id] > 0.5

    def all_masked(self, batch: int, length: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The t = 1 state, every token MASK: `(batch, length, V + 1)` (the sampler's x_init)."""
        x = torch.zeros(batch, length, self.token_dim, dtype=dtype, device=device)
        x[..., self.mask_id] = 1.0
        return x

    def _check_layout(self, x: torch.Tensor, name: str, x_name: str) -> None:
        check_x(x, self._where(name), x_name)
        if x.shape[-1] != self.token_dim:
            raise CoreInputError(f"{self._where(name)}: {x_name} must have D = vocab_size + 1 = {self.token_dim} "
                                 f"entries per token (one-hot, last = MASK), got shape {tuple(x.shape)}")

    # ------------------------------------------------------------------ forward process
    def _coefficients(self, t):
        return 1.0 - t, t

    def marginal(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) `(B, L, V + 1)` for clean one-hot x0 `(B, L, V + 1)` and t `(B, L)`."""
        check_tokens(x0, t, self._where("marginal"), "x0")
        self._check_layout(x0, "marginal", "x0")
        keep = (1.0 - t).unsqueeze(-1).to(x0.dtype)
        return keep * x0 + (1.0 - keep) * F.one_hot(torch.tensor(self.mask_id), self.token_dim).to(x0)

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x0): token i is masked iff Phi(noise[b, i, 0]) < t[b, i].

        x0, noise `(B, L, V + 1)` (noise standard normal, only its first entry per token is used),
        t `(B, L)` -> x_t `(B, L, V + 1)`.
        """
        check_tokens(x0, t, self._where("corrupt"), "x0")
        self._check_layout(x0, "corrupt", "x0")
        check_like(noise, x0, self._where("corrupt"), "noise", "x0")
        masked = standard_normal_cdf(noise[..., 0]) < t
        return torch.where(masked.unsqueeze(-1), self.all_masked(*x0.shape[:2], x0.dtype, x0.device), x0)

    def corrupt_count(self, x0: torch.Tensor, count: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t with exactly `count[b]` tokens of row b masked, at uniformly random positions: the
        `count[b]` tokens of smallest `noise[b, i, 0]` (ties: the earlier position first).

        x0, noise `(B, L, V + 1)` (noise standard normal, only its first entry per token is used),
        count `(B,)` integers in 0..L -> x_t `(B, L, V + 1)`. With the level `count / L` it draws
        the count form of the bound (`log_likelihood_bound`, module docstring).
        """
        where = self._where("corrupt_count")
        self._check_layout(x0, "corrupt_count", "x0")
        check_like(noise, x0, where, "noise", "x0")
        batch, length = x0.shape[:2]
        if not isinstance(count, torch.Tensor) or count.shape != (batch,) or count.is_floating_point():
            got = f"{getattr(count, 'dtype', type(count).__name__)} {tuple(getattr(count, 'shape', ()))}"
            raise CoreInputError(f"{where}: count must be an integer tensor ({batch},), got {got}")
        if must_check_values() and bool(((count < 0) | (count > length)).any()):
            raise CoreInputError(f"{where}: count must be in 0..L = {length}, got {count.tolist()}")
        masked = ranks(noise[..., 0], descending=False) < count.to(noise.device).unsqueeze(1)
        return torch.where(masked.unsqueeze(-1), self.all_masked(batch, length, x0.dtype, x0.device), x0)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's target is the clean token itself (trained by `per_token_nll`). -> x0."""
        check_tokens(x0, t, self._where("target"), "x0")
        return x0

    # ------------------------------------------------------------------ loss and bound
    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """log p(x0_i = v | x_t) `(B, L, V + 1)` from logits: the MASK entry gets -inf."""
        self._check_layout(out, "log_probs", "out")
        logits = out.float().clone()
        logits[..., self.mask_id] = float("-inf")
        return logits.log_softmax(-1)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] `(B, L, V + 1)`: the model's distribution on masked tokens, x_t elsewhere."""
        check_tokens(x_t, t, self._where("predict_x0"))
        check_like(out, x_t, self._where("predict_x0"), "out")
        probs = self.log_probs(out).exp().to(x_t.dtype)
        return torch.where(self.is_masked(x_t).unsqueeze(-1), probs, x_t)

    def per_token_nll(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The continuous-time negative-ELBO integrand `(B, L)`: -log p(x0_i | x_t) / t_i on masked
        tokens, 0 on the others. E over t ~ U(0, 1) and x_t of its sum over tokens bounds -log p(x0)."""
        check_tokens(x_t, t, self._where("per_token_nll"))
        check_like(out, x_t, self._where("per_token_nll"), "out")
        check_like(x0, x_t, self._where("per_token_nll"), "x0")
        nll = -self.log_probs(out).gather(-1, x0.argmax(-1, keepdim=True)).squeeze(-1)
        masked = self.is_masked(x_t)
        weighted = nll / t.float().clamp(min=_EPS)
        return torch.where(masked, weighted, torch.zeros_like(weighted)).to(x_t.dtype)

    def log_likelihood_bound(self, denoiser, x0: torch.Tensor, cond=None, steps: int | None = None,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """A Monte-Carlo estimate of the negative ELBO, in nats per sequence `(B,)` (>= -log p(x0)).

        Args:
            denoiser: `denoiser(x_t (B, L, V + 1), t (B, L), cond) -> logits (B, L, V + 1)`.
            x0: clean one-hot tokens `(B, L, V + 1)`.
            steps: None = continuous time, estimated in its count form (module docstring: per
                sequence m ~ U{1..L} tokens masked at random, L / m times the sum of their -log p);
                K = the K-step bound sum_k (1 / k) E[masked -log p] at t = k / K (one mask draw per k).
            generator: source of t and of the masks.
        """
        self._check_layout(x0, "log_likelihood_bound", "x0")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise CoreConfigError(f"MaskedDiffusion.log_likelihood_bound: steps must be None or an int >= 1, "
                                  f"got {steps!r}")
        batch, length, _ = x0.shape

        def masked_nll(levels: torch.Tensor) -> torch.Tensor:
            """levels (B,) -> sum over the masked tokens of -log p(x0_i | x_t) (B,), one mask draw."""
            t = levels.unsqueeze(1).expand(batch, length)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            x_t = self.corrupt(x0, t, noise)
            return self.per_token_nll(denoiser(x_t, t, cond), x0, x_t, t).sum(1) * levels  # undo the 1 / t

        if steps is None:
            count = torch.randint(1, length + 1, (batch,), generator=generator, device=x0.device)
            t = (count / length).to(x0.dtype).unsqueeze(1).expand(batch, length)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            x_t = self.corrupt_count(x0, count, noise)
            return self.per_token_nll(denoiser(x_t, t, cond), x0, x_t, t).sum(1)
        total = torch.zeros(batch, dtype=x0.dtype, device=x0.device)
        for k in range(1, steps + 1):
            level = torch.full((batch,), k / steps, dtype=x0.dtype, device=x0.device)
            total = total + masked_nll(level) / k
        return total

    # ------------------------------------------------------------------ reverse step
    def step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, out: torch.Tensor,
             noise: torch.Tensor | None = None, **step_kwargs) -> StepResult:
        """Confidence-ordered unmasking from level t to s <= t (module docstring).

        Args:
            x_t: one-hot `(B, L, V + 1)`; t, s `(B, L)`; out: logits `(B, L, V + 1)`.
            noise: standard normal `(B, L, V + 1)`; needed when temperature > 0 (Gumbel-max draws).
            step_kwargs: `temperature` overrides the process's.
        Returns:
            StepResult(x_s, mean = x_s, std = 0): the step is a deterministic function of its noise.
        """
        where = self._where("step")
        unknown = sorted(set(step_kwargs) - {"temperature"})
        if unknown:
            raise CoreConfigError(f"{where}: unknown step argument(s) {unknown}; MaskedDiffusion takes 'temperature'")
        temperature = step_kwargs.get("temperature", self.temperature)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise CoreConfigError(f"{where}: temperature must be a number >= 0, got {temperature!r}")
        check_tokens(x_t, t, where)
        check_tokens(x_t, s, where, t_name="s")
        self._check_layout(x_t, "step", "x_t")
        check_like(out, x_t, where, "out")
        if must_check_values() and bool((s > t).any()):
            raise CoreInputError(f"{where}: a reverse step needs s <= t everywhere")
        log_p = self.log_probs(out)
        scores = log_p
        if temperature > 0:
            if noise is None:
                raise CoreInputError(f"{where}: temperature > 0 draws tokens and needs standard normal noise of "
                                     f"the shape of x_t {tuple(x_t.shape)}")
            check_like(noise, x_t, where, "noise")
            uniform = standard_normal_cdf(noise.float()).clamp(_EPS, 1.0 - _EPS)
            scores = log_p / temperature - torch.log(-torch.log(uniform))
        choice = scores.argmax(-1)  # (B, L), never MASK (its log-probability is -inf)
        confidence = log_p.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        unmask = self.unmasking(self.is_masked(x_t) & (t > s), t, s, confidence)
        x_s = torch.where(unmask.unsqueeze(-1), F.one_hot(choice, self.token_dim).to(x_t.dtype), x_t)
        return StepResult(x_s, x_s, torch.zeros_like(x_s))

    @staticmethod
    def unmasking(moving: torch.Tensor, t: torch.Tensor, s: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Which tokens to unmask `(B, L)` bool: in each row, the n - round(n s / t) most confident of the
        n `moving` tokens (ties: the earlier position first); t, s of a row are taken on its moving tokens.

        Args:
            moving: bool `(B, L)`, masked tokens whose level goes down (t > s).
            t, s: `(B, L)`. confidence: `(B, L)`, e.g. the log-probability of each token's choice.
        """
        count = moving.sum(1)
        zero = torch.zeros_like(t)
        t_row = torch.where(moving, t, zero).amax(1)
        s_row = torch.where(moving, s, zero).amax(1)
        keep = torch.floor(count * s_row / t_row.clamp(min=_EPS) + 0.5).clamp(max=count)
        n_unmask = count - keep.to(count.dtype)
        score = torch.where(moving, confidence.float(), torch.full_like(confidence.float(), float("-inf")))
        return moving & (ranks(score, descending=True) < n_unmask.unsqueeze(1))

    # ------------------------------------------------------------------ not defined for a discrete process
    def _not_gaussian(self, name: str):
        raise CoreConfigError(f"{self._where(name)}: MaskedDiffusion is a discrete process; it has no Gaussian "
                              "noise estimate or transition density (use step, per_token_nll, log_likelihood_bound)")

    def predict_noise(self, x_t, t, out):
        self._not_gaussian("predict_noise")

    def output_from_x0(self, x_t, t, x0):
        self._not_gaussian("output_from_x0")

    def transition(self, x_t, t, s, out, **step_kwargs):
        self._not_gaussian("transition")

    def transition_log_prob(self, x_t, t, s, out, x_s, std_floor=0.0, **step_kwargs):
        self._not_gaussian("transition_log_prob")


