"""Run folders: one process at a time in each, the files this program writes there, and what a run was trained on.

- The lock: a process that writes into a run folder (training, resuming, a model command
  writing its picture there) holds an flock on `.mnist-vae.lock` in it for its whole life.
  The kernel drops the lock when the process dies, so a crash never leaves a folder
  locked, and a lock file left behind by a killed process blocks nothing. A second
  process is refused at once, naming the holder's process id (written into the file).
- The files this program writes into a run folder, by name, so that `--overwrite` (and a
  rerun into a folder that holds no checkpoint) removes those and never anything else.
- A fingerprint of the training and test data, kept in the checkpoint, so that a resume on
  other data is refused.
"""

import contextlib
import errno
import fcntl
import functools
import os
import re
import time
from pathlib import Path

from . import files
from .config import fixed_length
from .errors import UserError

LOCK_NAME = ".mnist-vae.lock"
CHECKPOINT_NAME = "checkpoint.safetensors"  # checkpoint.FILENAME; not imported, since that pulls in torch


class FolderBusy(UserError):
    pass


class DataMismatch(UserError):
    pass


# ---------------------------------------------------------------- the lock

class _Lock:
    def __init__(self, folder, fd, created):
        self.folder, self.fd, self.created, self.count = folder, fd, created, 1


_held = {}  # real path of a folder -> its _Lock, for the locks this process holds


def _key(folder):
    return os.path.realpath(folder)


def _missing_parents(folder):
    """The folders that mkdir(parents=True) would create for `folder`, deepest first."""
    missing, path = [], Path(os.path.abspath(folder))
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _read_pid(fd):
    # The holder writes its pid just after taking the lock; give it a moment to do so.
    for _ in range(10):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


def hold(folder, create=True, what="--output"):
    """Lock `folder` for this process (creating it first if `create`); return a key for release().

    Re-entrant within a process. Raises FolderBusy if another process holds it, and a
    one-line WriteError if the folder cannot be created or written.
    """
    folder = Path(folder)
    key = _key(folder)
    if key in _held:
        _held[key].count += 1
        return key
    created, fd, path = [], None, folder / LOCK_NAME
    try:
        created = _missing_parents(folder) if create else []
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                fd = None
                _remove_empty(created)
                holder = f"process {pid}" if pid else "another process"
                raise FolderBusy(f"{what} {folder} is in use by another mnist-vae ({holder}); wait for it to "
                                 f"finish or stop it, or choose another folder") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                break  # a file system without locks (some network mounts): go on unlocked
            # Its last holder may have removed the file between our open and our lock: then
            # we locked a file nobody else can see, and must lock the one at `path` instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except FolderBusy:
        raise
    except OSError as e:
        if fd is not None:  # locked, but the pid could not be written (a full disk): leave nothing behind
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
        _remove_empty(created)
        if e.errno in (errno.EEXIST, errno.ENOTDIR) and os.path.isfile(folder):
            raise UserError(f"{what} {folder} is a file, not a folder; give a folder name") from None
        advice = files.ADVICE.get(e.errno, "choose a folder you can write to")
        raise files.WriteError(f"{what} {folder}: cannot write there ({e.strerror or e}); {advice}") from None
    _held[key] = _Lock(folder, fd, created)
    return key


def release(key):
    """Undo one hold(); the last one removes the lock file, then unlocks, then removes folders it
    created that the run left empty (a run that failed on its data or memory leaves nothing)."""
    lock = _held.get(key)
    if lock is None:
        return
    lock.count -= 1
    if lock.count > 0:
        return
    del _held[key]
    # Unlink while still locked: a process waiting on this file then sees it gone and retries.
    with contextlib.suppress(OSError):
        os.unlink(lock.folder / LOCK_NAME)
    os.close(lock.fd)
    _remove_empty(lock.created)


def _remove_empty(folders):
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def locked(folder, create=True, what="--output"):
    key = hold(folder, create, what)
    try:
        yield Path(folder)
    finally:
        release(key)


@contextlib.contextmanager
def session():
    """Release, on leaving, every lock taken inside (a command holds its folders until it returns)."""
    before = set(_held)
    try:
        yield
    finally:
        for key in [key for key in _held if key not in before]:
            while key in _held:
                release(key)


def locked_run(train):
    """Decorate train(config, resume=False, overwrite=False, ...): hold config.output's lock for the run."""
    @functools.wraps(train)
    def run(config, *args, **kwargs):
        with locked(config.output):
            return train(config, *args, **kwargs)
    return run


def hold_if_run(folder, what="--out"):
    """Lock `folder` if it holds a run (a command is about to write a file into it)."""
    folder = Path(folder)
    try:
        is_run = (folder / CHECKPOINT_NAME).exists() or (folder / "config.json").exists()
    except OSError:
        return None
    return hold(folder, create=False, what=what) if is_run else None


# ---------------------------------------------------------------- the files this program writes

EPOCH_IMAGE_PREFIXES = ("PRR", "samples", "analogies", "PMLR", r"PMLR_class\d+", "PMLR_map")
RUN_FILES = ("input.jpg", "input_noise.jpg", "metrics.csv", "loss_curves.png", "config.json", "evaluation.json",
             "samples.png", "reconstruct.png", "denoise.png", "interpolate.png", "analogies.png",
             "explore.html")
# Folders this program writes into a run folder by default, with the files it writes in each: export's
# (export.FILES; not imported, since export imports this module).
RUN_FOLDERS = {"onnx": ("encoder.onnx", "decoder.onnx", "model.json")}
_EPOCH_IMAGE = re.compile(rf"(?:{'|'.join(EPOCH_IMAGE_PREFIXES)})_epoch_\d+\.jpg")
_TEMP_FILE = re.compile(r"\..+\.\d+(?:\.[0-9a-f]+)?\.tmp")  # files.atomic_path's, left by a killed process


def is_output(name):
    """Whether a file name in a run folder is one this program writes."""
    return (name == CHECKPOINT_NAME or name in RUN_FILES or bool(_EPOCH_IMAGE.fullmatch(name))
            or bool(_TEMP_FILE.fullmatch(name)))


def clear_outputs(folder, log=print):
    """Remove the files this program wrote in `folder`, and nothing else.

    The checkpoint goes first: if a removal fails half-way, the folder holds no run (a rerun
    starts afresh) rather than an old checkpoint beside a mix of files.
    """
    folder = Path(folder)
    names = sorted((entry.name for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False)
                    and is_output(entry.name)), key=lambda name: name != CHECKPOINT_NAME)
    for name in names:
        _remove(folder / name)
    # The folders it writes (export's onnx/, and an export's temporary folder a killed process left):
    # their files by name, then the folder if that left it empty.
    export_files = RUN_FOLDERS["onnx"]
    folders = [(folder / name, inside) for name, inside in RUN_FOLDERS.items()]
    folders += [(Path(entry.path), export_files) for entry in os.scandir(folder)
                if entry.is_dir(follow_symlinks=False) and _TEMP_FILE.fullmatch(entry.name)]
    for path, inside in folders:
        if not path.is_dir() or path.is_symlink():
            continue
        leftovers = [Path(entry.path) for entry in os.scandir(path)
                     if entry.is_dir(follow_symlinks=False) and _TEMP_FILE.fullmatch(entry.name)]
        for target in [path / name for name in inside] + [leftover / name for leftover in leftovers
                                                          for name in inside]:
            if target.is_file() and not target.is_symlink():
                _remove(target)
                names.append(str(target.relative_to(folder)))
        for empty in leftovers + [path]:
            with contextlib.suppress(OSError):
                empty.rmdir()
    if names:
        log(f"removed the {len(names)} files of the earlier run in {folder}")
    return names


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise files.WriteError(f"cannot remove {path} ({e.strerror}); "
                               f"{files.ADVICE.get(e.errno, 'remove it by hand')}") from None


# ---------------------------------------------------------------- what a run was trained on


def check_same_data(state, fingerprint, out, source, log=print):
    """Refuse to resume the run in `out` on data other than those it was trained on."""
    saved = state.get("data_fingerprint")
    if saved is None:
        log(f"note: {out} was saved by an older mnist-vae that did not record its data; "
            f"cannot check that {source} holds the same data")
        return
    if saved != fingerprint:
        raise DataMismatch(f"--resume {out}: the data from the {source} are not those the run was trained on "
                           f"(data fingerprint {fingerprint[:12]}, the run's {saved[:12]}; it was trained on "
                           f"the {state.get('data_source', 'data it names in config.json')}); give --data_dir "
                           f"the run's data, or train a new run with another --output")


def check_evaluation_data(saved, fingerprint, run_dir, source, other_data=False, flag="--other_data", log=print):
    """Refuse to evaluate the run in `run_dir` on data other than it was trained on (as --resume refuses
    to train on them), unless `other_data`: then say in one line that they are other data. `saved` is the
    run's recorded fingerprint (None for runs that recorded none, and the packaged model: no check)."""
    if saved is None or saved == fingerprint:
        return
    if not other_data:
        raise DataMismatch(f"evaluate {run_dir}: the data from the {source} are not those the run was trained on "
                           f"(data fingerprint {fingerprint[:12]}, the run's {saved[:12]}); give --data_dir the "
                           f"run's data, or pass {flag} to evaluate it on these anyway"
                           + (" (other_data=True from Python)" if flag == "--other_data" else ""))
    log(f"note: evaluating {run_dir} on other data than it was trained on (the {source}; data fingerprint "
        f"{fingerprint[:12]}, the run's {saved[:12]})")


def epoch_digits(num_epochs):
    """Digits of the epoch number in file names: the width of num_epochs, two at least."""
    return max(2, len(str(num_epochs)))


def training_seconds(history):
    """Seconds of training in a run's metrics rows, whichever call trained each epoch."""
    return sum(row["seconds"] for row in history)


def budget_spent(config, history):
    """Whether a --time_budget run has trained for its minutes (the epochs' training seconds, across resumes)."""
    return config.time_budget > 0 and training_seconds(history) >= 60 * config.time_budget


def training_done(config, state):
    """Whether the run whose checkpoint holds `state` has trained all it will: its epochs, or its time budget."""
    return state["epoch"] >= config.num_epochs or budget_spent(config, state["history"])


def estimate_missing(config, run_dir):
    """Whether a finished run still owes its --eval_k estimate (one interrupted by a signal)."""
    return config.eval_k > 0 and not (Path(run_dir) / "evaluation.json").exists()


def finished_message(run_dir, config, state):
    """What --resume of a finished run says."""
    if budget_spent(config, state["history"]):
        return (f"{run_dir} has spent its time budget of {config.time_budget:g} minutes after {state['epoch']} "
                f"epochs; train a new run to train more")
    if fixed_length(config):
        return f"{run_dir} has finished all {state['epoch']} epochs, {fixed_length(config)}; train a new run to train more"
    return (f"{run_dir} has finished all {state['epoch']} epochs; to train further, "
            f"pass --num_epochs with more than {state['epoch']}")
