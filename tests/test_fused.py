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
from mnist_vae.fast.fused import FusedTrainStep, supports, unsupported
from mnist_vae.model import VAE, ConditionalVAE
from mnist_vae.step import AutogradTrainStep, make_step
from mnist_vae.data import add_noise


@pytest.fixture(scope="module")
def mnist_batches():
    dataset = load_dataset("mnist", log=lambda *a: None)
    x = torch.from_numpy(dataset.train_images[:6000].reshape(-1, 784).copy()).float() / 255
    return x, torch.from_numpy(dataset.train_labels[:6000].astype("int64"))


def train_both(data, steps, likelihood="bernoulli", noise=False, batch_size=128, dim_z=4, fused_adam=True,
               model_class=VAE):
    """The same model trained by the autograd step (through model.loss) and by the fused step."""
    x_all, labels_all = data
    torch.manual_seed(0)
    reference = model_class(dim_z=dim_z, likelihood=likelihood)
    fast = copy.deepcopy(reference)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)  # the default, unfused
    fast_optimizer = torch.optim.Adam(fast.parameters(), lr=1e-3, fused=fused_adam)
    reference_step = AutogradTrainStep(reference, reference_optimizer)
    fast_step = FusedTrainStep(fast, fast_optimizer)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1))
    reference_terms, fast_terms = [], []
    for step in range(steps):
        start = (step * batch_size) % (len(x_all) - batch_size)
        batch = order[start: start + batch_size]
        target, labels = x_all[batch], labels_all[batch] if model_class.conditional else None
        for terms, run in ((reference_terms, reference_step), (fast_terms, fast_step)):
            torch.manual_seed(1000 + step)  # the same noise, dropout masks and eps for both
            x = add_noise(target, 0.7) if noise else target
            terms.append(run(x, target, labels))
    return reference, fast, torch.stack(reference_terms), torch.stack(fast_terms)


def test_fused_step_matches_autograd_for_300_steps(mnist_batches, implementation, routine):
    reference, fast, reference_terms, fast_terms = train_both(mnist_batches, steps=300)
    assert fast_step_routine(fast) == routine
    # the loss fell, so the comparison is over real learning, not a flat start
    assert reference_terms[-20:, 0].mean() < reference_terms[:20, 0].mean() - 50
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast, p_reference, rtol=1e-3, atol=weight_atol(routine), msg=name)


def weight_atol(routine):
    """How far weights may drift from autograd's: the reference's products are torch.mm's, so through
    torch.mm only the elementwise loops round differently; through oneDNN every product does too, and
    Adam's normalised steps (about lr for any gradient far above eps) magnify the difference on weights
    whose gradients are near zero."""
    return 2e-4 if routine == "torch.mm" else 5e-4


def fast_step_routine(model):
    return FusedTrainStep(model, torch.optim.Adam(model.parameters())).products.name


def test_fused_step_matches_autograd_when_denoising_with_two_latent_dimensions(mnist_batches, implementation):
    _, _, reference_terms, fast_terms = train_both(mnist_batches, steps=100, noise=True, dim_z=2)
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)


def test_fused_step_matches_autograd_with_an_unfused_optimizer(mnist_batches):
    """Where no fused Adam kernel exists the step calls optimizer.step() instead of updating each
    layer during the backward pass; both must train the same."""
    reference, fast, reference_terms, fast_terms = train_both(mnist_batches, steps=100, fused_adam=False)
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast, p_reference, rtol=1e-3, atol=2e-4, msg=name)


def test_fused_step_matches_autograd_for_the_continuous_bernoulli(mnist_batches, implementation):
    _, _, reference_terms, fast_terms = train_both(mnist_batches, steps=100, likelihood="continuous_bernoulli",
                                                   batch_size=64)
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
                                                              model_class=ConditionalVAE)
    assert reference_terms[-20:, 0].mean() < reference_terms[:20, 0].mean() - 30
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast, p_reference, rtol=1e-3, atol=weight_atol(routine), msg=name)


# ---------------------------------------------------------------- what the fused step is given

def _swap(model, part, index, module):
    getattr(model, part)[index] = module
    return model


@pytest.mark.parametrize("edit", [
    lambda m: _swap(m, "encoder", 1, nn.ReLU()),  # ELU swapped for ReLU
    lambda m: _swap(m, "decoder", 1, nn.Tanh()),  # PyTorch's tanh, not the fast path's
    lambda m: _swap(m, "decoder", 4, nn.ELU(alpha=0.5)),
    lambda m: _swap(m, "encoder", 2, nn.Dropout(0.1)),
    lambda m: m.double(),
])
def test_fused_step_refuses_a_model_it_does_not_compute(edit):
    config = Config(dim_z=2, n_hidden=16)
    model = VAE(dim_z=2, n_hidden=16)
    assert supports(model, config) and supports(ConditionalVAE(dim_z=2, n_hidden=16), config)
    assert not supports(edit(model), config)


@pytest.mark.parametrize("changes", [dict(beta=2.0), dict(kl_warmup=3), dict(objective="iwae", k_train=5)])
def test_fused_step_refuses_any_loss_but_the_plain_elbo(changes):
    model = VAE(dim_z=2, n_hidden=16)
    config = replace(Config(), **changes)
    assert "plain ELBO" in unsupported(model, config)
    optimizer = torch.optim.Adam(model.parameters())
    assert isinstance(make_step(model, optimizer, config), AutogradTrainStep)
    with pytest.raises(UserError, match="--step fused cannot train"):
        make_step(model, optimizer, replace(config, step="fused"))


def test_a_swapped_activation_is_trained_and_evaluated_by_autograd(tmp_path, monkeypatch):
    """The old program's VAE with ReLU for its first ELU: --step auto must train it as it evaluates it
    (autograd, ReLU), i.e. exactly as --step autograd does; --step fused is refused."""
    data = make_idx_dataset(tmp_path / "data", n_train=128, n_test=32)
    original = VAE.from_config.__func__

    def with_relu(cls, config):
        return _swap(original(cls, config), "encoder", 1, nn.ReLU())

    monkeypatch.setattr(VAE, "from_config", classmethod(with_relu))
    config = Config(dim_z=2, n_hidden=16, batch_size=32, num_epochs=1, data_dir=str(data), PRR_n_img_x=2,
                    PRR_n_img_y=2, PMLR_n_samples=10)
    for step in ("auto", "autograd"):
        train_module.train(replace(config, step=step, output=str(tmp_path / step)), log=lambda *a: None)
    rows = [{k: v for k, v in read_metrics(tmp_path / step)[0].items() if k != "seconds"}
            for step in ("auto", "autograd")]
    assert rows[0] == rows[1]
    with pytest.raises(UserError, match="encoder is not the old program's MLP"):
        train_module.train(replace(config, step="fused", output=str(tmp_path / "fused")), log=lambda *a: None)
