"""The model shipped in the package: the dim_z 2 MNIST run of the results (docs/results.md), its float16 weights and provenance.

`mnist_vae.load("pretrained")` and every command's RUN_DIR `pretrained` load it. It is
refreshed from a finished run folder, by the maintainers, with one command:

    python -m mnist_vae.pretrained RUN_DIR [--commit SHA] [--command "mnist-vae ..."]

which measures the run's test -ELBO on MNIST with its float32 weights and again with the
float16 weights it stores, and writes both, with the command that trained the run and
the git commit of that code, into the file's header. float16 halves the file (2.6 MB for
1.3 million weights) and changes the pictures by less than a grey level; the numbers it
gives are within a few hundredths of a nat of the float32 model's (both are recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from .. import checkpoint, files
from ..checkpoint import CheckpointError, build_model, read_file
from ..config import Config
from ..data import load_tensors
from ..errors import UserError
from ..evaluation import evaluate
from ..version import __version__

FILENAME = "mnist-dim2.safetensors"
FORMAT = "mnist-vae pretrained 1"
MAX_BYTES = 3 * 2**20  # what the packaged model may add to the package


def path() -> Path:
    """Where the packaged model's file is."""
    return Path(__file__).resolve().parent / FILENAME


def read(file=None):
    """(config, float16 weights named "model.*", info) of the packaged file; info holds `epoch` and `provenance`."""


    file = Path(file or path())
    if not file.is_file():
        raise CheckpointError(f"the packaged model {file} is missing; reinstall mnist-vae, or refresh it with "
                              f"python -m mnist_vae.pretrained RUN_DIR")
    try:
        metadata, tensors = read_file(file)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        config = Config.from_dict(json.loads(metadata["config"]))
        config.check()
        info = {"epoch": int(metadata["epoch"]), "provenance": json.loads(metadata["provenance"])}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the packaged model {file} cannot be read ({e}); reinstall mnist-vae") from None
    return config, tensors, info


def load_model(file=None):
    """(config, the VAE in float32, info) of the packaged model."""

    config, tensors, info = read(file)
    weights = {name: value.float() for name, value in tensors.items()}
    return config, build_model(config, weights, file or path()).eval(), info


# ---------------------------------------------------------------- refreshing it from a run

def refresh(run_dir, commit=None, command=None, out=None, log=print) -> dict:
    """Store the trained model of `run_dir` as the packaged model (float16), with its provenance; return it."""


    config, state, tensors = checkpoint.load(run_dir)
    if config.dataset != "mnist" or config.dim_z != 2:
        raise UserError(f"{run_dir} is a {config.dataset} run with dim_z={config.dim_z}; the packaged model is "
                        f"the dim_z 2 MNIST run (mnist-vae --dim_z 2 --num_epochs 60)")
    if state["epoch"] < config.num_epochs:
        raise UserError(f"{run_dir} has trained {state['epoch']} of its {config.num_epochs} epochs; finish it "
                        f"first (mnist-vae --resume {run_dir})")
    model = checkpoint.build_model(config, tensors, Path(run_dir) / checkpoint.FILENAME).eval()
    half = {f"model.{name}": value.detach().to(torch.float16).contiguous() for name, value in model.state_dict().items()}
    rounded = checkpoint.build_model(config, {name: value.float() for name, value in half.items()}).eval()
    test = load_tensors(dataclasses.replace(config, n_test=0, n_train=1, data_dir=None), "cpu", log=lambda _: None).test
    float32, float16 = evaluate(model, test)[0], evaluate(rounded, test)[0]
    log(f"test -ELBO on MNIST's {len(test)} test images: {float32:.4f} (float32 weights), "
        f"{float16:.4f} (float16 weights)")
    provenance = {
        "command": command or _command(config),
        "commit": commit or _git_commit(),
        "mnist_vae": __version__,
        "torch": torch.__version__,
        "epochs": state["epoch"],
        "test_images": len(test),
        "test_neg_elbo_float32": float32,
        "test_neg_elbo_float16": float16,
        "training_test_neg_elbo": state["history"][-1]["test_neg_elbo"],
        "weights": "float16, from the float32 weights of the run",
    }
    evaluation = Path(run_dir) / "evaluation.json"
    if evaluation.is_file():
        result = json.loads(evaluation.read_text())
        provenance.update(test_nll_float32=result["iw_nll"], test_nll_stderr=result["iw_nll_stderr"],
                          test_nll_k=result["k"])
    metadata = {"format": FORMAT, "config": json.dumps({**config.to_dict(), "output": "pretrained"}),
                "epoch": str(state["epoch"]), "provenance": json.dumps(provenance)}
    data = safetensors_bytes(half, metadata=metadata)
    if len(data) > MAX_BYTES:
        raise UserError(f"the model takes {len(data) / 2**20:.1f} MB in float16, more than the package's "
                        f"{MAX_BYTES / 2**20:.0f} MB")
    target = Path(out or path())
    files.write_bytes(target, data)
    log(f"wrote {target} ({len(data) / 2**20:.2f} MB)")
    return provenance


def _command(config) -> str:
    """The training command of `config`: its settings that differ from the defaults, as flags."""

    defaults = Config()
    flags = [f"--{name} {shlex.quote(str(value))}" for name, value in config.to_dict().items()
             if value != getattr(defaults, name) and name not in ("device", "tensorboard")]
    return " ".join(["mnist-vae", *flags])


def _git_commit() -> str:
    """The commit of this source tree, marked "-dirty" when it has uncommitted changes; "unknown" outside git."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".."], cwd=source,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def main(argv=None) -> int:
    """`python -m mnist_vae.pretrained RUN_DIR`: refresh the packaged model from a finished run."""

    parser = argparse.ArgumentParser(prog="python -m mnist_vae.pretrained", description=main.__doc__.split(": ")[1])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished dim_z 2 MNIST run (mnist-vae --dim_z 2 "
                                                           "--num_epochs 60 --eval_k 1000 --output RUN_DIR)")
    parser.add_argument("--commit", help="git commit of the code that trained the run (default: this checkout's)")
    parser.add_argument("--command", help="the command that trained it (default: made from its settings)")
    parser.add_argument("--out", help=f"file to write (default: the package's {FILENAME})")
    args = parser.parse_args(argv)
    try:
        refresh(args.run_dir, args.commit, args.command, args.out)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
