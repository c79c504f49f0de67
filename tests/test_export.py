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
from test_robustness import tmpfs  # noqa: F401 (a fixture: a real 2 MB tmpfs)
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


# ---------------------------------------------------------------- every model the runs hold

def make_run(folder, seed=0, **settings):
    """A run folder whose checkpoint holds a model of these settings with seeded random weights (scaled up
    so that its images vary), as training would save it; no training, to keep the suite short."""
    from mnist_vae import checkpoint
    from mnist_vae.model import build

    config = Config(output=str(folder), n_hidden=settings.pop("n_hidden", 24), **settings)
    torch.manual_seed(seed)
    module = build(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(2.0)
    folder.mkdir(parents=True, exist_ok=True)
    elbo = "neg_elbo_given_y" if config.conditional else "neg_elbo"
    history = [{"epoch": 1, f"train_{elbo}": 550.0, "train_recon": 545.0, "train_kl": 5.0, f"test_{elbo}": 543.2,
                "test_recon": 540.0, "test_kl": 3.2}]
    extra = {"rng.torch": torch.get_rng_state(), "rng.data_epoch_start": torch.Generator().get_state(),
             "progress.step_terms": torch.zeros((1, 4))}
    checkpoint.save(folder, module, torch.optim.Adam(module.parameters()),
                    {"config": config.to_dict(), "model": module.name, "epoch": 1, "step": 0, "history": history,
                     "seconds_in_epoch": 0.0, "data_source": "test"}, extra)
    return folder


# One of each kind of model the settings build: the seed's MLP and the one-activation MLPs of every
# depth kind, dropout 0 (reproduce --paper's runs), the continuous Bernoulli, and conditional models.
FAMILIES = {
    "relu": dict(dim_z=2, activation="relu"),
    "tanh, one layer, dropout 0": dict(dim_z=3, activation="tanh", n_layers=1, dropout=0.0),
    "elu, three layers, continuous Bernoulli": dict(dim_z=4, activation="elu", n_layers=3,
                                                    likelihood="continuous_bernoulli"),
    "seed, dropout 0, continuous Bernoulli": dict(dim_z=2, dropout=0.0, likelihood="continuous_bernoulli"),
    "conditional seed": dict(dim_z=2, conditional=True),
    "conditional relu, three layers, dropout 0": dict(dim_z=5, conditional=True, activation="relu", n_layers=3,
                                                      dropout=0.0),
}


@needs_extra
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_model_family_exports_what_load_computes(family, tmp_path, capsys):
    """The export is made from the model the run holds: onnxruntime gives what mnist_vae.load(run) gives,
    on MNIST test images, their means and prior draws (a relu run once exported as the seed's MLP)."""
    run = make_run(tmp_path / "run", **FAMILIES[family])
    result = main(capsys, "export", run)
    assert result.returncode == 0, result.stderr
    out = run / "onnx"
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]
    model = mnist_vae.load(run)
    data = mnist_vae.datasets.load("mnist", MNIST_DIR)
    x = mnist_vae.prepare_images(data.test_images[:50]).numpy()
    labels = data.test_labels[:50].astype(np.int64)
    run_graph = sessions(out)
    conditional = model.conditional
    feed = {"image": x, **({"label": labels} if conditional else {})}
    assert [i.name for i in run_graph["encoder"].get_inputs()] == list(feed)
    mu, std = run_graph["encoder"].run(["mu", "std"], feed)
    expected_mu, expected_std = model.encode(x, labels if conditional else None)
    assert np.abs(mu - expected_mu).max() <= TOLERANCE and np.abs(std - expected_std).max() <= TOLERANCE
    z = np.random.default_rng(0).normal(scale=2.0, size=(50, model.dim_z)).astype(np.float32)
    for latents in (z, mu):
        feed = {"z": latents, **({"label": labels} if conditional else {})}
        (image,) = run_graph["decoder"].run(["image"], feed)
        expected = model.decode(latents, labels if conditional else None).reshape(50, 784)
        assert np.abs(image - expected).max() <= TOLERANCE
    described = json.loads((out / "model.json").read_text())
    assert described["settings"] == model.config.to_dict()
    if conditional:  # the label input, documented on both graphs
        for part in ("encoder", "decoder"):
            label = [i for i in described[part]["inputs"] if i["name"] == "label"]
            assert label and label[0]["dtype"] == "int64" and label[0]["shape"] == ["batch"]
            assert "class index" in label[0]["meaning"]


@needs_extra
def test_a_model_the_exporter_cannot_export_is_refused_in_one_line_before_any_file(tmp_path):
    """A layer torch.export cannot trace (it branches on its data): ValueError, one line, no folder."""
    from torch import nn

    class Branching(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    module = VAE(2, 16, 0.0).eval()
    module.decoder[1] = Branching()
    model = Model(module, Config(dim_z=2, n_hidden=16), epoch=0, run_dir=None, name="test")
    with pytest.raises(ValueError) as excinfo:
        model.export(tmp_path / "out")
    message = str(excinfo.value)
    assert "\n" not in message and "decoder" in message and "nothing was written" in message
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


@needs_extra
@pytest.mark.parametrize("when", ["encoder", "decoder"])
def test_ctrl_c_while_exporting_writes_nothing_and_exits_130(tmp_path, capsys, monkeypatch, isolated_cache, when):
    """Ctrl-C inside torch.export: exit 130, one line, and the three files together or not at all."""
    import signal

    real = torch.export.export
    calls = {"n": 0}

    def interrupted_export(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (1 if when == "encoder" else 2):
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, arriving inside torch's exporter
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", interrupted_export)
    # As it was: Python's own handler, or SIG_IGN where the shell started pytest in the background
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "out"
    result = main(capsys, "export", "pretrained", "--out", out)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    # nothing of the export's, not even a temporary folder; ONNX Runtime, where this process loads it first,
    # keeps a device id of its own in the cache folder isolated_cache points it to
    assert not out.exists() and [p for p in tmp_path.iterdir() if p != isolated_cache] == []
    assert signal.getsignal(signal.SIGINT) is handler  # put back as it was


@needs_extra
def test_an_export_into_an_existing_folder_replaces_the_three_files_and_nothing_else(tmp_path, exported):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "encoder.onnx").write_bytes(b"old")
    mnist_vae.load("pretrained").export(out)
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "encoder.onnx").read_bytes() == (exported / "encoder.onnx").read_bytes()


@needs_extra
def test_a_full_disk_while_exporting_names_the_file_and_leaves_nothing(tmpfs, capsys):
    """The pretrained model's graphs (about 5 MB) on a 2 MB file system."""
    out = tmpfs / "onnx"
    result = main(capsys, "export", "pretrained", "--out", out)
    assert_one_line_error(result, str(out / "encoder.onnx"), "No space left")
    assert ".tmp" not in result.stderr
    assert list(tmpfs.iterdir()) == []
