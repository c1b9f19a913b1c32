"""Shared pytest fixtures."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Quiet TensorFlow's C++ logs.


@pytest.fixture(scope="session")
def real_medical_mnist_builder(tmp_path_factory):
    """The real Medical MNIST dataset, prepared once per session.

    Reads images from $MEDJAX_MANUAL_DIR (skips if unset) and writes to
    $MEDJAX_TEST_TFDS_DIR if set (reused across sessions), else a tmp dir.
    """
    manual_dir = os.environ.get("MEDJAX_MANUAL_DIR")
    if not manual_dir:
        pytest.skip("MEDJAX_MANUAL_DIR not set")
    from medjax.datasets import medical_mnist

    tfds_dir = os.environ.get("MEDJAX_TEST_TFDS_DIR") or tmp_path_factory.mktemp("tfds")
    return medical_mnist.prepare("medical_mnist", str(tfds_dir), manual_dir)
