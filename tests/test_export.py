"""`mnist-vae export --format onnx` and Model.export: the ONNX files, their description, and parity with
PyTorch under onnxruntime (at most 1e-5 apart per pixel and per latent coordinate, at any batch size).

These need the [export] extra (onnx, onnxscript, onnxruntime), which `make` installs. Without it they
skip, except in CI (CI=true), where a missing extra is a failure: the parity must be checked there."""

import json
import os

import numpy as np
import pytest
import torch

import mnist_vae
from conftest import MNIST_DIR, assert_one_line_error, main
from mnist_vae import export
from mnist_vae.api import Model
from mnist_vae.config import Config
from mnist_vae.model import VAE, continuous_bernoulli_mean

TOLERANCE = 1e-5

MISSING = export.missing_packages()
if MISSING and os.environ.get("CI") == "true":
    pytest.fail(f"the [export] extra is not installed ({', '.join(MISSING)}); CI must install it "
                f"(make installs '.[test,export]')", pytrace=False)
needs_extra = pytest.mark.skipif(bool(MISSING), reason=f"the [export] extra is not installed ({', '.join(MISSING)}): "
                                                       f"pip install 'mnist-vae[export]'")


def sessions(folder):
    import onnxruntime

    return {part: onnxruntime.InferenceSession(str(folder / f"{part}.onnx"), providers=["CPUExecutionProvider"])
            for part in ("encoder", "decoder")}


def assert_parity(model, folder, images, z):
    """onnxruntime's encoder and decoder against the PyTorch model, on the same inputs."""
    run = sessions(folder)
    x = mnist_vae.prepare_images(images).numpy()
    mu, std = run["encoder"].run(["mu", "std"], {"image": x})
    expected_mu, expected_std = model.encode(x)
    assert np.abs(mu - expected_mu).max() <= TOLERANCE and np.abs(std - expected_std).max() <= TOLERANCE
    for latents in (z, mu):
        (image,) = run["decoder"].run(["image"], {"z": latents.astype(np.float32)})
        expected = model.decode(latents).reshape(len(latents), 784)
        assert image.shape == expected.shape and np.abs(image - expected).max() <= TOLERANCE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The packaged model exported by the command line."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    from mnist_vae import cli

    assert cli.main(["export", "pretrained", "--format", "onnx", "--out", str(out)], prog="mnist-vae") == 0
    return out


@needs_extra
def test_export_writes_two_graphs_and_their_description(exported):
    assert sorted(p.name for p in exported.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]
    described = json.loads((exported / "model.json").read_text())
    model = mnist_vae.load("pretrained")
    assert described["settings"] == model.config.to_dict() and described["epochs"] == model.epoch
    assert [i["name"] for i in described["encoder"]["inputs"]] == ["image"]
    assert [o["name"] for o in described["encoder"]["outputs"]] == ["mu", "std"]
    assert described["decoder"]["inputs"][0]["shape"] == ["batch", 2]
    run = sessions(exported)
    assert [i.name for i in run["encoder"].get_inputs()] == ["image"]
    assert run["encoder"].get_inputs()[0].shape[1] == 784 and isinstance(run["encoder"].get_inputs()[0].shape[0], str)
    assert [o.name for o in run["decoder"].get_outputs()] == ["image"]


@needs_extra
@pytest.mark.parametrize("batch", [1, 5, 300])
def test_onnx_matches_pytorch_on_mnist_and_prior_draws(exported, batch):
    model = mnist_vae.load("pretrained")
    digits = mnist_vae.datasets.load("mnist", MNIST_DIR).test_images[:batch]
    z = np.random.default_rng(batch).normal(scale=2.0, size=(batch, 2)).astype(np.float32)
    assert_parity(model, exported, digits, z)


@needs_extra
def test_continuous_bernoulli_decoder_matches_too():
    """The continuous Bernoulli's mean has a 0/0 at logit 0; the exported decoder must agree near it too.
    (Its encoder is the Bernoulli model's; only the decoder is exported here, to keep the suite short.)"""
    import onnxruntime

    torch.manual_seed(5)
    module = VAE(2, 16, 0.0, "continuous_bernoulli").eval()
    with torch.no_grad():  # logits spread over [-3, 3]: on both sides of where the mean changes formula
        module.decoder[-1].weight.mul_(4.0)
    model = Model(module, Config(dim_z=2, n_hidden=16, likelihood="continuous_bernoulli"), epoch=0, run_dir=None,
                  name="test")
    _, decoder = export._modules()
    graph = export._onnx_bytes(decoder(module).eval(), torch.zeros(3, 2), ["z"], ["image"])
    z = np.random.default_rng(0).normal(scale=2.0, size=(64, 2)).astype(np.float32)
    logits = module.decode(torch.from_numpy(z)).detach()
    assert (logits.abs() < 0.05).any() and (logits.abs() > 1).any()
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    (image,) = session.run(["image"], {"z": z})
    assert np.abs(image - model.decode(z).reshape(64, 784)).max() <= TOLERANCE


def test_continuous_bernoulli_mean_is_exact_in_float32():
    """Its float32 value is within 2e-7 of the float64 closed form at every logit (what parity relies on)."""
    logits = torch.linspace(-4, 4, 80001, dtype=torch.float64)
    logits = logits[logits.abs() > 1e-6]
    exact = 1 / (1 - torch.exp(-logits)) - 1 / logits
    assert (continuous_bernoulli_mean(logits.float()).double() - exact).abs().max() < 2e-7


def test_without_the_extra_one_line_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(export, "missing_packages", lambda: ["onnxscript"])
    result = main(capsys, "export", "pretrained", "--out", tmp_path / "x")
    assert_one_line_error(result, "pip install 'mnist-vae[export]'", "onnxscript")
    assert not (tmp_path / "x").exists()


@needs_extra
def test_export_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    result = main(capsys, "export", "pretrained", "--out", target)
    assert_one_line_error(result, "is a file")
    assert target.read_text() == "mine"
