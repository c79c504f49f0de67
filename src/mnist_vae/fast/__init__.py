"""The fast path: the training step with its backward pass written out, its C loops, product routines and thread governor.

It imports the models and never the reverse: `step.make_step` hands it a model only where
`fused.unsupported` finds nothing that it does not compute exactly as autograd does.
"""

import os
import platform

import torch

from . import kernels, products


def machine():
    """The CPU, cores, torch and the elementwise code in use, for benchmark and results headers."""
    cpu = products.describe_cpu(products.cpu()) or platform.processor() or platform.machine()  # as lscpu names it
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "kernels": kernels.description()}
