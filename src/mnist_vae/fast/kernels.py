"""The elementwise work of the fused training step, in C when the extension is built, else in torch ops.

`_kernels.c` does each activation layer, the loss and Adam's update in one vectorised loop (with
--precision bf16 reading and writing the products' bfloat16 operands themselves), and where the step's
products go through torch.mm in float32, a layer's product with its loop in one call, by the sgemm that
torch.mm itself calls (linear_activation, linear_backward), and at a small batch a whole MLP's pass
(MLPInOneCall); the functions here
call it for contiguous float32 (and bfloat16) CPU tensors and otherwise compute the same thing in torch
ops (CUDA, MPS, or an install without a C compiler). Set MNIST_VAE_NO_KERNELS=1 before starting to use
torch ops everywhere, e.g. to compare the two; `use(False)` does it within a process.

The dropout bits are layers.py's SplitMix64 bits; the C loops draw the same bits themselves, and
this module hands layers.py the C version of the generator, so both paths give the same masks.
"""

import ctypes
import functools
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import layers
from ..layers import dropout_mask, keep_threshold, tanh_

try:
    from . import _kernels
except ImportError:  # built without a C compiler: torch ops below
    _kernels = None


def _openmp_runtimes():
    """The OpenMP runtimes (libgomp files) mapped into this process, on Linux; empty elsewhere."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "libgomp" in line.rsplit("/", 1)[-1]}


# _kernels uses the libgomp that torch loaded, and with it torch's threads; where this torch build
# brought a differently named copy, the module got a second runtime with threads of its own, which
# would compete with torch's for the cores: its loops then stay on one thread.
if _kernels is not None and _kernels.openmp and len(_openmp_runtimes()) > 1:
    _kernels.set_parallel(False)


# Read once: the step asks for every tensor it hands over, and os.environ costs more than a small loop.
_enabled = _kernels is not None and not os.environ.get("MNIST_VAE_NO_KERNELS")


def available():
    return _enabled


def use(c_loops):
    """Compute the step's elementwise work in the C loops (True, where they were built) or in torch ops (False)."""
    global _enabled
    _enabled = bool(c_loops) and _kernels is not None


def description():
    """Which code does the step's elementwise work, for benchmark and results headers."""
    if not _enabled:
        return "torch ops"
    return "C, OpenMP" if _kernels.openmp else "C, one thread"


def core_distance_ns(trips=200, repeats=3):
    """How far apart two of torch's threads run: the nanoseconds a write by one takes to reach the other, the
    median of `repeats` timings of `trips` round trips (_kernels.c's core_distance); None where the C loops
    do not run on several threads (not built, no OpenMP, one runtime too many) or the process has one core,
    where the two threads would take turns on it and each trip would wait for the scheduler."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not _enabled or not _kernels.openmp or cores < 2:
        return None
    timings = sorted(_kernels.core_distance(trips) for _ in range(repeats))
    return timings[len(timings) // 2] or None


def _use_c(*tensors, dtype=torch.float32):
    if not _enabled:
        return False
    for t in tensors:  # a loop, not all(...): this runs a dozen times a step
        if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def _splitmix64(key, n):
    if not _enabled:  # use(False) after import: the torch ops of layers.py
        return None
    out = torch.empty(n, dtype=torch.int64)
    _kernels.splitmix64(out.data_ptr(), key, n)
    return out


if _kernels is not None:
    layers.use_splitmix64(_splitmix64)


# ---------------------------------------------------------------- the step's elementwise work


def elu_dropout(a, bias, key, p, backward=True):
    """h = elu(a + bias) m, written into a, and m elu'(a + bias), the backward pass's factor (None where
    `backward` is False: the forward pass alone); m is the dropout mask of dropout_bits(a.numel(),
    key=key) (key None: no dropout), 0 or 1/(1-p)."""
    done = _activation_in_c("elu_dropout", a, bias, key, p, backward)
    if done:
        return done
    e = F.elu(a.add_(bias))
    factor = e.clamp(max=0).add_(1) if backward else None  # elu'(x) = min(elu(x), 0) + 1
    _dropout(e, factor, key, p)
    return a.copy_(e), factor


def tanh_dropout(a, bias, key, p, backward=True):
    """h = tanh(a + bias) m, written into a, as tanh_ computes it, and m (1 - tanh²) where `backward`."""
    done = _activation_in_c("tanh_dropout", a, bias, key, p, backward)
    if done:
        return done
    t = tanh_(a.add_(bias))
    factor = torch.addcmul(torch.ones_like(t), t, t, value=-1) if backward else None
    return _dropout(t, factor, key, p)


def relu_dropout(a, bias, key, p, backward=True):
    """h = relu(a + bias) m, written into a, and m where a + bias > 0, else 0, where `backward`."""
    done = _activation_in_c("relu_dropout", a, bias, key, p, backward)
    if done:
        return done
    x = a.add_(bias)
    factor = torch.gt(x, 0, out=torch.empty_like(x)) if backward else None
    x.relu_()
    return _dropout(x, factor, key, p)


def _dropout(h, factor, key, p):
    """h and the factor (where not None) times the dropout mask of `key` (None: no dropout), in place."""
    if key is not None:
        m = dropout_mask(h.shape, p, h.device, key)
        h.mul_(m)
        if factor is not None:
            factor.mul_(m)
    return h, factor


# The activations the fused step computes, by name: (h, factor) = function(a, bias, key, p, backward=True).
ACTIVATION_DROPOUT = {"elu": elu_dropout, "tanh": tanh_dropout, "relu": relu_dropout}


def _activation_in_c(name, a, bias, key, p, backward):
    """(h, factor) from the C loop `name`, which draws the mask's bits itself (factor None where not
    `backward`: the loop then does not write it), or None where the tensors do not suit it."""
    if not _use_c(a, bias):
        return None
    factor = torch.empty_like(a) if backward else None
    getattr(_kernels, name)(a.data_ptr(), 0, 0, bias.data_ptr(), factor.data_ptr() if backward else 0,
                            key is not None, key or 0, keep_threshold(p), 1 / (1 - p), *a.shape)
    return a, factor


# ---------------------------------------------------------------- a layer's product with its elementwise work


def _torch_sgemm():
    """The address of the sgemm_ in torch's own library (MKL's, which torch.mm calls for float32 on the CPU), for
    _kernels.c to call; None where the C loops were not built or this torch has no such library (another BLAS,
    macOS, Windows)."""
    if _kernels is None or not sys.platform.startswith("linux") or not torch.backends.mkl.is_available():
        return None
    try:  # torch has loaded it: RTLD_NOLOAD finds it, never loads a second copy
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"),
                              mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        return ctypes.cast(library.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


_SGEMM = _torch_sgemm()
if _SGEMM is not None:
    _kernels.set_sgemm(_SGEMM)
# The C loops' activations, as _kernels.c numbers them.
_KINDS = {"elu": 0, "tanh": 1, "relu": 2}
# Shapes (rows, inputs, outputs) on which sgemm_gives_torch_mm checks the bits: small and odd ones, a small
# batch's, and the default model's first layer.
_CHECKED_SHAPES = ((3, 5, 7), (20, 200, 200), (37, 784, 65), (128, 784, 500))


def sgemm_gives_torch_mm():
    """Whether linear_activation and linear_backward may stand in for torch.mm: the C loops call torch's own
    sgemm, and its products give torch.mm's bits, forward (x W') and back (d W), under this process's
    torch.get_float32_matmul_precision() (which may send torch.mm's products elsewhere). The fused step asks
    when it is built."""
    return _enabled and _SGEMM is not None and _sgemm_checked(torch.get_float32_matmul_precision())


@functools.lru_cache(maxsize=None)
def _sgemm_checked(precision):
    generator = torch.Generator().manual_seed(0)
    for rows, n_in, n_out in _CHECKED_SHAPES:
        x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((rows, n_in), (n_out, n_in),
                                                                                  (n_out,)))
        h, _ = linear_activation("tanh", x, weight, bias, None, 0.0)
        if not torch.equal(h, tanh_dropout(torch.mm(x, weight.t()), bias, None, 0.0)[0]):
            return False
        d = torch.randn(rows, n_out, generator=generator)
        if not torch.equal(linear_backward(d, None, torch.empty(n_out), weight, True)[1], torch.mm(d, weight)):
            return False
    return True


def linear_activation(activation, x, weight, bias, key, p):
    """ACTIVATION_DROPOUT[activation] on the product x weight', in one call into C (the product by torch's sgemm,
    which must give torch.mm's bits: sgemm_gives_torch_mm): (h, factor) as it gives them; None where the tensors
    do not suit the C loops."""
    if not (_enabled and _SGEMM is not None and _use_c(x, weight, bias)):
        return None
    (rows, n_in), n_out = x.shape, weight.shape[0]
    h, factor = torch.empty(rows, n_out), torch.empty(rows, n_out)
    _kernels.linear_activation(_KINDS[activation], x.data_ptr(), weight.data_ptr(), h.data_ptr(), bias.data_ptr(),
                               factor.data_ptr(), key is not None, key or 0, keep_threshold(p), 1 / (1 - p), rows,
                               n_in, n_out)
    return h, factor


def linear_backward(d, factor, grad_bias, weight, need_input_grad):
    """factor_bias_grad(d, factor, grad_bias), then d(loss)/d(inputs) = d weight where `need_input_grad` (else None),
    in one call into C (the product as linear_activation's): (d, d_inputs); None where the tensors do not suit the
    C loops, or d has no factor and is larger than the sums the C loop takes alone (SUM_IN_C)."""
    if not (_SGEMM is not None and _backward_in_c(d, factor, grad_bias) and _use_c(weight)):
        return None
    (rows, n_out), n_in = d.shape, weight.shape[1]
    d_inputs = torch.empty(rows, n_in) if need_input_grad else None
    _kernels.linear_backward(d.data_ptr(), 0 if factor is None else factor.data_ptr(), grad_bias.data_ptr(),
                             weight.data_ptr(), 0 if d_inputs is None else d_inputs.data_ptr(), rows, n_in, n_out)
    return d, d_inputs


class MLPInOneCall:
    """One MLP's layers on batches of `rows` rows, each pass through them one call into C (mlp_forward, mlp_backward)
    where the step's products go through torch's sgemm (sgemm_gives_torch_mm): the layers' calls one by one, in
    their order, and so their bits, without the Python of a call for each layer, which at a small batch cost about
    as much as the layers' own loops (docs/speed.md). It keeps the buffers of the hidden layers' outputs, factors
    and gradients for every pass of that many rows, and the addresses the C loops take, gathered again where a
    parameter or one of Adam's moments moved (a checkpoint loaded, a tensor's .data set)."""

    def __init__(self, weights, biases, activations, ps, rows, need_input_grad):
        self.weights, self.biases, self.activations, self.ps, self.rows = weights, biases, activations, ps, rows
        self.h = [torch.empty(rows, w.shape[0]) for w in weights[:-1]]  # each hidden layer's output
        self.factors = [torch.empty_like(h) for h in self.h]
        self.d = [torch.empty_like(h) for h in self.h]  # d(loss)/d(each hidden layer's output)
        self.dx = torch.empty(rows, weights[0].shape[1]) if need_input_grad else None
        self.forward_addresses, self.backward_addresses = None, None
        self.inputs = None  # the last forward pass's inputs of each layer, which the backward pass reads

    @staticmethod
    def suits(weights, biases, rows):
        """Whether the C loops take these layers on batches of `rows` rows."""
        return _enabled and _SGEMM is not None and rows <= WEIGHT_GRAD_ADAM_ROWS and _use_c(*weights, *biases)

    def forward(self, x, keys):
        """The hidden layers on x (rows of the first layer's inputs), their dropout masks from `keys` (None for
        none): (each layer's input, the first x; each hidden layer's factor; the last hidden layer's output), as
        the step's _hidden_layers gives them; None where x or a parameter does not suit the C loops."""
        addresses = [t.data_ptr() for t in self.weights + self.biases]
        if addresses != self.forward_addresses:
            if not self.suits(self.weights, self.biases, self.rows):
                return None
            self.layers_forward = tuple(
                (_KINDS[activation], w.data_ptr(), b.data_ptr(), h.data_ptr(), f.data_ptr(), keep_threshold(p),
                 1 / (1 - p), self.rows, w.shape[1], w.shape[0])
                for w, b, activation, p, h, f in zip(self.weights, self.biases, self.activations, self.ps, self.h,
                                                     self.factors))
            self.forward_addresses = addresses
        if x.shape != (self.rows, self.weights[0].shape[1]) or not _use_c(x):
            return None
        _kernels.mlp_forward(self.layers_forward, x.data_ptr(), tuple(keys))
        self.inputs = [x, *self.h]
        return self.inputs, self.factors, self.h[-1] if self.h else x

    def backward(self, d, x, grad_biases, exp_avgs, exp_avg_sqs, scalars, narrow):
        """Back through the layers from d(loss)/d(their output), d, after a forward pass on x: each layer's
        factor_bias_grad and input gradient (linear_backward), then the weight gradient and Adam's update of its
        weight and bias (weight_grad_adam, with `exp_avgs` and `exp_avg_sqs` each layer's [weight's, bias's] and
        Adam's `scalars`); return d(loss)/dx where the plan was made with need_input_grad, else None; False, having
        changed nothing, where the tensors do not suit the C loops."""
        moments = [t for pair in zip(exp_avgs, exp_avg_sqs) for m in pair for t in m]
        tensors = self.weights + self.biases + grad_biases + moments
        addresses = [t.data_ptr() for t in tensors]
        if addresses != self.backward_addresses:
            if not _use_c(*tensors):
                return False
            inputs = [None, *self.h]
            self.layers_backward = tuple(
                (w.data_ptr(), b.data_ptr(), gb.data_ptr(), m[0].data_ptr(), v[0].data_ptr(), m[1].data_ptr(),
                 v[1].data_ptr(), self.factors[j].data_ptr() if j < len(self.h) else 0,
                 0 if inputs[j] is None else inputs[j].data_ptr(), self.d[j].data_ptr() if j < len(self.d) else 0,
                 self.rows, w.shape[1], w.shape[0])
                for j, (w, b, gb, m, v) in enumerate(zip(self.weights, self.biases, grad_biases, exp_avgs,
                                                           exp_avg_sqs)))
            self.backward_addresses = addresses
        if (d.shape != (self.rows, self.weights[-1].shape[0]) or x.shape != (self.rows, self.weights[0].shape[1])
                or not _use_c(d, x)):
            return False
        _kernels.mlp_backward(self.layers_backward, d.data_ptr(), x.data_ptr(),
                              0 if self.dx is None else self.dx.data_ptr(), narrow, *scalars)
        return self.dx


def _check_draws(rows, what, n, per):
    """Refuse `rows` rows of `what` that are not whole draws of the n `per` (row r belongs to r % n): the C loops
    would divide by zero or misread the layout."""
    if n == 0 or rows % n:
        raise ValueError(f"{rows} rows of {what} are not whole draws of {n} {per}")


def bernoulli_loss(logits, bias, target, scale, by_row=False):
    """For l = logits + bias: sum over pixels of y l - softplus(l) (log p(y | l), as model.log_likelihood),
    and (sigmoid(l) - y) scale, the gradient of -log p times scale, where y, the target of row r, is row
    r % len(target) of `target` (the importance-weighted bound's K draws of an image are rows k B + i).
    The log-likelihood is summed over the rows too, or with `by_row` given for each row."""
    _check_draws(logits.shape[0], "logits", target.shape[0], "targets")
    if _use_c(logits, bias, target):
        rows, d_logits = torch.empty(logits.shape[0], device=logits.device), torch.empty_like(logits)
        _kernels.bernoulli_loss(logits.data_ptr(), bias.data_ptr(), target.data_ptr(), rows.data_ptr(),
                                d_logits.data_ptr(), scale, target.shape[0], *logits.shape)
        # Each row is one thread's sum, in one order, however many threads torch has; one sum over all
        # pixels would split them by the thread count (threads.py changes it while training).
        return (rows if by_row else rows.sum()), d_logits
    target = target.repeat(logits.shape[0] // target.shape[0], 1)
    logits = logits + bias
    rows = (target * logits - F.softplus(logits)).sum(dim=1)
    return (rows if by_row else rows.sum()), torch.sigmoid(logits).sub_(target).mul_(scale)


# The most elements of a d whose column sums alone the C loop takes: up to about the size of the default
# batch's logits, still in the cache from the loss, one thread's loop costs less than torch's dispatch to
# two; beyond, torch's sum is the faster.
SUM_IN_C = 1 << 17


def _backward_in_c(d, factor, grad_bias, transposed=False):
    """Whether the C loop does factor_bias_grad's work: tensors it can read, and a d with a factor, or to be
    transposed, or no larger than SUM_IN_C."""
    return ((factor is not None or transposed or d.numel() <= SUM_IN_C) and _use_c(d, grad_bias)
            and (factor is None or _use_c(factor)))


def factor_bias_grad(d, factor, grad_bias, transposed=False):
    """The backward pass through a layer's activation and bias: d *= factor in place, where a factor is given
    (None: the last layer, which has no activation), and d summed over the rows into grad_bias; return d, and
    with `transposed` also d' as a contiguous tensor, the weight gradient's first operand as oneDNN reads it
    (given a transposed view, it copies it, at twice the time of this loop's writes).
    In C one pass does it all, the rows in blocks of 32 shared among the threads, each column summed in row order
    within a block and the blocks' sums in block order (the same bits on any number of threads); torch's sum is
    faster only on a d larger than SUM_IN_C where there is nothing else to do (the last layers')."""
    if _backward_in_c(d, factor, grad_bias, transposed):
        d_t = torch.empty(d.shape[1], d.shape[0]) if transposed else None
        _kernels.factor_bias_grad(d.data_ptr(), 0 if factor is None else factor.data_ptr(), grad_bias.data_ptr(),
                                  0 if d_t is None else d_t.data_ptr(), *d.shape)
        return (d, d_t) if transposed else d
    if factor is not None:
        d.mul_(factor)
    torch.sum(d, dim=0, out=grad_bias)
    return (d, d.t().contiguous()) if transposed else d


def bernoulli_log_p(logits, bias, images, n):
    """log p(image | l) of each row of l = logits + bias, the sum over pixels of x l - softplus(l), where
    row r's image x is row r // n of `images` (n draws of z per image); the estimate's forward pass alone.
    In C each row is summed in one order however many threads there are."""
    if _use_c(logits, bias, images):
        out = torch.empty(logits.shape[0], device=logits.device)
        _kernels.bernoulli_log_p(logits.data_ptr(), bias.data_ptr(), images.data_ptr(), out.data_ptr(), n,
                                 *logits.shape)
        return out
    logits = (logits + bias).view(images.shape[0], n, images.shape[1])
    return (images[:, None] * logits - F.softplus(logits)).sum(dim=2).view(-1)


def gaussian_sample(gaussian, eps, by_row=False):
    """z = mu + std eps for [mu, s] = gaussian and std = softplus(s) + 1e-6; also std, and the sum over
    the batch of KL(N(mu, std²) || N(0, I)), or with `by_row` each image's."""
    rows, dim_z = eps.shape
    if _use_c(gaussian, eps):
        z, std, kl = torch.empty_like(eps), torch.empty_like(eps), torch.empty(rows)
        _kernels.gaussian_draws(gaussian.data_ptr(), eps.data_ptr(), z.data_ptr(), std.data_ptr(), kl.data_ptr(), 0,
                                rows, 1, dim_z)  # one draw; no log-ratio
        return z, std, kl if by_row else kl.sum()
    mu, pre_std = gaussian[:, :dim_z], gaussian[:, dim_z:]
    std = F.softplus(pre_std) + 1e-6
    if by_row:
        kl = (0.5 * (mu.square() + std.square() - 1) - std.log()).sum(dim=1)
    else:
        kl = 0.5 * (mu.square() + std.square() - 1).sum() - std.log().sum()
    return mu + std * eps, std, kl


def elbo_terms(log_px, kl, kl_weight):
    """The ELBO's terms of a batch as model.VAE.loss gives them, batch means of [-ELBO, -log p(x|z), KL, loss]
    with loss = kl_weight KL - log p(x|z), from each image's log p(x|z) and KL. In C one call, each sum
    in row order, where torch makes seven calls of a few microseconds: at batch 20 they were a twentieth
    of a step."""
    if _use_c(log_px, kl):
        out = torch.empty(4)
        _kernels.elbo_terms(log_px.data_ptr(), kl.data_ptr(), log_px.shape[0], kl_weight, out.data_ptr())
        return out
    reconstruction, kl = log_px.sum() / log_px.shape[0], kl.sum() / log_px.shape[0]
    loss = kl - reconstruction if kl_weight == 1 else kl_weight * kl - reconstruction
    return torch.stack([kl - reconstruction, -reconstruction, kl, loss])


def with_labels(v, labels, n_classes):
    """[v, one_hot(labels)], the input of a conditional model's first layers; row r takes labels[r % len(labels)],
    as the K draws per image of the importance-weighted bound are laid out, so v's rows must be whole draws of
    the labels. In C one pass, where torch's one_hot (which reads the labels' range first) and cat make three
    calls and two passes over the data."""
    rows, cols = v.shape
    _check_draws(rows, "v", len(labels), "labels")
    if _use_c(v) and _use_c(labels, dtype=torch.int64):
        out = torch.empty(rows, cols + n_classes)
        _kernels.with_labels(v.data_ptr(), labels.data_ptr(), out.data_ptr(), rows, cols, len(labels), n_classes)
        return out
    y = F.one_hot(labels, n_classes).to(v.dtype)
    return torch.cat([v, y.repeat(rows // len(labels), 1)], dim=1)


def gaussian_backward(gaussian, eps, std, d_z, scale):
    """d(loss)/d[mu, s] from d(loss)/dz, where the loss adds KL times `scale` (1/B for a batch mean):
    d mu = d_z + mu scale, d s = (d_z eps + (std - 1/std) scale) sigmoid(s)."""
    rows, dim_z = eps.shape
    if _use_c(gaussian, eps, std, d_z):
        d_gaussian = torch.empty_like(gaussian)
        _kernels.gaussian_backward(gaussian.data_ptr(), eps.data_ptr(), std.data_ptr(), d_z.data_ptr(),
                                   d_gaussian.data_ptr(), scale, rows, dim_z)
        return d_gaussian
    mu, pre_std = gaussian[:, :dim_z], gaussian[:, dim_z:]
    d_std = d_z * eps + (std - 1 / std) * scale
    return torch.cat([d_z + mu * scale, d_std * torch.sigmoid(pre_std)], dim=1)


# ---------------------------------------------------------------- Adam's update


def adam_suits(*tensors):
    """Whether `adam` computes in C on these parameters and Adam's moments of them (the step checks them
    once, as they live from step to step, and each step's gradients as they come)."""
    return _use_c(*tensors)


def adam_scalars(step, lr, beta1, beta2, eps, weight_decay):
    """The scalars of `adam` for the step that makes the count `step` (1 the first time) with these options,
    in double as torch computes them; the C call rounds them to float as torch does."""
    bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    return (1 - beta1, beta2, 1 - beta2, math.sqrt(bias_correction2), eps, -(lr / bias_correction1), weight_decay)


def adam(parameters, grads, exp_avgs, exp_avg_sqs, scalars, weight_copy=None):
    """One step of torch.optim.Adam (no amsgrad, no maximize) on a layer's weight and bias, in place, as
    torch._fused_adam_ computes it: each list is [weight's, bias's], as torch._fused_adam_ takes them, the
    parameters and moments ones for which adam_suits holds, and `scalars` those of adam_scalars for this
    step. With `weight_copy`,
    a bfloat16 tensor of the weight's shape (--precision bf16), the weight's gradient is bfloat16 too, and the
    updated weight is also written there, rounded as .bfloat16() rounds. False where the gradients do not
    suit the C loop, which updated nothing then.

    One C loop updates both tensors with the arithmetic of torch's vectorised loop, in the same order and
    with the same roundings of the scalars, so that the two agree to the bit but for the few elements
    at the end of a tensor that torch's loop does without vectors. Why not torch's own: it is the larger
    part of a small step's fixed cost, and as its memory traffic bounds it, a loop that also reads the
    bfloat16 gradient and writes the bfloat16 weight saves the two passes of their own that converting
    them takes (docs/speed.md)."""
    (weight, bias), (grad_weight, grad_bias), (exp_avg_w, exp_avg_b), (exp_avg_sq_w, exp_avg_sq_b) = (
        parameters, grads, exp_avgs, exp_avg_sqs)
    if not (_use_c(grad_bias) and (_use_c(grad_weight) if weight_copy is None else
                                   _use_c(grad_weight, weight_copy, dtype=torch.bfloat16))):
        return False
    _kernels.adam(weight.data_ptr(), grad_weight.data_ptr(), exp_avg_w.data_ptr(), exp_avg_sq_w.data_ptr(),
                  weight.numel(), 0 if weight_copy is None else weight_copy.data_ptr(), bias.data_ptr(),
                  grad_bias.data_ptr(), exp_avg_b.data_ptr(), exp_avg_sq_b.data_ptr(), bias.numel(), *scalars)
    return True


# The most rows of weight_grad_adam's operands, as _kernels.c defines them (WG_MAX_ROWS): a tile of the gradient costs
# less to sum than the product's output costs to write out and read back, at Burda et al.'s batch of 20 and on the
# 100 rows of their IWAE's decoder, and no more at the default batch of 128 (on an AMD EPYC Zen 4); larger batches,
# where it has not been measured, keep the product routine.
WEIGHT_GRAD_ADAM_ROWS = getattr(_kernels, "weight_grad_adam_rows", 0)  # 0: not built


def weight_grad_adam(d_y, x, parameters, grad_bias, exp_avgs, exp_avg_sqs, scalars, narrow=False):
    """The weight gradient d_y' x of a layer y = x W' + b, and adam's update of W and b from it and from grad_bias,
    in place, in one pass over W: each tile of the gradient goes to Adam while it is in the cache, never written
    out. Adam's arithmetic is adam's; the gradient's is a sum over the rows in their order, whatever the
    threads, where the product routines sum in their own order. `narrow` takes the tiles that fit AVX2's vector
    registers, built for AVX2 and FMA (products.has_avx2() must hold), else AVX-512's, built for any x86-64 CPU
    and fast where it has AVX-512. False where the tensors do not suit the C loop or have more than
    WEIGHT_GRAD_ADAM_ROWS rows; nothing was updated then."""
    (weight, bias), (exp_avg_w, exp_avg_b), (exp_avg_sq_w, exp_avg_sq_b) = parameters, exp_avgs, exp_avg_sqs
    if d_y.shape[0] > WEIGHT_GRAD_ADAM_ROWS or not _use_c(d_y, x, grad_bias):
        return False
    out, in_features = weight.shape
    _kernels.weight_grad_adam(d_y.data_ptr(), x.data_ptr(), d_y.shape[0], weight.data_ptr(), exp_avg_w.data_ptr(),
                              exp_avg_sq_w.data_ptr(), out, in_features, bias.data_ptr(), grad_bias.data_ptr(),
                              exp_avg_b.data_ptr(), exp_avg_sq_b.data_ptr(), narrow, *scalars)
    return True


# ---------------------------------------------------------------- with --precision bf16


def activation_bf16(activation, a, bias, key, p, keep_float=False):
    """A hidden layer with --precision bf16: from its product a in bfloat16, h = act(a + bias) m in bfloat16 (the
    next product's operand), the factor as ACTIVATION_DROPOUT's, and h in float32 too where `keep_float`
    (else None); each value what ACTIVATION_DROPOUT gives on a.float(), rounded as .bfloat16() rounds."""
    if _use_c(a, dtype=torch.bfloat16) and _use_c(bias):
        h, factor = torch.empty_like(a), torch.empty(a.shape)
        h_float = torch.empty(a.shape) if keep_float else None
        getattr(_kernels, f"{activation}_dropout")(
            h_float.data_ptr() if keep_float else 0, a.data_ptr(), h.data_ptr(), bias.data_ptr(), factor.data_ptr(),
            key is not None, key or 0, keep_threshold(p), 1 / (1 - p), *a.shape)
        return h, factor, h_float
    h_float, factor = ACTIVATION_DROPOUT[activation](a.float(), bias, key, p)
    return h_float.bfloat16(), factor, h_float if keep_float else None


def factor_bias_grad_bf16(d, factor, grad_bias):
    """factor_bias_grad with --precision bf16: d(loss)/da = d factor from d(loss)/dh in bfloat16 (d, as its product
    gave it), or d itself in float32 where there is no factor (a last layer, d from the loss); its sum over
    the rows into grad_bias, from float32 values; return d(loss)/da in bfloat16, the operand of the layer's
    backward products."""
    rows, cols = d.shape
    if (_use_c(d, dtype=torch.bfloat16) and _use_c(factor, grad_bias)) if factor is not None else _use_c(d, grad_bias):
        out = torch.empty(d.shape, dtype=torch.bfloat16)
        _kernels.factor_bias_grad_bf16(d.data_ptr() if factor is not None else 0,
                                       d.data_ptr() if factor is None else 0,
                                       factor.data_ptr() if factor is not None else 0, grad_bias.data_ptr(),
                                       out.data_ptr(), rows, cols)
        return out
    return factor_bias_grad(d.float(), factor, grad_bias).bfloat16()


# ---------------------------------------------------------------- the importance-weighted bound's


def gaussian_draws(gaussian, eps, k):
    """K draws per image for [mu, s] = gaussian (B rows) and eps (K B rows; row d B + i is draw d of image i):
    z = mu + std eps, std = softplus(s) + 1e-6 (B rows), the sum over the batch of KL(N(mu, std²) || N(0, I)),
    and log p(z) - log q(z|x) of each draw (K B)."""
    images, dim_z = gaussian.shape[0], gaussian.shape[1] // 2
    if _use_c(gaussian, eps):
        z, std = torch.empty_like(eps), torch.empty(images, dim_z)
        kl, log_ratio = torch.empty(images), torch.empty(eps.shape[0])
        _kernels.gaussian_draws(gaussian.data_ptr(), eps.data_ptr(), z.data_ptr(), std.data_ptr(), kl.data_ptr(),
                                log_ratio.data_ptr(), images, k, dim_z)
        return z, std, kl.sum(), log_ratio
    mu, pre_std = gaussian[:, :dim_z], gaussian[:, dim_z:]
    std = F.softplus(pre_std) + 1e-6
    draws = eps.view(k, images, dim_z)
    z = mu + std * draws
    kl = (0.5 * (mu.square() + std.square() - 1) - std.log()).sum()
    log_ratio = (0.5 * (draws.square() - z.square()) + std.log()).sum(dim=2)
    return z.view(k * images, dim_z), std, kl, log_ratio.view(-1)


def importance_weights(log_px, log_ratio, kl_weight, k):
    """From log p(x|z) and log p(z) - log q(z|x) of K draws per image (rows d B + i): the normalised importance
    weights v = softmax over the draws of l = log_px + kl_weight log_ratio (K B), and log (1/K) sum_d exp(l_d)
    of each image (B), the bound."""
    images = log_px.shape[0] // k
    if _use_c(log_px, log_ratio):
        weights, log_mean_w = torch.empty_like(log_px), torch.empty(images)
        _kernels.importance_weights(log_px.data_ptr(), log_ratio.data_ptr(), kl_weight, math.log(k),
                                    weights.data_ptr(), log_mean_w.data_ptr(), images, k)
        return weights, log_mean_w
    log_w = (log_px + kl_weight * log_ratio).view(k, images)
    return torch.softmax(log_w, dim=0).view(-1), torch.logsumexp(log_w, dim=0) - math.log(k)


def importance_gaussian_backward(gaussian, eps, std, z, d_z, weights, kl_weight, scale, dreg):
    """d(loss)/d[mu, s] of the importance-weighted bound from d(loss)/dz of its K draws (d_z, K B rows), the
    draws z (their first dim_z columns), their normalised weights, and `scale` (1/B), for its standard or
    (`dreg`) its DReG gradient, as fused.py's docstring derives them."""
    images, dim_z = std.shape
    k = eps.shape[0] // images
    if _use_c(gaussian, eps, std, z, d_z, weights):
        d_gaussian = torch.empty_like(gaussian)
        _kernels.importance_gaussian_backward(gaussian.data_ptr(), eps.data_ptr(), std.data_ptr(), z.data_ptr(),
                                              z.shape[1], d_z.data_ptr(), weights.data_ptr(), kl_weight, scale, dreg,
                                              d_gaussian.data_ptr(), images, k, dim_z)
        return d_gaussian
    eps, z, d_z = (t.reshape(k, images, -1)[:, :, :dim_z] for t in (eps, z, d_z))
    v = weights.view(k, images, 1)
    if dreg:
        # The encoder through z alone, log q's parameters held: d log w / dz gains w (eps / std - z); each
        # draw's gradient is weighted (1 - w + w v) more (model.dreg_surrogate), and log q has no direct
        # term in std.
        d_z = (d_z + (z - eps / std) * (v * (kl_weight * scale))) * (1 - kl_weight + kl_weight * v)
        d_std = (d_z * eps).sum(dim=0)
    else:
        d_z = d_z + z * v * (kl_weight * scale)
        d_std = (d_z * eps).sum(dim=0) - std.reciprocal() * (kl_weight * scale)
    return torch.cat([d_z.sum(dim=0), d_std * torch.sigmoid(gaussian[:, dim_z:])], dim=1)
