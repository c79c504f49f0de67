"""Writing files so that nothing is lost: every file goes to a temporary name beside its target and is renamed over it.

A crash, a full disk or a read-only folder then leaves the old file as it was and no
partial file behind, and the OSError becomes one line naming the path and what to do.
"""

import contextlib
import errno
import json
import os
from pathlib import Path

from .errors import UserError


class WriteError(UserError):
    pass


ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or choose another place",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another place",
    errno.EROFS: "the file system is read-only; choose a folder you can write to",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.ENOENT: "its folder does not exist; create it or choose another path",
    errno.EISDIR: "it is a folder; give a file name",
}


def error_line(path, error, doing="write"):
    """One line for an OSError on a user's path: the path, what went wrong, what to do."""
    advice = ADVICE.get(error.errno, "choose another place")
    return f"cannot {doing} {path} ({error.strerror or error}); {advice}"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    On any error the temporary file is removed, `path` is left as it was, and an OSError
    becomes a WriteError (one line naming the path).
    """
    path = Path(path)
    # The target's name, cut short so that the temporary name stays within the 255 bytes a name can have.
    tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(error_line(path, e)) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path, data):
    """Write `data` to `path` atomically, and only if every byte reached the file: a short write that
    nothing reported (seen on a full disk) is an error naming `path`, and leaves the old file as it was."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            written = os.fstat(f.fileno()).st_size
        if written != len(data):
            raise WriteError(f"cannot write {path} (only {written} of its {len(data)} bytes were written); "
                             f"{ADVICE[errno.ENOSPC]}")


def write_text(path, text):
    write_bytes(path, text.encode())


def write_json(path, values):
    write_text(path, json.dumps(values, indent=2) + "\n")
