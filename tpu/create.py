"""Create a TPU VM or a queued resource, unless a healthy one by that name exists.

    python tpu/create.py jaxlm-v5e --zone us-west4-a --accelerator-type v5litepod-8 --spot
    python tpu/create.py jaxlm-v5e --zone us-west4-a --queued --spot --dry-run

Checks `describe` first: an existing READY/ACTIVE slice is left alone, a preempted or
suspended one is deleted and created again. `--no-wait` returns once gcloud accepts the request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu import gcloud  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="tpu/create.py", description=__doc__.splitlines()[0])
    gcloud.add_tpu_args(p, billing=True)
    p.add_argument("--no-wait", action="store_true", help="do not poll until READY/ACTIVE")
    p.add_argument("--poll-s", type=float, default=30, help="seconds between describe polls")
    return p


def run(args: argparse.Namespace) -> int:
    """Do the work for parsed flags; GcloudError becomes one line on stderr."""
    tpu = gcloud.tpu_from_args(args)
    gc = gcloud.gcloud_from_args(args)
    gcloud.ensure_created(gc, tpu, wait=not args.no_wait, poll_s=args.poll_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a usage error)."""
    return gcloud.main_guard("create", run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
