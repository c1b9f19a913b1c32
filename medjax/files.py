"""Paths that may be local or on a remote filesystem (gs://...), as on TPU VMs."""

import json
import os

from etils import epath


def absolute(path: str) -> str:
    """Absolute form of a local path; URLs such as gs://bucket/dir are returned unchanged."""
    return path if "://" in path else os.path.abspath(path)


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` to `path` whole or not at all: a reader (the checkpoint watcher, an evaluation
    job) never sees a half-written file."""
    target = epath.Path(absolute(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f"{target.name}.partial"
    partial.write_text(json.dumps(payload, indent=2))
    partial.replace(target)
