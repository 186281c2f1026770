"""The `jaxlm` command: a thin dispatcher over subcommands that live next to their code.

Each module in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and
sets `func` (taking the parsed args, returning an exit code) as the parser default. A user's mistake
raises `jaxlm.errors.UserError` and is printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxlm.errors import UserError

_COMMAND_MODULES = (
    "jaxlm.commands",  # init, export-hf, import-hf, generate
    "jaxlm.train_cli",  # train
    "jaxlm.data.cli",  # tokenizer train, data prepare, data demo-corpus
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
