"""mnist-vae: a variational auto-encoder for MNIST and Fashion-MNIST on PyTorch."""

__version__ = "0.1.0"
