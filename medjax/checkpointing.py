"""Orbax checkpoints of the train state, each saved with a JSON description of how it was made.

Layout: `<workdir>/checkpoints/<step>/{state,metadata,checksums}`. The metadata item carries the config,
class names and preprocessing recipe, so an evaluation job needs nothing but the workdir. The checksums
item holds a CRC-32 of every saved array, checked on restore: orbax checks neither the bytes of the
arrays nor (before reading) that their files are whole, so a damaged checkpoint would otherwise restore
as wrong numbers. A checkpoint that fails to read or to match its checksums raises BadCheckpointError
(one line naming it); training moves such checkpoints aside to `<workdir>/bad_checkpoints/` and resumes
from the newest good one.
"""

import zlib
from typing import Any

from absl import logging

from etils import epath
from flax import serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax import files


def checkpoint_dir(workdir: str) -> str:
    return str(epath.Path(files.absolute(workdir)) / "checkpoints")


def create_manager(
    workdir: str, *, max_to_keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager for `<workdir>/checkpoints` with a `state` (pytree) and a `metadata` (JSON) item."""
    directory = checkpoint_dir(workdir)
    if read_only and not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"No checkpoints directory at {directory}")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


CHECKSUMS = "checksums"


class BadCheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its checksums."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"Bad checkpoint {where}: {reason}")
        self.where = where


def _one_line(error: Exception) -> str:
    """An exception as one short line (TensorStore's errors carry multi-kilobyte specs)."""
    text = str(error).strip().splitlines()
    text = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _host_value(leaf) -> np.ndarray | None:
    """The full value of `leaf` on this host, or None for an array sharded over other hosts."""
    if isinstance(leaf, jax.Array):
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        if not leaf.is_fully_addressable:
            return None
    return np.asarray(leaf)


def checksums(tree: Any) -> dict[str, str]:
    """'crc32:<hex>' of each array's bytes (C order), by its key path in `tree`."""
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = _host_value(leaf)
        if value is not None:
            data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            found[jax.tree_util.keystr(path)] = f"crc32:{zlib.crc32(data):08x}"
    return found


def verify(tree: Any, expected: dict[str, str] | None, where: str) -> None:
    """Raises BadCheckpointError if an array of `tree` differs from the checksum saved for it."""
    if expected is None:
        logging.warning("Checkpoint %s has no checksums (saved by an older medjax); not verified.", where)
        return
    actual = checksums(tree)
    bad = sorted(key for key, value in actual.items() if key in expected and expected[key] != value)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise BadCheckpointError(where, f"checksum mismatch in {', '.join(bad[:3])}{more}")


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return str(epath.Path(manager.directory) / str(step))


def _saved_checksums(manager: ocp.CheckpointManager, step: int) -> dict | None:
    if not (epath.Path(step_path(manager, step)) / CHECKSUMS).exists():
        return None
    try:
        return manager.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))[
            CHECKSUMS
        ]
    except Exception as e:  # Orbax and TensorStore raise many types on damaged files.
        raise BadCheckpointError(step_path(manager, step), _one_line(e)) from e


def save(manager: ocp.CheckpointManager, step: int, state: Any, metadata: dict) -> None:
    """Saves `state` and `metadata` at `step` (asynchronously; call `manager.wait_until_finished()`).

    The state is stored as plain nested dicts (flax's state-dict form), so its layout does not depend on
    Python classes and any reader can inspect it.
    """
    state_dict = serialization.to_state_dict(state)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict),
            metadata=ocp.args.JsonSave(metadata),
            **{CHECKSUMS: ocp.args.JsonSave(checksums(state_dict))},
        ),
    )


def resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    """`step` if it was saved, else the latest step when `step` is None; clear errors otherwise."""
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint found in {manager.directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise ValueError(
            f"No checkpoint for step {step} in {manager.directory}; saved steps: {sorted(steps)}"
        )
    return step


def restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
    except Exception as e:  # Orbax and TensorStore raise many types on damaged files.
        raise BadCheckpointError(step_path(manager, step), _one_line(e)) from e


def _describe(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in leaves
    }


def check_structure(saved: Any, target: Any, where: str) -> None:
    """Raises ValueError listing every leaf that is missing, unexpected or of another shape/dtype."""
    saved_leaves, target_leaves = _describe(saved), _describe(target)
    problems = []
    for key in sorted(set(target_leaves) - set(saved_leaves)):
        problems.append(f"missing in checkpoint: {key} {target_leaves[key]}")
    for key in sorted(set(saved_leaves) - set(target_leaves)):
        problems.append(f"not in model: {key} {saved_leaves[key]}")
    for key in sorted(set(saved_leaves) & set(target_leaves)):
        if saved_leaves[key] != target_leaves[key]:
            problems.append(
                f"mismatch at {key}: checkpoint {saved_leaves[key]} vs model {target_leaves[key]}"
            )
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ValueError(
            f"Checkpoint {where} does not match the model ({len(problems)} problems):\n  {shown}{more}"
        )


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` into the structure, shapes, dtypes and shardings of `abstract_state`.

    The saved tree is checked against the target first, so a different model is an error, never a
    partial load. Then every array is checked against its checksum (BadCheckpointError if it differs or
    cannot be read).
    """
    where = step_path(manager, step)
    target = serialization.to_state_dict(abstract_state)
    try:
        saved = manager.item_metadata(step).state
    except Exception as e:  # Orbax and TensorStore raise many types on damaged files.
        raise BadCheckpointError(where, _one_line(e)) from e
    if saved is None:
        raise BadCheckpointError(where, "no state item")
    check_structure(saved, target, where)
    expected = _saved_checksums(manager, step)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # Orbax and TensorStore raise many types on damaged files.
        raise BadCheckpointError(where, _one_line(e)) from e
    verify(restored.state, expected, where)
    return serialization.from_state_dict(abstract_state, restored.state)


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a bad checkpoint out of the manager's view, to `<workdir>/bad_checkpoints/<step>[-<n>]`
    (deleted where the file system cannot rename folders); returns where it went. Call on every process."""
    source = epath.Path(step_path(manager, step))
    parent = epath.Path(manager.directory).parent / "bad_checkpoints"
    target = parent / str(step)
    n = 0
    while target.exists():
        n += 1
        target = parent / f"{step}-{n}"
    if jax.process_index() == 0:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        except Exception as e:  # Object stores cannot rename folders.
            logging.warning("Cannot move %s aside (%s); deleting it.", source, _one_line(e))
            source.rmtree(missing_ok=True)
            target = "deleted"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"medjax: checkpoint {step} set aside")
    manager.reload()
    return str(target)


def restore_newest_good(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores and matches its checksums, newer bad ones
    being logged and set aside (so max_to_keep never counts them); (None, abstract_state) if there are
    no checkpoints. Raises BadCheckpointError if every checkpoint is bad."""
    bad = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, restore_state(manager, step, abstract_state)
        except BadCheckpointError as e:
            moved = set_aside(manager, step)
            logging.error("%s; moved to %s.", e, moved)
            bad.append(f"{e} (moved to {moved})")
    if bad:
        raise BadCheckpointError(
            manager.directory, f"no good checkpoint left: {'; '.join(bad)}. Rerun to start from scratch."
        )
    return None, abstract_state


def restore_variables(workdir: str, step: int, abstract_variables: dict) -> dict:
    """Restores only the model variables ({'params', 'batch_stats'}) of the state saved at `step`.

    Works for training checkpoints (whatever their optimizer state) and for converted ones that hold
    only the variables. The saved variables are checked against `abstract_variables` first (any
    difference is an error listing it). Leaves with a `sharding` restore as jax arrays laid out so,
    the others as numpy arrays.
    """
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)
    where = step_path(manager, step)
    try:
        saved_tree = manager.item_metadata(step).state
    except Exception as e:  # Orbax and TensorStore raise many types on damaged files.
        raise BadCheckpointError(where, _one_line(e)) from e
    if saved_tree is None:
        raise BadCheckpointError(where, "no state item")
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    saved = {name: saved_tree[name] for name in abstract_variables if name in saved_tree}
    check_structure(saved, abstract_variables, f"{manager.directory}/{step}")

    def restore_args(leaf):
        if getattr(leaf, "sharding", None) is not None:
            return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

    args = ocp.args.PyTreeRestore(
        item=abstract_variables,
        restore_args=jax.tree_util.tree_map(restore_args, abstract_variables),
        partial_restore=True,
    )
    expected = _saved_checksums(manager, step)
    try:
        restored = dict(manager.restore(step, args=ocp.args.Composite(state=args)).state)
    except Exception as e:  # Orbax and TensorStore raise many types on damaged files.
        raise BadCheckpointError(where, _one_line(e)) from e
    verify(restored, expected, where)
    return restored
