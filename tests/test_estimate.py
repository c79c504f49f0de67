"""The importance-weighted estimate on the fast path (fast/estimate.py) computes what the model's own
decoder and likelihood compute, and is used only where it does; glibc keeps freed memory for reuse."""

import platform

import pytest
import torch

from mnist_vae.config import Config
from mnist_vae.evaluation import log_likelihoods
from mnist_vae.fast import kernels, memory, products
from mnist_vae.fast.estimate import log_px_of_draws
from mnist_vae.model import build, importance_weighted_log_likelihood, log_likelihood_of_draws


FAMILIES = [{}, {"activation": "tanh", "n_layers": 3, "dropout": 0.0}, {"activation": "relu", "n_hidden": 64},
            {"conditional": True, "dim_z": 3}, {"likelihood": "continuous_bernoulli"}]


@pytest.mark.parametrize("routine", products.ROUTINES)
@pytest.mark.parametrize("settings", FAMILIES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_fast_estimate_computes_what_the_model_computes(settings, routine):
    if routine == "oneDNN" and not products.onednn_available(torch.device("cpu")):
        pytest.skip("this torch has no oneDNN")
    products.use(routine)
    try:
        torch.manual_seed(0)
        model = build(Config(**settings)).eval()
        fast = log_px_of_draws(model)
    finally:
        products.use(None)
    assert fast is not None
    x = torch.rand(30, 784) if settings.get("likelihood") else torch.rand(30, 784).bernoulli()
    labels = torch.randint(0, 10, (30,)) if model.conditional else None
    with torch.no_grad():
        z = torch.randn(30, 7, model.dim_z)
        reference = importance_weighted_log_likelihood(model, x, 40, labels=labels,
                                                       generator=torch.Generator().manual_seed(1))
        estimate = importance_weighted_log_likelihood(model, x, 40, labels=labels, log_px_of_draws=fast,
                                                      generator=torch.Generator().manual_seed(1))
        # draw by draw too, against the model's decoder and likelihood
        draws = log_likelihood_of_draws(model.decode(z, None if labels is None else labels[:, None]), x,
                                        model.likelihood)
        assert fast(z, x, labels).shape == (30, 7)
        torch.testing.assert_close(fast(z, x, labels), draws, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(estimate, reference, rtol=1e-5, atol=1e-3)


def test_fast_estimate_leaves_other_models_to_themselves():
    assert log_px_of_draws(build(Config(model="vae2", dim_z=4))) is None
    model = build(Config())
    model.decoder[1] = torch.nn.Sigmoid()  # an activation the fast path does not compute
    assert log_px_of_draws(model) is None


def test_log_likelihoods_use_the_fast_path_and_give_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    model = build(Config(dim_z=5))
    x = torch.rand(20, 784).bernoulli()
    fast = log_likelihoods(model, x, 30, batch_size=10, progress=False)
    calls = []
    monkeypatch.setattr("mnist_vae.evaluation.log_px_of_draws", lambda model: calls.append(model))
    plain = log_likelihoods(model, x, 30, batch_size=10, progress=False)
    assert calls == [model]  # the second time the fast path was not there to use
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-3)
    assert not torch.equal(fast, plain) or not kernels.available()  # the two paths were both taken


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_glibc_keeps_freed_memory():
    assert memory.keep_freed_memory() is True
