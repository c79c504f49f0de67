"""The errors a user can fix, each reported as one line: the command line prints it, the API raises it; and
the signals that stop work part-way, caught where the work can end cleanly."""

import signal


class UserError(Exception):
    """A mistake or a problem the user can fix: reported as one line, no traceback."""

    exit_code = 1


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint; exit with `exit_code` (128 + signal)."""

    def __init__(self, exit_code):
        super().__init__(exit_code)
        self.exit_code = exit_code


def catch_signals(handler, signals=(signal.SIGINT, signal.SIGTERM)):
    """Send each of `signals` to `handler`, but for one this process started out ignoring: a command that a shell
    without job control runs in the background (`mnist-vae ... &` in a script) ignores Ctrl-C, which the
    terminal sends to the script's whole process group, and goes on, as Unix programs keep an ignored SIGINT
    ignored. Returns {signal: its handler before} of those caught, for restore_signals."""
    return {sig: signal.signal(sig, handler) for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN}


def restore_signals(previous):
    """Put back the handlers catch_signals replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class DataError(UserError):
    """A problem with the user's data or files, reported as one line without a traceback."""


class ArgumentError(UserError, ValueError):
    """A bad argument: a ValueError for Python callers, and the command line's one-line error."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong type: a TypeError for Python callers, one line on the command line."""


def as_argument_error(error: UserError) -> UserError:
    """The same message as an ArgumentError (a ValueError), unless it already is a ValueError or TypeError."""
    if isinstance(error, (ValueError, TypeError)):
        return error
    converted = ArgumentError(str(error))
    converted.exit_code = error.exit_code
    return converted
