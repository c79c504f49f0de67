"""Checkpoints: one safetensors file per run folder, written atomically, never pickled.

The file holds the model weights, the Adam state and the random-number-generator
states as tensors, and everything else (config, epoch, step, metrics so far) as JSON
in the safetensors header. Loading it reads tensors and JSON only, so opening a
checkpoint cannot run code. It is written to a temporary file in the same folder,
fsynced and renamed over the old one: a crash or a full disk mid-write leaves the
previous checkpoint as it was.
"""

import json
import math
import os
import re
from pathlib import Path

import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from . import files
from .config import Config
from .errors import UserError
from .evaluation import elbo_name, metric_fields
from .model import MODELS, model_class, model_name

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
    # The model's class and constructor arguments (nanoGPT's model_args): loading builds exactly it.
    state = {**state, "model": model.name, "model_args": model.model_args}
    metadata = {"format": FORMAT, "state": json.dumps(state)}
    try:
        files.write_bytes(Path(run_dir) / FILENAME, safetensors_bytes(tensors, metadata=metadata))
    except files.WriteError as e:
        raise CheckpointError(f"{e}; the previous checkpoint, if any, is unchanged") from None


def read_file(path):
    """(metadata, tensors) of a safetensors file, on the CPU; safetensors' and the OS's errors pass through."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        # A path whose bytes are not UTF-8 (a folder named b"bad\xff"): safetensors takes only UTF-8
        # names, so the file is read here, by its bytes, and parsed from memory.
        return _read_bytes(Path(path).read_bytes())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}


def _read_bytes(data):
    """read_file's result from a safetensors file's bytes: its header's __metadata__, and the tensors."""
    from safetensors.torch import load as tensors_of

    if len(data) < 8 or len(data) - 8 < (size := int.from_bytes(data[:8], "little")):
        raise SafetensorError("the header is incomplete")
    try:
        header = json.loads(data[8: 8 + size])
    except (ValueError, RecursionError) as e:
        raise SafetensorError(f"the header is not JSON ({e})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata or {}, tensors_of(data)


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
        metadata, tensors = read_file(path)
    except OSError as e:  # the file could not be read: nothing is known about its contents
        raise CheckpointError(f"cannot read {path} ({e.strerror or e}); make it readable, or give another "
                              f"run folder") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); it cannot be loaded; "
                              f"retrain, or restore it from a backup") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mnist-vae checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        state = json.loads(metadata["state"])
        config = Config.from_dict(state["config"])
        if not (_is_int(state["epoch"]) and _is_int(state["step"]) and isinstance(state["history"], list)):
            raise TypeError("epoch and step must be whole numbers and history a list")
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: its settings cannot be read ({_short(e)}); the file is damaged") from None
    try:
        config.check()
    except ValueError as e:
        raise CheckpointError(f"{path}: its config has {e}, which no run can have; the config was changed "
                              f"by hand or the file is damaged") from None
    try:  # settings valid one by one that no model has together (the seed's MLP with three layers)
        config.check_combination()
    except UserError as e:
        raise CheckpointError(f"{path}: its config has settings no run can have together ({e}); the config "
                              f"was changed by hand or the file is damaged") from None
    # The model a checkpoint holds, by its name in model.MODELS; checkpoints from before models had
    # names hold the old program's VAE.
    name = state.setdefault("model", "vae")
    if name not in MODELS:
        raise CheckpointError(f"{path}: it holds a model {name!r} that this mnist-vae does not know; register its "
                              f"class with mnist_vae.model.register before loading it")
    if name != model_name(config):
        raise CheckpointError(f"{path}: it holds a model {name!r} that its config (model={config.model!r}, "
                              f"conditional={config.conditional}) does not describe; the file is damaged or from "
                              f"a newer mnist-vae")
    check_contents(config, state, tensors, path)
    return config, state, tensors


def model_args(config, state=None):
    """(name, constructor arguments) of the model a checkpoint holds: as its state records them, or, for
    a checkpoint from before they were recorded (and the packaged model), as its config describes them."""
    name = (state or {}).get("model") or model_name(config)
    if state is not None and "model_args" in state:
        return name, state["model_args"]
    return name, model_class(name).from_config(config).model_args


def build_model(config, tensors, path="checkpoint", state=None):
    """The model a checkpoint holds, built from its class and arguments, with the checkpoint's weights:
    every weight must be there in the shape the model has, and the config must say what the model is."""
    name, arguments = model_args(config, state)
    described = model_class(name).from_config(config).model_args if state is not None else arguments
    for setting, value in arguments.items():
        if described.get(setting, value) != value:
            raise CheckpointError(f"{path}: its config says {setting}={described[setting]!r} but its model has "
                                  f"{setting}={value!r}; the config was changed by hand or the file is damaged")
    try:
        model = model_class(name)(**arguments)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model {name} cannot be built from {arguments} ({_short(e)}); the file "
                              f"is damaged") from None
    weights = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in weights:
            _fail(path, f"its weight {key} of the {name} model is missing")
        if weights[key].shape != value.shape:
            _fail(path, f"its weight {key} has shape {tuple(weights[key].shape)} where the {name} model "
                        f"({_settings_text(arguments)}) has {tuple(value.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        _fail(path, f"it holds a weight {extra[0]} that the {name} model does not have")
    model.load_state_dict(weights)
    return model


def _settings_text(arguments):
    return ", ".join(f"{key}={value}" for key, value in arguments.items())


def load_optimizer_state(optimizer, tensors, path="checkpoint"):
    """Put the saved Adam moments and step counts back into `optimizer`."""
    params = optimizer.param_groups[0]["params"]
    for name, value in tensors.items():  # each must belong to a parameter, in its shape
        match = OPTIMIZER_TENSOR.fullmatch(name)
        if match is None:
            continue
        index, key = int(match.group(1)), match.group(2)
        expected = () if key == "step" else tuple(params[index].shape) if index < len(params) else None
        if expected is None or tuple(value.shape) != expected:
            _fail(path, f"its optimizer state {name} does not fit the model")
    for index, parameter in enumerate(params):
        prefix = f"optimizer.{index}."
        state = {name[len(prefix):]: value.to(parameter.device)
                 for name, value in tensors.items() if name.startswith(prefix)}
        if state:
            optimizer.state[parameter] = state


# ---------------------------------------------------------------- what a checkpoint may hold
# Everything a checkpoint holds is checked on loading against what save() writes: the JSON state's
# types and ranges, the tensors' names, dtypes and shapes, and that the numbers are finite. A file
# that differs was made by hand or damaged, and is refused in one line, before any of it is used.

OPTIMIZER_TENSOR = re.compile(r"optimizer\.(\d+)\.(step|exp_avg|exp_avg_sq)")
RNG_TENSORS = ("rng.torch", "rng.data_epoch_start", "rng.cuda")
REQUIRED_TENSORS = ("rng.torch", "rng.data_epoch_start", "progress.step_terms")
MAX_EPOCH_DIGITS = 12


def _short(error, limit=200):
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "..."


def _fail(path, what):
    raise CheckpointError(f"{path}: {what}; the file was made by hand or is damaged; retrain, or restore it "
                          f"from a backup")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_contents(config, state, tensors, path):
    """Refuse (CheckpointError) a state or tensors that save() would not have written."""
    if not isinstance(state, dict):
        _fail(path, "its state is not a JSON object")
    epoch, step = state["epoch"], state["step"]
    if not 0 <= epoch <= config.num_epochs:
        _fail(path, f"its epoch {epoch} is outside 0..num_epochs ({config.num_epochs})")
    if step < 0 or (step > 0 and epoch >= config.num_epochs):
        _fail(path, f"its step {step} is not a step of epoch {epoch + 1}")
    if not _is_int(config.epoch_digits) or not 0 <= config.epoch_digits <= MAX_EPOCH_DIGITS:
        _fail(path, f"its epoch_digits {config.epoch_digits!r} is not a whole number from 0 to {MAX_EPOCH_DIGITS}")
    seconds = state.get("seconds_in_epoch")
    if not _is_number(seconds) or seconds < 0:
        _fail(path, f"its seconds_in_epoch {_short(repr(seconds), 40)} is not a time")
    for key in ("data_source", "data_fingerprint"):
        if key in state and not isinstance(state[key], str):
            _fail(path, f"its {key} is not text")
    arguments = state.get("model_args", {})
    if not isinstance(arguments, dict) or not all(
            isinstance(value, (int, float, str, bool)) for value in arguments.values()):
        _fail(path, "its model_args is not a table of settings")
    history = state["history"]
    if len(history) != epoch:
        _fail(path, f"it holds metrics for {len(history)} epochs but says {epoch} are done")
    for index, row in enumerate(history):
        if not isinstance(row, dict) or row.get("epoch") != index + 1 or not set(row) <= set(metric_fields(config)):
            _fail(path, f"its metrics row {index + 1} is not one this program writes")
        for key, value in row.items():
            if not (_is_number(value) or isinstance(value, str)):
                _fail(path, f"its metrics row {index + 1} has {key} = {_short(repr(value), 40)}")
        elbo = elbo_name(config)
        for key in (f"train_{elbo}", "train_recon", "train_kl", f"test_{elbo}", "test_recon", "test_kl"):
            if not _is_number(row.get(key)):
                _fail(path, f"its metrics row {index + 1} has no finite {key}")
    for name in REQUIRED_TENSORS:
        if name not in tensors:
            _fail(path, f"it lacks the tensor {name}")
    expected_rng = torch.get_rng_state().shape
    for name, value in tensors.items():
        if name.startswith("model."):
            if value.dtype != torch.float32 or not torch.isfinite(value).all():
                _fail(path, f"its weight {name} is " + ("not float32" if value.dtype != torch.float32 else
                                                        "not finite (NaN or infinity)"))
        elif (match := OPTIMIZER_TENSOR.fullmatch(name)) is not None:
            if value.dtype != torch.float32 or not torch.isfinite(value).all() or (
                    match.group(2) != "exp_avg" and (value < 0).any()):
                _fail(path, f"its optimizer state {name} is not finite and float32" + (
                    "" if match.group(2) == "exp_avg" else " and non-negative"))
        elif name in RNG_TENSORS:
            if value.dtype != torch.uint8 or value.dim() != 1 or not len(value) or (
                    name == "rng.torch" and value.shape != expected_rng):
                _fail(path, f"its random state {name} is not one torch writes")
        elif name == "progress.step_terms":
            # 4 columns (-ELBO, reconstruction, KL, loss); 3 in checkpoints from before the loss had its own
            if value.dtype != torch.float32 or value.dim() != 2 or value.shape[1] not in (3, 4) or \
                    not torch.isfinite(value[:step]).all():
                _fail(path, f"its progress.step_terms is not a finite float32 table of (steps, 4)")
        else:
            _fail(path, f"it holds a tensor {_short(repr(name), 60)} that mnist-vae never writes")


def check_progress(state, tensors, n_steps, path, device=None):
    """Refuse a checkpoint whose position in the epoch does not fit the data it resumes on."""
    if state["step"] >= n_steps:
        _fail(path, f"its step {state['step']} is past the end of an epoch of {n_steps} steps")
    if tensors["progress.step_terms"].shape[0] != n_steps:
        _fail(path, f"its progress.step_terms has {tensors['progress.step_terms'].shape[0]} rows for an epoch "
                    f"of {n_steps} steps")
    try:
        torch.Generator(device=device or "cpu").set_state(tensors["rng.data_epoch_start"])
        torch.Generator().set_state(tensors["rng.torch"])
    except (RuntimeError, ValueError) as e:
        _fail(path, f"its random state cannot be restored ({_short(e, 80)})")
