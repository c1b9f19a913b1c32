"""The jitted data-parallel train step learns, and gives the same result on 1, 4 and 8 devices."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import step_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_lowers_the_loss():
    losses, state = step_runner.run(num_steps=30)
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0], losses


def _run_on_devices(directory, count, num_steps=3):
    out = directory / f"{count}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "step_runner.py"), str(out), str(num_steps)],
        check=True,
        env=env | {"PYTHONPATH": REPO},
        cwd=REPO,
    )
    return dict(np.load(out))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _run_on_devices(tmp_path_factory.mktemp("one_device"), 1)


@pytest.mark.parametrize("count", [4, 8])
def test_one_and_several_devices_agree(one_device, tmp_path, count):
    one = dict(one_device)
    several = _run_on_devices(tmp_path, count)
    assert int(one.pop("devices")) == 1 and int(several.pop("devices")) == count
    assert one.keys() == several.keys()
    for key in one:
        np.testing.assert_allclose(one[key], several[key], rtol=2e-4, atol=2e-5, err_msg=key)
