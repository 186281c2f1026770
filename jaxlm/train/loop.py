"""The trainer skeleton that the LM trainer and the SAE trainer both run on.

What a trainer supplies: its state as named pytrees (parameters, optimizer state, ...), a data
iterator with `get_state`/`set_state` (JSON), and a `step(step_number) -> metrics` function that
runs one optimizer step. What the skeleton gives both, identically:

* `jaxlm.checkpoint.Checkpoints` (the one checkpoint manager, in the core so that loading a
  workdir's model uses it too): Orbax checkpoints of the state trees plus the data iterator's
  state and a JSON meta; restore takes the newest readable one. A torn checkpoint is set aside (to
  `checkpoints.unreadable/`) with a warning and the one before is used; but a checkpoint that is
  whole and merely has another state shape (another optimizer, say) is not torn: the rerun is
  refused in one line naming the settings that differ, and nothing is moved.
* `run_loop`: the loop with metrics (JSON Lines, TensorBoard, a progress bar, a loss plot through
  `MetricsLog`), periodic saves, periodic evaluation, a stop on any non-finite metric it is told
  to watch (naming the last good checkpoint; nothing non-finite is saved), and SIGTERM (a TPU
  preemption notice): save at a step every host agrees on, then return `preempted`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax

from jaxlm.checkpoint import SaveFailed
from jaxlm.errors import UserError
from jaxlm.train.metrics_log import MetricsLog
from jaxlm.train.sections import PREEMPTED_EXIT, LogSection  # noqa: F401

log = logging.getLogger("jaxlm.train")


class TrainingDiverged(UserError):
    """A watched metric became NaN or infinite; the last good checkpoint is kept."""


class DataState(Protocol):
    """A data iterator whose position is JSON: Grain loaders and the SAE activation store."""

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def init_distributed() -> None:
    """Join a multi-host run when the environment describes one (TPU pods, or explicit vars)."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAXLM_COORDINATOR"):
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives across processes
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAXLM_COORDINATOR"],
            num_processes=int(os.environ["JAXLM_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXLM_PROCESS_ID"]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        jax.distributed.initialize()  # Cloud TPU VMs: everything comes from the metadata server


class Preemption:
    """SIGTERM (a TPU preemption notice): the loop saves and exits at a step that every host
    agrees on. One process: our handler sets a flag, read at the next step. Several: the notice
    reaches hosts at different steps, and a host that saved alone would wait in Orbax's barrier
    while the others wait in the next step's collectives; JAX's preemption service (the
    coordination service's own SIGTERM handler, so ours is not installed) propagates the notice
    and names the first step all hosts can stop at."""

    def __init__(self, multihost: bool):
        self.multihost = multihost
        self.requested = False
        self._prev: Any = None

    def __enter__(self) -> Preemption:
        def handler(signum, frame):
            self.requested = True

        if not self.multihost:
            try:
                self._prev = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not the main thread
                self._prev = None
        return self

    def stop_at(self, step: int) -> bool:
        """Whether to save and exit after `step`; call it once after every step, on every host."""
        if self.multihost:
            from jax.experimental import multihost_utils

            self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


@dataclasses.dataclass
class Loop:
    """How the loop runs: its length, cadences, and what it watches and saves."""

    start: int  # the step the state is at (0, or the restored step)
    steps: int  # the last step
    log: LogSection
    checkpoint_every: int
    save: Callable[[int, dict], None]  # (step, the latest metrics row) -> save a checkpoint
    wait: Callable[[], None]  # until every save is on disk (they may be asynchronous)
    watch: Mapping[str, str]  # metric -> what to call it when it is not finite
    summarize: Callable[[dict, int, float], dict] = lambda row, steps, seconds: {}
    evaluate: Callable[[int], dict] | None = None  # step -> metrics to log (e.g. eval_loss)
    eval_every: int = 0
    before_step: Callable[[], None] | None = None
    multihost: bool = False
    initial_metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _State:
    """What the loop carries between steps: the latest metrics row and the checkpoints' state."""

    final: dict  # the latest metrics row (with the summary keys)
    last_good: int  # the newest checkpoint known to be on disk (0: none)
    pending: int | None = None  # the newest checkpoint, whose save may still run
    t0: float = 0.0  # when the steps since the last metrics row began
    t0_step: int = 0  # the step they began after


@dataclasses.dataclass
class LoopResult:
    final: dict  # the last metrics row (with the summary keys)
    step: int
    preempted: bool


def run_loop(
    loop: Loop, step_fn: Callable[[int], Mapping[str, Any]], mlog: MetricsLog, where: Path
) -> LoopResult:
    """Run `step_fn(step)` for steps start+1 .. steps; metrics are fetched from the device every
    `log.every` steps (one sync), checked, logged; a checkpoint every `checkpoint_every` steps,
    at the end and on SIGTERM. `where` is the checkpoint directory named in messages."""
    pending: list[tuple[int, Mapping[str, Any]]] = []
    state = _State(
        dict(loop.initial_metrics), loop.start, t0=time.perf_counter(), t0_step=loop.start
    )

    def flush(step: int) -> None:
        rows = [{"step": s, **{k: _py(v) for k, v in m.items()}} for s, m in pending]
        pending.clear()
        if not rows:
            return
        if any(not _finite(row, loop.watch) for row in rows):
            _settle(loop, state, where)  # the saves before stay good: let them finish
            for row in rows:
                _check_finite(row, loop.watch, state.last_good, where)
        seconds = time.perf_counter() - state.t0
        final = dict(rows[-1])
        final.update(loop.summarize(final, step - state.t0_step, seconds))
        state.final = final
        mlog.write(final, step_rows=rows)
        state.t0, state.t0_step = time.perf_counter(), step

    step = loop.start
    with Preemption(loop.multihost) as preempt:
        while step < loop.steps:
            if loop.before_step is not None:
                loop.before_step()
            metrics = step_fn(step)
            step += 1
            pending.append((step, metrics))
            mlog.advance()
            if step % loop.log.every == 0 or step == loop.steps:
                flush(step)
            if loop.evaluate and loop.eval_every and step % loop.eval_every == 0:
                if step < loop.steps:
                    mlog.write({"step": step, **loop.evaluate(step)})
            stop = preempt.stop_at(step)
            if step % loop.checkpoint_every == 0 or step == loop.steps or stop:
                flush(step)
                _save(loop, step, state, where)
            if stop:
                _settle(loop, state, where)
                mlog.note(f"SIGTERM: saved step {step} to {where}; exiting")
                return LoopResult(state.final, step, True)
    _settle(loop, state, where)
    return LoopResult(state.final, step, False)


def _save(loop: Loop, step: int, state: _State, where: Path) -> None:
    """Save a checkpoint; a failed save (the disk is full) stops the run in one line naming the
    last good checkpoint, which stays (Orbax renames a save into place only when it is whole).
    A save starts only once the one before has finished, so that one is then known good."""
    try:
        loop.save(step, state.final)
    except SaveFailed as e:
        raise SaveFailed(f"{e}; stopped: {_good(state.last_good, where)}") from None
    if state.pending is not None:
        state.last_good = state.pending
    state.pending = step


def _settle(loop: Loop, state: _State, where: Path) -> None:
    """Wait for the saves in flight; the one pending is then good."""
    try:
        loop.wait()
    except SaveFailed as e:
        raise SaveFailed(f"{e}; stopped: {_good(state.last_good, where)}") from None
    if state.pending is not None:
        state.last_good, state.pending = state.pending, None


def _good(step: int, where: Path) -> str:
    return f"the last good checkpoint is step {step} in {where}" if step else "none was saved"


def _finite(row: dict, watch: Mapping[str, str]) -> bool:
    return all(math.isfinite(row[k]) for k in watch if k in row)


def _py(v: Any) -> Any:
    """A metric as a Python number (device arrays are fetched here: the loop's one sync)."""
    if isinstance(v, int | float | str) or v is None:
        return v
    return float(v)


def _check_finite(row: dict, watch: Mapping[str, str], last_good: int, where: Path) -> None:
    bad = [what for key, what in watch.items() if key in row and not math.isfinite(row[key])]
    if not bad:
        return
    good = (
        f"The last good checkpoint is step {last_good} in {where}" if last_good
        else "No checkpoint was saved"
    )  # fmt: skip
    raise TrainingDiverged(
        f"{bad[0]} is not finite at step {row['step']}; stopped. {good} (try a lower optim.lr)"
    )
