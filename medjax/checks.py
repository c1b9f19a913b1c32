"""Checks of a training config's values, run before any data is read or any step is compiled.

A nonsensical value (a negative epoch count, a learning rate of zero or NaN, a batch of zero images)
otherwise fails late with an unrelated error, or worse, trains on and saves meaningless checkpoints.
"""

import math
import numbers

import ml_collections


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# field -> (kind, test, what the value must be); fields a config does not have are skipped.
_RULES = {
    "seed": ("int", lambda v: v >= 0, ">= 0"),
    "data.num_train_examples": ("int", lambda v: v == -1 or v > 0, "-1 (all) or > 0"),
    "data.mean": ("float", lambda v: True, "finite"),
    "data.std": ("float", lambda v: v > 0, "> 0"),
    "data.image_size": ("int", lambda v: v >= 0, ">= 0"),
    "data.channels": ("int", lambda v: v >= 0, ">= 0"),
    "augment.rotation_degrees": ("float", lambda v: v >= 0, ">= 0"),
    "augment.translate_fraction": ("float", lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment.brightness": ("float", lambda v: v >= 0, ">= 0"),
    "augment.contrast": ("float", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "model.dropout_rate": ("float", lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.bn_momentum": ("float", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "model.bn_epsilon": ("float", lambda v: v > 0, "> 0"),
    "train.batch_size": ("int", lambda v: v > 0, "> 0"),
    "train.num_epochs": ("float", lambda v: v > 0, "> 0"),
    "train.learning_rate": ("float", lambda v: v > 0, "> 0"),
    "train.weight_decay": ("float", lambda v: v >= 0, ">= 0"),
    "train.momentum": ("float", lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.warmup_steps": ("int", lambda v: v >= 0, ">= 0"),
    "train.label_smoothing": ("float", lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.log_every_steps": ("int", lambda v: v > 0, "> 0"),
    "train.eval_every_steps": ("int", lambda v: v >= 0, ">= 0 (0: once an epoch)"),
    "train.checkpoint_every_steps": ("int", lambda v: v > 0, "> 0"),
    "train.bn_calibration_batches": ("int", lambda v: v >= 0, ">= 0"),
    "train.max_checkpoints_to_keep": ("int?", lambda v: v >= 1, ">= 1 or None (keep all)"),
    "train.stop_at_eval_accuracy": ("float?", lambda v: 0 <= v <= 1, "in [0, 1] or None"),
    "eval.batch_size": ("int", lambda v: v > 0, "> 0"),
    "transfer.frozen_stages": ("int", lambda v: v >= 0, ">= 0"),
    "transfer.backbone_lr_multiplier": ("float", lambda v: v >= 0, ">= 0"),
}


def _lookup(config: ml_collections.ConfigDict, field: str):
    """(found, value) of a dotted field."""
    node = config
    for part in field.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """One line per config value that cannot make sense, naming the field, its value and the rule."""
    found = []
    for field, (kind, test, rule) in _RULES.items():
        present, value = _lookup(config, field)
        if not present or (value is None and kind.endswith("?")):
            continue
        if kind.startswith("int"):
            ok = _number(value) and float(value).is_integer() and test(value)
        else:
            ok = _number(value) and math.isfinite(value) and test(value)
        if not ok:
            found.append(
                f"config.{field}={value!r} must be {'an integer ' if kind.startswith('int') else ''}{rule}"
            )
    present, scale = _lookup(config, "augment.scale_range")
    if present and not (
        isinstance(scale, (tuple, list))
        and len(scale) == 2
        and all(_number(s) and math.isfinite(s) for s in scale)
        and 0 < scale[0] <= scale[1]
    ):
        found.append(f"config.augment.scale_range={scale!r} must be (low, high) with 0 < low <= high")
    return found


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError listing every field of `config` whose value cannot make sense."""
    found = problems(config)
    if found:
        raise ValueError("Invalid config: " + "; ".join(found) + ".")
