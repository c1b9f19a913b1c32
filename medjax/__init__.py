"""medjax: JAX/Flax CNNs for medical image classification."""

__version__ = "0.1.0"
