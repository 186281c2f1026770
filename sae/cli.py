"""The `jaxlm-sae` command: a thin dispatcher over subcommands that live next to their code.

Like `jaxlm.cli`: each module in `_COMMAND_MODULES` exposes `register(subparsers)`; a module that
is not there yet is skipped. A user's mistake (`UserError`) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from jaxlm.errors import UserError

_COMMAND_MODULES = (
    "sae.train_cli",  # train
    "sae.analysis_cli",  # the analysis commands (TSEA, dashboards)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm-sae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"jaxlm-sae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
