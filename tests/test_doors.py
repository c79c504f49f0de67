"""The command line and the Python API are two doors onto one implementation: the same request through
either gives the same outcome. Training and resuming write the same files, metrics and checkpoint; the
model commands' pictures hold the API's images pixel for pixel and their printed numbers are the API's;
and each refusal is the same one line (the command line's error is the API exception's message).

Tiny runs (n_hidden 16, one epoch on a made-up dataset), trained once through each door per module."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import mnist_vae
from conftest import main, make_idx_dataset, read_metrics, snapshot
from mnist_vae import checkpoint, cli
from mnist_vae.export import missing_packages
from mnist_vae.plots import grid

SETTINGS = dict(n_hidden=16, batch_size=32, dim_z=2, num_epochs=1, seed=3, PRR_n_img_x=4, PRR_n_img_y=3,
                PMLR_n_img_x=3, PMLR_n_img_y=2, PMLR_n_samples=30)
GAP = 2  # pixels between the columns and rows of the side-by-side pictures


def flags(settings):
    return [f"--{name}={value}" for name, value in settings.items()]


def train_through_both_doors(base, settings):
    """The same run trained by `mnist-vae FLAGS` and by mnist_vae.train(**settings)."""
    assert cli.main([*flags(settings), "--output", str(base / "cli")], prog="mnist-vae") == 0
    model = mnist_vae.train(base / "api", log=lambda _: None, **settings)
    return SimpleNamespace(cli=base / "cli", api=base / "api", model=model, settings=settings)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("doors") / "data", n_train=128, n_test=32, seed=5)


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    return train_through_both_doors(tmp_path_factory.mktemp("plain"), {**SETTINGS, "data_dir": str(data)})


@pytest.fixture(scope="module")
def conditional(data, tmp_path_factory):
    return train_through_both_doors(tmp_path_factory.mktemp("conditional"),
                                    {**SETTINGS, "conditional": True, "data_dir": str(data)})


@pytest.fixture(params=["plain", "conditional"])
def both(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two users' pictures: dark ink on light paper (a "1") and chalk on a blackboard (a "0")."""
    folder = tmp_path_factory.mktemp("images")
    one = np.full((90, 70), 250, dtype=np.uint8)
    one[10:80, 30:40] = 10
    Image.fromarray(one).save(folder / "one.png")
    yy, xx = np.indices((100, 100))
    zero = np.where(np.abs(np.hypot(yy - 50, xx - 50) - 30) < 6, 230, 0).astype(np.uint8)
    Image.fromarray(zero).save(folder / "zero.png")
    return [folder / "one.png", folder / "zero.png"]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def as_pixels(images):
    """Images in [0, 1] as the pictures store them: uint8, rounded."""
    return np.uint8(np.clip(np.asarray(images).reshape(-1, 28, 28), 0, 1) * 255 + 0.5)


def column(path, c, rows):
    """Column `c` of a side-by-side picture: its `rows` images, (rows, 28, 28)."""
    canvas = pixels(path)
    at = c * (28 + GAP)
    return np.stack([canvas[r * (28 + GAP): r * (28 + GAP) + 28, at: at + 28] for r in range(rows)])


# ---------------------------------------------------------------- training

def assert_same_run(a, b):
    """Two run folders hold the same run: the same files, pictures byte for byte, the same metrics but
    for the seconds, the same settings but for the folder, and the same checkpoint tensors."""
    files_a, files_b = snapshot(a), snapshot(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        if name not in ("metrics.csv", "config.json", checkpoint.FILENAME):
            assert files_a[name] == files_b[name], name
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    configs = [json.loads((folder / "config.json").read_text()) for folder in (a, b)]
    assert {**configs[0], "output": None} == {**configs[1], "output": None}
    with safe_open(a / checkpoint.FILENAME, "pt") as fa, safe_open(b / checkpoint.FILENAME, "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert fa.get_tensor(key).equal(fb.get_tensor(key)), key


def test_training_writes_the_same_run_through_both_doors(both):
    assert_same_run(both.cli, both.api)
    assert both.model.epoch == 1 and both.model.run_dir == both.api


def test_resuming_trains_the_same_further_through_both_doors(plain, tmp_path, capsys):
    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    shutil.copytree(plain.cli, by_cli)
    shutil.copytree(plain.api, by_api)
    assert main(capsys, "--resume", by_cli, "--num_epochs", "2").returncode == 0
    model = mnist_vae.train(by_api, resume=True, num_epochs=2, log=lambda _: None)
    assert model.epoch == 2
    assert_same_run(by_cli, by_api)
    # A finished run: nothing to train; both say so in the same words.
    said = []
    mnist_vae.train(by_api, resume=True, log=said.append)
    result = main(capsys, "--resume", by_cli)
    assert result.returncode == 0
    assert result.stdout.strip() == said[0].replace(str(by_api), str(by_cli)) and "finished" in said[0]


# ---------------------------------------------------------------- the model commands

def test_sample_is_the_apis_sample(both, tmp_path, capsys):
    model = mnist_vae.load(both.api)
    requests = [(["--n", "12", "--seed", "7"], dict(n=12, seed=7), (4, 3))]  # a 4 x 3 grid
    if model.conditional:
        requests = [(["--n", "12", "--seed", "7", "--class", "3"], dict(n=12, seed=7, label=3), (4, 3)),
                    (["--n", "20", "--seed", "7"], dict(n=20, seed=7, label=[i % 10 for i in range(20)]), (10, 2))]
    for args, call, (n_x, n_y) in requests:
        out = tmp_path / "samples.png"
        result = main(capsys, "sample", both.api, *args, "--out", out)
        assert result.returncode == 0, result.stderr
        assert np.array_equal(pixels(out), grid(model.sample(**call), n_x, n_y))


def test_reconstruct_and_denoise_are_the_apis(both, images, tmp_path, capsys):
    model = mnist_vae.load(both.api)
    out = tmp_path / "r.png"
    assert main(capsys, "reconstruct", both.api, *images, "--out", out).returncode == 0
    assert np.array_equal(column(out, 0, 2), as_pixels(mnist_vae.prepare_images(images)))
    assert np.array_equal(column(out, 1, 2), as_pixels(model.reconstruct(images)))
    assert main(capsys, "denoise", both.api, *images, "--add_noise", "--out", out).returncode == 0
    noisy = model.add_noise(images, seed=0)
    assert np.array_equal(column(out, 1, 2), as_pixels(noisy))
    assert np.array_equal(column(out, 2, 2), as_pixels(model.reconstruct(noisy)))


def test_interpolate_is_the_apis(plain, images, tmp_path, capsys):
    out = tmp_path / "line.png"
    result = main(capsys, "interpolate", plain.api, "--from", images[0], "--to", images[1], "--steps", "6",
                  "--out", out)
    assert result.returncode == 0, result.stderr
    line = mnist_vae.load(plain.api).interpolate(images[0], images[1], steps=6)
    assert np.array_equal(pixels(out), grid(line, 6, 1))


def test_classify_prints_the_apis_probabilities(conditional, images, capsys):
    model = mnist_vae.load(conditional.api)
    result = main(capsys, "classify", conditional.api, *images, "--k", "5")
    assert result.returncode == 0, result.stderr
    expected = []
    for path, p in zip(images, model.classify(images, k=5)):
        best = model.classes[int(p.argmax())]
        expected.append(f"{path}: {best} (p={p.max():.3f})  "
                        + "  ".join(f"{name}:{q:.3f}" for name, q in zip(model.classes, p)))
    assert result.stdout.splitlines() == expected


def test_analogies_are_the_apis(conditional, images, tmp_path, capsys):
    model = mnist_vae.load(conditional.api)
    out = tmp_path / "a.png"
    result = main(capsys, "analogies", conditional.api, *images, "--out", out)
    assert result.returncode == 0, result.stderr
    read_as = [model.classes[label] for label in model.predict(images)]
    assert result.stdout.splitlines()[:2] == [f"{path}: read as {name} (give --label to choose)"
                                             for path, name in zip(images, read_as)]
    styles = model.analogies(images)
    assert styles.shape == (2, 10, 28, 28)
    for c in range(10):
        assert np.array_equal(column(out, c + 1, 2), as_pixels(styles[:, c])), c
    assert main(capsys, "analogies", conditional.api, *images, "--label", "3", "--out", out).returncode == 0
    assert np.array_equal(column(out, 4, 2), as_pixels(model.analogies(images, labels=3)[:, 3]))


def test_evaluate_prints_the_apis_numbers(both, capsys):
    model = mnist_vae.load(both.api)
    result = main(capsys, "evaluate", both.api, "--k", "5")
    assert result.returncode == 0, result.stderr
    said = []
    numbers = model.evaluate(k=5, log=said.append)
    given, nll = (" of log p(x|y)", " -log p(x|y)") if model.conditional else ("", "")
    config = model.config
    expected = said + [
        f"run: {both.api} ({config.dataset}, dim_z=2, likelihood={config.likelihood}, binarize={config.binarize}, "
        f"1 epochs)",
        f"test images: {numbers['images']}",
        f"test -ELBO{given}: {numbers['neg_elbo']:.3f} nats per image (reconstruction {numbers['recon']:.3f}, "
        f"KL {numbers['kl']:.3f})"]
    if model.conditional:
        expected.append(f"test accuracy as a classifier (highest ELBO): {numbers['accuracy']:.4f}")
    expected.append(f"test NLL{nll} (importance weighted, k=5): {numbers['nll']:.3f} ± {numbers['nll_stderr']:.3f} "
                    f"nats per image (± one standard error)")
    assert result.stdout.splitlines() == expected
    assert numbers["images"] == 32 and said == [f"data: mnist from the --data_dir {both.settings['data_dir']}"]
    assert ("accuracy" in numbers) == model.conditional


# ---------------------------------------------------------------- refusals: one line, the same through both

REFUSALS = {
    "a length and a budget": (["--num_epochs", "2", "--time_budget", "1", "--output", "{new}"],
                              dict(output="{new}", num_epochs=2, time_budget=1), 1),
    "a resume that changes the model": (["--resume", "{run}", "--dim_z", "5"],
                                        dict(output="{run}", resume=True, dim_z=5), 1),
    "a folder holding a run": (["--output", "{run}"], dict(output="{run}"), 1),
    "a bad whole number": (["--dim_z", "0", "--output", "{new}"], dict(output="{new}", dim_z=0), 2),
    "a bad choice": (["--dataset", "cifar", "--output", "{new}"], dict(output="{new}", dataset="cifar"), 2),
    "a bad number": (["--learning_rate=-1", "--output", "{new}"], dict(output="{new}", learning_rate=-1), 2),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refusal_is_the_same_line_through_both_doors(plain, tmp_path, capsys, case):
    args, call, code = REFUSALS[case]
    run, new = tmp_path / "run", tmp_path / "new"
    shutil.copytree(plain.api, run)
    fill = lambda value: value.format(run=run, new=new) if isinstance(value, str) else value  # noqa: E731
    before = snapshot(run)
    with pytest.raises(ValueError) as refused:
        mnist_vae.train(**{name: fill(value) for name, value in call.items()}, log=lambda _: None)
    result = main(capsys, *map(fill, args))
    assert result.returncode == code
    assert result.stderr == f"mnist-vae: error: {refused.value}\n"
    assert snapshot(run) == before and not new.exists()


def test_an_unknown_setting_is_refused_through_both_doors(tmp_path, capsys):
    """The command line refuses the flag as argparse does; the API as Python refuses a keyword (TypeError)."""
    with pytest.raises(TypeError, match="unknown setting 'dimz'"):
        mnist_vae.train(tmp_path / "new", dimz=2)
    result = main(capsys, "--dimz", "2", "--output", tmp_path / "new")
    assert result.returncode == 2 and result.stderr == "mnist-vae: error: unrecognized arguments: --dimz 2\n"
    assert not (tmp_path / "new").exists()


def test_exporting_a_conditional_model_gives_the_same_files_through_both_doors(conditional, tmp_path, capsys):
    if missing_packages() and os.environ.get("CI") != "true":  # in CI, the extra is installed
        pytest.skip(f"the [export] extra is not installed ({', '.join(missing_packages())})")
    written = mnist_vae.load(conditional.api).export(tmp_path / "api")
    result = main(capsys, "export", conditional.api, "--out", tmp_path / "cli")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in written.values()) == sorted(path.name for path in (tmp_path / "cli").iterdir())
    api_json = json.loads((tmp_path / "api" / "model.json").read_text())
    cli_json = json.loads((tmp_path / "cli" / "model.json").read_text())
    for graph in ("encoder", "decoder"):
        assert api_json[graph] == cli_json[graph]
        assert [i["name"] for i in api_json[graph]["inputs"]][-1] == "label"
