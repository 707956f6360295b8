"""Run a MindFormers data YAML's handlers offline and save the result (MindFormers' own command line).

    python toolkit/data_preprocess/huggingface/datasets_preprocess.py \\
        --config configs/data_process_handling.yaml --save_path ./data/openr1_handled [--register_path DIR]

Same arguments as MindFormers' script of the same path. Differences, and why:

* This project's handlers (``OpenR1Math220kDataHandler``, ``CoTJsonlDataHandler``,
  ``BFDPackingHandler``, ...) are registered on ``mindformers.dataset.handler`` first: MindFormers'
  ``HFDataLoader`` finds a ``type:`` only there, so the docs' recipe needs a wrapper.
* The result is written atomically (temp directory, then rename): MindFormers appends a
  ``save_to_disk`` step that leaves a half-written dataset under the final name if killed.
  A ``save_to_disk`` entry in the YAML is therefore ignored (with a note).
* ``SAVE_PATH/report.json`` records rows, skips by reason (format handlers) and packing stats.
* A ``PackingHandler`` entry gets a warning: ``process_legacy_args`` drops its ``pad_token`` and pads
  with 0; use ``BFDPackingHandler``.

The loading and handler chain itself is MindFormers' code: ``process_legacy_args``,
``HFDataLoader._build_config``, ``load_dataset`` and ``process_dataset``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]
if str(_REPO) not in sys.path:  # run as a script from a checkout: make `handlers`/`distilled` importable
    sys.path.insert(0, str(_REPO))


def prepare_args(argv: list[str] | None = None) -> argparse.Namespace:
    """MindFormers' command line: ``--config``, ``--save_path``, ``--register_path``."""
    parser = argparse.ArgumentParser(description="Run a MindFormers data YAML's handlers and save the dataset.")
    parser.add_argument("--config", type=str, required=True,
                        help="YAML with train_dataset.data_loader (CommonDataLoader / HFDataLoader settings)")
    parser.add_argument("--save_path", default="./packed_data", type=str,
                        help="directory to save the processed dataset (datasets.load_from_disk format)")
    parser.add_argument("--register_path", type=str, default=None,
                        help="folder added to sys.path for your own handler modules (relative paths are "
                             "taken from the project root, as in MindFormers)")
    args = parser.parse_args(argv)
    if args.register_path is not None:
        if not os.path.isabs(args.register_path):
            args.register_path = str(_REPO / args.register_path)
        os.environ["REGISTER_PATH"] = args.register_path
        if args.register_path not in sys.path:
            sys.path.append(args.register_path)
    return args


def _plain(obj):
    """MindFormerConfig (dict subclass with attribute access) -> plain dicts/lists."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class _Recorder:
    """Collect the handler instances MindFormers creates, for report.json (it keeps none)."""

    def __init__(self) -> None:
        self.instances: list = []

    def __enter__(self):
        import handlers

        self._orig = {}
        for cls in handlers.HANDLERS:
            orig = cls.__call__
            self._orig[cls] = cls.__dict__.get("__call__")  # None: inherited

            def wrapped(inst, dataset, _orig=orig):
                self.instances.append(inst)
                return _orig(inst, dataset)

            cls.__call__ = wrapped
        return self

    def __exit__(self, *exc) -> None:
        for cls, own in self._orig.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own


def run(config_path: str, save_path: str) -> dict:
    """Load the YAML's dataset, run its handlers with MindFormers' loader code, save atomically.

    Returns the report dict (also written to ``save_path/report.json``).
    """
    import handlers
    from distilled.io_utils import atomic_dir, write_json

    handlers.register_with_mindformers()
    from mindformers.core.context.build_context import MFContextOperator
    from mindformers.dataset.dataloader.hf_dataloader import HFDataLoader, process_legacy_args
    from mindformers.tools import MindFormerConfig

    t0 = time.perf_counter()
    config = MindFormerConfig(config_path)
    MFContextOperator(config)
    try:
        loader = _plain(config.train_dataset.data_loader)
    except (AttributeError, KeyError):
        raise SystemExit(f"{config_path}: no train_dataset.data_loader section") from None
    chain = loader.get("handler") or []
    if isinstance(chain, dict):
        chain = [chain]
    kept = []
    for h in chain:
        t = h.get("type") if isinstance(h, dict) else None
        if t == "save_to_disk":
            print(f"note: {config_path}: ignoring the YAML's save_to_disk step; saving atomically to {save_path}",
                  file=sys.stderr)
            continue
        if t == "PackingHandler":
            print(f"warning: {config_path}: MindFormers' PackingHandler pads with 0 whatever pad_token says "
                  "(process_legacy_args drops it) and fills ~83% of each row; use BFDPackingHandler "
                  "(pad_token: 151643)", file=sys.stderr)
        kept.append(h)
    loader["handler"] = kept
    kwargs = process_legacy_args(**loader)
    mf_config = HFDataLoader._build_config(**kwargs)
    dataset = HFDataLoader.load_dataset(mf_config)
    rows_loaded = len(dataset) if hasattr(dataset, "__len__") else None
    with _Recorder() as rec:
        if mf_config.process is not None:
            dataset, mf_config = HFDataLoader.process_dataset(mf_config, dataset)
    report = {"config": str(config_path), "rows_loaded": rows_loaded, "rows_out": len(dataset),
              "columns": list(dataset.column_names), "handlers": []}
    for inst in rec.instances:
        entry = {"type": type(inst).__name__}
        if hasattr(inst, "skips"):
            entry.update(rows_in=inst.rows_in, skips=inst.skips.to_dict())
        stats = getattr(inst, "stats", None)
        if stats is not None:
            entry["packing"] = stats.to_dict()
        report["handlers"].append(entry)
    with atomic_dir(save_path) as tmp:
        dataset.save_to_disk(str(tmp))
        report["elapsed_s"] = round(time.perf_counter() - t0, 3)
        write_json(Path(tmp) / "report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns an exit code."""
    args = prepare_args(argv)
    report = run(args.config, args.save_path)
    skips = sum(h.get("skips", {}).get("total", 0) for h in report["handlers"])
    print(f"saved {report['rows_out']} rows ({', '.join(report['columns'])}) from {report['rows_loaded']} "
          f"loaded to {args.save_path} in {report['elapsed_s']:.1f}s; {skips} rows skipped "
          f"(see {args.save_path}/report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
