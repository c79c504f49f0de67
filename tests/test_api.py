"""The Python API (mnist_vae.load, mnist_vae.train, the Model's methods, mnist_vae.datasets.load), the
README's "From Python" code, which runs here so that it cannot rot, and the packaged pretrained model.

One tiny run, trained through the API (module-scoped), serves most tests; it is checked against the
same run trained through the command line."""

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mnist_vae
from conftest import MNIST_DIR, ROOT, main, make_idx_dataset, read_metrics, run_command
from mnist_vae import checkpoint, pretrained
from mnist_vae.images import load_user_image
from mnist_vae.data import load_tensors
from mnist_vae.evaluation import classifier_accuracy, decode_images, evaluate, reconstruct
from mnist_vae.model import analogies

SETTINGS = dict(n_hidden=32, batch_size=32, dim_z=3, PRR_n_img_x=4, PRR_n_img_y=4, num_epochs=2, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("api") / "data", n_train=256, n_test=64, seed=4)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    model = mnist_vae.train(output=out, data_dir=str(data), log=lambda _: None, **SETTINGS)
    return model


@pytest.fixture(scope="module")
def digits():
    """Eight real MNIST test digits, uint8 (8, 28, 28)."""
    return mnist_vae.datasets.load("mnist", MNIST_DIR).test_images[:8].copy()


# ---------------------------------------------------------------- train and load

def test_train_is_the_command_lines_training(run, data, tmp_path, capsys):
    """Same settings through the CLI: the same files, the same metrics, the same weights."""
    out = tmp_path / "cli"
    flags = [f"--{name}={value}" for name, value in SETTINGS.items()]
    result = main(capsys, *flags, "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in run.run_dir.iterdir())
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(run.run_dir))
    loaded = mnist_vae.load(out)
    for (name, a), (_, b) in zip(loaded.module.state_dict().items(), run.module.state_dict().items()):
        assert torch.equal(a, b), name
    assert dataclasses.replace(loaded.config, output=run.config.output) == run.config
    assert run.epoch == 2 and run.dim_z == 3


def test_load_gives_the_saved_model(run):
    config, state, tensors = checkpoint.load(run.run_dir)
    module = checkpoint.build_model(config, tensors).eval()
    model = mnist_vae.load(run.run_dir)
    assert model.config == config and model.epoch == state["epoch"] == 2
    z = torch.randn(5, 3)
    assert np.array_equal(model.decode(z.numpy()).reshape(5, 784), decode_images(module, z).numpy())
    assert str(model.device) == "cpu" and "dim_z=3" in repr(model)


def test_train_resumes_and_refuses_what_the_command_line_refuses(run, data, tmp_path):
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        mnist_vae.train(output=run.run_dir, data_dir=str(data), **SETTINGS)
    with pytest.raises(ValueError, match="--dim_z 5 contradicts the run in"):
        mnist_vae.train(output=run.run_dir, resume=True, dim_z=5)
    with pytest.raises(ValueError, match=r"dim_z=0: expected a whole number of at least 1"):
        mnist_vae.train(output=tmp_path / "new", dim_z=0)
    with pytest.raises(TypeError, match="unknown setting 'dimz'"):
        mnist_vae.train(output=tmp_path / "new", dimz=2)
    with pytest.raises(ValueError, match="expected one of mnist, fashion-mnist"):
        mnist_vae.train(output=tmp_path / "new", dataset="cifar")
    assert not (tmp_path / "new").exists()
    lines = []
    again = mnist_vae.train(output=run.run_dir, resume=True, log=lines.append)  # finished: nothing to do
    assert "has finished all 2 epochs" in lines[0] and again.epoch == 2


def test_train_resume_of_a_finished_run_runs_the_estimate_it_still_owes(data, tmp_path):
    out = tmp_path / "estimate"
    mnist_vae.train(output=out, data_dir=str(data), eval_k=2, log=lambda _: None, **{**SETTINGS, "num_epochs": 1})
    estimate = (out / "evaluation.json").read_text()
    (out / "evaluation.json").unlink()  # as after a signal during the estimate: the training is done, the estimate not
    lines = []
    mnist_vae.train(output=out, resume=True, log=lines.append)
    assert (out / "evaluation.json").read_text().split('"seconds"')[0] == estimate.split('"seconds"')[0]
    assert not any("has finished" in line for line in lines)
    lines.clear()
    mnist_vae.train(output=out, resume=True, log=lines.append)  # now nothing is owed
    assert "has finished all 1 epochs" in lines[0]


@pytest.mark.parametrize("kind", ["missing", "no checkpoint", "truncated"])
def test_bad_run_folder_is_a_value_error_with_the_command_lines_message(run, tmp_path, capsys, kind):
    bad = tmp_path / "bad"
    if kind != "missing":
        bad.mkdir()
    if kind == "truncated":
        raw = (run.run_dir / checkpoint.FILENAME).read_bytes()
        (bad / checkpoint.FILENAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError) as caught:
        mnist_vae.load(bad)
    result = main(capsys, "sample", bad)
    assert result.stderr.strip() == f"mnist-vae: error: {caught.value}"


def test_load_refuses_bad_arguments():
    with pytest.raises(TypeError, match="folder name"):
        mnist_vae.load(3)
    with pytest.raises(ValueError, match="device must be one of"):
        mnist_vae.load("pretrained", device="gpu")


# ---------------------------------------------------------------- images in, arrays out

def test_every_form_of_images_gives_the_same_pixels(run, digits, tmp_path):
    floats = digits.astype(np.float32) / 255
    expected, _ = run.encode(floats)
    for form in (digits, digits.reshape(8, 784), floats.reshape(8, 784), list(digits), [digits[:3], digits[3:]],
                 torch.from_numpy(floats), torch.from_numpy(digits).reshape(8, 1, 28, 28)):
        mu, std = run.encode(form)
        assert np.allclose(np.asarray(mu), expected, atol=1e-6) and np.asarray(std).shape == (8, 3)
    one, _ = run.encode(digits[0])  # one image, (28, 28)
    assert one.shape == (1, 3) and np.allclose(one, expected[:1], atol=1e-6)


def test_arrays_in_arrays_out_tensors_in_tensors_out(run, digits):
    assert isinstance(run.reconstruct(digits), np.ndarray) and run.reconstruct(digits).shape == (8, 28, 28)
    tensor = torch.from_numpy(digits)
    out = run.reconstruct(tensor)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 28, 28)
    assert isinstance(run.elbo(tensor), torch.Tensor) and isinstance(run.elbo(digits), np.ndarray)
    assert isinstance(run.decode(torch.zeros(2, 3)), torch.Tensor)


def test_files_and_pil_images_get_the_command_lines_preparation(run, tmp_path):
    grey = np.zeros((90, 60), dtype=np.uint8) + 240  # dark ink on light paper, not 28 x 28
    grey[20:70, 25:33] = 20
    Image.fromarray(grey).save(tmp_path / "one.png")
    prepared = load_user_image(tmp_path / "one.png")
    for form in (tmp_path / "one.png", str(tmp_path / "one.png"), Image.fromarray(grey)):
        assert np.allclose(mnist_vae.prepare_images(form).numpy(), prepared[None], atol=1e-6)
    with Image.open(tmp_path / "one.png") as image:
        mixed = run.reconstruct([image, tmp_path / "one.png", prepared])
    assert mixed.shape == (3, 28, 28) and np.allclose(mixed[0], mixed[2], atol=1e-6)


@pytest.mark.parametrize("images, error, needle", [
    (np.full((2, 28, 28), 200.0), ValueError, "must lie in [0, 1]"),
    (np.full((2, 28, 28), -1, dtype=np.int64), ValueError, "must lie in 0..255"),
    (np.zeros((2, 27, 28)), ValueError, "must have shape (N, 28, 28) or (N, 784)"),
    (np.full((1, 784), np.nan), ValueError, "NaN"),
    ([], ValueError, "empty"),
    (42, TypeError, "a NumPy array, a torch tensor, a PIL image, a path"),
    (np.array([["a"] * 784]), TypeError, "must hold numbers"),
])
def test_bad_images_raise(run, images, error, needle):
    with pytest.raises(error) as caught:
        run.encode(images)
    assert needle in str(caught.value)


def test_bad_image_file_is_a_value_error_with_the_command_lines_message(run, tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(ValueError) as caught:
        run.reconstruct(notes)
    result = main(capsys, "reconstruct", run.run_dir, notes, "--out", tmp_path / "r.png")
    assert result.stderr.strip() == f"mnist-vae: error: {caught.value}"


# ---------------------------------------------------------------- what the model does

def test_sample_is_seeded_decoding_of_prior_draws(run):
    z = torch.randn((6, 3), generator=torch.Generator().manual_seed(11))
    assert np.array_equal(run.sample(6, seed=11).reshape(6, 784), decode_images(run.module, z).numpy())
    assert not np.array_equal(run.sample(6, seed=11), run.sample(6, seed=12))
    assert not np.array_equal(run.sample(6), run.sample(6))  # no seed: fresh draws
    for bad, error in ((0, ValueError), (2.5, TypeError), ("3", TypeError)):
        with pytest.raises(error):
            run.sample(bad)
    with pytest.raises(ValueError, match="not a conditional model"):
        run.sample(4, label=3)


def test_decode_checks_the_latent_shape(run):
    with pytest.raises(ValueError, match=r"z must have shape \(N, 3\)"):
        run.decode(np.zeros((4, 2)))
    assert run.decode(np.zeros(3)).shape == (1, 28, 28)


def test_reconstruct_interpolate_and_noise(run, digits):
    x = torch.from_numpy(digits.reshape(8, 784).astype(np.float32) / 255)
    assert np.array_equal(run.reconstruct(digits).reshape(8, 784), reconstruct(run.module, x).numpy())
    line = run.interpolate(digits[0], digits[1], steps=5)
    ends = run.reconstruct(digits[:2])
    assert line.shape == (5, 28, 28) and np.allclose(line[[0, -1]], ends, atol=1e-6)
    assert np.abs(line[2] - ends[0]).mean() > 1e-4
    with pytest.raises(ValueError, match="expected one image"):
        run.interpolate(digits[:2], digits[2])
    noisy = run.add_noise(digits, seed=1)
    assert noisy.shape == (8, 28, 28) and noisy.min() >= 0 and noisy.max() <= 1
    assert np.array_equal(noisy, run.add_noise(digits, seed=1)) and np.abs(noisy - x.numpy().reshape(8, 28, 28)).mean() > 0.1


def test_elbo_and_log_likelihood_are_the_runs_own_numbers(run, data):
    test = load_tensors(run.config, "cpu", log=lambda _: None).test
    per_image = run.elbo(test.numpy())
    assert per_image.shape == (64,)
    assert -per_image.mean() == pytest.approx(evaluate(run.module, test)[0], abs=1e-3)
    assert -per_image.mean() == pytest.approx(float(read_metrics(run.run_dir)[-1]["test_neg_elbo"]), abs=2e-3)
    state = torch.get_rng_state()
    log_p = run.log_likelihood(test[:10], k=20)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    assert torch.equal(log_p, run.log_likelihood(test[:10], k=20))  # fixed draws
    # The importance-weighted bound is tighter than the ELBO (up to noise with one z per image).
    assert log_p.mean() > run.elbo(test[:10]).mean() - 1.0
    report = run.evaluate(k=5, data_dir=str(data))
    assert report["images"] == 64 and report["neg_elbo"] == pytest.approx(-per_image.mean(), abs=1e-3)
    assert 0 < report["nll_stderr"] < report["nll"]


def test_datasets_load():
    mnist = mnist_vae.datasets.load("mnist")
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.dtype == np.uint8
    assert mnist.test_labels.shape == (10000,) and mnist.classes == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        mnist_vae.datasets.load("cifar")


def test_public_names_are_documented():
    for name in mnist_vae.__all__:
        value = getattr(mnist_vae, name)
        if callable(value) or isinstance(value, type(mnist_vae)):
            assert (value.__doc__ or "").strip(), name
    for name in ("encode", "decode", "sample", "reconstruct", "elbo", "log_likelihood", "interpolate", "evaluate",
                 "export", "classify", "predict", "analogies"):
        assert getattr(mnist_vae.Model, name).__doc__.strip(), name
        assert "return" in getattr(mnist_vae.Model, name).__annotations__, name


# ---------------------------------------------------------------- the pretrained model

@pytest.fixture(scope="module")
def packaged():
    if not pretrained.path().is_file():
        pytest.fail(f"{pretrained.path()} is missing: the package ships it")
    return mnist_vae.load("pretrained")


def test_pretrained_model_is_small_and_says_where_it_came_from(packaged):
    assert pretrained.path().stat().st_size <= 3 * 2**20
    assert packaged.config.dim_z == 2 and packaged.config.dataset == "mnist" and packaged.run_dir is None
    provenance = packaged.provenance
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]), provenance["commit"]
    assert provenance["command"].startswith("mnist-vae ") and "--dim_z 2" in provenance["command"]
    assert packaged.epoch == provenance["epochs"] == 60
    _, tensors, _ = pretrained.read()
    assert {value.dtype for value in tensors.values()} == {torch.float16}


def test_pretrained_models_test_elbo_is_the_recorded_one(packaged):
    """Its test -ELBO on MNIST, measured now, is what was recorded with the float16 weights; and that is
    within float16's rounding of the float32 model's."""
    measured = packaged.evaluate(k=0, data_dir=str(MNIST_DIR))
    provenance = packaged.provenance
    assert measured["images"] == 10000
    assert measured["neg_elbo"] == pytest.approx(provenance["test_neg_elbo_float16"], abs=0.01)
    assert provenance["test_neg_elbo_float16"] == pytest.approx(provenance["test_neg_elbo_float32"], abs=0.1)


def test_refreshing_the_packaged_model_from_a_run(tmp_path, capsys):
    """python -m mnist_vae.pretrained RUN_DIR: float16 weights, both test -ELBOs, the command and commit."""
    run = mnist_vae.train(output=tmp_path / "run", dim_z=2, n_hidden=32, num_epochs=1, n_train=500, n_test=200,
                          data_dir=str(MNIST_DIR), log=lambda _: None)
    target = tmp_path / "packaged.safetensors"
    assert pretrained.main([str(run.run_dir), "--out", str(target), "--commit", "0" * 40]) == 0
    config, module, info = pretrained.load_model(target)
    provenance = info["provenance"]
    assert provenance["commit"] == "0" * 40 and "--dim_z 2" in provenance["command"] and info["epoch"] == 1
    test = load_tensors(dataclasses.replace(config, n_test=0), "cpu", log=lambda _: None).test
    assert provenance["test_images"] == 10000
    assert evaluate(module, test)[0] == pytest.approx(provenance["test_neg_elbo_float16"], abs=1e-4)
    assert evaluate(run.module, test)[0] == pytest.approx(provenance["test_neg_elbo_float32"], abs=1e-4)
    weights = dict(run.module.state_dict())
    for name, value in module.state_dict().items():
        assert torch.equal(value, weights[name].half().float()), name
    capsys.readouterr()
    assert pretrained.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_folder_named_pretrained_wins(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(run.run_dir, tmp_path / "pretrained")
    assert mnist_vae.load("pretrained").config.dim_z == 3
    os.unlink(tmp_path / "pretrained")
    assert mnist_vae.load("pretrained").config.dim_z == 2


def test_commands_take_pretrained_as_run_dir(packaged, tmp_path, capsys, monkeypatch):
    result = run_command("sample", "pretrained", "--n", "16", "--out", "s.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "s.png") as image:
        assert image.size == (112, 112)
    monkeypatch.chdir(tmp_path)
    digit = (mnist_vae.datasets.load("mnist", MNIST_DIR).test_images[0]).copy()
    Image.fromarray(255 - digit).resize((70, 70)).save("my_digit.png")  # dark ink on white paper
    result = main(capsys, "reconstruct", "pretrained", "my_digit.png")  # writes ./reconstruct.png
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "reconstruct.png") as image:
        assert image.size == (58, 28)
    result = main(capsys, "evaluate", "pretrained", "--k", "0", "--n_test", "500")
    assert result.returncode == 0 and "test images: 500" in result.stdout and "60 epochs" in result.stdout


# ---------------------------------------------------------------- the README's Python code

def readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_from_python_runs(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert blocks, "the README has no ```python block"
    monkeypatch.chdir(tmp_path)  # the example writes its files here
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert any(Path(tmp_path).iterdir())


# ---------------------------------------------------------------- conditional models

@pytest.fixture(scope="module")
def conditional_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "conditional"
    return mnist_vae.train(output=out, data_dir=str(data), log=lambda _: None, conditional=True,
                           **{**SETTINGS, "num_epochs": 1})


def test_a_conditional_model_takes_labels_and_classifies(conditional_run, digits):
    from mnist_vae.model import classify

    model = conditional_run
    assert model.conditional and model.classes[7] == "7"
    # sample(label=) decodes the seeded z with that class, as the module does with its one-hot column.
    z = torch.randn((4, model.dim_z), generator=torch.Generator().manual_seed(5))
    expected = decode_images(model.module, z, torch.full((4,), 7)).reshape(-1, 28, 28).numpy()
    assert np.array_equal(model.sample(4, seed=5, label=7), expected)
    assert np.array_equal(model.sample(4, seed=5, label="7"), expected)
    assert not np.array_equal(model.sample(4, seed=5, label=1), expected)
    # classify: p(y|x), rows summing to 1, the module's own classifier.
    p = model.classify(digits)
    x = mnist_vae.prepare_images(digits)
    assert p.shape == (8, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.allclose(p, classify(model.module, x, k=1).exp().numpy(), atol=1e-6)
    # reconstruct without labels uses the class it finds; with labels, the ones given.
    given = model.reconstruct(digits, labels=[3] * 8)
    assert np.allclose(given, reconstruct(model.module, x, torch.full((8,), 3)).reshape(-1, 28, 28).numpy())
    assert model.elbo(digits, labels=3).shape == (8,)
    assert model.log_likelihood(digits[:2], k=5, labels=[3, 4]).shape == (2,)


def test_a_conditional_model_refuses_calls_without_what_it_needs(conditional_run, run, digits):
    with pytest.raises(ValueError, match="conditional model: sample"):
        conditional_run.sample(2)
    with pytest.raises(ValueError, match="needs the class of each row"):
        conditional_run.decode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="give the labels"):
        conditional_run.elbo(digits)
    with pytest.raises(ValueError, match="expected 8 labels"):
        conditional_run.reconstruct(digits, labels=[1, 2])
    with pytest.raises(ValueError, match="no such class"):
        conditional_run.sample(2, label="sneaker")
    with pytest.raises(ValueError, match="not a conditional model"):
        run.classify(digits)
    with pytest.raises(ValueError, match="not a conditional model"):
        run.decode(np.zeros((2, 3)), labels=[1, 2])


def test_a_conditional_model_predicts_draws_classes_and_writes_analogies(conditional_run, data, digits):
    """What the commands of conditional runs use: predict (the class read in each image), sample with a
    class per image, analogies, and evaluate's accuracy as a classifier."""
    from mnist_vae.model import classify

    model = conditional_run
    x = mnist_vae.prepare_images(digits)
    labels = model.predict(digits)
    assert labels.shape == (8,) and labels.dtype == np.int64
    assert np.array_equal(labels, classify(model.module, x, k=100).argmax(1).numpy())
    assert isinstance(model.predict(torch.from_numpy(digits)), torch.Tensor)
    assert np.array_equal(model.reconstruct(digits), model.reconstruct(digits, labels=labels))  # its labels
    # analogies: each image's posterior mean under its label, decoded with every class.
    styles = model.analogies(digits[:3], labels=[1, 2, "3"])
    assert styles.shape == (3, 10, 28, 28)
    assert np.array_equal(styles.reshape(3, 10, 784), analogies(model.module, x[:3], torch.tensor([1, 2, 3])).numpy())
    assert np.allclose(styles[[0, 1, 2], [1, 2, 3]], model.reconstruct(digits[:3], labels=[1, 2, 3]), atol=1e-6)
    assert np.array_equal(model.analogies(digits[:3]), model.analogies(digits[:3], labels=labels[:3]))
    # sample: a class for every image, or one per image.
    z = torch.randn((4, model.dim_z), generator=torch.Generator().manual_seed(5))
    expected = decode_images(model.module, z, torch.tensor([0, 1, 2, 0])).reshape(-1, 28, 28).numpy()
    assert np.array_equal(model.sample(4, seed=5, label=[0, 1, 2, 0]), expected)
    with pytest.raises(ValueError, match="expected 4 labels"):
        model.sample(4, seed=5, label=[1, 2])
    # evaluate: the bounds of log p(x|y), and the accuracy as a classifier; where the data came from, to `log`.
    said = []
    report = model.evaluate(k=0, log=said.append)
    tensors = load_tensors(model.config, "cpu", log=lambda _: None)
    assert report["accuracy"] == classifier_accuracy(model.module, tensors.test, tensors.test_y)
    assert 0 <= report["accuracy"] <= 1 and "nll" not in report
    assert said == [f"data: mnist from the --data_dir {data}"]


def test_predict_and_analogies_need_a_conditional_model(run, digits):
    for method in ("predict", "analogies"):
        with pytest.raises(ValueError, match=f"not a conditional model; {method} needs a run trained with"):
            getattr(run, method)(digits)
    assert "accuracy" not in run.evaluate(k=0)
