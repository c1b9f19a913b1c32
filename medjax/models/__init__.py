"""Model registry: builds a flax.linen module from `config.model`."""

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from medjax.models.paper_cnn import PaperCNN

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _paper_cnn(model_config, num_classes, dtype):
    return PaperCNN(
        num_classes=num_classes,
        features=tuple(model_config.features),
        dense_features=model_config.dense_features,
        dropout_rate=model_config.dropout_rate,
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        dtype=dtype,
    )


MODELS = {"paper_cnn": _paper_cnn}


def create_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Returns the module named by `model_config.name`; unknown names and dtypes are errors."""
    if model_config.name not in MODELS:
        raise ValueError(f"Unknown config.model.name={model_config.name!r}; known: {sorted(MODELS)}")
    if model_config.dtype not in _DTYPES:
        raise ValueError(f"Unknown config.model.dtype={model_config.dtype!r}; known: {sorted(_DTYPES)}")
    return MODELS[model_config.name](model_config, num_classes, _DTYPES[model_config.dtype])
