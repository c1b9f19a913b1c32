"""Stopping a run cleanly on SIGTERM (how TPU VMs and schedulers preempt) or SIGINT (Ctrl-C).

The training loop asks `Stopper.reached(step)` after every step. Once a signal has arrived it answers True
at one step, the same on every process: the loop then checks the state, saves a checkpoint at that step,
waits until it is committed and raises `Preempted`, which exits the process with status
EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL: "try again later"). Rerunning the same command resumes
from that checkpoint and ends bit-identical to a run that was never stopped.

One process: Python signal handlers set a flag. Several processes (jax.distributed): JAX's preemption
service catches SIGTERM on any process and picks the sync step that all processes reach
(multihost_utils.reached_preemption_sync_point); SIGINT is turned into a SIGTERM to the same process so
it takes the same path. A second SIGINT interrupts at once (KeyboardInterrupt).
"""

import contextlib
import os
import signal
import threading

from absl import logging
import jax

EXIT_PREEMPTED = 75


class Preempted(SystemExit):
    """The run stopped on a signal after saving a checkpoint at `step`; exits with EXIT_PREEMPTED."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.signal_name = signal_name

    def __str__(self):
        return f"Preempted by {self.signal_name} at step {self.step} (exit status {EXIT_PREEMPTED})."


class Stopper:
    """Records SIGTERM/SIGINT and tells the training loop at which step to stop."""

    def __init__(self, multiprocess: bool):
        self.multiprocess = multiprocess
        self.signal_name = None

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is None:
            logging.warning("Received %s: stopping after this step with a checkpoint.", name)
            self.signal_name = name
            if signum == signal.SIGINT:
                # A second Ctrl-C interrupts at once.
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.multiprocess:
                os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption service.

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (the same answer on every process)."""
        if self.multiprocess:
            from jax.experimental import multihost_utils

            try:
                stop = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # The preemption service is disabled.
                return False
            if stop and self.signal_name is None:
                self.signal_name = "SIGTERM"
            return stop
        return self.signal_name is not None

    def stop(self, manager, step: int) -> None:
        """Waits for the checkpoint saved at `step` to be committed, logs it and raises Preempted."""
        manager.wait_until_finished()
        logging.warning(
            "%s: checkpoint for step %d committed in %s; exiting with status %d. Rerun the same command "
            "to resume.",
            self.signal_name,
            step,
            manager.directory,
            EXIT_PREEMPTED,
        )
        raise Preempted(step, self.signal_name)


@contextlib.contextmanager
def handler():
    """Installs the SIGTERM/SIGINT handling for the block and yields its Stopper; restores the previous
    handlers after."""
    multiprocess = jax.process_count() > 1
    stopper = Stopper(multiprocess)
    if threading.current_thread() is not threading.main_thread():
        logging.info("Not on the main thread: SIGTERM/SIGINT keep their handlers.")
        yield stopper
        return
    # With several processes, SIGTERM stays with JAX's preemption service.
    signums = [signal.SIGINT] if multiprocess else [signal.SIGINT, signal.SIGTERM]
    previous = {signum: signal.signal(signum, stopper._on_signal) for signum in signums}
    try:
        yield stopper
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
