"""Train one chest X-ray classifier; one code path for CPU/gloo, GPU/NCCL and DeepSpeed.

    accelerate launch [--config_file launch/configs/X.yaml] cxr/train.py --config cxr/configs/Y.yaml key=value ...
    torchrun --nproc_per_node N -m cxr.train --config ... key=value ...
    python -m cxr.train --config ... key=value ...

The run directory (``checkpoint.run_dir``; layout in docs/run-dir.md) gets the resolved
config, ``metrics.csv`` (one row per epoch), ``checkpoints/{last,best}``, the best epoch's
``val_predictions.parquet``, ``train.log``, ``throughput.csv`` and ``status.json``. With ``checkpoint.resume=auto``
(default) the same command continues from ``last``, exactly: same weights, same data order,
same RNG streams as an uninterrupted run.

Exit status (every rank; launchers read RUN/status.json because torchrun/accelerate turn
any non-zero worker status into 1):
  0   finished (all epochs, max_steps, early stopping, or nothing left to do)
  2   bad config or input (one-line error, no traceback; --debug shows it)
  75  stopped by SIGUSR1 or SIGTERM after saving ``last`` — requeue me (EX_TEMPFAIL)
  other: a crash; a dead peer makes the others fail within train.collective_timeout_s
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`accelerate launch cxr/train.py`): import the package, not cxr/*
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
from collections.abc import Callable, Sequence

from cxr.config import Config, config_yaml, describe_config, load_config
from cxr.data import build_loader
from cxr.runs.run_log import EXIT_REQUEUE  # noqa: F401 (read by launchers and tests)
from cxr.training.trainer import Trainer
from cxrbase.errors import cli_entry


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config keys (section.key=default):\n" + describe_config(),
    )
    p.add_argument("--config", help="YAML config (cxr/configs/*.yaml); omitted: all defaults")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override a config value, parsed as YAML (optim.lr=3e-4, loss.cap=null, optim.betas=[0.9,0.99])",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also CXR_DEBUG=1)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    return train(cfg)


def train(cfg: Config, loader_fn: Callable = build_loader) -> int:
    """Run (or resume) training as configured; returns the process exit status (see module doc).

    loader_fn: ``build_loader``-compatible factory (benchmarks pass in-memory data). The loop
    and its state are cxr/training/trainer.py's :class:`~cxr.training.trainer.Trainer`."""
    return Trainer(cfg, loader_fn).run()


if __name__ == "__main__":
    sys.exit(main())
