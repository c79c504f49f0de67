"""Checkpoints: one safetensors file per run folder, written atomically, never pickled.

The file holds the model weights, the Adam state and the random-number-generator
states as tensors, and everything else (config, epoch, step, metrics so far) as JSON
in the safetensors header. Loading it reads tensors and JSON only, so opening a
checkpoint cannot run code. It is written to a temporary file in the same folder,
fsynced and renamed over the old one: a crash or a full disk mid-write leaves the
previous checkpoint as it was.
"""

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from . import files
from .config import Config, UserError
from .model import MODELS, build, model_name

FILENAME = "checkpoint.safetensors"
FORMAT = "mnist-vae checkpoint 1"


class CheckpointError(UserError):
    pass


def save(run_dir, model, optimizer, state, extra_tensors):
    """Write the checkpoint of `run_dir`. `state` is JSON-able and must hold the config;
    `extra_tensors` (random generator states, running sums) are stored under their own names."""
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    for index, parameter in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(parameter, {}).items():
            tensors[f"optimizer.{index}.{key}"] = value
    tensors.update(extra_tensors)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
    metadata = {"format": FORMAT, "state": json.dumps(state)}
    try:
        files.write_bytes(Path(run_dir) / FILENAME, safetensors_bytes(tensors, metadata=metadata))
    except files.WriteError as e:
        raise CheckpointError(f"{e}; the previous checkpoint, if any, is unchanged") from None


def load(run_dir):
    """Read the checkpoint of `run_dir`: (config, state, tensors), with clear errors for bad files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a folder; give the --output folder of a training run")
    path = run_dir / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no {FILENAME}; train into it first "
                              f"(mnist-vae --output {run_dir})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); it cannot be loaded; "
                              f"retrain, or restore it from a backup") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mnist-vae checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        state = json.loads(metadata["state"])
        config = Config.from_dict(state["config"])
        state.update(epoch=int(state["epoch"]), step=int(state["step"]), history=list(state["history"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: its settings cannot be read ({e}); the file is damaged") from None
    try:
        config.check()
    except ValueError as e:
        raise CheckpointError(f"{path}: its config has {e}, which no run can have; the config was changed "
                              f"by hand or the file is damaged") from None
    # The model a checkpoint holds, by its name in model.MODELS; checkpoints from before models had
    # names hold the seed VAE.
    name = state.setdefault("model", "vae")
    if name not in MODELS or name != model_name(config):
        raise CheckpointError(f"{path}: it holds a model {name!r} that its config (conditional="
                              f"{config.conditional}) does not describe; the file is damaged or from a newer "
                              f"mnist-vae")
    return config, state, tensors


def build_model(config, tensors, path="checkpoint"):
    """The model `config` describes (model.MODELS) with the checkpoint's weights, checking that the two agree."""
    weights = {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}
    shapes = {  # what each setting fixes in the weights
        "n_hidden": ("encoder.0.weight", 0, config.n_hidden),
        "dim_z": ("encoder.6.weight", 0, 2 * config.dim_z),
    }
    for setting, (name, axis, expected) in shapes.items():
        if name not in weights:
            raise CheckpointError(f"{path}: weight {name} is missing; the file is damaged")
        found = weights[name].shape[axis]
        if found != expected:
            actual = found // 2 if setting == "dim_z" else found
            raise CheckpointError(f"{path}: its config says {setting}={getattr(config, setting)} but its "
                                  f"weights are for {setting}={actual}; the config was changed by hand or "
                                  f"the file is damaged")
    model = build(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model


def load_optimizer_state(optimizer, tensors):
    """Put the saved Adam moments and step counts back into `optimizer`."""
    for index, parameter in enumerate(optimizer.param_groups[0]["params"]):
        prefix = f"optimizer.{index}."
        state = {name[len(prefix):]: value.to(parameter.device)
                 for name, value in tensors.items() if name.startswith(prefix)}
        if state:
            optimizer.state[parameter] = state
