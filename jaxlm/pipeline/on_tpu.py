"""Training stages on a Cloud TPU slice (`models.where: tpu`), through the tpu/ scripts.

A TPU stage runs the same `jaxlm train` command as a local one, with its paths moved to the
slice: the run's folder RUN/ is mirrored at gs://RUNS/PREFIX/ (the config's `tpu.runs`, and the
workdir's name), which `tpu/setup.py --runs` mounts read-write at RUNS_DIR on every worker, so
RUN/data/translated is RUNS_DIR/PREFIX/data/translated there. The stage

1. copies its inputs up (`gcloud storage rsync`): the prepared data it reads, the parent model
   of a continual pre-training, and its train config (as RUNS/PREFIX/configs/LABEL.yaml);
2. when its settings changed, removes the old remote workdir (what `--overwrite` does locally:
   babysit reruns one command after a preemption, and that rerun must resume, not start over);
3. runs `tpu/babysit.py` with the train command: create the slice if missing, set it up at the
   commit, run, and after a preemption recreate, set up and rerun (the trainer resumes from the
   workdir's last checkpoint on the mount);
4. copies the finished workdir back to RUN/models/LABEL, so the local stages downstream
   (samples, SAEs, the report) read it as if it had been trained here.

The commands are built by tpu/gcloud.py and the scripts themselves (the tpu/ folder of this
checkout); a dry run prints them, with babysit's own `--dry-run` below its line (as comments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from jaxlm.errors import UserError
from jaxlm.pipeline.config import PipelineConfig
from jaxlm.pipeline.engine import Context

REPO = Path(__file__).resolve().parents[2]  # the checkout with tpu/ beside jaxlm/
NOTHING_TO_REMOVE = "matched no objects"  # gcloud storage rm's error for an absent prefix


def scripts() -> tuple[ModuleType, ModuleType, ModuleType]:
    """tpu/gcloud.py, tpu/babysit.py and tpu/delete.py of this checkout (not a package of the
    install: the scripts are run as files, so they come from the checkout)."""
    if not (REPO / "tpu" / "babysit.py").is_file():
        raise UserError(f"models.where=tpu needs the tpu/ scripts of a jaxlm checkout; none in "
                        f"{REPO}")  # fmt: skip
    if "tpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "tpu", REPO / "tpu" / "__init__.py", submodule_search_locations=[str(REPO / "tpu")]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["tpu"] = module
        spec.loader.exec_module(module)
    from tpu import babysit, delete, gcloud

    return gcloud, babysit, delete


@dataclasses.dataclass
class Slice:
    """The config's slice, and where this run's folder lives on gs:// and on the workers."""

    cfg: PipelineConfig
    workdir: Path  # RUN/, resolved
    used: bool = False  # a stage has run babysit (a dry run: printed it) in this process

    @property
    def t(self):
        return self.cfg.tpu

    @property
    def prefix(self) -> str:
        return self.t.prefix or self.workdir.name

    @property
    def accelerator(self) -> str:
        return self.t.accelerator or self.cfg.plan.accelerator

    def rel(self, local: Path) -> str:
        """A path of the run folder, relative to it (what it is under gs:// and the mount)."""
        try:
            return local.relative_to(self.workdir).as_posix()
        except ValueError:
            raise UserError(f"{local}: not inside the run folder {self.workdir}") from None

    def gs(self, rel: str) -> str:
        return f"{str(self.t.runs).rstrip('/')}/{self.prefix}/{rel}"

    def mounted(self, rel: str) -> str:
        return f"{self.t.runs_dir.rstrip('/')}/{self.prefix}/{rel}"

    def at(self, local: Path) -> str:
        """A path of the run folder as the workers see it."""
        return self.mounted(self.rel(local))

    def describe(self) -> str:
        billing = ", spot" if self.t.spot else ", reserved" if self.t.reserved else ""
        return f"TPU slice {self.t.name} ({self.accelerator} in {self.t.zone}{billing})"

    def commit(self) -> str:
        """`tpu.commit`, else this checkout's HEAD (which the workers fetch from `tpu.repo`)."""
        if self.t.commit:
            return self.t.commit
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True)  # fmt: skip
        if out.returncode != 0:
            raise UserError(f"tpu.commit is not set and `git rev-parse HEAD` failed in {REPO}")
        return out.stdout.strip()

    def _tpu_flags(self) -> list[str]:
        t = self.t
        return [str(t.name), "--zone", str(t.zone), *(["--project", t.project] if t.project
                else []), *(["--queued"] if t.queued else [])]  # fmt: skip

    def babysit(self, run_id: str, command: list[str]) -> list[str]:
        """`python tpu/babysit.py ...` for `command` (create if missing, set up, run, rerun)."""
        t = self.t
        billing = ["--spot"] if t.spot else ["--reserved"] if t.reserved else []
        version = ["--runtime-version", t.runtime_version] if t.runtime_version else []
        env = [x for kv in t.env for x in ("--env", kv)]
        log_dir = t.log_dir or self.gs("tpu-logs")
        return [sys.executable, str(REPO / "tpu" / "babysit.py"), *self._tpu_flags(),
                "--accelerator-type", self.accelerator, *version, *billing,
                "--repo", str(t.repo), "--commit", self.commit(), "--dir", t.dir,
                "--runs", str(t.runs), "--runs-dir", t.runs_dir, "--log-dir", log_dir,
                "--run-id", run_id, "--max-restarts", str(t.max_restarts),
                "--poll-s", f"{t.poll_s:g}", *env, "--", *command]  # fmt: skip

    def delete(self) -> list[str]:
        return [sys.executable, str(REPO / "tpu" / "delete.py"), *self._tpu_flags()]


def train(
    ctx: Context,
    sl: Slice,
    label: str,
    args: Callable[[Callable[[Path], str], str], list[str]],
    *,
    config: Path,
    inputs: list[Path],
    out: Path,
) -> None:
    """Run `jaxlm train` on the slice: `args(at, config)` are its arguments with every run
    folder path through `at` and the config's path as given; `inputs` (folders of the run) go
    up first, the workdir `out` comes back at the end."""
    gcloud, _, _ = scripts()
    config_rel = f"configs/{label}.yaml"
    for local in inputs:
        ctx.run(gcloud.storage_rsync(str(local), sl.gs(sl.rel(local)), mirror=True))
    ctx.run(gcloud.storage_cp(str(config), sl.gs(config_rel)))
    if ctx.overwrite:  # what --overwrite does here; a rerun by babysit must resume instead
        ctx.run(gcloud.storage_rm(sl.gs(sl.rel(out))), tolerate=NOTHING_TO_REMOVE)
    argv = sl.babysit(label, ["jaxlm", *args(sl.at, sl.mounted(config_rel))])
    if not ctx.dry_run:
        ctx.log(f"[{label}] on {sl.describe()}: tpu/babysit.py (log: "
                f"{ctx.workdir / 'logs' / f'{label}.log'})")  # fmt: skip
    ctx.run(argv)
    if ctx.dry_run:  # what babysit would run: from scratch the first time, then on the slice
        _show(argv, "babysit", ["--simulate-state", "MISSING"] if not sl.used else [])
    sl.used = True
    if not ctx.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    ctx.run(gcloud.storage_rsync(sl.gs(sl.rel(out)), str(out), mirror=True))


def delete(sl: Slice, log: Callable[[str], None], *, dry_run: bool = False) -> None:
    """Delete the slice (`tpu.delete_when_done`) through tpu/delete.py; logs/tpu-delete.log."""
    argv = sl.delete()
    if dry_run:
        print(f"# the slice, once no TPU stage is left to run\n{shlex.join(argv)}", flush=True)
        _show(argv, "delete", [])
        return
    log(f"deleting {sl.describe()}: no TPU stage left to run")
    Context(sl.workdir, overwrite=False, log=log, stage="tpu-delete").run(argv)
    sl.used = False


def _show(argv: list[str], script: str, states: list[str]) -> None:
    """The gcloud commands a tpu/ script would run (its own --dry-run), printed as comments."""
    module = dict(zip(("babysit", "delete"), scripts()[1:], strict=True))[script]
    cut = argv.index("--") if "--" in argv else len(argv)
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = module.main([*argv[2:cut], "--dry-run", *states, *argv[cut:]])
    if code != 0:
        raise UserError(f"tpu/{script}.py --dry-run: {err.getvalue().strip()}")
    for line in buf.getvalue().splitlines():
        print(f"#   {line}", flush=True)
