"""The Grain input pipeline over prepared DATADIRs: shuffle, shard, mix, batch, resume.

Per source, the row *indices* are sharded by process (process i of n takes rows i, i+n, ...: a
disjoint part, all of them together), globally shuffled with the seed (reshuffled each epoch) and
repeated; several sources are mixed by weight (`grain.MapDataset.mix`, deterministic); then whole
batches of indices are read with one batched ArrayRecord `__getitems__` per source and decoded with
one `np.frombuffer`, so there is no per-row Python work beyond the index shuffle.

The loader is Grain's checkpointable iterator: `get_state()` is a JSON-serialisable dict and
`set_state()` resumes with exactly the batches an uninterrupted run would give.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxlm.errors import UserError

if TYPE_CHECKING:
    from array_record.python.array_record_data_source import ArrayRecordDataSource

_SOURCE_SHIFT = 40  # index code = source << 40 | row: up to 2**40 rows per source


def read_metadata(datadir: str | os.PathLike) -> dict:
    """The `metadata.json` of a DATADIR written by `jaxlm data prepare`."""
    path = Path(datadir) / "metadata.json"
    if not path.is_file():
        raise UserError(f"{datadir} is not a prepared DATADIR (no metadata.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    missing = [k for k in ("tokenizer", "seq_len", "splits") if k not in meta]
    if missing or "sha256" not in meta["tokenizer"]:
        raise UserError(f"{path}: not a metadata.json of `jaxlm data prepare` (no {missing})")
    return meta


def common_tokenizer(metas: list[dict]) -> dict:
    """The `tokenizer` entry that every DATADIR's metadata shares: sources mixed in one run must
    hold the same token ids."""
    if len({m["tokenizer"]["sha256"] for m in metas}) > 1:
        raise UserError("the data sources were tokenised with different tokenizers")
    return metas[0]["tokenizer"]


class _ReadBatch:
    """Index codes [B] -> {"tokens": int32[B, T+1]}; opens the ArrayRecord files lazily."""

    def __init__(self, paths: list[list[str]], row_len: int):
        self.paths, self.row_len = paths, row_len
        self._sources: list[ArrayRecordDataSource] | None = None

    def __getstate__(self):  # picklable for worker processes: reopen there
        return {"paths": self.paths, "row_len": self.row_len, "_sources": None}

    def __call__(self, codes: np.ndarray) -> dict[str, np.ndarray]:

        if self._sources is None:
            self._sources = [_open_shards(p) for p in self.paths]
        src, rows = codes >> _SOURCE_SHIFT, codes & ((1 << _SOURCE_SHIFT) - 1)
        out = np.empty((len(codes), self.row_len), np.int32)  # [B, T+1]
        for s in np.unique(src):
            where = np.flatnonzero(src == s)
            try:
                records = self._sources[s].__getitems__(rows[where].tolist())
                out[where] = np.frombuffer(b"".join(records), np.int32).reshape(len(where), -1)
            except (RuntimeError, ValueError) as e:  # a damaged chunk, or rows of another size
                where_ = Path(self.paths[s][0]).parent
                raise UserError(f"{where_}: a shard is corrupt ({_first_line(e)}); prepare the "
                                "data again") from None  # fmt: skip
        return {"tokens": out}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _open_shards(paths: list[str]):
    """An ArrayRecord data source over a split's shards; a damaged one is one line naming it."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    try:
        return ArrayRecordDataSource(paths)
    except (RuntimeError, OSError, ValueError):
        for p in paths:  # which one
            try:
                ArrayRecordDataSource([p])
            except (RuntimeError, OSError, ValueError) as e:
                raise UserError(f"{p}: not a readable ArrayRecord shard ({_first_line(e)}); "
                                "prepare the data again") from None  # fmt: skip
        raise


def check_shards(datadir: str | os.PathLike, meta: dict, split: str) -> list[str]:
    """The split's shard paths, each opened once (its footer read) and its rows counted against
    the metadata: a missing, truncated or damaged shard is one line now, not an error in a
    loader thread later."""
    info = meta["splits"][split]
    paths = [str(Path(datadir) / s) for s in info["shards"]]
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p}: missing (listed in {Path(datadir) / 'metadata.json'})")
    n = len(_open_shards(paths))
    if n != info["rows"]:
        raise UserError(f"{datadir} [{split}]: the shards hold {n} rows, metadata.json says "
                        f"{info['rows']}; prepare the data again")  # fmt: skip
    return paths


class Loader:
    """Iterable over batches `{"tokens": int32[batch_size, seq_len + 1]}` with exact resume."""

    def __init__(self, dataset, seq_len: int, metadata: list[dict]):
        self._dataset = dataset
        self._iter = iter(dataset)
        self.seq_len = seq_len
        self.metadata = metadata[0] if len(metadata) == 1 else metadata

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """A JSON-serialisable position; pass it to `set_state` to resume exactly there."""
        return _jsonable(self._iter.get_state())

    def set_state(self, state: dict | bytes | str) -> None:
        if isinstance(state, bytes | str):
            state = json.loads(state)
        self._iter.set_state(state)


def _jsonable(state: dict) -> dict:
    return json.loads(json.dumps(state))  # a copy, and a check that it serialises


def make_loader(
    sources: Sequence[tuple[str, float]],
    *,
    split: str,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    slice_global_batch: bool = False,
    drop_remainder: bool = True,
) -> Loader:
    """A loader over (DATADIR, weight) `sources`; `batch_size` is per process.

    Weights are relative (normalised to sum to one). `num_epochs=None` repeats forever; otherwise
    the loader stops when the first source runs out. `worker_count > 0` decodes in that many
    worker processes (Grain `mp_prefetch`); 0 reads in background threads of this process.

    `slice_global_batch=True` (what the trainer uses): every process walks the same global
    order of batches of `batch_size * process_count` rows and reads only its own slice, so the
    data a run sees does not depend on how many hosts feed it (1 host x 8 devices trains exactly
    like 2 hosts x 4 devices, and a run may resume on another topology).

    `drop_remainder=False` (with `num_epochs`): the last batch holds the rows left over, fewer
    than `batch_size`, for readers that must see every row (`sae.analysis.dashboards.read_rows`);
    training keeps every batch full. Not with `slice_global_batch`: a short global batch would
    leave the processes slices of different sizes, some empty.
    """
    import grain

    if not sources:
        raise UserError("make_loader needs at least one (datadir, weight) source")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    if slice_global_batch and not drop_remainder:
        raise ValueError("drop_remainder=False needs slice_global_batch=False")
    metas = [read_metadata(d) for d, _ in sources]
    row_lens = {m["row_len"] for m in metas}
    if len(row_lens) != 1:
        raise UserError(f"sources have different seq_len: {[m['seq_len'] for m in metas]}")
    paths, datasets = [], []
    for i, ((datadir, _), meta) in enumerate(zip(sources, metas, strict=True)):
        if split not in meta["splits"] or meta["splits"][split]["rows"] == 0:
            hint = " (prepare it with a larger --val-fraction)" if split == "validation" else ""
            raise UserError(f"{datadir} has no rows in split {split!r}{hint}")
        paths.append(check_shards(datadir, meta, split))
        ds = grain.MapDataset.range(meta["splits"][split]["rows"])
        if not slice_global_batch:
            ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise UserError(f"{datadir} [{split}] has fewer rows than processes")
        if shuffle:
            ds = ds.shuffle(seed=(seed * 1_000_003 + i) % 2**32)
        ds = ds.repeat(num_epochs).map(_SourceCode(i))
        datasets.append(ds)
    weights = [float(w) for _, w in sources]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    if slice_global_batch:
        ds = ds.batch(batch_size * process_count, drop_remainder=True, batch_fn=_stack_codes)
        ds = ds.map(_Slice(process_index * batch_size, (process_index + 1) * batch_size))
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack_codes)
    ds = ds.map(_ReadBatch(paths, row_lens.pop()))
    read = grain.ReadOptions(num_threads=2 if worker_count == 0 else 1, prefetch_buffer_size=8)
    ids = ds.to_iter_dataset(read)
    if worker_count > 0:
        _parse_absl_flags()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Loader(ids, metas[0]["seq_len"], metas)


def _parse_absl_flags() -> None:
    """Grain's worker processes read absl flags, which a non-absl program never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _SourceCode:
    def __init__(self, source: int):
        self.offset = source << _SOURCE_SHIFT

    def __call__(self, row: int) -> int:
        return self.offset | int(row)


class _Slice:
    """This process's rows [start, stop) of a global batch of index codes."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        return codes[self.start : self.stop]


def _stack_codes(codes: Sequence[int]) -> np.ndarray:
    return np.asarray(codes, np.int64)
