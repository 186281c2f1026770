"""Config sections that both trainers (the LM's and the SAE's) share, and the one `--data` parser.

A trainer's config is a frozen dataclass of sections; the sections here mean the same thing in
both, so `--set checkpoint.every=100` or `--data DIR:0.8` read the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxlm.errors import UserError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: SIGTERM stopped a run after saving; rerun to resume


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str  # a DATADIR written by `jaxlm data prepare`
    weight: float = 1.0  # relative mixing weight


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500  # save every N steps (and at the end, and on SIGTERM)
    keep: int = 3  # keep the newest K checkpoints
    async_save: bool = True  # write in the background while training continues


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10  # metrics every N steps (forces a device sync)
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar
    plot: bool = True  # loss-curve PNG in the workdir


@dataclasses.dataclass(frozen=True)
class MeshSection:
    shape: tuple[int, int, int] = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    devices: int = 0  # use only the first N devices (0: all); for comparisons and debugging
    rules: str | None = None  # a rules table YAML; None: jaxlm/sharding.yaml


def parse_data_arg(text: str) -> dict:
    """`DATADIR` or `DATADIR:WEIGHT` -> {"path", "weight"}: the one parser of a --data flag, for
    both trainers. A colon not followed by a number belongs to the path."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": text, "weight": 1.0}


def source_pairs(sources: Sequence[DataSource]) -> list[tuple[str, float]]:
    """(path, weight) pairs for the loader; no sources is the user's to fix."""
    if not sources:
        raise UserError("no training data: pass --data DATADIR[:WEIGHT] or set data.sources")
    return [(s.path, s.weight) for s in sources]


def check_sections(
    sources: Sequence[DataSource], checkpoint: CheckpointSection, log: LogSection
) -> None:
    """The checks both configs' `__post_init__` make on the shared sections."""
    if checkpoint.every < 1 or log.every < 1:
        raise UserError("checkpoint.every and log.every must be >= 1")
    if checkpoint.keep < 1:
        raise UserError(f"checkpoint.keep={checkpoint.keep} must be >= 1")
    for i, src in enumerate(sources):
        if not (math.isfinite(src.weight) and src.weight > 0):
            raise UserError(f"data.sources[{i}] ({src.path}): weight {src.weight} must be > 0")


def read_sources(pairs: Sequence[tuple[str, float]]) -> tuple[dict, int, list[dict]]:
    """(tokenizer entry, seq_len, metadata per source) of DATADIRs that may be mixed in one run:
    the same tokenizer (the same token ids) and the same row length, else a one-line refusal."""
    from jaxlm.data.pipeline import common_tokenizer, read_metadata

    metas = [read_metadata(p) for p, _ in pairs]
    tok = common_tokenizer(metas)
    seq_lens = {m["seq_len"] for m in metas}
    if len(seq_lens) > 1:
        raise UserError(f"the data sources have different seq_len: {sorted(seq_lens)}")
    return tok, seq_lens.pop(), metas


def source_identity(path: str, weight: float, meta: dict) -> dict:
    """What makes a DATADIR the same data: where it is, its weight, and what is in it."""
    from pathlib import Path

    return {"path": str(Path(path).resolve()), "weight": weight, "seq_len": meta["seq_len"],
            "tokens": meta.get("tokens"), "tokenizer_sha256": meta["tokenizer"]["sha256"],
            "rows": {k: v.get("rows") for k, v in meta["splits"].items()}}  # fmt: skip
