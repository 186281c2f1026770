"""The gcloud commands the tpu/ scripts (and the pipeline's TPU stages) may print, and a parser
that asserts a printed line is one of them, well-formed.

The table is written from the gcloud reference pages (compute tpus tpu-vm, compute tpus
queued-resources, storage cp/rsync/rm), not from tpu/gcloud.py, so the two check each other.
"""

from __future__ import annotations

import shlex

_WHERE = {"--zone", "--project"}
_BILLING = {"--spot", "--reserved", "--preemptible"}
# path -> (positionals, required flags, allowed flags)
COMMANDS = {
    ("compute", "tpus", "tpu-vm", "create"): (
        1,
        {"--zone", "--accelerator-type", "--version"},
        _WHERE | _BILLING | {"--accelerator-type", "--version", "--async", "--labels"},
    ),
    ("compute", "tpus", "tpu-vm", "describe"): (1, {"--zone"}, _WHERE | {"--format"}),
    ("compute", "tpus", "tpu-vm", "delete"): (1, {"--zone"}, _WHERE | {"--quiet", "--async"}),
    ("compute", "tpus", "tpu-vm", "ssh"): (
        1,
        {"--zone", "--worker", "--command"},
        _WHERE | {"--worker", "--command"},
    ),
    ("compute", "tpus", "tpu-vm", "scp"): (
        2,
        {"--zone", "--worker"},
        _WHERE | {"--worker", "--recurse"},
    ),
    ("compute", "tpus", "queued-resources", "create"): (
        1,
        {"--zone", "--node-id", "--accelerator-type", "--runtime-version"},
        _WHERE | {"--node-id", "--accelerator-type", "--runtime-version", "--spot", "--reserved"},
    ),
    ("compute", "tpus", "queued-resources", "describe"): (1, {"--zone"}, _WHERE | {"--format"}),
    ("compute", "tpus", "queued-resources", "delete"): (
        1,
        {"--zone"},
        _WHERE | {"--quiet", "--force", "--async"},
    ),
    ("storage", "cp"): (2, set(), {"--recursive", "-r"}),
    ("storage", "rsync"): (
        2,
        set(),
        {"--recursive", "-r", "--delete-unmatched-destination-objects"},
    ),
    ("storage", "rm"): (1, set(), {"--recursive", "-r"}),
}
BOOLEAN_FLAGS = _BILLING | {"--quiet", "--force", "--async", "--recurse", "--recursive"}
BOOLEAN_FLAGS |= {"--delete-unmatched-destination-objects"}


def parse_gcloud(line: str) -> tuple[tuple[str, ...], list[str], dict[str, str | None]]:
    """(subcommand path, positionals, flags) of one printed line; asserts it is well-formed."""
    argv = shlex.split(line)
    assert argv[0] == "gcloud", line
    path = next((p for p in COMMANDS if tuple(argv[1 : 1 + len(p)]) == p), None)
    assert path is not None, f"not a known gcloud TPU/storage command: {line}"
    positionals, flags, rest = [], {}, argv[1 + len(path) :]
    while rest:
        tok = rest.pop(0)
        if not tok.startswith("-"):
            positionals.append(tok)
            continue
        name, eq, value = tok.partition("=")
        assert name.startswith("--") and len(name) > 2 and " " not in name, tok
        if not eq and name not in BOOLEAN_FLAGS:  # the `--flag value` form
            assert rest and not rest[0].startswith("--"), f"{name} needs a value: {line}"
            value = rest.pop(0)
        assert name not in BOOLEAN_FLAGS or not eq, f"{name} takes no value: {line}"
        assert eq or name in BOOLEAN_FLAGS or value, tok
        flags[name] = value if (eq or name not in BOOLEAN_FLAGS) else None
    n_pos, required, allowed = COMMANDS[path]
    assert len(positionals) == n_pos, f"{path}: positionals {positionals}"
    assert required <= flags.keys(), f"{path}: missing {required - flags.keys()}"
    assert flags.keys() <= allowed, f"{path}: unexpected {flags.keys() - allowed}"
    assert not (flags.keys() >= {"--spot", "--reserved"}), line
    return path, positionals, flags
