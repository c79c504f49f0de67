"""The command line: `mnist-vae [COMMAND] FLAGS`, one door onto the API; errors are one line, never a traceback.

Each command's module is imported when the command runs, so that `--help` and flag errors
answer before torch loads, and so that a training run takes its folder's lock first.
"""

import codecs
import sys
from pathlib import Path

from . import files, runs
from .arguments import train_parser
from .config import Config
from .errors import Interrupted, UserError

MODEL_COMMANDS = ("evaluate", "sample", "reconstruct", "denoise", "interpolate", "classify", "analogies", "export")
FRONT_ENDS = ("explore", "bench", "reproduce", "sweep")
COMMANDS = ("train", *MODEL_COMMANDS, *FRONT_ENDS)


def main(argv=None, prog=None):
    """Run a command; return its exit status. User errors print one line, never a traceback."""
    _never_fail_on_encoding()
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or ("mnist-vae" if Path(sys.argv[0]).name != "main.py" else "main.py")
    command = "train"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    try:
        with runs.session():  # the run folders a command locked are released when it returns
            return _run(command, prog, argv) or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # one on a path not caught where it happened: still one line, no traceback
        print(f"{prog}: error: " + (files.error_line(e.filename, e, "use") if e.filename else str(e)),
              file=sys.stderr)
        return 1
    except Interrupted as e:
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _escape(error):
    """The encoding error handler of the command's output: a file name's byte that is not UTF-8 (a
    surrogate, as Python reads such names) goes out as that byte, so the name printed is the name on
    disk; any other character the output's encoding lacks, as a backslash escape (\\xb1 for ±)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for character in error.object[error.start: error.end]:
        code = ord(character)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += character.encode("ascii", "backslashreplace")
    return bytes(out), error.end


codecs.register_error("mnist_vae.escape", _escape)


def _never_fail_on_encoding():
    """Let every character reach the terminal, whatever its encoding: ± and − under PYTHONIOENCODING=ascii
    or LANG=C, and folder names that are not UTF-8, ended a command with UnicodeEncodeError after its
    work was done."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="mnist_vae.escape")
        except (AttributeError, ValueError, OSError):  # not a text stream that can be reconfigured
            pass


def _run(command, prog, argv):
    # Lazy dispatch: a command's module, and torch with it, loads only once its flags are read.
    if command == "train":
        given = vars(train_parser(prog).parse_args(argv))
        resume, overwrite = given.pop("resume", None), given.pop("overwrite", False)
        # The run folder's lock comes first, before torch loads: of two runs started into one folder a
        # moment apart, the first keeps it and the second is refused at once (released when main() returns).
        if resume is None:
            runs.hold(given.get("output", Config().output))
        elif Path(resume).is_dir():  # else loading the checkpoint says what is wrong with it
            runs.hold(resume, create=False, what="--resume")
        from . import commands
        return commands.command_train(given, resume, bool(overwrite))
    if command in MODEL_COMMANDS:
        from . import commands
        return getattr(commands, f"command_{command}")(prog, argv)
    if command == "explore":
        from . import explore
        return explore.main(prog, argv)
    if command == "bench":
        from . import bench
        return bench.main(prog, argv)
    if command == "reproduce":
        from . import reproduce
        return reproduce.main(prog, argv)
    from . import sweep
    return sweep.main(prog, argv)


if __name__ == "__main__":
    sys.exit(main())
