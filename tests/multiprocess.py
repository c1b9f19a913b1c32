"""For tests that start local CPU processes forming one JAX job (jax.distributed, coordinator on
127.0.0.1): starting them, and reading the checkpoints they save."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prefix of a driver script run as `python -c DRIVER PROCESS_ID PORT ARGS...`: it joins the job as process
# PROCESS_ID of `num_processes`, with one CPU device each and gloo collectives across processes.
PREAMBLE = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{{sys.argv[2]}}", num_processes={num_processes}, process_id=int(sys.argv[1])
)
from absl import logging
logging.set_verbosity(logging.INFO)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(driver: str, args, num_processes: int = 2, **popen_kwargs) -> list[subprocess.Popen]:
    """Starts `num_processes` CPU processes running PREAMBLE + `driver` with command-line arguments
    PROCESS_ID PORT *args; stderr is piped unless `popen_kwargs` says otherwise."""
    port = free_port()
    code = PREAMBLE.format(num_processes=num_processes) + driver
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), str(port), *map(str, args)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
            text=True,
            **popen_kwargs,
        )
        for i in range(num_processes)
    ]


def numpy_state(workdir: str, step: int) -> dict:
    """The state saved in `workdir` at `step` as numpy arrays, whichever processes and devices saved it."""
    directory = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory).item_metadata.tree
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
