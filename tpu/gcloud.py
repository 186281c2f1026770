"""The gcloud commands behind the tpu/ scripts: argv lists built in one place, run or printed.

Every command is an argv list (no shell on this side); `Gcloud(dry_run=True)` prints each one as
`shlex.join(argv)` on its own line and runs nothing, answering `describe` from a simulated
state so scripts show the whole sequence they would run. Syntax follows the current gcloud
reference (`gcloud compute tpus tpu-vm ...`, `gcloud compute tpus queued-resources ...`).

Accelerator names are gcloud's (`v4-8`, `v5litepod-8`, `v5p-8`, `v6e-8`); `v5e-N` is accepted
as an alias of `v5litepod-N`. v4-N and v5p-N count TensorCores (2 per chip), v5litepod-N and
v6e-N count chips.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from jaxlm.errors import UserError, exit_code

# Runtime (VM image) per generation, from the Cloud TPU "TPU software versions" page.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Slice sizes gcloud accepts: chips for v5litepod/v6e, TensorCores (multiples of 8) for v4/v5p.
_CHIP_SIZES = {1, 4, 8, 16, 32, 64, 128, 256}
_MAX_CORES = {"v4": 8192, "v5p": 17920}

# Node states after which the slice must be deleted and created again; for queued resources
# the resource's own state (`state.state`) is watched instead.
NODE_LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "FAILED", "DELETING"}
QR_LOST = {"SUSPENDED", "SUSPENDING", "FAILED", "DELETING", "PREEMPTED"}
NODE_READY = {"READY"}
QR_READY = {"ACTIVE"}


class GcloudError(UserError):
    """A gcloud call failed, or a flag is not something gcloud would accept."""


def parse_accelerator(name: str) -> tuple[str, int]:
    """("v5litepod", 8) for "v5e-8" or "v5litepod-8"; GcloudError for anything gcloud rejects."""
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name)
    if m is None:
        kinds = "v4-N, v5litepod-N (alias v5e-N), v5p-N or v6e-N"
        raise GcloudError(f"unknown accelerator type {name!r}; use {kinds}")
    gen, size = ("v5litepod" if m[1] == "v5e" else m[1]), int(m[2])
    ok = size in _CHIP_SIZES if gen in ("v5litepod", "v6e") else 8 <= size <= _MAX_CORES[gen]
    if not ok or (gen in _MAX_CORES and size % 8):
        raise GcloudError(f"unknown accelerator type {name!r}: no {gen} slice of size {size}")
    return gen, size


def hosts_of(accelerator: str) -> int:
    """TPU VM workers in a slice: 4 chips per host, except single-host v5e/v6e up to 8 chips."""
    gen, size = parse_accelerator(accelerator)
    chips = size // 2 if gen in _MAX_CORES else size
    return 1 if chips <= (8 if gen in ("v5litepod", "v6e") else 4) else chips // 4


@dataclasses.dataclass(frozen=True)
class Tpu:
    """Where a slice lives and how it is billed; `queued` makes it a queued resource."""

    name: str  # TPU VM node id (and queued-resource id when queued)
    zone: str
    project: str | None = None
    accelerator: str = "v5litepod-8"
    runtime_version: str | None = None  # None: RUNTIME_VERSIONS for the generation
    spot: bool = False
    reserved: bool = False
    queued: bool = False

    def __post_init__(self) -> None:
        gen, size = parse_accelerator(self.accelerator)
        object.__setattr__(self, "accelerator", f"{gen}-{size}")
        if self.runtime_version is None:
            object.__setattr__(self, "runtime_version", RUNTIME_VERSIONS[gen])
        if self.spot and self.reserved:
            raise GcloudError("--spot and --reserved are mutually exclusive: pick one")

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def create(self) -> list[str]:
        """`tpu-vm create`, or `queued-resources create` with --queued."""
        billing = ["--spot"] if self.spot else ["--reserved"] if self.reserved else []
        if self.queued:
            return [*_QR, "create", self.name, f"--node-id={self.name}", *self._where(),
                    f"--accelerator-type={self.accelerator}",
                    f"--runtime-version={self.runtime_version}", *billing]  # fmt: skip
        return [*_VM, "create", self.name, *self._where(),
                f"--accelerator-type={self.accelerator}", f"--version={self.runtime_version}",
                *billing]  # fmt: skip

    def describe(self) -> list[str]:
        """Prints just the state: the node's, or the queued resource's."""
        fmt = "value(state.state)" if self.queued else "value(state)"
        return [*(_QR if self.queued else _VM), "describe", self.name, *self._where(),
                f"--format={fmt}"]  # fmt: skip

    def delete(self) -> list[str]:
        """Delete without prompting."""
        if self.queued:  # --force deletes the node along with the queued resource
            return [*_QR, "delete", self.name, *self._where(), "--quiet", "--force"]
        return [*_VM, "delete", self.name, *self._where(), "--quiet"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        """Run a one-line shell command on the workers."""
        return [*_VM, "ssh", self.name, *self._where(), f"--worker={worker}",
                f"--command={command}"]  # fmt: skip

    def scp_from(self, remote: str, local: str, worker: str = "all") -> list[str]:
        """Copy a remote directory from the workers to a local one."""
        return [*_VM, "scp", "--recurse", f"{self.name}:{remote}", local, *self._where(),
                f"--worker={worker}"]  # fmt: skip

    def lost(self, state: str | None) -> bool:
        """Whether the slice is gone or preempted and must be recreated."""
        return state is None or state in (QR_LOST if self.queued else NODE_LOST)

    def ready(self, state: str | None) -> bool:
        """Whether the slice can take commands: READY (node) or ACTIVE (queued)."""
        return state in (QR_READY if self.queued else NODE_READY)


_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
_QR = ["gcloud", "compute", "tpus", "queued-resources"]


def storage_rsync(src: str, dst: str, *, mirror: bool = False) -> list[str]:
    """Copy a directory tree between here and gs:// (either way), only what differs; `mirror`
    also deletes what `src` lacks, so `dst` ends up exactly `src` (no stale checkpoints)."""
    delete = ["--delete-unmatched-destination-objects"] if mirror else []
    return ["gcloud", "storage", "rsync", "--recursive", *delete, src, dst]


def storage_cp(src: str, dst: str) -> list[str]:
    """Copy one file between here and gs://."""
    return ["gcloud", "storage", "cp", src, dst]


def storage_rm(url: str) -> list[str]:
    """Delete a gs:// prefix and everything under it (gcloud fails when nothing matches)."""
    return ["gcloud", "storage", "rm", "--recursive", url]


class Gcloud:
    """Runs argv lists, or with `dry_run` prints them (shlex.join, one a line) and runs nothing.

    In a dry run `describe` answers from `states`, a script of simulated states consumed one
    per call (the last one repeats); "MISSING" stands for a slice that does not exist.
    """

    def __init__(self, dry_run: bool = False, states: Sequence[str] = ("MISSING",)) -> None:
        self.dry_run = dry_run
        self._states = list(states)

    def run(self, argv: list[str]) -> int:
        """Print the command; unless dry, run it and return its exit code."""
        print(shlex.join(argv), flush=True)
        if self.dry_run:
            self._simulate(argv)
            return 0
        return subprocess.run(argv, check=False).returncode

    def check(self, argv: list[str]) -> None:
        """`run`, raising GcloudError on a non-zero exit."""
        if (rc := self.run(argv)) != 0:
            raise GcloudError(f"exit {rc}: {shlex.join(argv)}")

    def scripted(self) -> bool:
        """Dry runs: whether simulated states are still queued (the story is not over)."""
        return self.dry_run and len(self._states) > 1

    def _simulate(self, argv: list[str]) -> None:
        """Unless more states were scripted, a created slice is up and a deleted one gone."""
        if len(self._states) <= 1 and argv[4:5] in (["create"], ["delete"]):
            ready = "ACTIVE" if argv[3] == "queued-resources" else "READY"
            self._states = [ready if argv[4] == "create" else "MISSING"]

    def state(self, tpu: Tpu) -> str | None:
        """The slice's state from `describe`, None when it does not exist."""
        argv = tpu.describe()
        print(shlex.join(argv), flush=True)
        if self.dry_run:
            state = self._states.pop(0) if len(self._states) > 1 else self._states[0]
            return None if state == "MISSING" else state
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode == 0:
            return out.stdout.strip() or None
        if "NOT_FOUND" in out.stderr or "not found" in out.stderr.lower():
            return None
        raise GcloudError(f"{shlex.join(argv)}: {out.stderr.strip().splitlines()[-1:]}")

    def sleep(self, seconds: float) -> None:
        """Wait between polls (not in dry runs)."""
        if not self.dry_run:
            time.sleep(seconds)


def add_tpu_args(p: argparse.ArgumentParser, *, billing: bool = False) -> None:
    """Flags every script shares; `billing` adds what only creating a slice needs."""
    p.add_argument("name", help="TPU VM name (also the queued-resource id with --queued)")
    p.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-central2-b (v4)")
    p.add_argument("--project", help="GCP project; default: gcloud's core/project")
    p.add_argument("--queued", action="store_true", help="a queued resource, not a plain TPU VM")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run none")
    p.add_argument(
        "--simulate-state",
        action="append",
        metavar="STATE",
        help="dry runs: describe's answers in order (READY, PREEMPTED, MISSING)",
    )
    if billing:
        p.add_argument("--accelerator-type", default="v5litepod-8", help="v5litepod-8, v4-32, ...")
        p.add_argument("--runtime-version", help="default: the generation's (see gcloud.py)")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--spot", action="store_true", help="spot: cheap, can be preempted")
        group.add_argument("--reserved", action="store_true", help="use the project's reservation")


def tpu_from_args(args: argparse.Namespace) -> Tpu:
    """The slice the parsed flags describe."""
    return Tpu(
        name=args.name,
        zone=args.zone,
        project=args.project,
        accelerator=getattr(args, "accelerator_type", "v5litepod-8"),
        runtime_version=getattr(args, "runtime_version", None),
        spot=getattr(args, "spot", False),
        reserved=getattr(args, "reserved", False),
        queued=args.queued,
    )


def gcloud_from_args(args: argparse.Namespace, default_state: str = "MISSING") -> Gcloud:
    """The runner for the flags: real, or dry with simulated describe answers."""
    if args.simulate_state and not args.dry_run:
        raise GcloudError("--simulate-state only goes with --dry-run")
    return Gcloud(dry_run=args.dry_run, states=args.simulate_state or [default_state])


def wait_ready(gc: Gcloud, tpu: Tpu, poll_s: float = 30, timeout_s: float = 24 * 3600) -> None:
    """Poll `describe` until the slice is READY (node) or ACTIVE (queued resource)."""
    deadline = time.monotonic() + timeout_s
    while not tpu.ready(state := gc.state(tpu)):
        if state is None or state in ("FAILED", "SUSPENDED", "PREEMPTED"):
            raise GcloudError(f"{tpu.name} is {state or 'missing'} while waiting for it")
        if time.monotonic() > deadline:
            raise GcloudError(f"{tpu.name} still {state} after {timeout_s:.0f}s")
        print(f"# {tpu.name}: {state}, waiting", file=sys.stderr)
        gc.sleep(poll_s)


def recreate(gc: Gcloud, tpu: Tpu, state: str | None) -> None:
    """Create the slice, deleting first what is left of a lost one (`state` from describe)."""
    if state is not None:
        print(f"# {tpu.name} is {state}: deleting before creating", file=sys.stderr)
        gc.check(tpu.delete())
    gc.check(tpu.create())


def ensure_created(gc: Gcloud, tpu: Tpu, wait: bool = True, poll_s: float = 30) -> bool:
    """Create the slice unless a healthy one exists (a lost one is deleted first).

    Returns whether it created one. Idempotent: a second call finds the slice and does nothing.
    """
    state = gc.state(tpu)
    created = tpu.lost(state)
    if created:
        recreate(gc, tpu, state)
    else:
        print(f"# {tpu.name} exists ({state}): not creating", file=sys.stderr)
    if wait and (created or not tpu.ready(state)):
        wait_ready(gc, tpu, poll_s=poll_s)
    return created


def main_guard(prog: str, body, argv: list[str] | None, parser: argparse.ArgumentParser) -> int:
    """Parse, run `body(args)`, and turn GcloudError into one line on stderr and exit 2.

    Everything after a `--` is the remote command, kept verbatim in `args.cmd`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.cmd = argv[cut + 1 :]
    return exit_code(prog, lambda: body(args))
