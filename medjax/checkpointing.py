"""Orbax checkpoints of the train state, each saved with a JSON description of how it was made.

Layout: `<workdir>/checkpoints/<step>/{state,metadata}`. The metadata item carries the config, class
names and preprocessing recipe, so an evaluation job needs nothing but the workdir.
"""

from typing import Any

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
    handlers = {"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, metadata: dict) -> None:
    """Saves `state` and `metadata` at `step` (asynchronously; call `manager.wait_until_finished()`).

    The state is stored as plain nested dicts (flax's state-dict form), so its layout does not depend on
    Python classes and any reader can inspect it.
    """
    state_dict = serialization.to_state_dict(state)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict), metadata=ocp.args.JsonSave(metadata)
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
    return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


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
    partial load.
    """
    target = serialization.to_state_dict(abstract_state)
    saved = manager.item_metadata(step).state
    check_structure(saved, target, f"{manager.directory}/{step}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return serialization.from_state_dict(abstract_state, restored.state)


def restore_variables(workdir: str, step: int, abstract_variables: dict) -> dict:
    """Restores only the model variables ({'params', 'batch_stats'}) of the state saved at `step`.

    Works for training checkpoints (whatever their optimizer state) and for converted ones that hold
    only the variables. The saved variables are checked against `abstract_variables` first (any
    difference is an error listing it). Leaves with a `sharding` restore as jax arrays laid out so,
    the others as numpy arrays.
    """
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)
    saved_tree = manager.item_metadata(step).state
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
    return dict(manager.restore(step, args=ocp.args.Composite(state=args)).state)
