"""Training metrics: JSON Lines, TensorBoard, a tqdm bar and a loss-curve PNG (process 0 only)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (the demo redirects it per stage)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _quiet_background_failures(record: logging.LogRecord) -> bool:
    """Drop the echoes of one failed asynchronous checkpoint write (a full disk): Orbax's worker
    threads and asyncio each log every failed array, hundreds of tracebacks, while the trainer
    reports the failure itself, once, with the last good checkpoint."""
    text = record.getMessage()
    if record.name == "asyncio" and "exception was never retrieved" in text:
        return False
    return not (record.name == "absl" and "raised an exception" in text)


def log_to_stderr() -> None:
    """jaxlm's and sae's INFO lines ("resumed from step N", fallbacks) and every library's
    warnings to stderr, for the command-line tools.

    A plain `logging.basicConfig` does nothing once the root logger has a handler, and an
    imported library's `logging.warning` call installs one: the INFO lines were lost.
    """
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    handler.addFilter(_quiet_background_failures)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in ("jaxlm", "sae"):
        logging.getLogger(name).setLevel(logging.INFO)


class MetricsLog:
    def __init__(
        self,
        workdir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        total: int = 0,
        initial: int = 0,
    ):
        self.workdir, self.enabled = Path(workdir), enabled
        self._file = open(self.workdir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tb"))
            except ImportError:
                self._tb = None
        self._bar = tqdm(
            total=total,
            initial=initial,
            disable=not (enabled and progress),
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def write(self, row: dict, step_rows: list[dict] | None = None) -> None:
        if not self.enabled:
            return
        assert self._file is not None  # opened whenever enabled
        rec = {"time": time.time(), **row}
        if step_rows:  # every step's loss, for exact-resume checks and the curve
            for r in step_rows[:-1]:
                self._file.write(json.dumps({"time": rec["time"], **r}) + "\n")
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(k, v, row["step"])
        shown = {k: row[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in row}
        if shown:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self, plot: bool = True) -> None:
        self._bar.close()
        if not self.enabled:
            return
        assert self._file is not None  # opened whenever enabled
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if plot:
            plot_loss(self.workdir / "metrics.jsonl", self.workdir / "loss.png")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return rows


def plot_loss(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}  # later rows win (resumed runs)
    per_source = sorted({k for r in rows for k in r if k.startswith("eval_loss/")})
    series = per_source or ["eval_loss"]  # one validation curve per data source
    evals = {k: {r["step"]: r[k] for r in rows if k in r} for k in series}
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train", lw=1)
    for key, points in evals.items():
        if points:
            name = key.split("/", 1)[1] if "/" in key else ""
            label = f"validation ({name})" if name else "validation"
            ax.plot(sorted(points), [points[s] for s in sorted(points)], "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(metrics).parent.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
