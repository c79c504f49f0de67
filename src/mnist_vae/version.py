"""The version of mnist-vae, recorded in the files it writes."""

__version__ = "0.1.0"
