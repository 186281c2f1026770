"""Keep a training run going on a preemptible slice: recreate, set up and resume after preemption.

    python tpu/babysit.py jaxlm-v5e --zone us-west4-a --accelerator-type v5litepod-8 --spot \\
        --repo https://github.com/ORG/jaxlm.git --commit 0123abc --log-dir gs://BUCKET/logs \\
        --runs gs://BUCKET/runs -- \\
        jaxlm train --config configs/pretrain.yaml --preset ts-33m --workdir /tmp/jaxlm-runs/ts-33m

The loop: `describe`; if the slice is PREEMPTED, SUSPENDED, TERMINATED or missing, delete it,
create it, wait for READY/ACTIVE and run setup; then run the same train command on all workers.
The command resumes from the last checkpoint in its workdir (on the gcsfuse mount of gs:// that
setup makes with --runs), so a rerun is a resume; a run stopped by a preemption notice exits 75
(EX_TEMPFAIL) after saving, and is rerun too. It stops when the command succeeds, or after
--max-restarts reruns. Dry runs play simulated `describe` answers: `--simulate-state READY
--simulate-state PREEMPTED` prints setup and run, then (the run "fails" while states are left)
describe, delete, create, setup and the rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu import gcloud  # noqa: E402
from tpu import run as run_script  # noqa: E402
from tpu import setup as setup_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="tpu/babysit.py", description=__doc__.splitlines()[0])
    gcloud.add_tpu_args(p, billing=True)
    setup_script.add_setup_args(p)
    p.add_argument("--max-restarts", type=int, default=50, help="give up after this many reruns")
    p.add_argument("--poll-s", type=float, default=60, help="seconds between describe polls")
    run_script.add_run_args(p, with_dir=False)
    return p


def babysit(gc: gcloud.Gcloud, tpu: gcloud.Tpu, args: argparse.Namespace) -> int:
    """Recreate-setup-run until the command exits 0; returns the last exit code."""
    setup_cmd = setup_script.setup_command(args)
    run_script.remote_command(args)  # flag errors before creating anything
    rc, set_up, state = 1, False, gc.state(tpu)
    for attempt in range(args.max_restarts + 1):
        if tpu.lost(state):
            gcloud.recreate(gc, tpu, state)
            set_up = False
        if not tpu.ready(state):  # just created, or still CREATING / WAITING_FOR_RESOURCES
            gcloud.wait_ready(gc, tpu, poll_s=args.poll_s)
        if not set_up:  # setup is idempotent: on a slice that survived it only re-checks
            gc.check(tpu.ssh(setup_cmd))
            set_up = True
        rc = run_script.run_on_all(gc, tpu, args)
        if gc.dry_run:  # a dry run fails the command while simulated states are left
            rc = 1 if gc.scripted() else 0
        if rc == 0:
            return 0
        state = gc.state(tpu)
        print(f"# attempt {attempt}: exit {rc}, slice {state or 'missing'}: "
              f"{'recreating' if tpu.lost(state) else 'rerunning'}", file=sys.stderr)  # fmt: skip
        gc.sleep(args.poll_s)
    return rc


def run(args: argparse.Namespace) -> int:
    """Do the work for parsed flags; GcloudError becomes one line on stderr."""
    tpu = gcloud.tpu_from_args(args)
    gc = gcloud.gcloud_from_args(args, default_state="READY")
    if gc.dry_run and args.simulate_state:  # after the simulated states, a fresh slice is up
        up = "ACTIVE" if tpu.queued else "READY"
        gc = gcloud.Gcloud(dry_run=True, states=[*args.simulate_state, up])
    return babysit(gc, tpu, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a usage error)."""
    return gcloud.main_guard("babysit", run, argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
