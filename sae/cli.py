"""The `jaxlm-sae` command: a thin dispatcher over subcommands that live next to their code.

Like `jaxlm.cli`: each module in `_COMMAND_MODULES` exposes `register(subparsers)`; a module that
is not there yet is skipped. A user's mistake (`UserError`) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from jaxlm.cli import build_parser as _build_parser
from jaxlm.cli import dispatch

_COMMAND_MODULES = (
    "sae.train_cli",  # train
    "sae.analysis_cli",  # the analysis commands (TSEA, dashboards)
)


def build_parser() -> argparse.ArgumentParser:
    return _build_parser("jaxlm-sae", _COMMAND_MODULES, __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
