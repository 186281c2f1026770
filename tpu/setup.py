"""Set up every worker of a TPU slice: jaxlm at a git commit, in a venv, with `jax[tpu]`.

    python tpu/setup.py jaxlm-v5e --zone us-west4-a \\
        --repo https://github.com/ORG/jaxlm.git --commit 0123abc \\
        --data gs://BUCKET/data/ar-tinystories --data-mode copy

One `gcloud compute tpus tpu-vm ssh --worker=all` runs an idempotent script on all workers:
clone or fetch the repo into --dir, check out --commit, make a Python 3.11 venv with uv (the
TPU images ship Python 3.10), `pip install -e ".[tpu]"`, and make the data shards readable:
`--data-mode copy` syncs them to local disk with `gcloud storage rsync --recursive` (the
re-runnable form of `gcloud storage cp -r`), `gcsfuse` mounts the bucket prefix read-only.
Workdirs need neither: --runs mounts gs:// read-write at /tmp/jaxlm-runs (gcsfuse).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu import gcloud  # noqa: E402

UV_INSTALL = "curl -LsSf https://astral.sh/uv/install.sh | sh"
GCSFUSE_INSTALL = (
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" '
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
    "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
    "sudo apt-get -qq update; sudo apt-get -qq install -y gcsfuse"
)


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """Flags for what goes on the workers (shared with babysit.py)."""
    p.add_argument("--repo", required=True, help="git URL the workers can clone")
    p.add_argument("--commit", help="commit, tag or branch to check out; default: local HEAD")
    p.add_argument("--dir", default="~/jaxlm", help="checkout on each worker (has the venv)")
    p.add_argument("--python", default="3.11", help="Python version uv installs for the venv")
    p.add_argument("--extras", default="tpu", help='pip extras: "tpu" pulls jax[tpu]')
    p.add_argument("--data", help="gs://BUCKET/PREFIX with the training shards")
    p.add_argument("--data-mode", choices=("none", "copy", "gcsfuse"), default="none")
    p.add_argument("--data-dir", default="/tmp/jaxlm-data", help="where shards appear locally")
    p.add_argument("--runs", help="gs://BUCKET/PREFIX for workdirs (checkpoints, metrics)")
    p.add_argument(
        "--runs-dir",
        default="/tmp/jaxlm-runs",
        help="where --runs is mounted read-write (gcsfuse); pass it as --workdir's parent",
    )


def local_head() -> str:
    """This checkout's HEAD commit, the default for --commit."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode != 0:
        raise gcloud.GcloudError("--commit not given and `git rev-parse HEAD` failed here")
    return out.stdout.strip()


def remote_path(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading ~ as $HOME."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def data_steps(data: str | None, mode: str, data_dir: str) -> list[str]:
    """Shell steps that make gs:// shards readable under data_dir."""
    if mode == "none":
        return []
    if not data or not data.startswith("gs://"):
        raise gcloud.GcloudError(f"--data-mode {mode} needs --data gs://BUCKET/PREFIX")
    where = remote_path(data_dir)
    if mode == "copy":
        return [
            f"mkdir -p {where}",
            f"gcloud storage rsync --recursive {shlex.quote(data)} {where}",
        ]
    bucket, _, prefix = data.removeprefix("gs://").partition("/")
    only_dir = f"--only-dir {shlex.quote(prefix)} " if prefix else ""
    return [
        f"command -v gcsfuse >/dev/null || {{ {GCSFUSE_INSTALL}; }}",
        f"mkdir -p {where}",
        f"mountpoint -q {where} || gcsfuse -o ro --implicit-dirs {only_dir}"
        f"{shlex.quote(bucket)} {where}",
    ]


def runs_steps(runs: str | None, runs_dir: str) -> list[str]:
    """Mount the runs bucket read-write: every host sees the same workdir, which outlives the
    slice, so a recreated slice resumes from the last checkpoint (Orbax writes through it)."""
    if not runs:
        return []
    if not runs.startswith("gs://"):
        raise gcloud.GcloudError(f"--runs {runs}: expected gs://BUCKET/PREFIX")
    bucket, _, prefix = runs.removeprefix("gs://").partition("/")
    only_dir = f"--only-dir {shlex.quote(prefix)} " if prefix else ""
    where = remote_path(runs_dir)
    return [
        f"command -v gcsfuse >/dev/null || {{ {GCSFUSE_INSTALL}; }}",
        f"mkdir -p {where}",
        f"mountpoint -q {where} || gcsfuse --implicit-dirs {only_dir}{shlex.quote(bucket)} {where}",
    ]


def setup_command(args: argparse.Namespace) -> str:
    """The one-line remote script that (re)installs jaxlm on a worker; safe to run again."""
    d, commit = remote_path(args.dir), shlex.quote(args.commit or local_head())
    steps = [
        "set -euo pipefail",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"command -v uv >/dev/null || {{ {UV_INSTALL}; }}",
        f"[ -d {d}/.git ] || git clone --quiet {shlex.quote(args.repo)} {d}",
        f"git -C {d} fetch --quiet origin",
        f"git -C {d} checkout --quiet --force {commit}",
        f"[ -x {d}/.venv/bin/python ] || uv venv --quiet --python {args.python} {d}/.venv",
        f"cd {d} && uv pip install --quiet --python .venv/bin/python -e "
        + shlex.quote(f".[{args.extras}]"),
        *data_steps(args.data, args.data_mode, args.data_dir),
        *runs_steps(getattr(args, "runs", None), getattr(args, "runs_dir", "/tmp/jaxlm-runs")),
        f'echo "jaxlm $(git -C {d} rev-parse --short HEAD) ready on $(hostname)"',
    ]
    return "; ".join(steps)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="tpu/setup.py", description=__doc__.splitlines()[0])
    gcloud.add_tpu_args(p)
    add_setup_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Do the work for parsed flags; GcloudError becomes one line on stderr."""
    tpu = gcloud.tpu_from_args(args)
    gc = gcloud.gcloud_from_args(args, default_state="READY")
    if not tpu.ready(state := gc.state(tpu)):
        raise gcloud.GcloudError(f"{tpu.name} is {state or 'missing'}: create it first")
    gc.check(tpu.ssh(setup_command(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a usage error)."""
    return gcloud.main_guard("setup", run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
