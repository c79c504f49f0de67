"""The C loops of the training step compute what their torch-ops versions and float64 references compute."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from mnist_vae import layers
from mnist_vae.fast import kernels, products

needs_c = pytest.mark.skipif(kernels._kernels is None, reason="the C extension was not built")


def test_the_c_extension_is_built_in_ci():
    """A failed build is not an error for pip (the extension is optional), so CI checks it here."""
    if not os.environ.get("CI"):
        pytest.skip("checked in CI only; without a C compiler the torch ops are used")
    assert kernels._kernels is not None, "src/mnist_vae/_kernels.c was not compiled: is a C compiler installed?"
    assert kernels._kernels.openmp or not sys.platform.startswith("linux"), "built without OpenMP on Linux"
    if sys.platform.startswith("linux") and torch.backends.mkl.is_available():
        assert kernels.sgemm_gives_torch_mm(), "the C loops found no sgemm in torch's library that gives torch.mm's bits"


@needs_c
def test_the_c_loops_share_torchs_openmp_runtime():
    """Two OpenMP runtimes in one process would each keep their own threads, more threads than cores."""
    if not (kernels._kernels.openmp and sys.platform.startswith("linux")):
        pytest.skip("built without OpenMP")
    assert len(kernels._openmp_runtimes()) == 1, kernels._openmp_runtimes()


def splitmix64_in_python(key, n):
    """SplitMix64 on Python integers, the reference the two implementations are checked against."""
    out, mask = [], (1 << 64) - 1
    for _ in range(n):
        key = (key + 0x9E3779B97F4A7C15) & mask
        z = key
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("key", [0, 1, 2**63 + 12345, 2**64 - 1])
def test_splitmix64_matches_the_reference(implementation, key):
    got = [value % (1 << 64) for value in layers.splitmix64(key, 257).tolist()]
    assert got == splitmix64_in_python(key, 257)
    if key == 0:
        assert got[0] == 0xE220A8397B1DCDAF  # the first output of SplitMix64 from 0, as published


def test_dropout_bits_follow_torch_seed_and_differ_between_calls(implementation):
    torch.manual_seed(3)
    first, second = layers.dropout_bits(1001), layers.dropout_bits(1001)
    torch.manual_seed(3)
    assert torch.equal(layers.dropout_bits(1001), first)
    assert not torch.equal(first, second)
    assert first.shape == (1001,) and first.dtype == torch.int16


@needs_c
def test_c_and_torch_ops_draw_the_same_dropout_bits(monkeypatch):
    torch.manual_seed(5)
    c_bits = layers.dropout_bits(128003)
    monkeypatch.setattr(kernels, "_enabled", False)
    torch.manual_seed(5)
    assert torch.equal(layers.dropout_bits(128003), c_bits)


def inputs(rows=130, cols=501):
    """Pre-activations over the whole float32 range that matters, tiny ones included."""
    torch.manual_seed(0)
    a = torch.randn(rows, cols) * 4
    a.view(-1)[:2001] = torch.linspace(-100, 100, 2001)
    a.view(-1)[2001:3001] = torch.randn(1000) * 1e-5
    bias = torch.randn(cols) * 0.1
    return a, bias


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("activation", ["elu", "tanh", "relu"])
def test_activation_dropout_and_its_backward_factor(implementation, activation, p):
    a, bias = inputs()
    key = layers.dropout_key() if p > 0 else None
    mask = torch.ones(a.shape, dtype=torch.float64) if key is None else (
        (layers.dropout_bits(a.numel(), key=key) >= layers.keep_threshold(p)).double().view(a.shape) / (1 - p))
    # float64 reference, with the derivative from autograd
    x = (a.double() + bias.double()).requires_grad_()
    act = {"elu": F.elu, "tanh": torch.tanh, "relu": F.relu}[activation](x)
    (derivative,) = torch.autograd.grad(act.sum(), x)
    function = kernels.ACTIVATION_DROPOUT[activation]
    h, factor = function(a.clone(), bias, key, p)
    # tanh as 2 sigmoid(2x) - 1 is within about 2e-7 of tanh; the mask scales errors by 1/(1-p)
    torch.testing.assert_close(h.double(), act.detach() * mask, rtol=2e-6, atol=3e-7 / (1 - p))
    torch.testing.assert_close(factor.double(), derivative * mask, rtol=2e-6, atol=4e-7 / (1 - p))


def test_bernoulli_loss_and_its_gradient(implementation):
    logits, bias = inputs(128, 784)
    torch.manual_seed(1)
    target = torch.rand(logits.shape)
    target[:, :100] = (target[:, :100] > 0.5).float()
    log_p, d_logits = kernels.bernoulli_loss(logits, bias, target, 1 / 128)
    l64 = (logits.double() + bias.double()).requires_grad_()
    reference = (target.double() * l64 - F.softplus(l64)).sum()
    (gradient,) = torch.autograd.grad(-reference / 128, l64)
    assert log_p.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(d_logits.double(), gradient, rtol=1e-5, atol=1e-9)
    # by_row: each row's log-likelihood (the importance-weighted bound weighs each draw by its own)
    rows, d_rows = kernels.bernoulli_loss(logits, bias, target, 1 / 128, by_row=True)
    by_row = (target.double() * l64 - F.softplus(l64)).sum(dim=1).detach()
    torch.testing.assert_close(rows.double(), by_row, rtol=1e-6, atol=1e-4)
    assert torch.equal(d_rows, d_logits) and rows.sum().item() == log_p.item()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("activation", ["elu", "tanh", "relu"])
def test_the_forward_pass_alone_gives_the_same_activations_and_no_factor(implementation, activation, p):
    a, bias = inputs()
    key = layers.dropout_key() if p > 0 else None
    function = kernels.ACTIVATION_DROPOUT[activation]
    h, factor = function(a.clone(), bias, key, p)
    h_alone, no_factor = function(a.clone(), bias, key, p, backward=False)
    assert no_factor is None and factor is not None
    assert torch.equal(h_alone, h)


@pytest.mark.parametrize("cols", [784, 5, 37])
def test_the_log_likelihood_of_draws_reads_each_image_once_for_its_n_draws(implementation, cols):
    """bernoulli_log_p: row r of the logits is a draw for image r // n, summed over pixels as the
    float64 reference sums them (cols not a multiple of the loop's 16 lanes take its tail too)."""
    n = 3
    images = max(11, -(-3001 // (n * cols)))  # inputs() writes its special values into the first 3001
    logits, bias = inputs(n * images, cols)
    torch.manual_seed(2)
    x = torch.rand(images, cols)
    x[:, : cols // 2] = (x[:, : cols // 2] > 0.5).float()
    log_p = kernels.bernoulli_log_p(logits, bias, x, n)
    l64 = logits.double() + bias.double()
    target = x.double().repeat_interleave(n, dim=0)
    reference = (target * l64 - F.softplus(l64)).sum(dim=1)
    torch.testing.assert_close(log_p.double(), reference, rtol=1e-6, atol=1e-4)
    by_row, _ = kernels.bernoulli_loss(logits, bias, x.repeat_interleave(n, dim=0), 1.0, by_row=True)
    torch.testing.assert_close(log_p, by_row, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (128, 500)])
def test_the_activation_loops_drop_the_units_of_dropout_bits(implementation, shape):
    """The C loop draws a mask's bits itself from its key; they must be dropout_bits' bits, also where
    one SplitMix64 output's four 16-bit values span two rows."""
    key = layers.dropout_key()
    kept = layers.dropout_bits(shape[0] * shape[1], key=key).view(shape) >= layers.keep_threshold(0.5)
    for function in (kernels.elu_dropout, kernels.tanh_dropout, kernels.relu_dropout):
        h, factor = function(torch.full(shape, 1.0), torch.zeros(shape[1]), key, 0.5)
        assert torch.equal(h != 0, kept) and torch.equal(factor != 0, kept)


@needs_c
@pytest.mark.parametrize("shape", [(131, 501), (7, 701)])
def test_the_c_loops_give_the_same_on_any_number_of_threads(shape):
    """The loops split their rows, and their dropout bits, between torch's threads, the activation and the loss
    from a few thousand elements: uneven splits (3 threads over 131 rows, or over 7) must give what one
    thread gives."""
    a, bias = inputs(*shape)
    target = torch.rand(*shape)
    key = layers.dropout_key()
    results = {}
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results[threads] = (*kernels.tanh_dropout(a.clone(), bias, key, 0.3),
                                *kernels.bernoulli_loss(a, bias, target, 0.01),
                                kernels.bernoulli_log_p(a, bias, target, 1))
    finally:
        torch.set_num_threads(threads_before)
    for one, three in zip(results[1], results[3]):
        torch.testing.assert_close(three, one, rtol=1e-6, atol=0)
    kept = layers.dropout_bits(a.numel(), key=key).view(a.shape) >= layers.keep_threshold(0.3)
    assert torch.equal(results[3][0] != 0, kept)


@needs_c
def test_non_contiguous_or_double_inputs_take_the_torch_ops(monkeypatch):
    a, bias = inputs()
    key = layers.dropout_key()
    h_c, factor_c = kernels.elu_dropout(a.clone(), bias, key, 0.1)
    wide = torch.zeros(a.shape[0], 2 * a.shape[1])
    wide[:, ::2] = a
    h_strided, factor_strided = kernels.elu_dropout(wide[:, ::2], bias, key, 0.1)
    torch.testing.assert_close(h_strided, h_c, rtol=2e-6, atol=3e-7)
    torch.testing.assert_close(factor_strided, factor_c, rtol=2e-6, atol=5e-7)
    h_double, factor_double = kernels.elu_dropout(a.double(), bias.double(), key, 0.1)
    torch.testing.assert_close(h_double, h_c.double(), rtol=2e-6, atol=3e-7)
    torch.testing.assert_close(factor_double, factor_c.double(), rtol=2e-6, atol=5e-7)


@pytest.mark.parametrize("dim_z", [1, 2, 20])
def test_gaussian_sample_kl_and_backward(implementation, dim_z):
    torch.manual_seed(2)
    gaussian = torch.randn(129, 2 * dim_z) * 3
    gaussian[0, dim_z:] = torch.linspace(-30, 30, dim_z)  # std from about 1e-6 to 30
    eps, d_z = torch.randn(129, dim_z), torch.randn(129, dim_z)
    z, std, kl = kernels.gaussian_sample(gaussian, eps)
    g64 = gaussian.double().requires_grad_()
    mu, std64 = g64[:, :dim_z], F.softplus(g64[:, dim_z:]) + 1e-6
    z64 = mu + std64 * eps.double()
    kl64 = (0.5 * (mu ** 2 + std64 ** 2 - 1) - torch.log(std64)).sum()
    torch.testing.assert_close(z.double(), z64.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), std64.detach(), rtol=1e-6, atol=1e-12)
    assert kl.item() == pytest.approx(kl64.item(), rel=1e-6)
    (gradient,) = torch.autograd.grad((z64 * d_z.double()).sum() + kl64 / 129, g64)
    d_gaussian = kernels.gaussian_backward(gaussian, eps, std, d_z, 1 / 129)
    torch.testing.assert_close(d_gaussian.double(), gradient, rtol=1e-5, atol=1e-6)


def test_the_kl_of_each_std_alone_is_within_float32_rounding(implementation):
    """The KL's log std (a polynomial in C) for single draws with std from 1e-6 to 1e4, where a sum over many
    would hide one bad value; the KL of one std is 0.5 (std² - 1) - log std (mu = 0)."""
    for s in torch.cat([torch.linspace(-14, 10, 97), torch.tensor([-0.5413, 0.5413, 1e4])]):  # softplus(±0.5413) ≈ 1
        gaussian = torch.tensor([[0.0, s.item()]])
        _, std, kl = kernels.gaussian_sample(gaussian, torch.zeros(1, 1))
        std64 = F.softplus(torch.tensor(s.item(), dtype=torch.float64)) + 1e-6
        expected = 0.5 * (std64 ** 2 - 1) - torch.log(std64)
        # the float32 rounding of std64 itself, and of the terms' difference, a few ulps of the larger term
        tolerance = 4e-7 * max(1.0, 0.5 * std64.item() ** 2, abs(torch.log(std64).item()))
        assert abs(kl.item() - expected.item()) <= tolerance, (s.item(), kl.item(), expected.item())


@pytest.mark.parametrize("shape", [(1, 1), (20, 200), (64, 500), (100, 200), (128, 500), (640, 37)])
def test_the_backward_pass_through_a_hidden_layer_and_its_bias(implementation, shape):
    """factor_bias_grad: d times the factor, in place, and its sum over the rows, the bias's gradient; and the
    sum alone for the last layer (no factor). The same bits on one thread as on two."""
    torch.manual_seed(4)
    d, factor = torch.randn(shape), torch.rand(shape) * 2
    reference = d.double() * factor.double()
    grad_bias = torch.empty(shape[1])
    out = kernels.factor_bias_grad(d, factor, grad_bias)
    assert out.data_ptr() == d.data_ptr()
    torch.testing.assert_close(d.double(), reference, rtol=1e-7, atol=0)
    torch.testing.assert_close(grad_bias.double(), reference.sum(dim=0), rtol=1e-5, atol=1e-5)
    last = torch.empty(shape[1])
    kernels.factor_bias_grad(d, None, last)
    torch.testing.assert_close(last.double(), reference.sum(dim=0), rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty(shape[1])
        kernels.factor_bias_grad(d.clone(), factor, one)
    finally:
        torch.set_num_threads(threads)
    again = torch.empty(shape[1])
    kernels.factor_bias_grad(d.clone(), factor, again)
    assert torch.equal(one, again)


@pytest.mark.parametrize("shape", [(1, 1), (20, 200), (17, 33), (64, 500), (100, 200), (128, 500), (130, 784)])
@pytest.mark.parametrize("with_factor", [True, False])
def test_the_backward_pass_also_writes_d_transposed(implementation, shape, with_factor):
    """factor_bias_grad(transposed=True): the same d and bias gradient as without, and d' as a contiguous
    tensor, with rows that are no multiple of the loop's blocks of sixteen."""
    torch.manual_seed(5)
    d, factor = torch.randn(shape), torch.rand(shape) * 2 if with_factor else None
    plain_bias, bias = torch.empty(shape[1]), torch.empty(shape[1])
    plain = kernels.factor_bias_grad(d.clone(), factor, plain_bias)
    got, got_t = kernels.factor_bias_grad(d.clone(), factor, bias, transposed=True)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    torch.testing.assert_close(bias.double(), plain.double().sum(dim=0), rtol=1e-5, atol=1e-5)
    assert got_t.shape == shape[::-1] and got_t.is_contiguous()
    assert torch.equal(got_t, got.t())


def test_the_loss_of_k_draws_reads_each_image_for_its_rows(implementation):
    """bernoulli_loss with K B rows of logits and B targets: row k B + i is draw k of image i, the same as
    with the targets repeated K times; rows that are not whole draws of every target are refused."""
    logits, bias = inputs(3 * 43, 784)
    torch.manual_seed(6)
    target = (torch.rand(43, 784) > 0.5).float()
    rows, d_logits = kernels.bernoulli_loss(logits, bias, target, 0.5, by_row=True)
    rows_repeated, d_repeated = kernels.bernoulli_loss(logits, bias, target.repeat(3, 1), 0.5, by_row=True)
    assert torch.equal(rows, rows_repeated) and torch.equal(d_logits, d_repeated)
    for some_logits, targets in ((logits[:100], target), (logits, target[:0])):
        with pytest.raises(ValueError, match="not whole draws"):
            kernels.bernoulli_loss(some_logits, bias, targets, 0.5)


def test_k_draws_per_image_their_kl_and_log_ratio(implementation):
    """gaussian_draws: row d B + i is draw d of image i, z = mu + std eps, and log p(z) - log q(z|x) of each."""
    torch.manual_seed(7)
    images, k, dim_z = 33, 5, 6
    gaussian = torch.randn(images, 2 * dim_z) * 3
    gaussian[0, dim_z:] = torch.linspace(-14, 10, dim_z)
    eps = torch.randn(k * images, dim_z)
    z, std, kl, log_ratio = kernels.gaussian_draws(gaussian, eps, k)
    g = gaussian.double()
    mu, std64 = g[:, :dim_z], F.softplus(g[:, dim_z:]) + 1e-6
    e = eps.double().view(k, images, dim_z)
    z64 = mu + std64 * e
    normal = torch.distributions.Normal
    ratio64 = normal(0.0, 1.0).log_prob(z64).sum(2) - normal(mu, std64).log_prob(z64).sum(2)
    torch.testing.assert_close(z.double(), z64.reshape(-1, dim_z), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(std.double(), std64, rtol=1e-6, atol=1e-12)
    assert kl.item() == pytest.approx((0.5 * (mu ** 2 + std64 ** 2 - 1) - std64.log()).sum().item(), rel=1e-6)
    torch.testing.assert_close(log_ratio.double(), ratio64.reshape(-1), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_importance_weights_and_the_bound_of_each_image(implementation, kl_weight):
    """The softmax over each image's K draws and log (1/K) sum exp, also where the log-weights are hundreds of
    nats apart (a draw far out in q's tail) and one weight is all but 1."""
    torch.manual_seed(8)
    images, k = 40, 7
    log_px = torch.randn(k * images) * 30 - 200
    log_px[:images] -= 700  # draw 0 of every image hundreds of nats below the rest
    log_ratio = torch.randn(k * images) * 5
    weights, log_mean_w = kernels.importance_weights(log_px, log_ratio, kl_weight, k)
    log_w = (log_px.double() + kl_weight * log_ratio.double()).view(k, images)
    torch.testing.assert_close(weights.double(), torch.softmax(log_w, dim=0).view(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(log_mean_w.double(), torch.logsumexp(log_w, dim=0) - math.log(k), rtol=1e-6,
                               atol=1e-4)
    # A weight below float32's smallest normal is 0, as e^x is in float32: a tiny one would make the
    # gradients it scales denormal, which the CPU multiplies many times slower.
    assert torch.equal(weights[:images], torch.zeros(images))


@needs_c
@pytest.mark.parametrize("dreg", [False, True])
@pytest.mark.parametrize("label_columns", [0, 10])
def test_the_bounds_gradient_in_c_is_the_torch_ops_one(dreg, label_columns):
    """importance_gaussian_backward in C against its torch-ops version in float64 (which the fused step's
    300-step tests hold to autograd), with z's label columns, as a conditional model appends them, skipped."""
    torch.manual_seed(9)
    images, k, dim_z = 21, 5, 4
    gaussian = torch.randn(images, 2 * dim_z) * 2
    eps = torch.randn(k * images, dim_z)
    z, std, _, _ = kernels.gaussian_draws(gaussian, eps, k)
    z = torch.cat([z, torch.rand(k * images, label_columns)], dim=1)
    d_z = torch.randn(k * images, dim_z)
    weights = torch.softmax(torch.randn(k, images), dim=0).reshape(-1)
    got = kernels.importance_gaussian_backward(gaussian, eps, std, z, d_z, weights, 0.7, 1 / images, dreg)
    kernels.use(False)
    try:
        expected = kernels.importance_gaussian_backward(*(t.double() for t in (gaussian, eps, std, z, d_z, weights)),
                                                        0.7, 1 / images, dreg)
    finally:
        kernels.use(True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def _adam_pair(shapes, generator):
    """A layer's weight and bias with Adam's moments part-way through training, twice: as C and torch step them."""
    tensors = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator)
        m = torch.randn(shape, generator=generator) * 1e-2
        v = torch.rand(shape, generator=generator) * 1e-4
        tensors.append((p, m, v))
    copies = [tuple(t.clone() for t in layer) for layer in tensors]
    return tensors, copies


@needs_c
@pytest.mark.parametrize("shapes", [((500, 784), (500,)), ((40, 500), (40,)), ((7, 3), (13,))])
@pytest.mark.parametrize("weight_decay, beta1", [(0.0, 0.9), (1e-2, 0.9), (0.0, 0.3)])
def test_adam_in_c_is_torchs_fused_adam(shapes, weight_decay, beta1):
    """Twenty steps of kernels.adam against torch._fused_adam_ on the same gradients, also with weight decay and
    with beta1 < 0.5 (where torch's lerp starts from the gradient): the same bits on every whole vector of 16
    elements, within an ulp or two on the few that torch's loop does one at a time at a tensor's end."""
    generator = torch.Generator().manual_seed(1)
    c, reference = _adam_pair(shapes, generator)
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    for count in range(1, 21):
        grads = [torch.randn(shape, generator=generator) * 10.0 ** -(count % 5) for shape in shapes]  # of every size
        for s in steps:
            s.add_(1)
        options = dict(lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
        torch._fused_adam_([t[0] for t in reference], grads, [t[1] for t in reference], [t[2] for t in reference],
                           [], steps, amsgrad=False, maximize=False, **options)
        assert kernels.adam([t[0] for t in c], grads, [t[1] for t in c], [t[2] for t in c],
                            kernels.adam_scalars(float(count), *options.values()))
    for ours, theirs in zip(c, reference):
        for a, b in zip(ours, theirs):
            whole = a.numel() // 16 * 16
            assert torch.equal(a.view(-1)[:whole], b.view(-1)[:whole])
            torch.testing.assert_close(a, b, rtol=3e-7, atol=1e-12)
            assert not torch.equal(a, torch.zeros_like(a))


@needs_c
@pytest.mark.parametrize("count", [7, 1000, 16000, 40000])
def test_adam_in_c_divides_by_the_bias_correction_as_torch_does_far_into_training_and_past_overflow(count):
    """The C loop divides by the bias correction's square root through its reciprocal: the same bits as
    torch._fused_adam_ at step counts where that root is another float (and from 16,628 on, 1), on gradients of
    every size, with a gradient whose square overflows (an infinite second moment) and a NaN."""
    generator = torch.Generator().manual_seed(count)
    (c,), (reference,) = _adam_pair([(64, 160)], generator)
    grad = torch.randn(64, 160, generator=generator) * torch.logspace(-12, 12, 160)
    grad[3, :16], grad[5, :16] = 1e30, float("nan")
    options = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    torch._fused_adam_([reference[0]], [grad], [reference[1]], [reference[2]], [], [torch.tensor(float(count))],
                       amsgrad=False, maximize=False, **options)
    assert kernels.adam([c[0], torch.zeros(16)], [grad, torch.zeros(16)], [c[1], torch.zeros(16)],
                        [c[2], torch.zeros(16)], kernels.adam_scalars(float(count), *options.values()))
    assert torch.isinf(c[2][3, :16]).all() and torch.isnan(c[0][5, :16]).all()
    for ours, theirs in zip(c, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


@needs_c
@pytest.mark.parametrize("out, in_features, rows", [(784, 200, 20), (200, 784, 20), (100, 200, 20), (50, 200, 32),
                                                     (200, 50, 100), (10, 500, 128), (7, 3, 1), (13, 70, 5)])
@pytest.mark.parametrize("narrow", [False, True], ids=["AVX-512 tiles", "AVX2 tiles"])
def test_weight_gradient_into_adam_is_the_product_then_adam(out, in_features, rows, narrow):
    """kernels.weight_grad_adam: Adam's update from the weight gradient d' x, which it sums tile by tile and never
    writes out, is kernels.adam's from that product (within the rounding of a sum in another order), for shapes
    with and without leftover rows and columns of tiles, with either shape of tile; the same bits on one thread as on
    two; the bias as adam updates it. (On any CPU with AVX2: the step takes the tiles that fit the CPU.)"""
    if narrow and not products.has_avx2():
        pytest.skip("AVX2's tiles are built for a CPU with AVX2 and FMA")
    generator = torch.Generator().manual_seed(5)
    tensors, references = _adam_pair([(out, in_features), (out,)], generator)
    c, reference = list(tensors[0]) + list(tensors[1]), list(references[0]) + list(references[1])  # p, m, v each
    start = c[0].clone()
    for count in range(1, 4):
        d, x = torch.randn(rows, out, generator=generator), torch.randn(rows, in_features, generator=generator)
        grad_bias = d.sum(0)
        scalars = kernels.adam_scalars(float(count), 1e-3, 0.9, 0.999, 1e-8, 0.0)
        product = (d.double().t() @ x.double()).float()
        assert kernels.adam(reference[0::3], [product, grad_bias], reference[1::3], reference[2::3], scalars)
        before = [t.clone() for t in c]
        assert kernels.weight_grad_adam(d, x, c[0::3], grad_bias, c[1::3], c[2::3], scalars, narrow)
    threads = torch.get_num_threads()
    try:  # the last step once more, from the same state, on one thread
        torch.set_num_threads(1)
        assert kernels.weight_grad_adam(d, x, before[0::3], grad_bias, before[1::3], before[2::3], scalars, narrow)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(before, c))
    for ours, theirs in zip(c, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # a gradient summed in another order
    assert all(torch.equal(a, b) for a, b in zip(c[3:], reference[3:]))  # the bias, from the same gradient
    assert not torch.equal(c[0], start)


def test_weight_gradient_into_adam_leaves_what_it_does_not_sum(monkeypatch):
    """More rows than kernels.WEIGHT_GRAD_ADAM_ROWS, a transposed operand, or the C loops switched off: nothing
    updated, False, and the step takes its product routine and adam."""
    rows = kernels.WEIGHT_GRAD_ADAM_ROWS
    parameters, exp_avgs, exp_avg_sqs = ([torch.full(shape, value) for shape in ((4, 16), (4,))]
                                         for value in (1.0, 0.0, 0.0))
    before = [t.clone() for t in parameters + exp_avgs + exp_avg_sqs]
    scalars = kernels.adam_scalars(1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    for d, x in ((torch.ones(rows + 1, 4), torch.ones(rows + 1, 16)), (torch.ones(4, rows).t(), torch.ones(rows, 16))):
        assert not kernels.weight_grad_adam(d, x, parameters, torch.ones(4), exp_avgs, exp_avg_sqs, scalars)
    monkeypatch.setattr(kernels, "_enabled", False)
    assert not kernels.weight_grad_adam(torch.ones(2, 4), torch.ones(2, 16), parameters, torch.ones(4), exp_avgs,
                                        exp_avg_sqs, scalars)
    assert all(torch.equal(a, b) for a, b in zip(parameters + exp_avgs + exp_avg_sqs, before))


def test_adam_leaves_gradients_it_cannot_read_to_torch(monkeypatch):
    """Non-contiguous gradients, or the C loops switched off: nothing updated, False, and the step uses torch's."""
    parameters, exp_avgs, exp_avg_sqs = ([torch.full((4, 16), value) for _ in range(2)] for value in (1.0, 0.0, 0.0))
    before = [t.clone() for t in parameters + exp_avgs + exp_avg_sqs]
    scalars = kernels.adam_scalars(1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert not kernels.adam(parameters, [torch.ones(16, 4).t(), torch.ones(4, 16)], exp_avgs, exp_avg_sqs, scalars)
    monkeypatch.setattr(kernels, "_enabled", False)
    assert not kernels.adam(parameters, [torch.ones(4, 16), torch.ones(4, 16)], exp_avgs, exp_avg_sqs, scalars)
    assert all(torch.equal(a, b) for a, b in zip(parameters + exp_avgs + exp_avg_sqs, before))


def _in_c_and_in_torch_ops(compute):
    """compute() with the C loops, then with the torch ops."""
    before = kernels.available()
    try:
        kernels.use(True)
        c = compute()
        kernels.use(False)
        return c, compute()
    finally:
        kernels.use(before)


@needs_c
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("activation", ["elu", "tanh", "relu"])
def test_a_bfloat16_layer_in_c_gives_the_bits_of_the_float32_one_rounded(activation, p):
    """--precision bf16: the C loop reads the product in bfloat16 and writes h in bfloat16 (and float32 where
    asked); each is what the float32 layer gives on the same input, h rounded as .bfloat16() rounds."""
    a, bias = inputs()
    a16 = a.bfloat16()
    key = layers.dropout_key() if p > 0 else None
    (h16, factor, h), (h16_ops, factor_ops, h_ops) = _in_c_and_in_torch_ops(
        lambda: kernels.activation_bf16(activation, a16, bias, key, p, keep_float=True))
    assert h16.dtype == torch.bfloat16 and factor.dtype == h.dtype == torch.float32
    assert torch.equal(h16, h.bfloat16()) and torch.equal(h16, h16_ops)
    # the same loop as float32 training's on a16's values: its bits there, the torch ops' within their rounding
    reference, reference_factor = kernels.ACTIVATION_DROPOUT[activation](a16.float(), bias, key, p)
    assert torch.equal(h, reference) and torch.equal(factor, reference_factor)
    torch.testing.assert_close(h, h_ops, rtol=2e-6, atol=3e-7 / (1 - p))
    torch.testing.assert_close(factor, factor_ops, rtol=2e-6, atol=4e-7 / (1 - p))
    assert kernels.activation_bf16(activation, a16, bias, key, p)[2] is None  # no float32 copy unless asked


@needs_c
@pytest.mark.parametrize("with_factor", [True, False])
def test_the_bfloat16_backward_through_a_layer_and_its_bias(with_factor):
    """d(loss)/da in bfloat16 from a bfloat16 d(loss)/dh times the factor, or from the loss's float32 gradient
    alone, rounded as .bfloat16() rounds, and the bias gradient from its float32 values."""
    torch.manual_seed(2)
    d = torch.randn(130, 501) * torch.logspace(-30, 30, 501)  # tiny and huge values: the rounding's every case
    factor = torch.rand(130, 501) if with_factor else None
    d_in = d.bfloat16() if with_factor else d
    grads = torch.empty(501), torch.empty(501)
    out, out_ops = _in_c_and_in_torch_ops(
        lambda: kernels.factor_bias_grad_bf16(d_in, factor, grads[0] if kernels.available() else grads[1]))
    exact = d_in.double() * (factor.double() if with_factor else 1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact.float().bfloat16()) and torch.equal(out, out_ops)
    scale = exact.abs().sum(dim=0)  # float32 sums of 130 terms, within a few ulps of their magnitude
    assert torch.all((grads[0].double() - exact.sum(dim=0)).abs() <= 1e-6 * scale)
    assert torch.all((grads[0].double() - grads[1].double()).abs() <= 1e-6 * scale)
    threads = torch.get_num_threads()
    try:  # the rows' blocks summed in order: the same bits on one thread as on two
        torch.set_num_threads(1)
        one = torch.empty(501)
        kernels.factor_bias_grad_bf16(d_in, factor, one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, grads[0])


@needs_c
def test_adam_on_a_bfloat16_gradient_writes_the_bfloat16_weight():
    """--precision bf16: the weight's gradient read in bfloat16 gives float32 Adam's bits on its float32 value,
    and the bfloat16 copy of the weight is the updated weight rounded as .bfloat16() rounds."""
    generator = torch.Generator().manual_seed(4)
    (bf16,), (fp32,) = _adam_pair([(300, 200)], generator)
    bias = [tuple(torch.zeros(7) for _ in range(3)) for _ in range(2)]
    copy = torch.empty(300, 200, dtype=torch.bfloat16)
    for count in range(1, 6):
        grad = (torch.randn(300, 200, generator=generator) * 10.0 ** -count).bfloat16()
        grad_bias = torch.randn(7, generator=generator)
        scalars = kernels.adam_scalars(float(count), 1e-3, 0.9, 0.999, 1e-8, 0.0)
        for (weight, exp_avg, exp_avg_sq), (b, b_avg, b_avg_sq), g, weight_copy in (
                (bf16, bias[0], grad, copy), (fp32, bias[1], grad.float(), None)):
            assert kernels.adam([weight, b], [g, grad_bias], [exp_avg, b_avg], [exp_avg_sq, b_avg_sq], scalars,
                                weight_copy=weight_copy)
        assert all(torch.equal(a, b) for a, b in zip(bf16 + bias[0], fp32 + bias[1]))
        assert torch.equal(copy, bf16[0].bfloat16())
    # a float32 gradient where a bfloat16 one is expected is left to torch
    assert not kernels.adam([bf16[0], bias[0][0]], [grad.float(), grad_bias], [bf16[1], bias[0][1]],
                            [bf16[2], bias[0][2]], scalars, weight_copy=copy)


@needs_c
@pytest.mark.parametrize("kl_weight", [1.0, 0.25])
def test_the_elbo_terms_of_a_batch_in_one_call(kl_weight):
    """[-ELBO, -log p(x|z), KL, loss] as batch means from each image's log p(x|z) and KL: the C loop and the torch
    ops within float32 rounding of float64's, loss = kl_weight KL - log p(x|z)."""
    torch.manual_seed(6)
    log_px, kl = -100 - 50 * torch.rand(20), 25 * torch.rand(20)
    c, ops = _in_c_and_in_torch_ops(lambda: kernels.elbo_terms(log_px, kl, kl_weight))
    rec, divergence = log_px.double().mean(), kl.double().mean()
    reference = torch.stack([divergence - rec, -rec, divergence, kl_weight * divergence - rec])
    for terms in (c, ops):
        assert terms.shape == (4,) and terms.dtype == torch.float32
        torch.testing.assert_close(terms.double(), reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("draws", [1, 3])
def test_the_label_columns_of_a_conditional_models_input(implementation, draws):
    """[v, one_hot(label)] for each row, row r of K draws per image taking image r % B's label; a label
    outside the classes is refused, not written past the row."""
    torch.manual_seed(7)
    labels = torch.tensor([3, 0, 9, 9, 5])
    v = torch.randn(draws * len(labels), 17)
    got = kernels.with_labels(v, labels, 10)
    assert got.shape == (draws * 5, 27) and got.dtype == torch.float32
    assert torch.equal(got[:, :17], v)
    for r in range(draws * 5):
        expected = torch.zeros(10)
        expected[labels[r % 5]] = 1
        assert torch.equal(got[r, 17:], expected), r
    with pytest.raises((ValueError, RuntimeError)):
        kernels.with_labels(v, torch.tensor([3, 0, 10, 1, 2]), 10)
    for wrong in (labels[:4], labels[:0]):  # rows that are not whole draws of the labels
        with pytest.raises(ValueError, match="not whole draws"):
            kernels.with_labels(v, wrong, 10)


needs_sgemm = pytest.mark.skipif(not kernels.sgemm_gives_torch_mm(),
                                 reason="no sgemm of torch's for the C loops here (CI on Linux has one)")


@needs_sgemm
@pytest.mark.parametrize("activation", ["elu", "tanh", "relu"])
@pytest.mark.parametrize("rows, n_in, n_out, p", [(20, 200, 200, 0.0), (3, 17, 9, 0.5), (128, 784, 500, 0.1)])
def test_a_layer_in_one_call_gives_the_bits_of_torch_mm_and_its_loops(activation, rows, n_in, n_out, p):
    """linear_activation is torch.mm then the activation's loop, and linear_backward factor_bias_grad then
    torch.mm for the input gradient, to the bit, dropout masks and all."""
    torch.manual_seed(3)
    x, weight, bias = torch.randn(rows, n_in), torch.randn(n_out, n_in) / n_in ** 0.5, torch.randn(n_out)
    key = None if p == 0 else layers.dropout_key()
    h, factor = kernels.linear_activation(activation, x, weight, bias, key, p)
    h_ref, factor_ref = kernels.ACTIVATION_DROPOUT[activation](torch.mm(x, weight.t()), bias, key, p)
    assert torch.equal(h, h_ref) and torch.equal(factor, factor_ref)
    d_out = torch.randn(rows, n_out)
    for d_factor in (factor, None):  # a hidden layer's, and a last layer's
        grad_bias, grad_bias_ref = torch.empty(n_out), torch.empty(n_out)
        d, d_inputs = kernels.linear_backward(d_out.clone(), d_factor, grad_bias, weight, True)
        d_ref = kernels.factor_bias_grad(d_out.clone(), d_factor, grad_bias_ref)
        assert torch.equal(d, d_ref) and torch.equal(grad_bias, grad_bias_ref)
        assert torch.equal(d_inputs, torch.mm(d_ref, weight))
    assert kernels.linear_backward(d_out.clone(), factor, grad_bias, weight, False)[1] is None


@needs_sgemm
def test_a_layer_in_one_call_takes_only_what_suits_it():
    """Tensors the C loops cannot read, or a last layer's d too large for its column sums alone, go the other way."""
    x, weight, bias = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    assert kernels.linear_activation("tanh", x, weight.t().contiguous().t(), bias, None, 0.0) is None
    assert kernels.linear_activation("tanh", x.double(), weight.double(), bias.double(), None, 0.0) is None
    big = torch.randn(kernels.SUM_IN_C // 100 + 1, 100)
    assert kernels.linear_backward(big, None, torch.empty(100), torch.randn(100, 3), True) is None
    assert kernels.linear_backward(big, torch.ones_like(big), torch.empty(100), torch.randn(100, 3), True) is not None


def _mlp(sizes, generator):
    weights = [torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5 for n_in, n_out in zip(sizes, sizes[1:])]
    return weights, [torch.randn(w.shape[0], generator=generator) for w in weights]


@needs_sgemm
@pytest.mark.parametrize("activations, p, need_input_grad, narrow", [
    (["tanh", "tanh"], 0.0, True, False), (["relu", "elu"], 0.3, False, False), ([], 0.0, True, False),
    (["tanh", "tanh"], 0.0, True, True)])
def test_an_mlp_in_one_call_gives_the_bits_of_its_layers_one_by_one(activations, p, need_input_grad, narrow):
    """MLPInOneCall's forward pass is linear_activation layer by layer, and its backward pass linear_backward then
    weight_grad_adam layer by layer from the last, to the bit: outputs, factors, input gradients, and the
    parameters and Adam's moments after the update."""
    if narrow and not products.has_avx2():
        pytest.skip("the narrow tiles are AVX2's")
    generator = torch.Generator().manual_seed(5)
    rows, sizes = 20, [13, 40, 24, 7][-len(activations) - 2:]
    weights, biases = _mlp(sizes, generator)
    copies = [[t.clone() for t in weights + biases] for _ in range(2)]
    first_weight = weights[0].clone()
    moments = [[[torch.rand(t.shape, generator=generator) for t in (w, b)] for w, b in zip(weights, biases)]
               for _ in range(2)]  # exp_avg and exp_avg_sq of each layer's weight and bias
    x, d_out = torch.randn(rows, sizes[0], generator=generator), torch.randn(rows, sizes[-1], generator=generator)
    keys = [None if p == 0 else layers.dropout_key() for _ in activations]
    scalars = kernels.adam_scalars(3, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    results = []
    for in_one_call, parameters in zip((True, False), copies):
        weights, biases = parameters[:len(parameters) // 2], parameters[len(parameters) // 2:]
        exp_avgs, exp_avg_sqs = ([[t.clone() for t in layer] for layer in kind] for kind in moments)
        grad_biases = [torch.empty_like(b) for b in biases]
        if in_one_call:
            plan = kernels.MLPInOneCall(weights, biases, activations, [p] * len(activations), rows, need_input_grad)
            inputs, factors, _ = plan.forward(x, keys)
            inputs, factors = [t.clone() for t in inputs], [t.clone() for t in factors]
            dx = plan.backward(d_out.clone(), x, grad_biases, exp_avgs, exp_avg_sqs, scalars, narrow)
            dx = None if dx is None else dx.clone()
        else:
            inputs, factors = [x], []
            for w, b, activation, key in zip(weights, biases, activations, keys):
                h, factor = kernels.linear_activation(activation, inputs[-1], w, b, key, p)
                inputs.append(h)
                factors.append(factor)
            d = d_out.clone()
            for j in reversed(range(len(weights))):
                d, d_inputs = kernels.linear_backward(d, factors[j] if j < len(factors) else None, grad_biases[j],
                                                      weights[j], j > 0 or need_input_grad)
                assert kernels.weight_grad_adam(d, inputs[j], [weights[j], biases[j]], grad_biases[j], exp_avgs[j],
                                                exp_avg_sqs[j], scalars, narrow)
                d = d_inputs
            dx = d
        results.append((inputs, factors, dx, parameters + grad_biases + sum(exp_avgs + exp_avg_sqs, [])))
    (inputs, factors, dx, tensors), (inputs_ref, factors_ref, dx_ref, tensors_ref) = results
    assert len(inputs) == len(inputs_ref) and all(torch.equal(a, b) for a, b in zip(inputs, inputs_ref))
    assert all(torch.equal(a, b) for a, b in zip(factors, factors_ref))
    assert (dx is None) == (not need_input_grad) and (dx is None or torch.equal(dx, dx_ref))
    assert all(torch.equal(a, b) for a, b in zip(tensors, tensors_ref))
    assert not torch.equal(tensors[0], first_weight)  # Adam moved the weights


@needs_sgemm
def test_an_mlp_in_one_call_takes_only_what_suits_it():
    """Weights the C loops cannot read, more rows than the weight gradients' tiles take, or a batch of another shape
    than the plan's go the other way, and nothing changes."""
    weights, biases = _mlp([6, 5, 3], torch.Generator().manual_seed(0))
    assert not kernels.MLPInOneCall.suits([weights[0].t().contiguous().t(), weights[1]], biases, 4)
    assert not kernels.MLPInOneCall.suits(weights, biases, kernels.WEIGHT_GRAD_ADAM_ROWS + 1)
    plan = kernels.MLPInOneCall(weights, biases, ["tanh"], [0.0], 4, need_input_grad=True)
    assert plan.forward(torch.randn(4, 6).double(), [None]) is None
    assert plan.forward(torch.randn(5, 6), [None]) is None
    before = [t.clone() for t in weights + biases]
    moments = [[torch.zeros_like(w), torch.zeros_like(b)] for w, b in zip(weights, biases)]
    scalars = kernels.adam_scalars(1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    for d, x in ((torch.randn(4, 2), torch.randn(4, 6)), (torch.randn(4, 3), torch.randn(5, 6))):
        assert plan.backward(d, x, [torch.empty_like(b) for b in biases], moments, moments, scalars, False) is False
    assert all(torch.equal(a, b) for a, b in zip(before, weights + biases))
