"""The variational auto-encoder: encoder q(z|x), decoder p(x|z), the ELBO and the importance-weighted bound.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2014), with the MLPs of the
TensorFlow program this project replaces; Burda, Grosse & Salakhutdinov,
"Importance Weighted Autoencoders" (2016) for the log-likelihood estimate;
Loaiza-Ganem & Cunningham, "The continuous Bernoulli" (2019) for grey-level pixels.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import tanh_

IMAGE_PIXELS = 28 * 28
LIKELIHOODS = ("bernoulli", "continuous_bernoulli")
LOG_2PI = math.log(2 * math.pi)


def dropout_mask(shape, p, device=None):
    """An inverted-dropout mask of `shape`: 0 with probability p, else 1/(1-p); float32.

    Drawn from 16-bit uniform integers (kernels.dropout_bits), so p is rounded to a multiple
    of 1/65536 (0.1 becomes 0.100006); the fused training step draws the same bits.
    """
    bits = kernels.dropout_bits(math.prod(shape), device)
    # Comparing straight into a float tensor is one pass; a bool mask and a where() are two, 6x slower.
    keep = torch.ge(bits, kernels.keep_threshold(p), out=torch.empty(bits.shape, device=device))
    return keep.mul_(1.0 / (1.0 - p)).view(shape)


class Dropout(nn.Module):
    """nn.Dropout with the faster mask above; the fused training step draws the same masks."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * dropout_mask(x.shape, self.p, x.device)


class Tanh(nn.Module):
    """nn.Tanh through the sigmoid, as the fused training step computes it; in place without autograd."""

    def forward(self, a):
        if torch.is_grad_enabled():
            return 2 * torch.sigmoid(2 * a) - 1
        return tanh_(a)


class VAE(nn.Module):
    def __init__(self, dim_z=4, n_hidden=500, dropout=0.1, likelihood="bernoulli"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        self.dim_z, self.n_hidden, self.likelihood = dim_z, n_hidden, likelihood
        # q(z|x): 784 -> ELU -> tanh -> (mu, pre-std), as in the original TensorFlow VAE.
        self.encoder = nn.Sequential(
            nn.Linear(IMAGE_PIXELS, n_hidden), nn.ELU(), Dropout(dropout),
            nn.Linear(n_hidden, n_hidden), Tanh(), Dropout(dropout),
            nn.Linear(n_hidden, 2 * dim_z),
        )
        # p(x|z): z -> tanh -> ELU -> 784 logits of the pixel distribution.
        self.decoder = nn.Sequential(
            nn.Linear(dim_z, n_hidden), Tanh(), Dropout(dropout),
            nn.Linear(n_hidden, n_hidden), nn.ELU(), Dropout(dropout),
            nn.Linear(n_hidden, IMAGE_PIXELS),
        )

    def encode(self, x):
        """Mean and standard deviation of the Gaussian q(z|x)."""
        mu, pre_std = self.encoder(x).chunk(2, dim=-1)
        # softplus keeps std positive (the program this replaces used the raw output,
        # which can go negative); the floor keeps log(std) finite.
        std = F.softplus(pre_std) + 1e-6
        return mu, std

    def decode(self, z):
        """Logits of p(x|z), one per pixel."""
        return self.decoder(z)

    def mean_image(self, logits):
        """The expected pixel values under p(x|z): what the image grids show."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(logits)
        return continuous_bernoulli_mean(logits)

    def log_px_given_z(self, logits, x):
        """log p(x|z) summed over pixels, from logits (numerically stable)."""
        return log_likelihood(logits, x, self.likelihood)

    def forward(self, x, target=None, eps=None):
        """Per-image ELBO terms for a batch: (elbo, reconstruction log-likelihood, kl).

        `x` is what the encoder sees; `target` is what the decoder must explain
        (the clean image when x is a noisy copy). Both are (batch, 784) in [0, 1].
        `eps` are the standard normal draws of the reparameterisation, if given.
        """
        target = x if target is None else target
        mu, std = self.encode(x)
        eps = torch.randn_like(std) if eps is None else eps
        z = mu + std * eps  # the reparameterisation trick
        reconstruction = self.log_px_given_z(self.decode(z), target)
        kl = gaussian_kl(mu, std)
        return reconstruction - kl, reconstruction, kl


def loss_function(model, x, target=None):
    """-ELBO in nats per image (sum over pixels and latent dimensions, mean over the batch).

    Also returns the batch means of [-ELBO, reconstruction -log p(x|z), KL], detached,
    so a training loop can accumulate them without a host synchronisation.
    """
    elbo, reconstruction, kl = model(x, target)
    loss = -elbo.mean()
    return loss, torch.stack([loss, -reconstruction.mean(), kl.mean()]).detach()


def gaussian_kl(mu, std):
    """KL( N(mu, std^2) || N(0, I) ) in closed form, summed over latent dimensions."""
    return 0.5 * (mu.square() + std.square() - 1).sum(-1) - std.log().sum(-1)


def log_likelihood(logits, x, likelihood="bernoulli"):
    """log p(x|logits) summed over the last dimension."""
    # -BCE(logits, x) = x*logits - softplus(logits): exact for binary x, and the usual
    # cross-entropy (not a normalised density) for grey levels. Its gradient is
    # sigmoid(logits) - x, as the fused training step computes it.
    log_p = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    if likelihood == "continuous_bernoulli":
        log_p = log_p + continuous_bernoulli_log_norm(logits).sum(-1)
    return log_p


def log_likelihood_of_draws(logits, x, likelihood="bernoulli"):
    """log_likelihood for many draws of z per image: logits (batch, n, pixels), x (batch, pixels).

    The same quantity written as x.l - sum softplus(l), with x.l one batched product: five
    times cheaper than the cross-entropy over the k x 784 logits per image of the estimate below.
    """
    log_p = torch.einsum("bnj,bj->bn", logits, x) - F.softplus(logits).sum(-1)
    if likelihood == "continuous_bernoulli":
        log_p = log_p + continuous_bernoulli_log_norm(logits).sum(-1)
    return log_p


def continuous_bernoulli_log_norm(logits):
    """log C(lambda) for lambda = sigmoid(logits); C = logits / tanh(logits / 2), C(0) = 2."""
    # Near 0 the ratio is 0/0; its Taylor series log 2 + l^2/12 is exact to O(l^4) there.
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(safe / 2))
    return torch.where(small, math.log(2.0) + logits.square() / 12, exact)


def continuous_bernoulli_mean(logits):
    """E[x] under the continuous Bernoulli: lambda/(2 lambda - 1) + 1/(2 artanh(1 - 2 lambda))."""
    # In logits: 1/(1 - exp(-l)) - 1/l, which tends to 1/2 as l -> 0. Near 0 the two terms cancel,
    # so there it is its Taylor series, 1/2 + l/12 - l^3/720 + l^5/30240 - l^7/1209600 (error below
    # 3e-8 for |l| < 1). The closed form is used only where it loses nothing to cancellation, so that
    # a runtime with a less exact expm1 (ONNX has none: exp(x) - 1) computes the same pixels.
    small = logits.abs() < 1
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = -1 / torch.expm1(-safe) - 1 / safe
    square = logits.square()
    series = 0.5 + logits * (1 / 12 - square * (1 / 720 - square * (1 / 30240 - square / 1209600)))
    return torch.where(small, series, exact)


@torch.no_grad()
def importance_weighted_log_likelihood(model, x, k, max_rows=None):
    """Per-image estimate of log p(x) with k importance samples from q(z|x).

    log (1/k) sum_i p(x, z_i) / q(z_i|x), computed with logsumexp. Samples are drawn
    in chunks so that at most `max_rows` decoder rows exist at once, whatever k is,
    and the chunks are combined with a running logsumexp. On the CPU 1024 rows keep a
    chunk's logits (3 MB) in cache, and chunks of 32768 rows ran twice as slow; a GPU
    wants large chunks (65536 rows, 200 MB of logits). Call in eval mode (no dropout).
    """
    if max_rows is None:
        max_rows = 1024 if x.device.type == "cpu" else 65536
    mu, std = model.encode(x)
    batch, dim_z = mu.shape
    per_chunk = max(1, min(k, max_rows // batch))
    total = torch.full((batch,), -math.inf, device=x.device, dtype=x.dtype)
    for done in range(0, k, per_chunk):
        n = min(per_chunk, k - done)
        eps = torch.randn((batch, n, dim_z), device=x.device, dtype=x.dtype)
        z = mu[:, None] + std[:, None] * eps  # (batch, n, dim_z)
        log_q = (-0.5 * eps.square() - std[:, None].log() - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z.square() - 0.5 * LOG_2PI).sum(-1)
        log_px = log_likelihood_of_draws(model.decode(z), x, model.likelihood)
        log_w = log_px + log_prior - log_q  # (batch, n)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
    return total - math.log(k)
