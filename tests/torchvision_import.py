"""Imports torchvision for the reference tests, or skips the calling test module saying why."""

import pytest


def import_torchvision():
    """torchvision, importable next to a CPU-only torch.

    torchvision's PyPI wheels are built against CUDA torch: with a CPU torch their C++ ops do not load,
    and `import torchvision` fails registering a fake kernel for `torchvision::nms` ("operator
    torchvision::nms does not exist"). The models need no C++ op, so the two ops the import looks up are
    declared (schemas only) when torch does not know them yet.
    """
    torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[convert]')")
    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARIES.append(library)  # The definitions live as long as the Library object.
    return pytest.importorskip("torchvision", reason="torchvision not installed (pip install '.[convert]')")


_LIBRARIES = []
