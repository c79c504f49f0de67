"""The model: shapes, the ELBO against hand computations, the likelihoods, and the log-likelihood estimate."""

import math

import numpy as np
import pytest
import torch

from mnist_vae.layers import Tanh, dropout_mask, tanh_
from mnist_vae.model import (VAE, continuous_bernoulli_log_norm, continuous_bernoulli_mean, gaussian_kl,
                             importance_weighted_log_likelihood, log_likelihood, log_likelihood_of_draws,
                             loss_function)


def test_shapes_and_positive_std():
    torch.manual_seed(0)
    model = VAE(dim_z=3, n_hidden=20)
    x = torch.rand(5, 784)
    mu, std = model.encode(x)
    assert mu.shape == (5, 3) and std.shape == (5, 3)
    assert (std > 0).all()
    assert model.decode(mu).shape == (5, 784)
    elbo, reconstruction, kl = model(x)
    assert elbo.shape == reconstruction.shape == kl.shape == (5,)
    assert torch.allclose(elbo, reconstruction - kl)
    assert (kl >= 0).all()


def test_std_stays_positive_for_very_negative_encoder_output():
    model = VAE(dim_z=2, n_hidden=8)
    with torch.no_grad():
        model.encoder[6].bias[2:] = -1e4  # pre-std far below zero
    _, std = model.encode(torch.rand(3, 784))
    assert (std > 0).all() and torch.isfinite(std.log()).all()


def test_kl_and_bernoulli_match_hand_computation():
    # KL(N(1, 2^2) || N(0, 1)) = 0.5 (1 + 4 - 1) - log 2
    assert gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[2.0]])).item() == pytest.approx(2 - math.log(2))
    # log Bernoulli: logits 0 -> p = 1/2 for either pixel value; logits log 3 -> p = 3/4
    logits = torch.tensor([[0.0, 0.0, math.log(3), math.log(3)]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    expected = 2 * math.log(0.5) + math.log(0.75) + math.log(0.25)
    assert log_likelihood(logits, x).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_negative_elbo_of_a_tiny_model_by_hand():
    """A 1-D latent model whose every number is worked out here in numpy."""
    torch.manual_seed(1)
    model = VAE(dim_z=1, n_hidden=3, dropout=0.0).double().eval()
    x = torch.rand(2, 784, dtype=torch.float64)
    eps = torch.tensor([[0.3], [-1.2]], dtype=torch.float64)
    elbo, _, _ = model(x, eps=eps)

    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    xn = x.numpy()
    elu = lambda a: np.where(a > 0, a, np.expm1(a))  # noqa: E731
    h = np.tanh(elu(xn @ p["encoder.0.weight"].T + p["encoder.0.bias"]) @ p["encoder.3.weight"].T
                + p["encoder.3.bias"])
    out = h @ p["encoder.6.weight"].T + p["encoder.6.bias"]
    mu, std = out[:, :1], np.log1p(np.exp(out[:, 1:])) + 1e-6
    z = mu + std * eps.numpy()
    g = elu(np.tanh(z @ p["decoder.0.weight"].T + p["decoder.0.bias"]) @ p["decoder.3.weight"].T
            + p["decoder.3.bias"])
    probs = 1 / (1 + np.exp(-(g @ p["decoder.6.weight"].T + p["decoder.6.bias"])))
    reconstruction = (xn * np.log(probs) + (1 - xn) * np.log(1 - probs)).sum(1)
    kl = 0.5 * (mu**2 + std**2 - 1 - np.log(std**2)).sum(1)
    np.testing.assert_allclose(elbo.detach().numpy(), reconstruction - kl, rtol=1e-10)
    torch.manual_seed(5)
    loss, terms = loss_function(model, x)
    assert loss.shape == () and terms.shape == (3,)
    assert terms[0].item() == pytest.approx(terms[1].item() + terms[2].item(), rel=1e-9)


def test_bernoulli_log_likelihood_is_stable_for_large_logits():
    logits = torch.tensor([[-200.0, 200.0, -200.0, 200.0]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    value = log_likelihood(logits, x).item()
    assert value == pytest.approx(-400.0, rel=1e-6)  # two certain pixels, two at log-odds 200 against


@pytest.mark.parametrize("logit", [-30.0, -3.0, -0.5, -1e-3, 0.0, 2e-3, 0.7, 4.0, 25.0])
def test_continuous_bernoulli_is_a_density_with_the_stated_mean(logit):
    x = torch.linspace(0, 1, 200001, dtype=torch.float64)
    logits = torch.full_like(x, logit)
    density = torch.exp(log_likelihood(logits[:, None], x[:, None], "continuous_bernoulli"))
    assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=2e-4)
    mean = torch.trapezoid(x * density, x).item()
    assert continuous_bernoulli_mean(torch.tensor(logit, dtype=torch.float64)).item() == pytest.approx(mean, abs=2e-4)
    assert torch.isfinite(continuous_bernoulli_log_norm(torch.tensor([logit]))).all()


def test_dropout_mask_keeps_the_right_fraction_in_every_lane():
    torch.manual_seed(0)
    mask = dropout_mask((1000, 1000), 0.1)
    values = torch.unique(mask).tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9) and len(values) == 2
    assert (mask > 0).float().mean().item() == pytest.approx(0.9, abs=0.002)
    # four 16-bit lanes come from each 64-bit draw: none of them may be biased
    lanes = (mask.reshape(-1, 4) > 0).float().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 0.9), atol=0.003), lanes
    assert mask.mean().item() == pytest.approx(1.0, abs=0.003)  # inverted dropout keeps the expectation


def _trained_tiny_model(dim_z, steps=300, lr=3e-3):
    """A small model given some Adam steps on blob images, so q(z|x) is informative."""
    torch.manual_seed(0)
    x = (torch.rand(64, 784) ** 6 > 0.3).float()
    model = VAE(dim_z=dim_z, n_hidden=32, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = loss_function(model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.double().eval(), x.double()


def test_importance_weighted_estimate_bounds_the_elbo_and_grows_with_k():
    model, x = _trained_tiny_model(dim_z=2)
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = torch.stack([model(x)[0] for _ in range(200)]).mean(0)  # E_q[ELBO], per image
    estimates, errors = {}, {}
    for k in (1, 4, 16, 64):
        torch.manual_seed(k)
        runs = torch.stack([importance_weighted_log_likelihood(model, x, k).mean() for _ in range(20)])
        estimates[k], errors[k] = runs.mean().item(), runs.std().item() / math.sqrt(len(runs))
    # k = 1 is the ELBO itself; larger k may only tighten the bound, in expectation
    assert estimates[1] == pytest.approx(elbo.mean().item(), abs=4 * errors[1] + 0.05)
    for small, large in ((1, 4), (4, 16), (16, 64)):
        assert estimates[large] > estimates[small] - 3 * (errors[small] + errors[large]), estimates
    assert estimates[64] - estimates[1] > 10 * (errors[1] + errors[64]), estimates


def test_importance_weighted_estimate_converges_to_exact_log_likelihood():
    """On a 1-D latent, log p(x) = log integral p(x|z) p(z) dz by quadrature on a fine grid."""
    model, x = _trained_tiny_model(dim_z=1, steps=100, lr=1e-3)
    x = x[:8]
    z = torch.linspace(-8, 8, 8001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        logits = model.decode(z)
        log_joint = torch.stack([log_likelihood(logits, xi.expand_as(logits)) for xi in x])  # (8, grid)
        log_joint = log_joint + (-0.5 * z[:, 0] ** 2 - 0.5 * math.log(2 * math.pi))
    dz = (z[1] - z[0]).item()
    exact = torch.logsumexp(log_joint, dim=1) + math.log(dz)
    errors = {}
    for k in (1, 100, 20000):
        torch.manual_seed(0)
        errors[k] = (importance_weighted_log_likelihood(model, x, k, max_rows=8 * 2500) - exact).abs()
    assert errors[20000].mean().item() < 0.02 and errors[20000].max().item() < 0.05, errors[20000]
    # the bound is loose at small k, so the test tells convergence from coincidence
    assert errors[1].mean().item() > 0.2 and errors[100].mean() > errors[20000].mean(), errors


def test_importance_weighted_memory_is_bounded_by_chunks():
    model, x = _trained_tiny_model(dim_z=2)
    torch.manual_seed(3)
    a = importance_weighted_log_likelihood(model, x[:4], k=64, max_rows=4 * 64)
    torch.manual_seed(3)
    b = importance_weighted_log_likelihood(model, x[:4], k=64, max_rows=4 * 64)
    assert torch.equal(a, b)
    torch.manual_seed(3)
    chunked = importance_weighted_log_likelihood(model, x[:4], k=64, max_rows=4 * 7)  # 10 chunks
    assert torch.allclose(chunked, a, atol=1.0)  # different draws, same quantity
    assert torch.isfinite(chunked).all()


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
def test_log_likelihood_of_draws_is_the_log_likelihood_of_each_draw(likelihood, binary):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn((3, 7, 784), generator=generator, dtype=torch.float64) * 8
    logits[0, 0, :5] = torch.tensor([0.0, 1e-3, -40.0, 40.0, 300.0])  # the edges of softplus and log C
    x = torch.rand((3, 784), generator=generator, dtype=torch.float64)
    x = x.round() if binary else x
    fast = log_likelihood_of_draws(logits, x, likelihood)
    for b in range(3):
        for n in range(7):
            # softplus(l) is taken as l above l = 20, an error below 2.1e-9 per pixel
            assert fast[b, n].item() == pytest.approx(log_likelihood(logits[b, n], x[b], likelihood).item(),
                                                      rel=1e-12, abs=784 * 2.1e-9)


def test_tanh_through_the_sigmoid_is_tanh():
    a = torch.linspace(-30, 30, 100001)
    assert torch.allclose(tanh_(a.clone()), torch.tanh(a), rtol=0, atol=4e-7)
    grad_a = a.clone().requires_grad_()
    Tanh()(grad_a).sum().backward()
    assert torch.allclose(grad_a.grad, 1 - torch.tanh(a) ** 2, rtol=0, atol=1e-6)
