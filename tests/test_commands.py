"""The commands for a trained run (evaluate, sample, reconstruct, denoise, interpolate), users' own
images, and bad input: missing, empty, corrupt or hand-edited run folders, files that are not images,
and --output folders that cannot be written. Every failure is one line on stderr, no traceback, and
leaves the files already on disk as they were.

One tiny trained run (module-scoped) serves every test; commands run in-process through cli.main,
and a few in a subprocess to see a real process exit without a traceback."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_one_line_error, main, make_idx_dataset, run_cli, run_command, snapshot
from mnist_vae import checkpoint, cli
from mnist_vae.errors import UserError
from mnist_vae.images import load_user_image
from mnist_vae.evaluation import decode_images, reconstruct
from mnist_vae.loop import prepare_output

RUN_ARGS = ["--n_hidden", "32", "--batch_size", "32", "--dim_z", "3", "--PRR_n_img_x", "4", "--PRR_n_img_y", "4",
            "--add_noise", "True", "--num_epochs", "2", "--seed", "3"]






def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def tile(canvas, row, column, gap=2):
    return canvas[row * (28 + gap): row * (28 + gap) + 28, column * (28 + gap): column * (28 + gap) + 28]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("commands")
    data = make_idx_dataset(base / "data", n_train=256, n_test=64, seed=4)
    out = base / "run"
    assert cli.main([*RUN_ARGS, "--data_dir", str(data), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Users' images: a light-background colour JPEG and a dark-background grey PNG of other sizes,
    and files that are not images."""
    folder = tmp_path_factory.mktemp("images")
    light = Image.new("RGB", (90, 60), (250, 240, 215))  # ink on cream paper
    ink = np.asarray(light).copy()
    ink[10:50, 40:48] = (20, 30, 120)  # a navy "1"
    ink[10:16, 30:48] = (20, 30, 120)
    Image.fromarray(ink).save(folder / "light.jpg", quality=95)
    dark = np.zeros((120, 100), dtype=np.uint8)  # chalk on a blackboard
    yy, xx = np.indices(dark.shape)
    dark[np.abs(np.hypot(yy - 60, xx - 50) - 30) < 6] = 230  # an "0"
    Image.fromarray(dark, mode="L").save(folder / "dark.png")
    (folder / "notes.png").write_text("these are my notes, not a picture\n")
    (folder / "cut.png").write_bytes((folder / "dark.png").read_bytes()[:60])
    (folder / "a_folder.png").mkdir()
    return SimpleNamespace(light=folder / "light.jpg", dark=folder / "dark.png", folder=folder,
                           bad={"not an image": folder / "notes.png", "truncated": folder / "cut.png",
                                "missing": folder / "nowhere.png", "a folder": folder / "a_folder.png"})


@pytest.fixture(scope="module")
def model(run):
    config, _, tensors = checkpoint.load(run)
    return checkpoint.build_model(config, tensors).eval()


@pytest.fixture
def unchanged(run):
    """The run folder is the same after the test as before it."""
    before = snapshot(run)
    yield run
    assert snapshot(run) == before


# ---------------------------------------------------------------- evaluate

def test_evaluate_prints_elbo_and_log_likelihood(unchanged, capsys):
    result = main(capsys, "evaluate", unchanged, "--k", "5")
    assert result.returncode == 0, result.stderr
    elbo = float(re.search(r"test -ELBO: ([\d.]+) nats", result.stdout).group(1))
    with open(unchanged / "metrics.csv") as f:
        last = f.read().splitlines()[-1].split(",")
    assert abs(elbo - float(last[4])) < 2e-3  # the loaded model scores as the trained one did
    match = re.search(r"test NLL \(importance weighted, k=5\): ([\d.]+) ± ([\d.]+) nats", result.stdout)
    assert match, result.stdout
    nll, stderr = map(float, match.groups())
    assert 0 < stderr < nll and abs(nll - elbo) < 0.1 * elbo
    assert "2 epochs" in result.stdout and "test images: 64" in result.stdout


def test_evaluate_k_0_skips_the_log_likelihood(unchanged, capsys):
    result = main(capsys, "evaluate", unchanged, "--k", "0")
    assert result.returncode == 0, result.stderr
    assert "test -ELBO" in result.stdout and "NLL" not in result.stdout and "±" not in result.stdout


# ---------------------------------------------------------------- sample

@pytest.mark.parametrize("n, size", [(16, (112, 112)), (10, (112, 84)), (1, (28, 28))])
def test_sample_writes_a_grid(unchanged, tmp_path, capsys, n, size):
    out = tmp_path / "s.png"
    result = main(capsys, "sample", unchanged, "--n", n, "--out", out)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == size
    assert pixels(out).std() > 0 or n == 1


def test_sample_default_file_seed_and_model(run, model, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = main(capsys, "sample", copy)
    assert result.returncode == 0, result.stderr
    with Image.open(copy / "samples.png") as image:
        assert image.size == (224, 224)  # 64 images: 8 x 8
    # The images are the decoded prior draws of the seed, from the saved model.
    z = torch.randn((64, 3), generator=torch.Generator().manual_seed(0))
    expected = decode_images(model, z).numpy().reshape(8, 8, 28, 28).transpose(0, 2, 1, 3).reshape(224, 224)
    assert np.abs(pixels(copy / "samples.png") - expected * 255).max() <= 1
    main(capsys, "sample", copy, "--seed", "1", "--out", tmp_path / "other.png")
    assert (tmp_path / "other.png").read_bytes() != (copy / "samples.png").read_bytes()


# ---------------------------------------------------------------- reconstruct, denoise, interpolate

def test_reconstruct_users_images_side_by_side(unchanged, images, model, tmp_path, capsys):
    out = tmp_path / "r.png"
    result = main(capsys, "reconstruct", unchanged, images.light, images.dark, "--out", out)
    assert result.returncode == 0, result.stderr
    canvas = pixels(out)
    assert canvas.shape == (58, 58)  # 2 rows, 2 columns of 28 with a 2-pixel gap
    inputs = np.stack([load_user_image(images.light), load_user_image(images.dark)])
    outputs = reconstruct(model, torch.from_numpy(inputs)).numpy()
    for row in range(2):
        assert np.abs(tile(canvas, row, 0) - inputs[row].reshape(28, 28) * 255).max() <= 1
        assert np.abs(tile(canvas, row, 1) - outputs[row].reshape(28, 28) * 255).max() <= 1
        left = tile(canvas, row, 0)
        border = np.concatenate([left[0], left[-1], left[:, 0], left[:, -1]])
        assert border.max() < 30 and left.max() > 200  # a dark background and bright ink, like MNIST
    # The cream paper of the JPEG was inverted: its thin "1" is the only bright part of the tile.
    assert tile(canvas, 0, 0).mean() < 0.2 * 255


def test_reconstruct_default_output_file(run, images, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = main(capsys, "reconstruct", copy, images.dark)
    assert result.returncode == 0, result.stderr
    assert pixels(copy / "reconstruct.png").shape == (28, 58)


@pytest.mark.parametrize("add_noise, width", [(False, 58), (True, 88)])
def test_denoise_side_by_side(unchanged, images, model, tmp_path, capsys, add_noise, width):
    out = tmp_path / "d.png"
    args = ["--add_noise"] if add_noise else []
    result = main(capsys, "denoise", unchanged, images.light, images.dark, *args, "--out", out)
    assert result.returncode == 0, result.stderr
    canvas = pixels(out)
    assert canvas.shape == (58, width)
    assert "note:" not in result.stdout  # this run was trained with --add_noise
    inputs = np.stack([load_user_image(images.light), load_user_image(images.dark)])
    for row in range(2):
        assert np.abs(tile(canvas, row, 0) - inputs[row].reshape(28, 28) * 255).max() <= 1
    if add_noise:
        noisy = tile(canvas, 0, 1)
        assert np.abs(noisy - tile(canvas, 0, 0)).mean() > 20  # the middle column is the noisy input
        restored = reconstruct(model, torch.from_numpy(noisy.reshape(1, 784) / 255)).numpy()
        assert np.abs(tile(canvas, 0, 2) - restored.reshape(28, 28) * 255).max() <= 3


def test_interpolate_writes_a_row(unchanged, images, model, tmp_path, capsys):
    out = tmp_path / "i.png"
    result = main(capsys, "interpolate", unchanged, "--from", images.light, "--to", images.dark, "--steps", "5",
                  "--out", out)
    assert result.returncode == 0, result.stderr
    strip = pixels(out)
    assert strip.shape == (28, 140)
    # The ends are the reconstructions of the two images.
    inputs = torch.from_numpy(np.stack([load_user_image(images.light), load_user_image(images.dark)]))
    ends = reconstruct(model, inputs).numpy().reshape(2, 28, 28) * 255
    assert np.abs(strip[:, :28] - ends[0]).max() <= 1
    assert np.abs(strip[:, -28:] - ends[1]).max() <= 1
    assert np.abs(strip[:, 56:84] - ends[0]).mean() > 0.5  # the middle is neither end


# ---------------------------------------------------------------- bad images

COMMANDS_WITH_IMAGES = {
    "reconstruct": lambda run, image, other: ["reconstruct", run, other, image],
    "denoise": lambda run, image, other: ["denoise", run, image, other],
    "interpolate": lambda run, image, other: ["interpolate", run, "--from", other, "--to", image],
}


@pytest.mark.parametrize("case", ["not an image", "truncated", "missing", "a folder"])
@pytest.mark.parametrize("command", list(COMMANDS_WITH_IMAGES))
def test_bad_image_is_one_line(unchanged, images, tmp_path, capsys, command, case):
    bad = images.bad[case]
    out = tmp_path / "out.png"
    result = main(capsys, *COMMANDS_WITH_IMAGES[command](unchanged, bad, images.dark), "--out", out)
    assert_one_line_error(result, str(bad))
    assert not out.exists()
    assert (images.bad["not an image"]).read_text().startswith("these are my notes")


def test_bad_image_in_a_real_process(run, images):
    before = snapshot(run)
    result = run_command("reconstruct", run, images.dark, images.bad["not an image"])
    assert_one_line_error(result, str(images.bad["not an image"]), "PNG or JPEG")
    assert snapshot(run) == before


@pytest.mark.parametrize("flag, value, needle", [("--out", "{tmp}", "folder"), ("--out", "{tmp}/no/x.png", "exist"),
                                                 ("--out", "{tmp}/x.gif", ".png")])
def test_bad_out_is_one_line(unchanged, images, tmp_path, capsys, flag, value, needle):
    result = main(capsys, "reconstruct", unchanged, images.dark, flag, value.format(tmp=tmp_path))
    assert_one_line_error(result, needle)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.gif"))


# ---------------------------------------------------------------- bad run folders

def hand_edited(run, folder, state_text=None, drop=(), **changes):
    """A copy of the run's checkpoint with the tensors kept and the config in its metadata changed."""
    with safe_open(str(run / checkpoint.FILENAME), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    state = json.loads(metadata["state"])
    state["config"].update(changes)
    for key in drop:
        del state[key]
    state_text = json.dumps(state) if state_text is None else state_text
    save_file(tensors, str(folder / checkpoint.FILENAME), metadata={**metadata, "state": state_text})


def make_bad_run(kind, run, folder):
    """A run folder gone wrong, and a word its error must name."""
    if kind == "missing":
        return folder / "nowhere", "nowhere"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    if kind == "a file":
        (folder / "file").write_text("not a folder")
        return folder / "file", "not a folder"
    raw = (run / checkpoint.FILENAME).read_bytes()
    shutil.copy(run / "metrics.csv", folder / "metrics.csv")
    if kind == "no checkpoint":
        return folder, checkpoint.FILENAME
    if kind == "truncated":
        (folder / checkpoint.FILENAME).write_bytes(raw[: len(raw) // 2])
        return folder, "truncated or corrupt"
    if kind == "corrupt header":
        (folder / checkpoint.FILENAME).write_bytes(raw[:8] + b"#" + raw[9:])
        return folder, "truncated or corrupt"
    if kind == "garbage":
        (folder / checkpoint.FILENAME).write_bytes(np.random.default_rng(0).bytes(5000))
        return folder, "truncated or corrupt"
    if kind == "empty file":
        (folder / checkpoint.FILENAME).write_bytes(b"")
        return folder, "truncated or corrupt"
    if kind == "not ours":
        save_file({"x": torch.zeros(3)}, str(folder / checkpoint.FILENAME), metadata={"format": "other"})
        return folder, "not an mnist-vae checkpoint"
    if kind == "dim_z edited":
        hand_edited(run, folder, dim_z=5)
        return folder, "dim_z"
    if kind == "n_hidden edited":
        hand_edited(run, folder, n_hidden=64)
        return folder, "n_hidden"
    if kind == "likelihood edited":
        hand_edited(run, folder, likelihood="gaussian")
        return folder, "likelihood"
    if kind == "dim_z made text":
        hand_edited(run, folder, dim_z="three")
        return folder, "dim_z"
    if kind == "settings not JSON":
        hand_edited(run, folder, state_text='{"config": {"dim_z": 3,')
        return folder, "settings cannot be read"
    if kind == "no epoch":
        hand_edited(run, folder, drop=["epoch"])
        return folder, "settings cannot be read"
    raise AssertionError(kind)


BAD_RUNS = ["missing", "a file", "no checkpoint", "truncated", "corrupt header", "garbage", "empty file", "not ours",
            "dim_z edited", "n_hidden edited", "likelihood edited", "dim_z made text", "settings not JSON", "no epoch"]
RUN_COMMANDS = {
    "evaluate": lambda run, images: ["evaluate", run, "--k", "5"],
    "sample": lambda run, images: ["sample", run, "--n", "4"],
    "reconstruct": lambda run, images: ["reconstruct", run, images.dark],
    "denoise": lambda run, images: ["denoise", run, images.light, "--add_noise"],
    "interpolate": lambda run, images: ["interpolate", run, "--from", images.light, "--to", images.dark],
    "explore": lambda run, images: ["explore", run],
    "resume": lambda run, images: ["--resume", run, "--num_epochs", "5"],
}


@pytest.mark.parametrize("kind", BAD_RUNS)
@pytest.mark.parametrize("command", list(RUN_COMMANDS))
def test_bad_run_folder_is_one_line_and_loses_nothing(run, images, tmp_path, capsys, command, kind):
    bad, needle = make_bad_run(kind, run, tmp_path / "bad")
    before = snapshot(tmp_path / "bad") if (tmp_path / "bad").is_dir() else None
    result = main(capsys, *RUN_COMMANDS[command](bad, images))
    assert_one_line_error(result, needle)
    assert str(Path(bad).name) in result.stderr
    if before is not None:
        assert snapshot(tmp_path / "bad") == before
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_bad_run_folder_in_a_real_process(run, tmp_path, kind):
    bad, needle = make_bad_run(kind, run, tmp_path / "bad")
    result = run_command("sample", bad) if kind == "missing" else run_cli("--resume", bad)
    assert_one_line_error(result, needle)


# ---------------------------------------------------------------- --output that cannot be written

def test_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("precious")
    result = main(capsys, "--output", target, "--num_epochs", "1")
    assert_one_line_error(result, str(target), "is a file")
    assert target.read_text() == "precious"


def _prepare_output_as_nobody(folder):
    """prepare_output(folder) in a child process that is not root: 0 refused cleanly, 1 accepted,
    2 another exception, 3 could not drop privileges."""
    pid = os.fork()
    if pid == 0:  # the child: everything is imported already
        code = 2
        try:
            try:
                os.setgid(65534)
                os.setuid(65534)
            except OSError:
                os._exit(3)
            try:
                prepare_output(folder)
                code = 1
            except UserError as e:
                code = 0 if "cannot write" in str(e) and str(folder) in str(e) else 2
            except BaseException:
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("sub", [False, True], ids=["folder", "subfolder"])
def test_output_folder_without_write_permission(tmp_path, capsys, sub):
    # A folder outside pytest's private temp tree, so that another user can reach it.
    base = Path(tempfile.mkdtemp(prefix="mnist-vae-readonly-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        (locked / "notes.txt").write_text("mine")
        target = locked / "sub" if sub else locked
        if os.geteuid() == 0:
            locked.chmod(0o755)  # root's folder: others may read but not write
            assert _prepare_output_as_nobody(target) == 0
        else:
            locked.chmod(0o500)
            result = main(capsys, "--output", target, "--num_epochs", "1")
            assert_one_line_error(result, str(target), "cannot write")
            locked.chmod(0o755)
        assert snapshot(locked) == {"notes.txt": b"mine"}
        assert not (locked / "sub").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_prepare_output_accepts_a_writable_folder(tmp_path):
    assert prepare_output(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
