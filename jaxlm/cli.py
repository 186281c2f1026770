"""The `jaxlm` command: a thin dispatcher over subcommands that live next to their code.

Each module in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and
sets `func` (taking the parsed args, returning an exit code) as the parser default. A user's mistake
raises `jaxlm.errors.UserError` and is printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxlm.errors import exit_code

_COMMAND_MODULES = (  # in the order of the method
    "jaxlm.mt.cli",  # 1. translate, translate-merge
    "jaxlm.data.cli",  # 2. data demo-corpus, tokenizer train, data prepare
    "jaxlm.train.cli",  # 2b, 3b. train (pretraining and continual pre-training)
    "jaxlm.synth.cli",  # 3a. synthesize
    "jaxlm.judge.cli",  # 4. judge complete | grade | compare
    "jaxlm.eval.cli",  # eval artifacts
    "sae.cli",  # 5. sae train | tsea | tsea-compare | dashboard
    "jaxlm.commands",  # models: init, export-hf, import-hf, generate
    "jaxlm.pipeline.cli",  # the whole method: pipeline
)


def build_parser(
    prog: str = "jaxlm", modules: tuple[str, ...] = _COMMAND_MODULES, description: str = ""
) -> argparse.ArgumentParser:
    """A parser with every subcommand of `modules`."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run the subcommand, and turn a user's mistake into one line and exit code 2."""
    args = parser.parse_args(argv)
    return exit_code(f"{parser.prog} {args.command}", lambda: args.func(args))


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
