"""Delete a TPU VM (or, with --queued, the queued resource and its node); absent is fine.

python tpu/delete.py jaxlm-v5e --zone us-west4-a [--queued] [--dry-run]
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
    p = argparse.ArgumentParser(prog="tpu/delete.py", description=__doc__.splitlines()[0])
    gcloud.add_tpu_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Do the work for parsed flags; GcloudError becomes one line on stderr."""
    tpu = gcloud.tpu_from_args(args)
    gc = gcloud.gcloud_from_args(args, default_state="READY")
    if gc.state(tpu) is None:
        print(f"# {tpu.name} does not exist: nothing to delete", file=sys.stderr)
        return 0
    gc.check(tpu.delete())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a usage error)."""
    return gcloud.main_guard("delete", run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
