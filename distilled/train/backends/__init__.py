"""Training backends behind one interface (see :mod:`distilled.train.backends.base`).

``get_backend("torch")`` or ``get_backend("mindspore")`` returns a fresh backend; the framework is
imported only then, so importing this package stays cheap. Plug in a new backend by adding a
factory to ``BACKENDS`` (or calling :func:`register_backend`).
"""

from __future__ import annotations

from typing import Any, Callable

from distilled.train.backends.base import (Backend, ForwardResult, PackedBatch, StepResult, TrainSettings,
                                     packed_batch)


def _torch(**kw: Any) -> Backend:
    from distilled.train.backends.torch_backend import TorchBackend

    return TorchBackend(**kw)


def _mindspore(**kw: Any) -> Backend:
    from distilled.train.backends.mindspore_backend import MindSporeBackend

    return MindSporeBackend(**kw)


BACKENDS: dict[str, Callable[..., Backend]] = {"torch": _torch, "mindspore": _mindspore}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Make ``factory(**kw) -> Backend`` available as ``get_backend(name)``."""
    BACKENDS[name] = factory


def get_backend(name: str, **kw: Any) -> Backend:
    """A new backend by name; ``kw`` goes to its constructor (e.g. ``device="cuda"``)."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}") from None
    return factory(**kw)


__all__ = ["Backend", "ForwardResult", "PackedBatch", "StepResult", "TrainSettings", "packed_batch",
           "get_backend", "register_backend", "BACKENDS"]
