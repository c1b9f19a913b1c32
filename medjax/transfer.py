"""Transfer learning: start training from another checkpoint's weights, then fine-tune.

`config.init_from` names the source: a medjax training workdir (its latest checkpoint, or step
`config.transfer.init_step`) or a directory written by `python -m medjax.convert` (same layout, e.g.
ImageNet weights). Training a new workdir then

* restores every variable of the backbone (params and batch-norm statistics) from the source, after
  checking the source against its own model definition;
* re-initialises the head: the top-level modules whose parameter shapes depend on the number of classes
  (found by building the model for two class counts, so every model declares its head by its shapes);
* adapts the input channels when the source saw another number of them (grayscale <-> RGB):
  `config.transfer.input_adapter='sum'` rewrites the first conv kernel (3 -> 1 channels: summed over
  input channels, which on a gray image equals feeding it as RGB; 1 -> 3: repeated / 3, so a gray RGB image
  gives the source's response), 'repeat' keeps the kernel and converts the images inside the step
  instead (gray -> RGB repeats the channel, RGB -> gray averages them);
* trains with `config.transfer.mode`:
    'full'           every parameter with the configured optimizer;
    'linear_probe'   only the head; the backbone's parameters are frozen;
    'frozen_stages'  the stem and the first `config.transfer.frozen_stages` stages frozen, the rest of the
                     backbone at `backbone_lr_multiplier` x the learning rate, the head at the full rate;
    'per_group_lr'   the backbone at `backbone_lr_multiplier` x the learning rate, the head at the full rate.
  Frozen parameters get zero updates (optax.multi_transform + set_to_zero). Their batch-norm statistics
  still follow the new data (train-mode batch norm and the precise-BN calibration in medjax.train), the
  usual behaviour when fine-tuning on another domain.

The source's pixel normalisation must equal `config.data.mean/std` (checked, unless
`config.transfer.check_preprocessing=False`): e.g. the converted ImageNet EfficientNet-Lite0 expects
(x - 127) / 128, i.e. mean=127/255, std=128/255. Image size: convolutional models with global pooling
accept any size; `config.data.image_size` resizes inside the step (e.g. 28x28 MedMNIST up to 64x64).
Anything that does not match (names, shapes) is an error listing every difference.
"""

import dataclasses
import functools
import json
import re
from typing import Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medjax import checkpointing
from medjax import files
from medjax import models
from medjax import steps

MODES = ("full", "linear_probe", "frozen_stages", "per_group_lr")
INPUT_ADAPTERS = ("sum", "repeat")
# Model fields that change what a model computes without changing any parameter shape.
_MUST_MATCH = ("name", "bn_epsilon", "stem")


def _efficientnet_block_stage(index: int) -> int:
    from medjax.models import efficientnet

    for stage, end in enumerate(np.cumsum([s.repeats for s in efficientnet.LITE0_STAGES])):
        if index < end:
            return stage + 1
    raise ValueError(f"EfficientNet-Lite0 has no block {index}.")


_RESNET_STAGES = ((r"stem$", 0), (r"layer(\d+)_\d+$", int))
_VGG_STAGES = ((r"conv1$", 0), (r"conv(\d+)$", lambda i: int(i) - 1), (r"fc(\d+)$", lambda i: 1000 + int(i)))
# Top-level parameter name -> stage per model: (regex, stage or function of the regex group). Stage 0 is
# the stem; 'frozen_stages=k' freezes stages 0..k. The head is never part of a stage.
STAGES: dict[str, tuple] = {
    "efficientnet_lite0": (
        (r"(conv_stem|bn0)$", 0),
        (r"blocks_(\d+)$", lambda i: _efficientnet_block_stage(int(i))),
        (r"(conv_head|bn1)$", 8),
    ),
    "resnet18": _RESNET_STAGES,
    "resnet34": _RESNET_STAGES,
    "resnet50": _RESNET_STAGES,
    "densenet121": ((r"stem$", 0), (r"(?:denseblock|transition)(\d+)_", int), (r"norm5$", 4)),
    "googlenet": ((r"conv\d$", 0), (r"inception(\d)[a-z]$", lambda i: int(i) - 2)),
    "paper_cnn": ((r"block(\d+)$", int), (r"fc$", 1000)),
    "vgg11": _VGG_STAGES,
    "vgg16": _VGG_STAGES,
    "alexnet": _VGG_STAGES,
    "zfnet": _VGG_STAGES,
    "lenet5": _VGG_STAGES,
}


def stage_of(model_name: str, name: str) -> int:
    """The stage of top-level parameter `name` of model `model_name` (0 = stem)."""
    if model_name not in STAGES:
        raise ValueError(
            f"config.transfer.mode='frozen_stages' needs the stage layout of model {model_name!r}; "
            f"known: {sorted(STAGES)} (medjax.transfer.STAGES)."
        )
    for pattern, stage in STAGES[model_name]:
        match = re.match(pattern, name)
        if match:
            return stage(*match.groups()) if callable(stage) else stage
    raise ValueError(f"Top-level parameter {name!r} of model {model_name!r} matches no stage in STAGES.")


def abstract_variables(model, input_shape) -> dict:
    """{'params', 'batch_stats'} of `model` for [H, W, C] inputs, as ShapeDtypeStructs."""
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1,) + tuple(input_shape), jnp.uint8), train=False)
    )
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@functools.lru_cache(maxsize=32)
def _shapes(model_json: str, num_classes: int, input_shape: tuple) -> dict:
    model = models.create_model(ml_collections.ConfigDict(json.loads(model_json)), num_classes)
    flat = flax.traverse_util.flatten_dict(abstract_variables(model, input_shape), sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _model_json(model_config: ml_collections.ConfigDict) -> str:
    return model_config.to_json(sort_keys=True)


def head_names(model_config: ml_collections.ConfigDict, input_shape) -> tuple[str, ...]:
    """Top-level modules whose parameter shapes depend on the number of classes (the classifier)."""
    input_shape = tuple(int(d) for d in input_shape)
    a = _shapes(_model_json(model_config), 2, input_shape)
    b = _shapes(_model_json(model_config), 3, input_shape)
    names = sorted({path.split("/")[1] for path in a if a[path] != b[path]})
    if not names:
        raise ValueError(f"Model {model_config.name!r} has no parameters that depend on the class count.")
    return tuple(names)


def _channel_dependent(model_config, input_shape, other_channels: int) -> set[str]:
    """Variable paths whose shapes change when the input has `other_channels` channels (the stem)."""
    input_shape = tuple(int(d) for d in input_shape)
    a = _shapes(_model_json(model_config), 2, input_shape)
    b = _shapes(_model_json(model_config), 2, input_shape[:2] + (int(other_channels),))
    return {path for path in a if a[path] != b.get(path)}


# ----------------------------------------------------------------------------------------------------
# The source checkpoint.


@dataclasses.dataclass(frozen=True)
class Source:
    """What a source checkpoint says about itself (from its JSON metadata)."""

    path: str
    step: int
    metadata: dict
    model_config: ml_collections.ConfigDict
    class_names: tuple[str, ...]
    preprocessing: dict
    input_shape: tuple[int, int, int]  # What its model saw, after resizing / channel conversion.


def open_source(path: str, step: int | None = None) -> Source:
    """Reads the metadata of a workdir or converted checkpoint directory (latest step by default)."""
    manager = checkpointing.create_manager(path, read_only=True)
    step = checkpointing.resolve_step(manager, step)
    metadata = checkpointing.restore_metadata(manager, step)
    for key in ("config", "class_names", "preprocessing"):
        if key not in metadata:
            raise ValueError(f"Checkpoint metadata of {manager.directory}/{step} has no {key!r} entry.")
    if "model" not in metadata["config"]:
        raise ValueError(f"Checkpoint metadata of {manager.directory}/{step} has no config.model entry.")
    prep = metadata["preprocessing"]
    input_shape = steps.model_input_shape(
        prep["image_shape"], prep.get("image_size", 0), prep.get("channels", 0)
    )
    return Source(
        path=files.absolute(path),
        step=step,
        metadata=metadata,
        model_config=ml_collections.ConfigDict(metadata["config"]["model"]),
        class_names=tuple(metadata["class_names"]),
        preprocessing=prep,
        input_shape=input_shape,
    )


def load_source(path: str, step: int | None = None):
    """(source, model, variables as numpy) of a checkpoint, checked against its own model definition."""
    source = open_source(path, step)
    model = models.create_model(source.model_config, len(source.class_names))
    variables = checkpointing.restore_variables(
        path, source.step, abstract_variables(model, source.input_shape)
    )
    return source, model, variables


# ----------------------------------------------------------------------------------------------------
# Hooks called by medjax.train.


def _transfer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    transfer = config.get("transfer") or ml_collections.ConfigDict()
    mode = transfer.get("mode", "full")
    if mode not in MODES:
        raise ValueError(f"Unknown config.transfer.mode={mode!r}; known: {MODES}")
    adapter = transfer.get("input_adapter", "sum")
    if adapter not in INPUT_ADAPTERS:
        raise ValueError(f"Unknown config.transfer.input_adapter={adapter!r}; known: {INPUT_ADAPTERS}")
    return transfer


def preprocessing(config: ml_collections.ConfigDict) -> dict:
    """`steps.preprocessing(config.data)`; input_adapter='repeat' sets the channels to the source's."""
    prep = steps.preprocessing(config.data)
    transfer = _transfer_config(config)
    if config.get("init_from") and transfer.get("input_adapter", "sum") == "repeat" and not prep["channels"]:
        prep["channels"] = open_source(config.init_from, transfer.get("init_step")).input_shape[2]
    return prep


def param_labels(config: ml_collections.ConfigDict, input_shape) -> Callable:
    """A function params -> the same tree of labels 'head', 'backbone' or 'frozen' (see the modes)."""
    transfer = _transfer_config(config)
    mode = transfer.get("mode", "full")
    head = head_names(config.model, input_shape)

    def label(name: str) -> str:
        if name in head:
            return "head"
        if mode == "linear_probe":
            return "frozen"
        if mode == "frozen_stages":
            return "frozen" if stage_of(config.model.name, name) <= transfer.frozen_stages else "backbone"
        return "backbone"

    def labels(params):
        return {name: jax.tree_util.tree_map(lambda _: label(name), sub) for name, sub in params.items()}

    return labels


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int, input_shape
) -> optax.GradientTransformation:
    """The configured optimizer, split into head / backbone / frozen groups unless mode is 'full'."""
    transfer = _transfer_config(config)
    if transfer.get("mode", "full") == "full":
        return steps.create_optimizer(config.train, total_steps)
    backbone = config.train.copy_and_resolve_references()
    backbone.learning_rate = config.train.learning_rate * transfer.backbone_lr_multiplier
    return optax.multi_transform(
        {
            "head": steps.create_optimizer(config.train, total_steps),
            "backbone": steps.create_optimizer(backbone, total_steps),
            "frozen": optax.set_to_zero(),
        },
        param_labels(config, input_shape),
    )


def _host(x) -> np.ndarray:
    """A (replicated) array's value on this host."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _adapt_channels(kernel: np.ndarray, channels: int, path: str) -> np.ndarray:
    if kernel.ndim != 4:
        raise ValueError(
            f"Cannot adapt the input channels of {path} with shape {kernel.shape}: not a conv kernel."
        )
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    if kernel.shape[2] == 1:
        return np.repeat(kernel, channels, axis=2) / channels
    raise ValueError(
        f"Cannot adapt {path} from {kernel.shape[2]} to {channels} input channels; only 1 <-> C."
    )


def transfer_variables(
    config: ml_collections.ConfigDict,
    source: Source,
    source_variables: dict,
    target_variables: dict,
    input_shape,
) -> tuple[dict, dict]:
    """Target variables with the backbone taken from the source; returns (variables, summary)."""
    transfer = _transfer_config(config)
    head = head_names(config.model, input_shape)
    source_head = head_names(source.model_config, source.input_shape)
    adapt = set()
    if source.input_shape[2] != input_shape[2]:
        if transfer.get("input_adapter", "sum") != "sum":
            raise ValueError(
                f"The source {source.path} saw {source.input_shape[2]}-channel inputs, this model sees "
                f"{input_shape[2]} (config.data.channels={config.data.get('channels', 0)}); "
                "config.transfer.input_adapter='repeat' needs config.data.channels at 0 or the source's "
                "channels."
            )
        adapt = _channel_dependent(config.model, input_shape, source.input_shape[2])
    source_flat = flax.traverse_util.flatten_dict(source_variables, sep="/")
    target_flat = flax.traverse_util.flatten_dict(target_variables, sep="/")
    merged, problems, adapted, restored = {}, [], [], 0
    for path, leaf in target_flat.items():
        top = path.split("/")[1]
        target_shape = tuple(leaf.shape)
        if top in head:
            merged[path] = leaf
            continue
        if path not in source_flat:
            problems.append(f"missing in source: {path} {target_shape}")
            continue
        value = _host(source_flat[path])
        if path in adapt:
            value = _adapt_channels(value, input_shape[2], path)
            adapted.append(path)
        if value.shape != target_shape:
            problems.append(f"shape mismatch at {path}: source {value.shape} vs target {target_shape}")
            continue
        merged[path] = value.astype(np.dtype(leaf.dtype))
        restored += 1
    for path in sorted(set(source_flat) - set(target_flat)):
        if path.split("/")[1] not in source_head:
            problems.append(f"not in target model: {path} {tuple(np.shape(source_flat[path]))}")
    if problems:
        hint = ""
        if source.input_shape[:2] != tuple(input_shape[:2]):
            hint = (
                f"\nThe source model saw {source.input_shape} inputs and this one {tuple(input_shape)}: a "
                "model whose parameters depend on the image size needs config.data.image_size set to the "
                "source's."
            )
        raise ValueError(
            f"Cannot initialise model {config.model.name!r} from {source.path} (step {source.step}, model "
            f"{source.model_config.name!r}): {len(problems)} problems:\n  " + "\n  ".join(problems) + hint
        )
    summary = {
        "init_from": source.path,
        "step": source.step,
        "restored_leaves": restored,
        "reinitialised_head": list(head),
        "adapted_input_channels": adapted,
    }
    return flax.traverse_util.unflatten_dict(merged, sep="/"), summary


def _check_compatible(config: ml_collections.ConfigDict, source: Source) -> None:
    problems = []
    for key in _MUST_MATCH:
        if (
            key in source.model_config
            and key in config.model
            and source.model_config[key] != config.model[key]
        ):
            problems.append(
                f"config.model.{key}: source {source.model_config[key]!r} vs {config.model[key]!r}"
            )
    transfer = _transfer_config(config)
    if transfer.get("check_preprocessing", True):
        for key in ("mean", "std"):
            saved = source.preprocessing[key]
            if not np.allclose(saved, config.data[key], rtol=0, atol=1e-6):
                problems.append(
                    f"config.data.{key}={config.data[key]!r} but the source was trained with {key}={saved!r} "
                    "(set it, or config.transfer.check_preprocessing=False)"
                )
    if problems:
        raise ValueError(
            f"config.init_from={source.path} does not fit this config:\n  " + "\n  ".join(problems)
        )


def restore_backbone(
    config: ml_collections.ConfigDict, target_variables: dict, input_shape
) -> tuple[dict, dict]:
    """`target_variables` (arrays or ShapeDtypeStructs) with the backbone restored from config.init_from.

    Returns (variables, summary); checks the source against this config and its own model first.
    """
    transfer = _transfer_config(config)
    source = open_source(config.init_from, transfer.get("init_step"))
    _check_compatible(config, source)
    source_model = models.create_model(source.model_config, len(source.class_names))
    source_variables = checkpointing.restore_variables(
        source.path, source.step, abstract_variables(source_model, source.input_shape)
    )
    return transfer_variables(config, source, source_variables, target_variables, input_shape)


def init_from(
    config: ml_collections.ConfigDict,
    state: steps.TrainState,
    tx: optax.GradientTransformation,
    input_shape,
    sharding: jax.sharding.Sharding,
) -> steps.TrainState:
    """`state` with its variables initialised from `config.init_from` (unchanged when that is unset).

    The optimizer state is re-initialised for the new parameters and the step is 0.
    """
    if not config.get("init_from"):
        return state
    target = {"params": state.params, "batch_stats": state.batch_stats}
    variables, summary = restore_backbone(config, target, input_shape)
    logging.info("Transfer: %s", summary)
    # Host values for every leaf, then one jitted placement (the same on every process).
    variables = jax.tree_util.tree_map(_host, variables)
    return jax.jit(
        lambda p, b: steps.TrainState(
            step=jnp.zeros((), jnp.int32), params=p, batch_stats=b, opt_state=tx.init(p)
        ),
        out_shardings=sharding,
    )(variables["params"], variables["batch_stats"])
