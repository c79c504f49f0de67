"""The fast training step computes what the autograd step computes, step after step, and is never
handed a model or a loss it does not compute."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import make_idx_dataset, read_metrics
from mnist_vae import loop as train_module
from mnist_vae.config import Config
from mnist_vae.errors import UserError
from mnist_vae.data import load_dataset
from mnist_vae.fast import fused, kernels
from mnist_vae.fast.fused import FusedTrainStep, supports, unsupported
from mnist_vae.model import VAE, ConditionalVAE, build
from mnist_vae.step import AutogradTrainStep, make_step
from mnist_vae.data import add_noise


@pytest.fixture(scope="module")
def mnist_batches():
    dataset = load_dataset("mnist", log=lambda *a: None)
    x = torch.from_numpy(dataset.train_images[:6000].reshape(-1, 784).copy()).float() / 255
    return x, torch.from_numpy(dataset.train_labels[:6000].astype("int64"))


def train_both(data, steps, likelihood="bernoulli", noise=False, batch_size=128, dim_z=4, fused_adam=True,
               model_class=VAE, model_options=None, kl_weight=None, device="cpu", **loss_options):
    """The same model trained by the autograd step (through model.loss) and by the fused step;
    `model_options` go to the model's class, `loss_options` (objective, k, kl_weight) to both steps,
    and `kl_weight(step)`, if given, sets the KL's weight before each step, as the KL warm-up does.
    Each step's noise, dropout masks and eps come from a seed of its own, so the two trainings see the
    same draws one after the other; autograd's, which no product routine or C loop changes, is trained
    once for the tests that repeat it through other routines."""
    if kl_weight is not None and not callable(kl_weight):
        loss_options["kl_weight"], kl_weight = kl_weight, None
    setting = (len(data[0]), steps, likelihood, noise, batch_size, dim_z, model_class, tuple(sorted((model_options or {}).items())),
               kl_weight, device, tuple(sorted(loss_options.items())))

    def build():
        torch.manual_seed(0)
        return model_class(dim_z=dim_z, likelihood=likelihood, **(model_options or {})).to(device)

    def trained(model, optimizer, step_class):
        run = step_class(model, optimizer, **loss_options)
        return model, _train(data, run, steps, batch_size, noise, model_class.conditional, kl_weight)

    if setting not in _AUTOGRAD_RUNS:
        model = build()  # the default Adam, unfused
        _AUTOGRAD_RUNS[setting] = trained(model, torch.optim.Adam(model.parameters(), lr=1e-3), AutogradTrainStep)
    reference, reference_terms = _AUTOGRAD_RUNS[setting]
    fast = build()
    fast, fast_terms = trained(fast, torch.optim.Adam(fast.parameters(), lr=1e-3, fused=fused_adam), FusedTrainStep)
    return reference, fast, reference_terms, fast_terms


_AUTOGRAD_RUNS = {}  # the autograd step's trainings by setting: (model, terms)


def _train(data, run, steps, batch_size, noise, conditional, kl_weight):
    """The terms of `steps` steps of `run` over the batches every training of train_both sees."""
    x_all, labels_all = data
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1)).to(x_all.device)
    terms = []
    for step in range(steps):
        start = (step * batch_size) % (len(x_all) - batch_size)
        batch = order[start: start + batch_size]
        target, labels = x_all[batch], labels_all[batch] if conditional else None
        if kl_weight is not None:  # as the training loop sets it during the KL warm-up
            run.loss_options["kl_weight"] = kl_weight(step)
        torch.manual_seed(1000 + step)
        x = add_noise(target, 0.7) if noise else target
        terms.append(run(x, target, labels))
    return torch.stack(terms)


# The C loops through each product routine; their torch-ops versions (the fallback where the C extension
# is not built) through torch.mm here, and layer by layer in the gradient test below.
@pytest.mark.parametrize("implementation, routine", [("C", "torch.mm"), ("C", "oneDNN"), ("torch ops", "torch.mm")],
                         indirect=True)
def test_fused_step_matches_autograd_for_300_steps(mnist_batches, implementation, routine):
    reference, fast, reference_terms, fast_terms = train_both(mnist_batches, steps=300)
    assert fast_step_routine(fast) == routine
    # the loss fell, so the comparison is over real learning, not a flat start
    assert reference_terms[-20:, 0].mean() < reference_terms[:20, 0].mean() - 50
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    assert_weights_close(fast, reference, weight_atol(routine))


# The seed's MLP at a quarter of its width: the tests of one feature each (denoising, an unfused Adam, the
# continuous Bernoulli, the conditional model) train it in a fraction of the time; the 300-step test above
# trains the full width.
SMALL = dict(n_hidden=128)


def assert_weights_close(fast, reference, atol, lr=1e-3):
    """Every weight of `fast` within atol (and 1e-3 relative) of the reference's, but for one element in
    10,000 of a tensor (one at least), which may be as far as two of Adam's steps of lr. Adam's first step
    moves every weight by about lr in its gradient's sign, whatever the gradient's size, and a later one can
    too where the gradient comes from a handful of images (an input pixel that is on in 5 of the 512): a
    weight whose gradient sums to almost 0 (1e-7, where its layer's median is 5e-3) steps by lr one way in
    one training and the other way in the other, as the rounding of its sum falls."""
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        difference = (p_fast - p_reference).detach().abs()
        outside = difference > atol + 1e-3 * p_reference.detach().abs()
        assert int(outside.sum()) <= max(1, p_fast.numel() // 10_000), (
            f"{name}: {int(outside.sum())} of {p_fast.numel()} elements differ by more than {atol:g}, "
            f"up to {float(difference.max()):.2e}")
        assert float(difference.max()) <= 2 * lr, f"{name}: an element differs by {float(difference.max()):.2e}"


def weight_atol(routine):
    """How far weights may drift from autograd's: the reference's products are torch.mm's, so through
    torch.mm only the elementwise loops round differently; through oneDNN every product does too, and
    Adam's normalised steps (about lr for any gradient far above eps) magnify the difference on weights
    whose gradients are near zero."""
    return 2e-4 if routine == "torch.mm" else 5e-4


def fast_step_routine(model):
    return FusedTrainStep(model, torch.optim.Adam(model.parameters())).products.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_step_matches_autograd_for_300_steps_on_a_cuda_gpu(mnist_batches):
    """On CUDA the step's elementwise work runs in torch ops and its products in cuBLAS, whose sums
    round otherwise than the CPU's."""
    data = tuple(t.cuda() for t in mnist_batches)
    reference, fast, reference_terms, fast_terms = train_both(data, steps=300, device="cuda")
    assert fast.encoder[0].weight.is_cuda and reference.encoder[0].weight.is_cuda
    assert reference_terms[-20:, 0].mean() < reference_terms[:20, 0].mean() - 50
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    assert_weights_close(fast, reference, weight_atol("torch.mm"))


def test_fused_step_matches_autograd_when_denoising_with_two_latent_dimensions(mnist_batches, implementation):
    _, _, reference_terms, fast_terms = train_both(mnist_batches, steps=100, noise=True, dim_z=2, model_options=SMALL)
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)


def test_fused_step_matches_autograd_with_an_unfused_optimizer(mnist_batches):
    """Where no fused Adam kernel exists the step calls optimizer.step() instead of updating each
    layer during the backward pass; both must train the same."""
    reference, fast, reference_terms, fast_terms = train_both(mnist_batches, steps=100, fused_adam=False, model_options=SMALL)
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast, p_reference, rtol=1e-3, atol=2e-4, msg=name)


def test_fused_step_matches_autograd_for_the_continuous_bernoulli(mnist_batches, implementation):
    _, _, reference_terms, fast_terms = train_both(mnist_batches, steps=100, likelihood="continuous_bernoulli",
                                                   batch_size=64, model_options=SMALL)
    torch.testing.assert_close(fast_terms, reference_terms, rtol=1e-3, atol=5e-2)


def test_fused_step_uses_the_optimizer_state_torch_would():
    """Its Adam state must be what torch.optim.Adam keeps, so checkpoints and resume see the same."""
    torch.manual_seed(0)
    model = VAE(dim_z=2, n_hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = FusedTrainStep(model, optimizer)
    for _ in range(3):
        step(torch.rand(8, 784))
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all(s["step"].item() == 3 for s in state.values())
    assert all(s["exp_avg"].abs().sum() > 0 for s in state.values())


def test_fused_step_matches_autograd_for_the_conditional_model(mnist_batches, implementation, routine):
    """The label as more input columns of both first layers: the same losses and weights as autograd."""
    reference, fast, reference_terms, fast_terms = train_both(mnist_batches, steps=100, dim_z=2,
                                                              model_class=ConditionalVAE, model_options=SMALL)
    assert reference_terms[-20:, 0].mean() < reference_terms[:20, 0].mean() - 30
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    assert_weights_close(fast, reference, weight_atol(routine))


@pytest.mark.skipif(not kernels.sgemm_gives_torch_mm(), reason="no sgemm of torch's for the C loops here")
@pytest.mark.parametrize("setting", [
    dict(n_hidden=64, activation="tanh", dropout=0.0, batch_size=20),  # Burda et al.'s shape, AVX's tiles
    dict(n_hidden=64, activation="relu", n_layers=3, dropout=0.1, batch_size=128),
    dict(n_hidden=64, conditional=True, likelihood="continuous_bernoulli", batch_size=64),
    dict(n_hidden=64, objective="iwae", k_train=5, batch_size=64),  # the logits' d too large for the C sums alone
], ids=["tanh b20", "relu 3 layers", "conditional, continuous Bernoulli", "iwae k=5"])
def test_the_products_called_from_c_train_to_the_bits_of_torch_mm(mnist_batches, monkeypatch, setting):
    """A hidden layer's product with its activation, and a layer's backward loop with its input gradient, each one
    call into C (sgemm_in_c), and each pass through an MLP one call where the batch suits (in_one_call), train to
    the same bits as torch.mm and the loops called one by one."""
    config = Config(**setting)
    x_all, labels_all = small_data(mnist_batches)
    trained = []
    for sgemm_in_c, in_one_call in ((True, True), (True, False), (False, False)):
        torch.manual_seed(0)
        model = build(config)
        step = make_step(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), config)
        assert isinstance(step, FusedTrainStep) and step.sgemm_in_c
        # an MLP in one call where its rows' weight gradients go into Adam in C: Burda et al.'s batch, on AVX2 too
        takes_one_call = step.in_one_call and config.batch_size <= step.weight_grad_adam_rows
        assert takes_one_call or setting["batch_size"] > 20
        step.sgemm_in_c, step.in_one_call = sgemm_in_c, in_one_call
        calls = {name: 0 for name in ("linear_activation", "linear_backward", "mlp_forward", "mlp_backward")}
        for name in calls:
            def counted(*args, f=getattr(kernels._kernels, name), name=name):
                calls[name] += 1
                return f(*args)
            monkeypatch.setattr(kernels._kernels, name, counted, raising=False)
        torch.manual_seed(1)
        starts = [i * config.batch_size % (len(x_all) - config.batch_size) for i in range(30)]
        terms = torch.stack([step(x_all[i:i + config.batch_size], None, labels_all[i:i + config.batch_size])
                             for i in starts])
        monkeypatch.undo()
        assert bool(calls["mlp_forward"]) == bool(calls["mlp_backward"]) == (in_one_call and takes_one_call)
        assert bool(calls["linear_activation"] + calls["linear_backward"]) == (
            sgemm_in_c and not (in_one_call and takes_one_call and config.objective == "elbo"))
        trained.append((terms, [p.detach().clone() for p in model.parameters()]))
    (terms, parameters), *others = trained
    for terms_ref, parameters_ref in others:
        assert torch.equal(terms, terms_ref)
        assert all(torch.equal(p, q) for p, q in zip(parameters, parameters_ref))


# Every family of models and losses the settings build, beyond the seed's: (model class, its options, the
# likelihood, the steps' loss options, the steps the 300-step test trains). Small MLPs (64 units) on 512
# images, so that each trains in seconds. Fewer steps where: ReLU's derivative jumps at 0, so a unit
# that oneDNN's rounding puts on the other side of 0 than autograd's torch.mm sends another gradient;
# with three ReLU layers the first such flip came at step 67 (a pre-activation of 2e-6 against weights
# 8e-6 apart), and Adam's steps carried it to 1e-3 in the weights by step 80, so that family trains 60
# steps (the two-layer ReLU family below trains 300). The importance-weighted bound runs the decoder on k
# times the rows, and its normalised weights amplify rounding (one KL 0.1 nats off at step 300 in torch
# ops), so 150 steps, on one hidden layer (with two, tanh's run apart by 0.04 nats by step 135).
FAMILIES = {
    "the seed's, no dropout, beta 4": (VAE, dict(dropout=0.0), "bernoulli", dict(kl_weight=4.0), 300),
    "tanh, 1 layer, no dropout": (VAE, dict(activation="tanh", n_layers=1, dropout=0.0), "bernoulli", {}, 300),
    "relu, 3 layers, dropout 0.1": (VAE, dict(activation="relu", n_layers=3, dropout=0.1), "bernoulli", {}, 60),
    "conditional, elu, 3 layers": (ConditionalVAE, dict(activation="elu", n_layers=3), "bernoulli", {}, 300),
    "KL warm-up, continuous Bernoulli, relu": (VAE, dict(activation="relu"), "continuous_bernoulli",
                                               dict(kl_weight=lambda step: min(1.0, step / 200)), 300),
    "iwae k=5, tanh, 1 layer": (VAE, dict(activation="tanh", n_layers=1, dropout=0.0), "bernoulli",
                                dict(objective="iwae", k=5), 150),
    "iwae k=3, conditional, beta 0.5": (ConditionalVAE, {}, "bernoulli", dict(objective="iwae", k=3, kl_weight=0.5),
                                        150),
    "iwae k=5, DReG, tanh, 1 layer": (VAE, dict(activation="tanh", n_layers=1, dropout=0.0), "bernoulli",
                                       dict(objective="iwae", k=5, gradient="dreg"), 150),
}
# More combinations for the one-step gradient test, which costs little.
GRADIENT_FAMILIES = {
    **FAMILIES,
    "elu, 1 layer, dropout 0.1": (VAE, dict(activation="elu", n_layers=1, dropout=0.1), "bernoulli", {}, 0),
    "conditional, tanh, 2 layers": (ConditionalVAE, dict(activation="tanh", dropout=0.1), "bernoulli", {}, 0),
    "relu, 1 layer, continuous Bernoulli": (VAE, dict(activation="relu", n_layers=1, dropout=0.0),
                                            "continuous_bernoulli", {}, 0),
    "KL weight 0": (VAE, {}, "bernoulli", dict(kl_weight=0.0), 0),
    "iwae k=4, continuous Bernoulli": (VAE, dict(activation="elu", dropout=0.1), "continuous_bernoulli",
                                       dict(objective="iwae", k=4), 0),
    "iwae k=1": (VAE, {}, "bernoulli", dict(objective="iwae", k=1), 0),
    "iwae k=4, DReG, conditional, beta 0.5": (ConditionalVAE, dict(dropout=0.1), "bernoulli",
                                              dict(objective="iwae", k=4, gradient="dreg", kl_weight=0.5), 0),
    "iwae k=3, DReG, continuous Bernoulli": (VAE, dict(activation="relu", n_layers=1), "continuous_bernoulli",
                                             dict(objective="iwae", k=3, gradient="dreg"), 0),
}


def small_data(data, n=512):
    x_all, labels_all = data
    return x_all[:n], labels_all[:n]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_matches_autograd_step_after_step_for_every_family(mnist_batches, routine, family):
    """Each depth, activation, dropout, the conditional model, beta, KL warm-up, the continuous Bernoulli and
    the importance-weighted bound: the fused step is chosen for it, and trains as autograd does, through
    each product routine. (Its elementwise work in torch ops is held to autograd step by step in the
    gradient test below, for every family.)"""
    model_class, model_options, likelihood, loss_options, steps = FAMILIES[family]
    model_options = dict(n_hidden=64, **model_options)
    config = replace(Config(), objective=loss_options.get("objective", "elbo"),
                     gradient=loss_options.get("gradient", "standard"))
    assert unsupported(model_class(likelihood=likelihood, **model_options), config) is None
    reference, fast, reference_terms, fast_terms = train_both(
        small_data(mnist_batches), steps=steps, batch_size=64, likelihood=likelihood, model_class=model_class,
        model_options=model_options, **loss_options)
    assert fast_step_routine(fast) == routine
    # the loss fell, so the comparison is over real learning, not a flat start
    assert reference_terms[-20:, 3].mean() < reference_terms[:20, 3].mean() - 30
    rtol, atol = (1e-3, 5e-2) if likelihood == "continuous_bernoulli" else (2e-4, 2e-3)
    torch.testing.assert_close(fast_terms, reference_terms, rtol=rtol, atol=atol)
    assert_weights_close(fast, reference, weight_atol(routine))


@pytest.mark.parametrize("loss_options", [{}, dict(objective="iwae", k=5)], ids=["elbo", "iwae k=5"])
def test_fused_step_matches_autograd_at_a_small_batch(mnist_batches, routine, monkeypatch, loss_options):
    """Burda et al.'s model (narrower) at their batch of 20, and their IWAE (the decoder on 100 rows), where the
    weight gradients through torch.mm go straight into Adam's update (kernels.weight_grad_adam), in AVX-512's tiles
    and in AVX2's: 300 steps as autograd trains them, through each product routine; the IWAE's 100: at about step
    115 of these batches its terms jump ten times further apart through either routine, past the tolerance through
    oneDNN on an AMD EPYC with AVX2 only."""
    weight_grad_adam, mlp_backward = kernels.weight_grad_adam, kernels.MLPInOneCall.backward
    # Either shape of tile wherever it runs (AVX2's where the CPU has AVX2), whichever the step would take here;
    # oneDNN's weight gradients go to Adam as it gives them, whatever the vector registers.
    for avx512 in ([True, False] if routine == "torch.mm" and fused.has_avx2() else [True]):
        monkeypatch.setattr(fused, "has_avx512", lambda: avx512)
        summed = []  # (rows, whether weight_grad_adam took them, in which tiles)
        monkeypatch.setattr(kernels, "weight_grad_adam", lambda d_y, *args, narrow: summed.append(
            (d_y.shape[0], weight_grad_adam(d_y, *args, narrow=narrow), narrow)) or summed[-1][1])

        def backward_in_one_call(plan, *args):  # a whole MLP's layers in one call (kernels.MLPInOneCall)
            done = mlp_backward(plan, *args)
            summed.append((plan.rows, done is not False, args[-1]))
            return done
        monkeypatch.setattr(kernels.MLPInOneCall, "backward", backward_in_one_call)
        model_options = dict(n_hidden=64, activation="tanh", dropout=0.0)
        reference, fast, reference_terms, fast_terms = train_both(
            small_data(mnist_batches), steps=100 if loss_options else 300, batch_size=20, dim_z=8,
            model_options=model_options, **loss_options)
        assert fast_step_routine(fast) == routine
        taken = {(rows, narrow) for rows, done, narrow in summed if done}
        rows = {20, 20 * loss_options.get("k", 1)}
        assert taken == ({(n, not avx512) for n in rows} if routine == "torch.mm" and kernels.available() else set())
        assert reference_terms[-20:, 3].mean() < reference_terms[:20, 3].mean() - 30
        torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
        assert_weights_close(fast, reference, weight_atol(routine))


@pytest.mark.parametrize("family", GRADIENT_FAMILIES)
def test_fused_gradients_match_autograd_layer_by_layer(implementation, family):
    """One step's gradient of every layer's weight and bias, written out, against autograd's through
    model.loss: each new backward (ReLU's factor, any depth, the label columns, the KL's weight, the
    importance weights) on its own, before Adam and many steps blur it."""
    model_class, model_options, likelihood, loss_options, _ = GRADIENT_FAMILIES[family]
    loss_options = {name: (value(100) if callable(value) else value) for name, value in loss_options.items()}
    torch.manual_seed(0)
    reference = model_class(dim_z=3, n_hidden=32, likelihood=likelihood, **model_options)
    fast = copy.deepcopy(reference)
    x = (torch.rand(48, 784) < torch.linspace(0.05, 0.6, 784)).float()
    labels = torch.arange(48) % 10 if model_class.conditional else None
    torch.manual_seed(7)
    loss, _ = reference.loss(x, x, labels, **loss_options)
    loss.backward()
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.0)  # keeps the gradients in .grad, changes nothing
    torch.manual_seed(7)
    FusedTrainStep(fast, optimizer, **loss_options)(x, x, labels)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        scale = p_reference.grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(p_fast.grad, p_reference.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


# ---------------------------------------------------------------- what the fused step is given

def _swap(model, part, index, module):
    getattr(model, part)[index] = module
    return model


class Subclass(VAE):
    """A new model: it may encode, decode or lose otherwise, whatever its layers."""


@pytest.mark.parametrize("edit", [
    lambda m: _swap(m, "encoder", 1, nn.LeakyReLU()),  # an activation the step has no loop for
    lambda m: _swap(m, "decoder", 1, nn.Tanh()),  # PyTorch's tanh, not the fast path's
    lambda m: _swap(m, "decoder", 4, nn.ELU(alpha=0.5)),
    lambda m: _swap(m, "encoder", 2, nn.Dropout(0.1)),  # PyTorch's dropout draws other bits
    lambda m: _swap(m, "encoder", 2, nn.Identity()),
    lambda m: _swap(m, "decoder", 6, nn.Linear(16, 784, bias=False)),
    lambda m: _swap(m, "decoder", 3, nn.Linear(16, 17)),  # shapes that do not chain
    lambda m: m.double(),
    lambda m: Subclass(dim_z=2, n_hidden=16),
])
def test_fused_step_refuses_a_model_it_does_not_compute(edit):
    config = Config(dim_z=2, n_hidden=16)
    model = VAE(dim_z=2, n_hidden=16)
    assert supports(model, config) and supports(ConditionalVAE(dim_z=2, n_hidden=16), config)
    edited = edit(model)
    assert not supports(edited, config)
    optimizer = torch.optim.Adam(edited.parameters())
    assert isinstance(make_step(edited, optimizer, config), AutogradTrainStep)
    with pytest.raises(UserError, match="--step fused cannot train"):
        make_step(edited, optimizer, replace(config, step="fused"))


def test_fused_step_takes_a_model_edited_to_what_it_computes():
    """It reads the layers, not the settings: ReLU for the seed's first ELU, a dropout rate per layer."""
    model = _swap(VAE(dim_z=2, n_hidden=16), "encoder", 1, nn.ReLU())
    _swap(model, "decoder", 5, type(model.decoder[2])(0.3))
    assert supports(model, Config())


@pytest.mark.parametrize("changes", [dict(beta=2.0), dict(kl_warmup=3), dict(objective="iwae", k_train=5),
                                     dict(objective="iwae", k_train=5, gradient="dreg"),
                                     dict(activation="tanh", n_layers=1, dropout=0.0, conditional=True)])
def test_fused_step_is_chosen_for_every_loss_and_mlp_the_settings_build(changes):
    config = replace(Config(dim_z=2, n_hidden=16), **changes)
    model = build(config)
    assert unsupported(model, config) is None
    step = make_step(model, torch.optim.Adam(model.parameters()), config)
    assert isinstance(step, FusedTrainStep)
    dreg = {"gradient": "dreg"} if config.gradient == "dreg" else {}
    assert step.loss_options == dict(kl_weight=config.beta, objective=config.objective, k=config.k_train, **dreg)


def test_a_swapped_activation_is_trained_and_evaluated_by_autograd(tmp_path, monkeypatch):
    """The old program's VAE with SiLU for its first ELU: --step auto must train it as it evaluates it
    (autograd, SiLU), i.e. exactly as --step autograd does; --step fused is refused."""
    data = make_idx_dataset(tmp_path / "data", n_train=128, n_test=32)
    original = VAE.from_config.__func__

    def with_silu(cls, config):
        return _swap(original(cls, config), "encoder", 1, nn.SiLU())

    monkeypatch.setattr(VAE, "from_config", classmethod(with_silu))
    config = Config(dim_z=2, n_hidden=16, batch_size=32, num_epochs=1, data_dir=str(data), PRR_n_img_x=2,
                    PRR_n_img_y=2, PMLR_n_samples=10)
    for step in ("auto", "autograd"):
        train_module.train(replace(config, step=step, output=str(tmp_path / step)), log=lambda *a: None)
    rows = [{k: v for k, v in read_metrics(tmp_path / step)[0].items() if k != "seconds"}
            for step in ("auto", "autograd")]
    assert rows[0] == rows[1]
    with pytest.raises(UserError, match="the encoder is not an MLP it computes: its module 1 is nn.SiLU"):
        train_module.train(replace(config, step="fused", output=str(tmp_path / "fused")), log=lambda *a: None)
