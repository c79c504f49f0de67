"""The device a run computes on: --device auto, cpu, cuda or mps."""

import torch

from .errors import UserError


def resolve_device(name):
    """--device auto picks CUDA, then Apple's MPS, then the CPU."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    elif (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name}: no such device on this machine; use --device auto or cpu")
    return torch.device(name)
