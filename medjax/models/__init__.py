"""Model registry: builds a flax.linen module from `config.model`."""

import functools

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from medjax.models import alexnet
from medjax.models import vgg
from medjax.models.densenet import DenseNet
from medjax.models.efficientnet import EfficientNetLite
from medjax.models.googlenet import GoogLeNet
from medjax.models.lenet import LeNet5
from medjax.models.paper_cnn import PaperCNN
from medjax.models.resnet import BasicBlock, Bottleneck, ResNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _bn_fields(model_config) -> dict:
    return {"bn_momentum": model_config.bn_momentum, "bn_epsilon": model_config.bn_epsilon}


def _paper_cnn(model_config, num_classes, dtype):
    return PaperCNN(
        num_classes=num_classes,
        features=tuple(model_config.features),
        dense_features=model_config.dense_features,
        dropout_rate=model_config.dropout_rate,
        dtype=dtype,
        **_bn_fields(model_config),
    )


def _lenet5(model_config, num_classes, dtype):
    del model_config  # No dropout, batch norm or options.
    return LeNet5(num_classes=num_classes, dtype=dtype)


def _alexnet(convs, model_config, num_classes, dtype):
    return alexnet.AlexNet(
        num_classes=num_classes, convs=convs, dropout_rate=model_config.dropout_rate, dtype=dtype
    )


def _vgg(layout, model_config, num_classes, dtype):
    return vgg.VGG(
        num_classes=num_classes,
        layout=layout,
        dropout_rate=model_config.dropout_rate,
        dtype=dtype,
        **_bn_fields(model_config),
    )


def _googlenet(model_config, num_classes, dtype):
    return GoogLeNet(
        num_classes=num_classes,
        dropout_rate=model_config.dropout_rate,
        dtype=dtype,
        **_bn_fields(model_config),
    )


def _resnet(stage_sizes, block, model_config, num_classes, dtype):
    return ResNet(
        num_classes=num_classes,
        stage_sizes=stage_sizes,
        block=block,
        stem=model_config.stem,
        zero_init_residual=model_config.zero_init_residual,
        dtype=dtype,
        **_bn_fields(model_config),
    )


def _densenet121(model_config, num_classes, dtype):
    return DenseNet(
        num_classes=num_classes,
        dropout_rate=model_config.dropout_rate,
        dtype=dtype,
        **_bn_fields(model_config),
    )


def _efficientnet_lite0(model_config, num_classes, dtype):
    return EfficientNetLite(
        num_classes=num_classes,
        dropout_rate=model_config.dropout_rate,
        dtype=dtype,
        **_bn_fields(model_config),
    )


MODELS = {
    "paper_cnn": _paper_cnn,
    "lenet5": _lenet5,
    "alexnet": functools.partial(_alexnet, alexnet.ALEXNET),
    "zfnet": functools.partial(_alexnet, alexnet.ZFNET),
    "vgg11": functools.partial(_vgg, vgg.VGG11),
    "vgg16": functools.partial(_vgg, vgg.VGG16),
    "googlenet": _googlenet,
    "resnet18": functools.partial(_resnet, (2, 2, 2, 2), BasicBlock),
    "resnet34": functools.partial(_resnet, (3, 4, 6, 3), BasicBlock),
    "resnet50": functools.partial(_resnet, (3, 4, 6, 3), Bottleneck),
    "densenet121": _densenet121,
    "efficientnet_lite0": _efficientnet_lite0,
}


def create_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Returns the module named by `model_config.name`; unknown names and dtypes are errors."""
    if model_config.name not in MODELS:
        raise ValueError(f"Unknown config.model.name={model_config.name!r}; known: {sorted(MODELS)}")
    if model_config.dtype not in _DTYPES:
        raise ValueError(f"Unknown config.model.dtype={model_config.dtype!r}; known: {sorted(_DTYPES)}")
    return MODELS[model_config.name](model_config, num_classes, _DTYPES[model_config.dtype])
