"""The `jaxlm` command: a thin dispatcher over subcommands that live next to their code.

Each module in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and
sets `func` (taking the parsed args, returning an exit code) as the parser default. A user's mistake
raises `jaxlm.errors.UserError` and is printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from jaxlm.errors import UserError

_COMMAND_MODULES = (
    "jaxlm.commands",  # init, export-hf, import-hf, generate
    "jaxlm.train_cli",  # train
    "jaxlm.data.cli",  # tokenizer train, data prepare, data demo-corpus
)


def build_parser(
    prog: str = "jaxlm", modules: tuple[str, ...] = _COMMAND_MODULES, description: str = ""
) -> argparse.ArgumentParser:
    """A parser with every subcommand of `modules`; a module that is not installed is skipped."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run the subcommand, and turn a user's mistake into one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
