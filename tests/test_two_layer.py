"""The model of two stochastic layers (Burda et al.'s x -> z1 -> z2): its bounds in the right order, its log
importance weights as torch.distributions computes them on the same draws, and a run of it through the API
that checkpoints, resumes, loads, samples and exports, with the commands that need one z saying so."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import distributions, nn

import mnist_vae
from conftest import assert_one_line_error, main, make_idx_dataset
from mnist_vae import checkpoint, export
from mnist_vae.config import Config
from mnist_vae.fast import fused
from mnist_vae.layers import Tanh  # the models' tanh, through the sigmoid
from mnist_vae.model import MODELS, TwoLayerVAE, build, importance_weighted_log_likelihood

MISSING = export.missing_packages()
if MISSING and os.environ.get("CI") == "true":
    pytest.fail(f"the [export] extra is not installed ({', '.join(MISSING)}); CI must install it")
needs_extra = pytest.mark.skipif(bool(MISSING), reason=f"the [export] extra is not installed ({', '.join(MISSING)})")


@pytest.fixture(autouse=True)
def one_thread():
    """Products of a few rows: one thread does them fastest, a second one only waits for a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(likelihood="bernoulli", steps=30, seed=0):
    """A small two-layer model in float64, trained a few steps on a few images, in eval mode, and the images."""
    torch.manual_seed(seed)
    model = TwoLayerVAE(dim_z=2, dim_z1=4, n_hidden=16, n_hidden2=8, likelihood=likelihood).double()
    x = torch.rand(8, 784, dtype=torch.float64) ** 3
    x = (x > 0.3).double() if likelihood == "bernoulli" else x
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = model.loss(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x


# ---------------------------------------------------------------- the model

def test_from_config_builds_burda_et_al_s_model_from_their_settings():
    config = Config(model="vae2", dim_z=50, n_hidden=200, activation="tanh", dropout=0.0)
    model = build(config)
    assert isinstance(model, TwoLayerVAE) and MODELS["vae2"] is TwoLayerVAE
    shapes = {name: [(m.in_features, m.out_features) for m in part if isinstance(m, nn.Linear)]
              for name, part in (("q_z1", model.q_z1), ("q_z2", model.q_z2), ("p_z1", model.p_z1), ("p_x", model.p_x))}
    assert shapes == {"q_z1": [(784, 200), (200, 200), (200, 200)], "q_z2": [(100, 100), (100, 100), (100, 100)],
                      "p_z1": [(50, 100), (100, 100), (100, 200)], "p_x": [(100, 200), (200, 200), (200, 784)]}
    assert all(isinstance(m, (nn.Linear, Tanh)) for m in model.modules() if not isinstance(m, (nn.Sequential,
                                                                                                    TwoLayerVAE)))
    assert (model.dim_z, model.dim_z1, model.dim_eps) == (50, 100, 150)
    # the default activation, the one-layer old program's mix, means tanh here; the fused step is not for it
    assert build(Config(model="vae2")).model_args["activation"] == "tanh"
    assert "TwoLayerVAE" in fused.unsupported(model, config)


def test_encode_decode_and_sample_work_on_z2():
    model, x = tiny()
    mu, std = model.encode(x)
    assert mu.shape == std.shape == (8, 2) and (std > 0).all()
    with torch.no_grad():
        mu1 = model.q_z1(x).chunk(2, -1)[0]
        expected = model.q_z2(mu1).chunk(2, -1)[0]  # q(z2|z1) at the mean of q(z1|x)
        torch.testing.assert_close(mu, expected)
        z2 = torch.randn(5, 2, dtype=torch.float64)
        prior_mu1 = model.p_z1(z2).chunk(2, -1)[0]
        torch.testing.assert_close(model.decode(z2), model.p_x(prior_mu1))  # p(x|z1) at the mean of p(z1|z2)
    assert model.mean_image(model.decode(z2)).shape == (5, 784)


def test_bounds_in_order_elbo_then_iw_5_then_iw_50():
    """On average over the images: the ELBO <= the k = 5 bound <= the k = 50 bound, each the mean of many
    estimates, apart by more than their standard errors."""
    model, x = tiny(steps=100)  # trained, so that q is not the posterior and the bounds are apart
    torch.manual_seed(1)
    with torch.no_grad():
        elbos = torch.stack([model(x)[0].mean() for _ in range(400)])
    estimates = {1: (elbos.mean().item(), elbos.std().item() / math.sqrt(len(elbos)))}
    for k in (5, 50):
        runs = torch.stack([importance_weighted_log_likelihood(model, x, k).mean() for _ in range(40)])
        estimates[k] = (runs.mean().item(), runs.std().item() / math.sqrt(len(runs)))
    for small, large in ((1, 5), (5, 50)):
        gap, error = estimates[large][0] - estimates[small][0], estimates[large][1] + estimates[small][1]
        assert gap > 3 * error, estimates
    # k = 1 is the ELBO itself: the importance-weighted estimate with one draw of the chain
    runs = torch.stack([importance_weighted_log_likelihood(model, x, 1).mean() for _ in range(400)])
    assert runs.mean().item() == pytest.approx(estimates[1][0], abs=4 * (estimates[1][1] + runs.std().item() / 20))


def independent_log_weights(model, x, eps):
    """log p(x, z1, z2) - log q(z1, z2|x) for the draws eps (batch, n, dim_z1 + dim_z), through
    torch.distributions and the model's MLPs alone."""
    likelihood = {"bernoulli": distributions.Bernoulli,
                  "continuous_bernoulli": distributions.ContinuousBernoulli}[model.likelihood]

    def normal(params):
        mu, pre_std = params.chunk(2, -1)
        return distributions.Normal(mu, nn.functional.softplus(pre_std) + 1e-6)

    eps1, eps2 = eps[..., :model.dim_z1], eps[..., model.dim_z1:]
    q_z1 = normal(model.q_z1(x)[:, None])
    z1 = q_z1.loc + q_z1.scale * eps1
    q_z2 = normal(model.q_z2(z1))
    z2 = q_z2.loc + q_z2.scale * eps2
    log_p = (distributions.Normal(0.0, 1.0).log_prob(z2).sum(-1) + normal(model.p_z1(z2)).log_prob(z1).sum(-1)
             + likelihood(logits=model.p_x(z1)).log_prob(x[:, None].expand(-1, eps.shape[1], -1)).sum(-1))
    return log_p - q_z1.log_prob(z1).sum(-1) - q_z2.log_prob(z2).sum(-1)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
def test_log_importance_weights_are_torch_distributions_on_the_same_draws(likelihood):
    model, x = tiny(likelihood, steps=10)
    with torch.no_grad():
        found = model.log_importance_weights(x, 6, generator=torch.Generator().manual_seed(3))
        eps = torch.randn((len(x), 6, model.dim_eps), generator=torch.Generator().manual_seed(3), dtype=x.dtype)
        expected = independent_log_weights(model, x, eps)
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-8)
        # the estimate is their log mean exp, chunk by chunk with the same draws
        estimate = importance_weighted_log_likelihood(model, x, 6, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(estimate, torch.logsumexp(expected, 1) - math.log(6))
        # the forward pass's ELBO terms are one draw of the same chain: (elbo, log p(x|z1), sampled KL)
        elbo, reconstruction, kl = model(x, eps=eps[:, 0])
        torch.testing.assert_close(elbo, expected[:, 0], rtol=1e-10, atol=1e-8)
        logits = model.p_x(model.q_z1(x).chunk(2, -1)[0] + (nn.functional.softplus(model.q_z1(x).chunk(2, -1)[1])
                                                           + 1e-6) * eps[:, 0, :model.dim_z1])
        torch.testing.assert_close(reconstruction, distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
                                   if likelihood == "bernoulli" else
                                   distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum(-1))
        torch.testing.assert_close(kl, reconstruction - elbo)


def test_the_iwae_loss_is_the_k_sample_bound_of_the_same_chain():
    model, x = tiny()
    model.train()
    torch.manual_seed(4)
    loss, terms = model.loss(x, objective="iwae", k=7)
    torch.manual_seed(4)
    eps = torch.randn((7, len(x), model.dim_eps), dtype=x.dtype)
    with torch.no_grad():
        log_w = independent_log_weights(model, x, eps.transpose(0, 1))  # (batch, k)
    assert loss.item() == pytest.approx(-(torch.logsumexp(log_w, 1) - math.log(7)).mean().item(), rel=1e-10)
    assert terms[3].item() == pytest.approx(loss.item())
    assert terms[0].item() == pytest.approx(-log_w.mean().item(), rel=1e-10)  # the -ELBO: the mean log weight


# ---------------------------------------------------------------- a run through the API

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("two_layer") / "data", n_train=128, n_test=32, seed=7)


SETTINGS = dict(model="vae2", dim_z=2, n_hidden=16, dropout=0.0, batch_size=32, binarize="dynamic",
                objective="iwae", k_train=3, gradient="dreg", eval_k=20, PRR_n_img_x=4, PRR_n_img_y=4,
                PMLR_n_img_x=4, PMLR_n_img_y=4, PMLR_n_samples=32, num_epochs=1)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_layer") / "run"
    lines = []
    trained = mnist_vae.train(output=out, data_dir=str(data), log=lines.append, **SETTINGS)
    return out, trained, lines


def test_it_trains_checkpoints_resumes_loads_and_samples(run):
    out, trained, lines = run
    assert isinstance(trained.module, TwoLayerVAE) and trained.epoch == 1 and trained.dim_z == 2
    assert any("training step: autograd" in line for line in lines)
    config, state, _ = checkpoint.load(out)
    assert state["model"] == "vae2" and state["model_args"] == {
        "dim_z": 2, "dim_z1": 4, "n_hidden": 16, "n_hidden2": 8, "n_layers": 2, "activation": "tanh",
        "dropout": 0.0, "likelihood": "bernoulli"}
    assert (config.model, config.gradient) == ("vae2", "dreg")
    assert json.loads((out / "config.json").read_text())["model"] == "vae2"
    row = state["history"][0]
    assert all(math.isfinite(row[key]) for key in ("train_neg_elbo", "test_neg_elbo", "test_neg_iw_bound"))
    assert row["test_neg_iw_bound"] <= row["test_neg_elbo"] + 1.0  # the k_train bound, not looser than the ELBO
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert math.isfinite(evaluation["iw_nll"]) and evaluation["k"] == 20
    # dim_z 2: the manifold and the latent map are pictures of z2
    for name in ("PMLR", "PMLR_map", "samples", "PRR"):
        assert any(path.name.startswith(name + "_epoch") for path in out.iterdir()), name

    resumed = mnist_vae.train(output=out, resume=True, num_epochs=2, log=lambda _: None)
    assert resumed.epoch == 2 and len(checkpoint.load(out)[1]["history"]) == 2
    loaded = mnist_vae.load(out)
    assert isinstance(loaded.module, TwoLayerVAE)
    for name, value in loaded.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name
    images = loaded.sample(5, seed=1)
    assert images.shape == (5, 28, 28) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, loaded.sample(5, seed=1))
    mu, std = loaded.encode(images)
    assert mu.shape == std.shape == (5, 2) and (std > 0).all()
    assert loaded.reconstruct(images).shape == (5, 28, 28)
    binary = (images > 0.5).astype(np.float32)
    elbo, log_p = loaded.elbo(binary), loaded.log_likelihood(binary, k=200)
    np.testing.assert_array_equal(elbo, loaded.elbo(binary))  # fixed draws of the whole chain
    assert np.isfinite(log_p).all() and log_p.mean() > elbo.mean()


def test_a_checkpoint_whose_config_contradicts_its_model_is_refused(run):
    out, _, _ = run
    config, state, tensors = checkpoint.load(out)
    state = {**state, "model_args": {**state["model_args"], "dim_z1": 6}}
    with pytest.raises(checkpoint.CheckpointError, match="its config says dim_z1=4 but its model has dim_z1=6"):
        checkpoint.build_model(config, tensors, out, state)


def test_explore_says_in_one_line_that_it_needs_one_z(run, capsys, tmp_path):
    out, _, _ = run
    result = main(capsys, "explore", out, "--out", tmp_path / "page.html")
    assert_one_line_error(result, "vae2 model has 2 stochastic layers", "one z")
    assert not (tmp_path / "page.html").exists()


@needs_extra
def test_export_gives_graphs_of_z2(run, tmp_path):
    out, _, _ = run
    model = mnist_vae.load(out)
    model.export(tmp_path / "onnx")  # checked against model.encode and model.decode before it is written
    described = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert described["decoder"]["inputs"][0]["shape"] == ["batch", 2]
    assert "q(z2|z1) at z1 = the mean of q(z1|x)" in described["encoder"]["outputs"][0]["meaning"]
    assert "p(z1|z2)" in described["decoder"]["outputs"][0]["meaning"]
