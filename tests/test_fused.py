"""The fast training step computes what a plain autograd step computes, step after step."""

import copy

import pytest
import torch

from mnist_vae.data import load_dataset
from mnist_vae.fused import FusedTrainStep
from mnist_vae.model import VAE, loss_function
from mnist_vae.train import add_noise


@pytest.fixture(scope="module")
def mnist_batches():
    dataset = load_dataset("mnist", log=lambda *a: None)
    x = torch.from_numpy(dataset.train_images[:6000].reshape(-1, 784).copy()).float() / 255
    return x


def reference_step(model, optimizer, x, target):
    """The textbook step: autograd through model.VAE, then Adam."""
    loss, terms = loss_function(model, x, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return terms


def train_both(x_all, steps, likelihood="bernoulli", noise=False, batch_size=128, dim_z=4, fused_adam=True):
    torch.manual_seed(0)
    reference = VAE(dim_z=dim_z, likelihood=likelihood)
    fast = copy.deepcopy(reference)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)  # the default, unfused
    fast_optimizer = torch.optim.Adam(fast.parameters(), lr=1e-3, fused=fused_adam)
    fast_step = FusedTrainStep(fast, fast_optimizer)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1))
    reference_terms, fast_terms = [], []
    for step in range(steps):
        start = (step * batch_size) % (len(x_all) - batch_size)
        target = x_all[order[start: start + batch_size]]
        for terms, run in ((reference_terms, lambda x: reference_step(reference, reference_optimizer, x, target)),
                           (fast_terms, lambda x: fast_step(x, target))):
            torch.manual_seed(1000 + step)  # the same noise, dropout masks and eps for both
            x = add_noise(target, 0.7) if noise else target
            terms.append(run(x))
    return reference, fast, torch.stack(reference_terms), torch.stack(fast_terms)


def test_fused_step_matches_autograd_for_300_steps(mnist_batches, implementation):
    reference, fast, reference_terms, fast_terms = train_both(mnist_batches, steps=300)
    # the loss fell, so the comparison is over real learning, not a flat start
    assert reference_terms[-20:, 0].mean() < reference_terms[:20, 0].mean() - 50
    torch.testing.assert_close(fast_terms, reference_terms, rtol=2e-4, atol=2e-3)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_fast, p_reference, rtol=1e-3, atol=2e-4, msg=name)


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
