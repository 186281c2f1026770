"""Stages that are skipped when done with the same settings, rerun when theirs changed, and
resumed when interrupted.

A stage has a name, the settings its outputs depend on, the stages it reads from, and a function
that runs it (through `jaxlm` commands, recorded for the report's provenance). Its fingerprint is
a hash of its settings and its inputs' identities (an input's fingerprint and the run that made
its outputs), so a changed setting changes the stage's fingerprint and every stage downstream of
it, and nothing else; a stage run again with the same settings (its marker deleted by hand, say)
makes new outputs, so the stages downstream of it run again too:

* done with this fingerprint (`.stages/NAME.json`): skipped;
* done, or started, with another fingerprint: run again, its outputs replaced (`overwrite`);
* started with this fingerprint but not done (killed): run again without replacing, so the
  commands resume (training and SAE runs continue from their checkpoints, translation and
  synthesis from their JSON Lines).

A dry run (`dry_run=True`) writes nothing: it says which stages would be skipped or run, and
the stages that run elsewhere (`where="tpu"`) print the commands they would run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxlm.errors import UserError
from jaxlm.train.sections import PREEMPTED_EXIT


@dataclasses.dataclass
class Stage:
    name: str
    settings: dict  # what the outputs depend on, besides the inputs
    deps: tuple[str, ...]  # stages whose outputs this one reads
    run: Callable[[Context], dict]  # -> the stage's result (JSON), kept in its marker
    where: str = "local"  # local | tpu | gpu: where it runs (--plan)
    describe: str = ""  # one line for --plan
    estimate: Callable[[], dict] | None = None  # --plan's figures for this stage


@dataclasses.dataclass
class Context:
    """What a running stage gets: where to write, whether to replace, how to run commands."""

    workdir: Path
    overwrite: bool
    log: Callable[[str], None]
    commands: list[str] = dataclasses.field(default_factory=list)
    stage: str = ""
    dry_run: bool = False  # `run` prints its commands and runs none

    def run(self, argv: Sequence[str], *, tolerate: str | None = None) -> None:
        """Run a command that is not jaxlm (gcloud, tpu/babysit.py), recorded and logged into
        logs/STAGE.log like `jaxlm`'s; a failure is one line naming the log, unless its output
        says `tolerate` (e.g. gcloud's "matched no objects" for a removal of nothing). A dry
        run prints the command and runs nothing."""
        line = shlex.join(argv)
        if self.dry_run:
            print(line, flush=True)
            return
        self.commands.append(line)
        log_path = self.workdir / "logs" / f"{self.stage}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"$ {line}\n")
            f.flush()
            start = f.tell()
            try:
                code = subprocess.run(list(argv), stdout=f, stderr=subprocess.STDOUT).returncode
            except OSError as e:  # not installed (gcloud: the Google Cloud CLI), not executable
                raise UserError(f"{argv[0]}: cannot run it ({e.strerror or e})") from None
        if code == 0:
            return
        with open(log_path) as f:
            f.seek(start)
            said = f.read()
        if tolerate and tolerate in said:
            return
        last = said.strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{Path(argv[0]).name} {' '.join(argv[1:3])} failed (exit {code}): "
                        f"{last[0]} (log: {log_path})")  # fmt: skip

    def jaxlm(self, *args: str, fresh_process: bool = False, overwrite_flag: bool = True) -> None:
        """Run `jaxlm ARGS` (with `--overwrite` when the stage replaces its outputs), its output
        into logs/STAGE.log; a failure is one line naming the log. `fresh_process` runs it in a
        child process (SAE training: a fresh XLA runtime whose memory goes back at its end)."""
        argv = [*args, *(["--overwrite"] if self.overwrite and overwrite_flag else [])]
        self.commands.append(shlex.join(["jaxlm", *argv]))
        log_path = self.workdir / "logs" / f"{self.stage}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"$ {shlex.join(['jaxlm', *argv])}\n")
            f.flush()
            if fresh_process:
                cmd = [sys.executable, "-m", "jaxlm.cli", *argv]
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            else:
                from jaxlm.cli import main

                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    code = main(list(argv))
        if code == PREEMPTED_EXIT:  # the stage is not done; a rerun resumes it
            raise UserError(f"jaxlm {args[0]} stopped by SIGTERM after saving; rerun to resume")
        if code != 0:
            last = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"jaxlm {' '.join(args[:2])} failed: {last[0]} (log: {log_path})")


def fingerprint(stage: Stage, upstream: dict[str, str]) -> str:
    """A hash of the stage's settings and its deps' identities (`upstream`, by name)."""
    text = json.dumps({"settings": stage.settings, "deps": {d: upstream[d] for d in stage.deps}},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity(fp: str, marker: dict | None) -> str:
    """What a stage's dependants' fingerprints read of it: its fingerprint and the run that made
    its outputs (`run`, written when it finished). Markers written before runs were recorded have
    none: their fingerprint alone, as it was then, so such workdirs are not rerun."""
    run = (marker or {}).get("run")
    return fp if run is None else f"{fp}/{run}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it to rerun that stage") from None


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    tmp.replace(path)


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # "done" | "skipped" | "not selected"
    result: dict
    seconds: float
    commands: list[str]


def run_stages(
    stages: Sequence[Stage],
    workdir: Path,
    *,
    only: Callable[[str], bool] | None = None,
    log: Callable[[str], None] = print,
    after_each: Callable[[dict[str, Outcome]], None] | None = None,
    dry_run: bool = False,
) -> dict[str, Outcome]:
    """Run `stages` in order (each after its deps); `only(name)` selects some (their inputs must
    be done already, with the settings they have now). `dry_run`: write nothing, say what would
    run, and let the stages that run elsewhere print their commands (`_dry_one`)."""
    markers = workdir / ".stages"
    if not dry_run:
        markers.mkdir(parents=True, exist_ok=True)
    idents: dict[str, str] = {}  # each stage's `identity`, as its dependants read it
    out: dict[str, Outcome] = {}
    for stage in stages:
        fp = fingerprint(stage, idents)
        done = _read(markers / f"{stage.name}.json")
        started = _read(markers / f"{stage.name}.started.json")
        if done is not None and done.get("fingerprint") == fp:
            log(f"{'# ' if dry_run else ''}[{stage.name}] done already")
            result, secs = done.get("result", {}), done.get("seconds", 0.0)
            out[stage.name] = Outcome(stage.name, "skipped", result, secs, done.get("commands", []))
            idents[stage.name] = identity(fp, done)
        elif only is not None and not only(stage.name):
            out[stage.name] = Outcome(stage.name, "not selected", {}, 0.0, [])
            idents[stage.name] = fp
            continue
        else:
            stale = [d for d in stage.deps if out.get(d) and out[d].status == "not selected"]
            if stale:
                raise UserError(f"stage {stage.name} needs {stale[0]}, which is not done with "
                                "these settings: run it too (or without --only)")  # fmt: skip
            # replaced rather than resumed: outputs made with other settings (done, or a run
            # started with them), or a replacing run that was interrupted (its outputs are
            # partly the old settings'; the commands' own --overwrite resumes what is new)
            changed = (done is not None) or (started is not None and (
                started["fingerprint"] != fp or started.get("changed", False)))  # fmt: skip
            if dry_run:
                out[stage.name] = _dry_one(stage, workdir, changed, log)
                idents[stage.name] = identity(fp, {"run": "(this run)"})  # a new run, unknown
            else:
                out[stage.name], marker = _run_one(stage, fp, workdir, changed, log)
                idents[stage.name] = identity(fp, marker)
        if after_each is not None:
            after_each(out)
    return out


def _run_one(stage: Stage, fp: str, workdir: Path, changed: bool, log) -> tuple[Outcome, dict]:
    markers = workdir / ".stages"
    what = "running again (its settings or inputs changed)" if changed else "running"
    log(f"[{stage.name}] {what} ...")
    _write(markers / f"{stage.name}.started.json", {"fingerprint": fp, "changed": changed})
    (markers / f"{stage.name}.json").unlink(missing_ok=True)
    ctx = Context(workdir, overwrite=changed, log=log, stage=stage.name)
    t0 = time.time()
    result = stage.run(ctx)
    seconds = round(time.time() - t0, 1)
    marker = {"fingerprint": fp, "run": secrets.token_hex(6), "result": result,
              "seconds": seconds, "commands": ctx.commands}  # fmt: skip
    _write(markers / f"{stage.name}.json", marker)
    (markers / f"{stage.name}.started.json").unlink(missing_ok=True)
    log(f"[{stage.name}] {brief(result)}; {seconds} s")
    return Outcome(stage.name, "done", result, seconds, ctx.commands), marker


def _dry_one(stage: Stage, workdir: Path, changed: bool, log) -> Outcome:
    """What running `stage` would do: the commands of a stage that runs elsewhere (printed by
    its own `run` with a dry Context), one comment line for a local one; nothing written."""
    again = " again (its settings or inputs changed)" if changed else ""
    if stage.where != "tpu":
        log(f"# [{stage.name}] would run{again} on this machine: {stage.describe}")
        return Outcome(stage.name, "dry run", {}, 0.0, [])
    log(f"# [{stage.name}] would run{again} on the TPU slice: {stage.describe}")
    ctx = Context(workdir, overwrite=changed, log=log, stage=stage.name, dry_run=True)
    stage.run(ctx)
    return Outcome(stage.name, "dry run", {}, 0.0, ctx.commands)


def brief(result: Any, depth: int = 0) -> str:
    """A stage's result in one line: numbers and short strings, nested one level."""
    if not isinstance(result, dict):
        return str(result)
    parts = []
    for k, v in result.items():
        if isinstance(v, dict) and depth == 0:
            inner = brief(v, 1)
            if inner:
                parts.append(f"{k}: {inner}")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            parts.append(f"{k}={round(v, 3) if isinstance(v, float) else v}")
        elif isinstance(v, str) and len(v) < 20 and "/" not in v:
            parts.append(f"{k}={v}")
    return ", ".join(parts) if depth else "; ".join(parts)
