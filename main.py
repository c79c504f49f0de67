"""The old program's entry point: `python main.py --dim_z 4` trains and writes images into results/."""

import sys
from pathlib import Path

try:
    from mnist_vae.cli import main
except ImportError:  # run from a checkout without installing: use the sources beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from mnist_vae.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="main.py"))
