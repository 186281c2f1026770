"""`jaxlm data prepare`: stories -> clean -> tokenise (+EOS) -> pack -> ArrayRecord shards.

Packing is concatenate-and-chunk: each split's token stream (story, EOS, story, EOS, ...) is cut
into rows of `seq_len + 1` int32 tokens (inputs and shifted targets of one training example); the
last partial row is dropped and counted. A story goes to `validation` when its hash falls below
`val_fraction`, so the split is deterministic and does not depend on input order or workers.

Each ArrayRecord record is one row (`group_size:1`, for random access). DATADIR is an atomic
`jaxlm.outputs.Output`: written into a temporary sibling and renamed into place at the end, so a
half-done run is never mistaken for a finished one (and its leftovers are removed by the next run);
its identity is the inputs (fingerprints), reading and cleaning options, the tokenizer's content
hash and the packing settings. A rerun with the same identity finds it done; other settings are
refused unless `overwrite`; two runs on one DATADIR are refused while the first holds its lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxlm.data import readers
from jaxlm.data.cleaning import CleanConfig, CleanStats, clean
from jaxlm.errors import UserError
from jaxlm.outputs import disk_errors
from jaxlm.tokenizer import EOS_ID, Tokenizer

if TYPE_CHECKING:
    from array_record.python.array_record_module import ArrayRecordWriter

SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1"
FORMAT_VERSION = 1


def prepare(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    seq_len: int,
    fmt: str = "auto",
    read_options: readers.ReadOptions | None = None,
    clean_cfg: CleanConfig | None = None,
    val_fraction: float = 0.01,
    rows_per_shard: int = 65536,
    workers: int | None = None,
    chunk_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepares DATADIR from `inputs`; returns (and writes) its metadata. A DATADIR already
    prepared with the same identity is kept: its metadata is returned with `already_done`."""
    from jaxlm.outputs import Output

    if seq_len < 1 or not 0.0 <= val_fraction < 1.0 or rows_per_shard < 1:
        raise UserError("need seq_len >= 1, 0 <= val_fraction < 1 and rows_per_shard >= 1")
    tok = Tokenizer.load(tokenizer_dir)
    clean_cfg = clean_cfg or CleanConfig()
    read_options = read_options or readers.ReadOptions()
    identity = {  # what the rows depend on (not workers nor chunk_size: they do not change them)
        "inputs": readers.inputs_identity(inputs, fmt),  # a missing file: one line, before work
        "read": dataclasses.asdict(read_options), "cleaning": dataclasses.asdict(clean_cfg),
        "tokenizer_sha256": tok.sha256, "seq_len": seq_len, "val_fraction": val_fraction,
        "rows_per_shard": rows_per_shard,
    }  # fmt: skip
    with Output(os.fspath(out_dir), kind="datadir", identity=identity, overwrite=overwrite) as out:
        if out.done:
            from jaxlm.data.pipeline import read_metadata

            return read_metadata(out.path) | {"already_done": True}
        meta = _run(inputs, out.tmp, tok, seq_len, fmt, read_options, clean_cfg, val_fraction,
                    rows_per_shard, workers, chunk_size, progress)  # fmt: skip
        meta["tokenizer"] = {"path": str(Path(tokenizer_dir).resolve()), "sha256": tok.sha256,
                             "vocab_size": tok.vocab_size, "eos_id": EOS_ID}  # fmt: skip
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        (out.tmp / "metadata.json").write_text(text)
        out.publish()
    return meta


def _run(inputs, tmp, tok, seq_len, fmt, read_options, clean_cfg, val_fraction,
         rows_per_shard, workers, chunk_size, progress) -> dict:  # fmt: skip
    from tqdm import tqdm

    sources = [{"input": p, "format": readers.resolve_format(p, fmt), "records": 0} for p in inputs]
    chunks = _chunks(inputs, fmt, read_options, sources, chunk_size)
    writers = {s: _SplitWriter(tmp, s, seq_len + 1, rows_per_shard) for s in SPLITS}
    stats, seen, duplicates = CleanStats(), set(), 0
    t0 = time.time()
    bar = tqdm(desc="prepare", unit=" stories", disable=not progress, smoothing=0.1)
    for results, chunk_stats in _map_chunks(chunks, str(tok.path), clean_cfg, workers):
        stats.update(chunk_stats)
        for digest, ids in results:
            if clean_cfg.dedup:
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            is_val = int.from_bytes(digest, "big") < val_fraction * 2.0**64
            writers["validation" if is_val else "train"].add(ids)
        bar.update(chunk_stats["seen"])
    bar.close()
    stats["removed_duplicate"] = duplicates
    stats["kept"] -= duplicates  # the workers counted them kept: de-dup happens here, after
    splits = {s: w.close() for s, w in writers.items()}
    total = sum(v["stories"] for v in splits.values())
    if total == 0:
        raise UserError(f"no stories left after cleaning (stats: {stats.report()})")
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "dtype": "int32",
        "records": "one row of row_len int32 tokens per ArrayRecord record",
        "stories": total,
        "tokens": sum(v["tokens"] for v in splits.values()),
        "sources": sources,
        "cleaning": dataclasses.asdict(clean_cfg),
        "cleaning_stats": stats.report(),
        "val_fraction": val_fraction,
        "splits": splits,
        "seconds": round(time.time() - t0, 2),
    }


def _chunks(inputs, fmt, options, sources, size) -> Iterator[list[str]]:
    """Raw stories from all inputs in chunks; counts records per source."""
    chunk: list[str] = []
    for path, src in zip(inputs, sources, strict=True):
        for story in readers.read(path, fmt, options):
            src["records"] += 1
            chunk.append(story)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


_WORKER: dict = {}


def _init_worker(model_path: str, clean_cfg: CleanConfig) -> None:
    _WORKER["tok"] = Tokenizer(model_path)
    _WORKER["cfg"] = clean_cfg


def _process_chunk(chunk: list[str]) -> tuple[list[tuple[bytes, np.ndarray]], CleanStats]:
    """Cleans and tokenises one chunk: (8-byte story hash, int32 ids + EOS) per kept story."""
    tok, cfg, stats = _WORKER["tok"], _WORKER["cfg"], CleanStats()
    kept = [c for c in (clean(s, cfg, stats) for s in chunk) if c is not None]
    stats["kept"] += len(kept)
    out = []
    for text, ids in zip(kept, tok.encode_batch(kept), strict=True):
        ids.append(EOS_ID)
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        out.append((digest, np.asarray(ids, np.int32)))
    return out, stats


def _map_chunks(chunks, model_path, clean_cfg, workers) -> Iterator:
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        _init_worker(model_path, clean_cfg)
        yield from map(_process_chunk, chunks)
        return
    ctx = mp.get_context("spawn")  # fork is unsafe once jax or threads are up in the parent
    with ctx.Pool(workers, _init_worker, (model_path, clean_cfg)) as pool:
        # A bounded window of chunks in flight, in order (Pool.imap would read the whole input
        # ahead into its task queue, and a reader's UserError would surface in its thread).
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_process_chunk, (chunk,)))
            if len(pending) >= 8 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Packs one split's token stream into rows and writes them to rotating ArrayRecord shards."""

    def __init__(self, tmp: Path, split: str, row_len: int, rows_per_shard: int):
        self.tmp, self.split, self.row_len, self.rows_per_shard = (
            tmp,
            split,
            row_len,
            rows_per_shard,
        )
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.stories = self.tokens = 0
        self.shard_rows: list[int] = []
        self.writer: ArrayRecordWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        self.stories += 1
        self.tokens += len(ids)
        self.pending.append(ids)
        self.pending_len += len(ids)
        if self.pending_len >= 64 * self.row_len:
            self._flush()

    def _flush(self) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        n_rows = len(stream) // self.row_len
        rows = stream[: n_rows * self.row_len].reshape(n_rows, self.row_len)  # [R, T+1]
        tail = stream[n_rows * self.row_len :]
        self.pending, self.pending_len = [tail], len(tail)
        for row in rows:
            self._write(row.tobytes())

    def _write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        with disk_errors(self.tmp):  # a full disk is a RuntimeError here
            if self.writer is None or self.shard_rows[-1] == self.rows_per_shard:
                if self.writer is not None:
                    self.writer.close()
                path = self.tmp / f"{self.split}-{len(self.shard_rows):05d}.partial"
                self.writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
                self.shard_rows.append(0)
            self.writer.write(record)
        self.shard_rows[-1] += 1

    def close(self) -> dict:
        """Flushes, names shards `{split}-{i:05d}-of-{n:05d}.arrayrecord`, returns split stats."""
        self._flush()
        if self.writer is not None:
            with disk_errors(self.tmp):
                self.writer.close()
        n = len(self.shard_rows)
        names = [f"{self.split}-{i:05d}-of-{n:05d}.arrayrecord" for i in range(n)]
        for i, name in enumerate(names):
            (self.tmp / f"{self.split}-{i:05d}.partial").rename(self.tmp / name)
        return {
            "stories": self.stories,
            "tokens": self.tokens,
            "rows": sum(self.shard_rows),
            "dropped_tail_tokens": self.pending_len,
            "shards": names,
            "rows_per_shard": self.shard_rows,
        }
