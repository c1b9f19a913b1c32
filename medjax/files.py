"""Paths that may be local or on a remote filesystem (gs://...), as on TPU VMs."""

import json
import os

from etils import epath


def absolute(path: str) -> str:
    """Absolute form of a local path; URLs such as gs://bucket/dir are returned unchanged."""
    return path if "://" in path else os.path.abspath(path)


def write_json(path: str, payload: dict) -> None:
    target = epath.Path(absolute(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2))
