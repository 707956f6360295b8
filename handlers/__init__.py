"""MindFormers 1.9 data handlers of this project, usable by ``type:`` name in MindFormers YAMLs.

MindFormers' ``HFDataLoader`` finds a handler only as an attribute of
``mindformers.dataset.handler``, so :func:`register_with_mindformers` puts every
handler there. The project's entry points (``toolkit/.../datasets_preprocess.py``,
``run_mindformer.py``) call it before building the data loader. Importing this package imports
MindFormers.
"""

from __future__ import annotations

from handlers.bfd_packing import BFDPackingHandler
from handlers.cot_jsonl import CoTJsonlDataHandler, MessagesDataHandler
from handlers.extra_formats import MagpieDataHandler, StratosDataHandler
from handlers.formats_base import FormatDataHandler
from handlers.openr1 import OpenR1Math220kDataHandler

HANDLERS = (OpenR1Math220kDataHandler, CoTJsonlDataHandler, MessagesDataHandler, StratosDataHandler,
            MagpieDataHandler, BFDPackingHandler)

__all__ = [c.__name__ for c in HANDLERS] + ["FormatDataHandler", "register_with_mindformers", "HANDLERS"]


def register_with_mindformers() -> None:
    """Set every handler as an attribute of ``mindformers.dataset.handler``. Idempotent."""
    import mindformers.dataset.handler as mf_handler

    for cls in HANDLERS:
        setattr(mf_handler, cls.__name__, cls)
