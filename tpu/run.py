"""Run one command on every worker of a TPU slice, with its environment and logs collected.

    python tpu/run.py jaxlm-v5e --zone us-west4-a --log-dir gs://BUCKET/logs \\
        --env JAX_COMPILATION_CACHE_DIR=gs://BUCKET/xla-cache -- \\
        jaxlm train --config configs/pretrain.yaml --preset ts-33m --workdir /tmp/jaxlm-runs/ts-33m

On each worker, inside the setup checkout and venv: write `worker-N.START.env` (commit,
TPU/JAX/XLA variables, jax/libtpu versions), run the command with its output tee'd to
`worker-N.START.log` under ~/jaxlm-logs/RUN_ID (START: the attempt's UTC start time), then copy
both to --log-dir: `gcloud storage cp` from the workers for gs://, `gcloud compute tpus tpu-vm
scp --worker=all` back here for a local dir.
The exit status is the command's (non-zero if any worker failed).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu import gcloud  # noqa: E402
from tpu.setup import remote_path  # noqa: E402

WORKER_ID = (
    "$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/"
    "instance/attributes/agent-worker-number || hostname)"
)
ENV_REPORT = (
    "{ date -u; git rev-parse HEAD; env | grep -E '^(TPU|JAX|XLA|LIBTPU)' | sort; "
    "pip list 2>/dev/null | grep -iE '^(jax|jaxlib|libtpu|flax|optax|orbax)'; }"
)


def add_run_args(p: argparse.ArgumentParser, with_dir: bool = True) -> None:
    """Flags for running the command (shared with babysit.py, where setup's --dir is used)."""
    if with_dir:
        p.add_argument("--dir", default="~/jaxlm", help="the checkout setup.py made on workers")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="exported on every worker before the command, repeatable")  # fmt: skip
    p.add_argument("--log-dir", default="./tpu-logs", help="gs://BUCKET/PREFIX or a local dir")
    p.add_argument("--run-id", default=time.strftime("%Y%m%d-%H%M%S"), help="log subfolder")
    p.epilog = "Put the command to run last, after --."


def exports(env: list[str]) -> list[str]:
    """`export KEY=VALUE` steps for --env, values shell-quoted."""
    steps = []
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise gcloud.GcloudError(f"--env {item!r}: expected KEY=VALUE")
        steps.append(f"export {key}={shlex.quote(value)}")
    return steps


def user_command(cmd: list[str]) -> str:
    """The command after --, shell-quoted for the remote shell."""
    if not cmd:
        raise gcloud.GcloudError("no command: put it after --, e.g. -- jaxlm train --config ...")
    return shlex.join(cmd)


def remote_command(args: argparse.Namespace) -> str:
    """The one-line script each worker runs: env report, command tee'd to its log, upload."""
    logs = f'"$HOME"/jaxlm-logs/{shlex.quote(args.run_id)}'
    steps = [
        "set -uo pipefail",
        f"cd {remote_path(args.dir)}",
        ". .venv/bin/activate",
        *exports(args.env),
        f"W={WORKER_ID}",
        "S=$(date -u +%Y%m%dT%H%M%SZ)",  # one file per attempt: a babysat rerun adds, not replaces
        f"mkdir -p {logs}",
        f'{ENV_REPORT} > {logs}/worker-"$W.$S".env 2>&1',
        f'( {user_command(args.cmd)} ) 2>&1 | tee {logs}/worker-"$W.$S".log',
        "rc=$?",
    ]
    if args.log_dir.startswith("gs://"):
        dest = shlex.quote(f"{args.log_dir.rstrip('/')}/{args.run_id}/")
        steps.append(f'gcloud storage cp {logs}/worker-"$W.$S".* {dest} || true')
    return "; ".join([*steps, "exit $rc"])


def run_on_all(gc: gcloud.Gcloud, tpu: gcloud.Tpu, args: argparse.Namespace) -> int:
    """Run the command on every worker; fetch logs to a local --log-dir. Returns the exit code."""
    rc = gc.run(tpu.ssh(remote_command(args)))
    if not args.log_dir.startswith("gs://"):
        if not gc.dry_run:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        gc.run(tpu.scp_from(f"~/jaxlm-logs/{args.run_id}", args.log_dir))
    return rc


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="tpu/run.py", description=__doc__.splitlines()[0])
    gcloud.add_tpu_args(p)
    add_run_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Do the work for parsed flags; GcloudError becomes one line on stderr."""
    tpu = gcloud.tpu_from_args(args)
    gc = gcloud.gcloud_from_args(args, default_state="READY")
    remote_command(args)  # flag errors before touching the slice
    if not tpu.ready(state := gc.state(tpu)):
        raise gcloud.GcloudError(f"{tpu.name} is {state or 'missing'}: create and set it up first")
    return run_on_all(gc, tpu, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a usage error)."""
    return gcloud.main_guard("run", run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
