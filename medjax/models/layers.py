"""Shared layers for every model. Convolution and pooling go through here so that a backend-specific
implementation (e.g. a faster CPU path) can be chosen in one place; parameter names and shapes are
exactly those of flax.linen.Conv, so checkpoints move freely between backends."""

import flax.linen as nn
import jax.numpy as jnp

Conv = nn.Conv


def max_pool(x: jnp.ndarray, window, strides=None, padding="VALID") -> jnp.ndarray:
    return nn.max_pool(x, window, strides=strides, padding=padding)


def avg_pool(x: jnp.ndarray, window, strides=None, padding="VALID") -> jnp.ndarray:
    return nn.avg_pool(x, window, strides=strides, padding=padding)
