"""The command line's argument parser: one-line usage errors, and the training flags every front end shares."""

import argparse

from .config import SETTINGS, Config, bad_value_line, boolean, text


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(parser, name, check, help_text, **kwargs):
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])

    def parse(text):
        try:
            return check(text)
        except argparse.ArgumentTypeError as e:
            # The line mnist_vae.train gives for the same value, not argparse's "argument --a/--b: ...";
            # an ArgumentError without an argument is printed as its message alone.
            raise argparse.ArgumentError(None, bad_value_line(name, text, e)) from None

    parser.add_argument(*spellings, dest=name, type=parse, help=help_text, **kwargs)


def train_parser(prog):
    defaults = Config()
    parser = Parser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Train a variational auto-encoder on MNIST or Fashion-MNIST and write its pictures, "
                    "metrics and checkpoint into --output.",
        epilog="other commands: evaluate, sample, reconstruct, denoise, interpolate, classify, analogies, export, "
               "explore, bench, reproduce, sweep "
               f"({prog} COMMAND --help)")
    for name, (check, help_text) in SETTINGS.items():
        default = getattr(defaults, name)
        extra = {"nargs": "?", "const": True, "metavar": "BOOL"} if check is boolean else {}
        _flag(parser, name, check, f"{help_text} (default: {default})", **extra)
    parser.add_argument("--resume", metavar="RUN_DIR", type=text,
                        help="continue the interrupted or finished run in RUN_DIR")
    parser.add_argument("--overwrite", nargs="?", const=True, type=boolean, metavar="BOOL",
                        help="write over the files of an earlier run in --output")
    return parser
