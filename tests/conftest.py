"""Shared fixtures: the real datasets, small IDX folders made on the fly, and ways to run the CLI."""

import csv
import errno
import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# The suite runs in two worker processes (pyproject.toml) on machines of two cores: OpenMP threads that spin
# while they wait for work, as libgomp's do by default, would hold both cores and starve the other worker's
# threads. Set before torch loads libgomp, which reads it then; the command line's processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The tests stop runs with Ctrl-C as a terminal does. A pytest that a shell without job control started in the
# background begins with SIGINT ignored, and so would every command it starts (errors.catch_signals): catch it
# again, here and in each worker, whose commands then begin with SIGINT's default action.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import torch

from mnist_vae import layers
from mnist_vae.fast import kernels, products

# The files that take longest, longest first; the rest follow in their own order. pytest-xdist hands whole files
# to the two workers in this order (--no-loadscope-reorder in pyproject.toml, where it would otherwise put the
# files with most tests first), so that neither worker waits at the end while the other runs a long file begun
# late. The order comes from `--durations=0`, each file's tests summed.
LONGEST_FILES = ("test_sweep.py", "test_tools.py", "test_fused.py", "test_precision.py", "test_new_user.py",
                 "test_export.py", "test_robustness.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # a stable sort

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# The real MNIST: the shared copy, else the one bundled in the package.
MNIST_DIR = SHARED_DATA / "mnist"
if not MNIST_DIR.is_dir():
    MNIST_DIR = ROOT / "src" / "mnist_vae" / "datasets" / "mnist"


def write_idx(path, array, gz=True):
    """Write a uint8 array as an IDX file (the format the datasets use)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_dataset(folder, n_train=256, n_test=64, seed=0, gz=True):
    """A small dataset in the four canonical IDX files: random blobs, labels 0..9."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = (rng.random((n, 28, 28)) ** 4 * 255).astype(np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return folder


@pytest.fixture
def tiny_dataset(tmp_path):
    return make_idx_dataset(tmp_path / "tiny")


@pytest.fixture
def mnist_dir():
    """The real MNIST (MNIST_DIR)."""
    return MNIST_DIR


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep every test away from the user's real download cache; the folder that stands for it."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def run_cli(*args, cwd=None, timeout=300, env=None):
    """Run `python main.py ARGS` in a subprocess; return the CompletedProcess (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def run_command(*args, cwd=None, timeout=300, env=None):
    """Run the installed `mnist-vae` console script (next to this Python) in a subprocess."""
    script = Path(sys.executable).with_name("mnist-vae")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_one_line_error(result, *needles, code=None):
    """A user error: non-zero exit, no traceback, one line on stderr mentioning each needle."""
    assert result.returncode != 0, result
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def main(capsys, *args):
    """mnist_vae.cli.main in-process, with its exit status and captured output, like a CompletedProcess. Given
    capsysbinary, the output is read as the bytes it is and decoded as a process's output with a name that is
    not UTF-8 is read (surrogateescape)."""
    from mnist_vae import cli

    try:
        code = cli.main([str(arg) for arg in args], prog="mnist-vae")
    except SystemExit as e:  # argparse's way out of a usage error
        code = e.code
    out, err = (text.decode(errors="surrogateescape") if isinstance(text, bytes) else text
                for text in capsys.readouterr())
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def snapshot(folder):
    """Every file under `folder` (relative path) with its bytes."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_metrics(folder):
    with open(Path(folder) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(params=["C", "torch ops"])
def implementation(request):
    """Run a test with the training step's elementwise work in kernels.py's C loops, then in its torch ops."""
    if request.param == "C" and kernels._kernels is None:
        pytest.skip("the C extension was not built")
    before = kernels.available()
    kernels.use(request.param == "C")
    yield request.param
    kernels.use(before)


@pytest.fixture(params=["torch.mm", "oneDNN"])
def routine(request):
    """Run a test with the training step's matrix products through torch.mm, then through oneDNN."""
    if not products.onednn_available(torch.device("cpu")):
        pytest.skip("this torch has no oneDNN")
    products.use(request.param)
    yield request.param
    products.use(None)


def signal_at_call(monkeypatch, call, signals):
    """Make the fused training step send `signals` to this process during its `call`-th call."""
    calls = {"n": 0}

    from mnist_vae.fast import fused

    class Step(fused.FusedTrainStep):
        def __call__(self, *batch):
            result = super().__call__(*batch)
            calls["n"] += 1
            if calls["n"] == call:
                for sig in signals:
                    handler = signal.getsignal(sig)  # never let a signal loose on pytest itself
                    assert callable(handler) and handler is not signal.default_int_handler, \
                        f"training installed no handler for {signal.Signals(sig).name}"
                    os.kill(os.getpid(), sig)
            return result

    monkeypatch.setattr(fused, "FusedTrainStep", Step)  # what step.make_step builds
    return calls


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the finished run of the test's module (its fixture `trained`), for a test to change."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    return copy


class FullDisk:
    """open() whose writes stop half-way with ENOSPC, as on a full disk."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.f = open(path, mode, *args, **kwargs)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class SilentlyShort(FullDisk):
    """open() whose writes keep half of the data and report success, as a write on a full disk once did."""

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        return len(data)
