"""Our own small shims for running official code unchanged on a CPU machine (never copies of official files).

Each shim is applied in the official-side subprocess only, and only where the real thing is missing:

* :func:`torchvision_compat`: the project's import fix for a CPU torch with the CUDA torchvision wheel
  (:mod:`anorefiner._compat`), so the official ``import torchvision`` works;
* :func:`stub_missing`: empty modules for optional imports the official files import at top level but the
  inference path never calls (plotting, tensorboard, OpenCV in visualisation helpers); any use raises;
* :func:`pkg_resources_packaging`: ``from pkg_resources import packaging`` (setuptools >= 81 dropped
  ``pkg_resources``) served by the ``packaging`` distribution it re-exported;
* :func:`cuda_to_cpu`: hard-coded ``tensor.to('cuda')`` / ``.cuda()`` lines (e.g. APRIL-GAN's unused attention sum
  in ``open_clip/transformer.py`` VisionTransformer.forward, Bayes-PFL's ``is_cuda``) stay on the CPU when no GPU
  is present.
"""

from __future__ import annotations

import importlib
import sys
import types

APPLIED: list[str] = []


def torchvision_compat() -> None:
    try:
        from anorefiner._compat import import_torchvision
    except ImportError:  # another environment (e.g. anomalib's): its own torchvision must import
        import torchvision  # noqa: F401
        return
    import_torchvision()


class _Unavailable(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*args, **kwargs):
            raise RuntimeError(f"parity shim: {self.__name__}.{attr} is not installed here and must not be "
                               "needed by the inference path")
        return missing


def stub_missing(*names: str) -> None:
    """Register an empty module for each ``name`` that cannot be imported (parents included)."""
    for name in names:
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub in sys.modules and i < len(parts):
                continue
            mod = _Unavailable(sub)
            sys.modules[sub] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
        APPLIED.append(f"stub {name}")


def pkg_resources_packaging() -> None:
    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        pass
    import packaging.version

    mod = types.ModuleType("pkg_resources")
    mod.packaging = packaging
    sys.modules["pkg_resources"] = mod
    APPLIED.append("pkg_resources.packaging -> packaging")


def cuda_to_cpu() -> None:
    """Without CUDA, ``Tensor.to('cuda')`` / ``Tensor.to(torch.device('cuda'))`` / ``Tensor.cuda()`` return the
    tensor on the CPU."""
    import torch

    if torch.cuda.is_available():
        return
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and (args[0] == "cuda" or (isinstance(args[0], torch.device) and args[0].type == "cuda")):
            args = ("cpu",) + args[1:]
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    APPLIED.append("Tensor.to('cuda') / .cuda() -> cpu")
