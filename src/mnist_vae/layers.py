"""The old program's layers as this project computes them: dropout with SplitMix64 bits and tanh through the sigmoid.

They define the arithmetic of the old program's MLP (model.VAE with --activation elu_tanh), so
that the autograd step and the fused step (fast/) draw the same dropout masks and round tanh the
same way. The fast path computes the same bits in C (fast/kernels.py registers it here through
`use_splitmix64`); both give the same bits, so a run does not depend on which is used.

Dropout bits come from SplitMix64 (Steele, Lea & Flood, 2014), a counter-based generator,
keyed by one 64-bit draw from torch's generator per mask: seeding, checkpoints and resuming go
on working through torch's RNG state.
"""

import math

import torch
from torch import nn

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_1, MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

_accelerated_splitmix64 = None  # a faster routine with the same output (the fast path's C loop), if any


def use_splitmix64(routine):
    """Compute splitmix64 on the CPU with `routine(key, n)` (same output as the torch ops below), or None."""
    global _accelerated_splitmix64
    _accelerated_splitmix64 = routine


def _signed(value):
    """A uint64 constant as the int64 with the same bits, as torch's int64 arithmetic wraps."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z, bits):
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return torch.bitwise_right_shift(z, bits).bitwise_and_((1 << (64 - bits)) - 1)


def splitmix64(key, n, device=None):
    """The first n outputs of SplitMix64 started at state `key` (0 <= key < 2**64), as int64."""
    if _accelerated_splitmix64 is not None and torch.device(device or "cpu").type == "cpu":
        out = _accelerated_splitmix64(key, n)  # None where the fast path is switched off
        if out is not None:
            return out
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device).mul_(_signed(GOLDEN_GAMMA)).add_(_signed(key))
    z = z.bitwise_xor_(_shift_right(z, 30)).mul_(_signed(MIX_1))
    z = z.bitwise_xor_(_shift_right(z, 27)).mul_(_signed(MIX_2))
    return z.bitwise_xor_(_shift_right(z, 31))


def dropout_key():
    """The key of one dropout mask: one 64-bit draw from torch's default generator."""
    return int(torch.empty((), dtype=torch.int64).random_(-2**63, None)) % (1 << 64)


def dropout_bits(n, device=None, key=None):
    """The bits of one dropout mask: n uniform 16-bit integers (int16, -32768..32767), four from each
    SplitMix64 output, from `key` (by default a new dropout_key())."""
    key = dropout_key() if key is None else key
    return splitmix64(key, (n + 3) // 4, device).view(torch.int16)[:n]


def keep_threshold(p):
    """A unit is kept when its 16-bit uniform is >= this: probability 1 - p, p rounded to 1/65536."""
    return round(p * 65536) - 32768


def tanh_(a):
    """tanh(a) as 2 sigmoid(2a) - 1, in place: twice as fast as torch.tanh on the CPU, and
    within a few float32 ulps of it. Tanh below and the fast path's C loop compute it the same way."""
    return a.mul_(2).sigmoid_().mul_(2).sub_(1)


def dropout_mask(shape, p, device=None, key=None):
    """An inverted-dropout mask of `shape`: 0 with probability p, else 1/(1-p); float32.

    Drawn from 16-bit uniform integers (dropout_bits, from `key` or a new one), so p is rounded
    to a multiple of 1/65536 (0.1 becomes 0.100006); the fused training step draws the same bits.
    """
    bits = dropout_bits(math.prod(shape), device, key)
    # Comparing straight into a float tensor is one pass; a bool mask and a where() are two, 6x slower.
    keep = torch.ge(bits, keep_threshold(p), out=torch.empty(bits.shape, device=device))
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
