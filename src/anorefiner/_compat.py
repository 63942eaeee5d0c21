"""Import-time compatibility for the pinned torch/torchvision pair.

The registry's ``torchvision==0.28.0`` wheel is a CUDA build. On a CPU build of ``torch==2.13.0``
its compiled operators cannot load, and ``import torchvision`` (hence ``import timm`` and
``import open_clip``) fails with ``operator torchvision::nms does not exist``. Nothing in this
project uses torchvision's compiled ops; only its Python parts (transforms, model definitions).
Declaring the two operator schemas that torchvision's Python code looks up at import time lets the
import succeed. Users with a matching CUDA torch never reach the fallback.
"""

from __future__ import annotations

import sys

_DONE = False


def import_torchvision():
    """Import and return :mod:`torchvision`, applying the CPU-torch shim once if needed."""
    global _DONE
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _DONE:
            raise
    import torch

    # Drop the half-initialised modules left by the failed import, then declare the schemas.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the fragment alive for the process lifetime; dropping it unregisters the schemas.
    sys.modules[__name__].__dict__["_TORCHVISION_LIB"] = lib
    _DONE = True
    import torchvision

    return torchvision


def import_open_clip():
    """Import and return :mod:`open_clip` after :func:`import_torchvision`."""
    import_torchvision()
    import open_clip

    return open_clip


def import_timm():
    """Import and return :mod:`timm` after :func:`import_torchvision`."""
    import_torchvision()
    import timm

    return timm
