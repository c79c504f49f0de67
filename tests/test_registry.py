"""Adding a model is one class and its registry entry: a model of a test's own trains, checkpoints,
resumes, loads and samples through the API, with no edit of the package."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import mnist_vae
from mnist_vae import checkpoint, model
from mnist_vae.errors import UserError

from conftest import make_idx_dataset


class OneLayerVAE(nn.Module):
    """A VAE of its own: one ReLU hidden layer in each MLP, written against the seam only."""

    name = "one_layer"
    conditional = False

    def __init__(self, dim_z=2, n_hidden=16, likelihood="bernoulli"):
        super().__init__()
        self.model_args = dict(dim_z=dim_z, n_hidden=n_hidden, likelihood=likelihood)
        self.dim_z, self.likelihood = dim_z, likelihood
        self.encoder = nn.Sequential(nn.Linear(784, n_hidden), nn.ReLU(), nn.Linear(n_hidden, 2 * dim_z))
        self.decoder = nn.Sequential(nn.Linear(dim_z, n_hidden), nn.ReLU(), nn.Linear(n_hidden, 784))

    @classmethod
    def from_config(cls, config):
        return cls(config.dim_z, config.n_hidden, config.likelihood)

    def encode(self, x, labels=None):
        mu, pre_std = self.encoder(x).chunk(2, dim=-1)
        return mu, nn.functional.softplus(pre_std) + 1e-6

    def decode(self, z, labels=None):
        return self.decoder(z)

    def mean_image(self, logits):
        return torch.sigmoid(logits)

    def forward(self, x, target=None, eps=None, labels=None):
        target = x if target is None else target
        mu, std = self.encode(x)
        z = mu + std * (torch.randn_like(std) if eps is None else eps)
        reconstruction = model.log_likelihood(self.decode(z), target, self.likelihood)
        kl = model.gaussian_kl(mu, std)
        return reconstruction - kl, reconstruction, kl

    def loss(self, x, target=None, labels=None, kl_weight=1.0, objective="elbo", k=1):
        elbo, reconstruction, kl = self(x, target)
        loss = -(reconstruction - kl_weight * kl).mean()
        return loss, torch.stack([-elbo.mean(), -reconstruction.mean(), kl.mean(), loss]).detach()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(model.MODELS, OneLayerVAE.name, OneLayerVAE)  # what model.register does, undone after
    return OneLayerVAE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("registry") / "data", n_train=256, n_test=64, seed=5)


SETTINGS = dict(model="one_layer", dim_z=2, n_hidden=16, batch_size=32, PRR_n_img_x=4, PRR_n_img_y=4,
                PMLR_n_img_x=4, PMLR_n_img_y=4, PMLR_n_samples=64, num_epochs=1)


def test_a_registered_model_trains_resumes_loads_and_samples(registered, data, tmp_path):
    out = tmp_path / "run"
    lines = []
    trained = mnist_vae.train(output=out, data_dir=str(data), log=lines.append, **SETTINGS)
    assert isinstance(trained.module, OneLayerVAE) and trained.epoch == 1
    assert any("training step: autograd" in line for line in lines)  # the fused step is not for it
    config, state, tensors = checkpoint.load(out)
    assert (state["model"], state["model_args"]) == ("one_layer", {"dim_z": 2, "n_hidden": 16,
                                                                   "likelihood": "bernoulli"})
    assert json.loads((out / "config.json").read_text())["model"] == "one_layer"

    resumed = mnist_vae.train(output=out, resume=True, num_epochs=2, log=lines.append)
    assert resumed.epoch == 2 and len(checkpoint.load(out)[1]["history"]) == 2
    loaded = mnist_vae.load(out)
    assert isinstance(loaded.module, OneLayerVAE)
    for name, value in loaded.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name])
    images = loaded.sample(5, seed=1)
    assert images.shape == (5, 28, 28) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, loaded.sample(5, seed=1))
    mu, std = loaded.encode(images)
    assert mu.shape == (5, 2) and (std > 0).all()


def test_loading_builds_the_recorded_model_and_checks_its_weights(registered, data, tmp_path):
    out = tmp_path / "run"
    mnist_vae.train(output=out, data_dir=str(data), log=lambda _: None, **SETTINGS)
    config, state, tensors = checkpoint.load(out)
    state["model_args"]["n_hidden"] = 8  # arguments that contradict the config
    with pytest.raises(checkpoint.CheckpointError, match="its config says n_hidden=16 but its model has n_hidden=8"):
        checkpoint.build_model(config, tensors, out, state)
    config = dataclasses.replace(config, n_hidden=8)  # both, and the weights do not fit them
    with pytest.raises(checkpoint.CheckpointError, match=r"weight encoder.0.weight has shape \(16, 784\) where"):
        checkpoint.build_model(config, tensors, out, state)


def test_an_unknown_model_is_one_line(data, tmp_path):
    with pytest.raises(UserError, match="--model one_layer: no such model; the models are vae, cvae"):
        mnist_vae.train(output=tmp_path / "run", data_dir=str(data), log=lambda _: None, **SETTINGS)


def test_a_checkpoint_of_an_unregistered_model_says_to_register_it(registered, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    mnist_vae.train(output=out, data_dir=str(data), log=lambda _: None, **SETTINGS)
    monkeypatch.delitem(model.MODELS, OneLayerVAE.name)
    with pytest.raises(ValueError, match="register its class"):
        mnist_vae.load(out)
