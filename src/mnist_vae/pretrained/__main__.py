"""`python -m mnist_vae.pretrained RUN_DIR`: refresh the packaged model from a finished run folder."""

import sys

from . import main

sys.exit(main())
