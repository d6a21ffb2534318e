"""Closed-form denoisers for the core tests: data with independent Gaussian entries N(mean, std^2).

For x_t = alpha x0 + sigma noise the posterior mean is
    E[x0 | x_t] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean),
so the optimal network output of any process is `process.output_from_x0(x_t, t, E[x0 | x_t])`.
"""


def gaussian_oracle(process, mean: float, std: float):
    """denoiser(x_t (B, L, D), t (B, L), cond) -> the exact optimal output for N(mean, std^2) data."""

    def denoiser(x_t, t, cond=None):
        alpha, sigma = process.alpha_sigma(t)
        alpha, sigma = alpha.unsqueeze(-1).to(x_t), sigma.unsqueeze(-1).to(x_t)
        gain = alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2)
        x0 = mean + gain * (x_t - alpha * mean)
        return process.output_from_x0(x_t, t, x0)

    return denoiser

