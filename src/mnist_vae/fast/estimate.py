"""The decoder's part of the importance-weighted estimate on the fast path: log p(x|z) for many draws of z.

The estimate (model.importance_weighted_log_likelihood) spends nearly all its time decoding k
draws of z per image: the decoder's products on k rows per image, each hidden layer's bias and
activation, and the Bernoulli log-likelihood of every pixel. Here the products go through the
training step's routine (products.py: oneDNN where the rule picks it, which PyTorch's layers do
not reach) and the elementwise work through its C loops (kernels.py) in their forward-only forms
(no backward factors; each draw's log-likelihood summed as it is computed, the image read once
for its n draws), for the MLP decoders the fused step computes; evaluation.py hands
`log_px_of_draws(model)` to the estimate. It computes what model.decode and
model.log_likelihood_of_draws do, up to float32 rounding (the tests hold the two to each other).
"""

import torch
import torch.nn.functional as F

from ..model import continuous_bernoulli_log_norm
from . import kernels
from .fused import mlp_layers, unsupported_model
from .products import Products


def log_px_of_draws(model):
    """A function (z, x, labels) -> log p(x|z) of each draw, (batch, n), for z (batch, n, dim_z), x
    (batch, pixels) and the labels (batch,) of a conditional model, computing what the model's
    decoder and likelihood compute in eval mode; None where the fast path does not compute them."""
    if unsupported_model(model) is not None:
        return None
    mlp = mlp_layers(model.decoder)
    products = Products(next(model.parameters()).device)
    n_classes = model.n_classes if model.conditional else 0

    def log_px(z, x, labels=None):
        batch, n, dim_z = z.shape
        v = z.reshape(batch * n, dim_z)  # row b n + j: draw j of image b
        if n_classes:
            v = torch.cat([v, F.one_hot(labels, n_classes).to(v.dtype).repeat_interleave(n, dim=0)], dim=1)
        for linear, activation, _ in mlp[:-1]:  # eval mode: no dropout; no backward pass, so no factors
            v, _ = kernels.ACTIVATION_DROPOUT[activation](products.linear(v, linear.weight), linear.bias, None, 0.0,
                                                          backward=False)
        last = mlp[-1][0]
        logits = products.linear(v, last.weight)
        log_p = kernels.bernoulli_log_p(logits, last.bias, x.contiguous(), n)
        if model.likelihood == "continuous_bernoulli":
            log_p = log_p + continuous_bernoulli_log_norm(logits.add_(last.bias)).sum(dim=1)
        return log_p.view(batch, n)

    return log_px
