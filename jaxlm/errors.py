"""Errors that are the user's to fix, and the one place that turns them into exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input (a file, line, field or flag): the message says where and how to fix it."""


def exit_code(prog: str, run: Callable[[], int | None]) -> int:
    """`run()`'s exit code; a `UserError` (or an `OSError`: a full disk, a read-only folder, a
    missing permission) is printed as one line `PROG: error: ...` and gives 2.

    Every command-line entry point (the `jaxlm` tool and the `tpu/` scripts) goes through here,
    so a user's mistake is never a traceback and always the same exit code.
    """
    try:
        return int(run() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk or the file system, not the code: the path and why
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
