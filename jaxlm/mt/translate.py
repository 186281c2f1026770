"""Sharded, resumable translation of a story corpus, and the merge of shard outputs.

`run(cfg)` reads the inputs (`jaxlm.mt.io`), keeps this worker's shard, skips every id already in
the output or in its rejected side file, and translates the rest chunk by chunk: the chunk's
stories are split into sentences (`jaxlm.mt.split`, dialogue kept whole), the unique sentences are
sorted by (length, text) and translated in batches, and each story is re-joined with its original
whitespace (so sentences and paragraphs keep their order and layout); `source` is the text as
translated, i.e. after ftfy's mojibake repair unless `--no-fix-text`.

Each finished story goes through the filters (`jaxlm.mt.filters`): accepted ones are appended to
the output `{"id", "source", "text"}`, rejected ones to `<out>.rejected.jsonl` `{"id", "reason",
"source", "text"}`, both flushed and fsynced per chunk. Rejected stories are not retried on a rerun
unless `--retry-rejected` (for instance with a bigger beam or model); a later success wins in
`merge`.

Chunks are fixed slices of the shard's stories (`chunk_stories` each, in input order), not of what
is left to do: a chunk with anything left is translated whole, and only its pending stories are
written. So every sentence meets the same batch on a resume (after a kill mid-chunk, or a run cut
short by `--limit`) as in an uninterrupted run, and the output is byte-identical, even where the
batch would move a logit in its last bits (see `jaxlm.mt.backends`); a resume redoes at most the
one chunk it was in. `--retry-rejected` is the exception: its stories are chunked among
themselves (a retry is meant to run with other settings, so it is not a replay).

With `--shard i/N` the output is `<stem>.shard-i-of-N.jsonl` beside `--out`. `merge` joins the
parts and fails unless every input id is accounted for exactly once (translated or rejected).

Each shard's output is a resumable `jaxlm.outputs.Output` (a file): its lock keeps a second
worker off it, naming the first, and its identity (`translation_identity`: the model, languages,
backend, beam, length settings, filters and ftfy; not the inputs, as a shard may be resumed with
more of them) refuses a rerun with other settings, except `--retry-rejected`, whose settings are
added to the record's history instead. `--overwrite` starts the shard (and its rejected file)
afresh. The merge is an atomic output identified by its parts' and inputs' fingerprints.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxlm.errors import UserError
from jaxlm.mt.backends import BackendConfig, load_backend
from jaxlm.mt.filters import FilterConfig, check
from jaxlm.mt.io import Story, parse_shard, read_stories, shard_of
from jaxlm.mt.split import split_sentences, strip_piece
from jaxlm.outputs import (
    Output,
    file_fingerprint,
    read_identity,
    refuse_if_being_written,
    say_done,
)
from jaxlm.store import JsonlStore, read_jsonl, write_jsonl


@dataclass(frozen=True)
class TranslateConfig:
    """One translation worker."""

    inputs: tuple[str, ...]
    out: str
    backend: BackendConfig
    filters: FilterConfig = field(default_factory=FilterConfig)
    shard: str = ""  # "i/N"
    batch_size: int = 64  # sentences per generate call
    chunk_stories: int = 256  # stories per write (flush + fsync)
    text_field: str = "text"
    id_field: str = "id"
    fix_text: bool = True  # repair mojibake (ftfy) before translating
    retry_rejected: bool = False
    limit: int = 0  # translate at most this many stories (0: all)
    overwrite: bool = False  # start the shard's output afresh instead of resuming it


def rejected_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejected.jsonl")


def shard_out_path(out: str | Path, shard: str) -> Path:
    out = Path(out)
    i, n = parse_shard(shard)
    return out if n == 1 else out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix or '.jsonl'}")


def _segments(text: str) -> list[tuple[str, str, str]]:
    return [strip_piece(p) for p in split_sentences(text)]


def _translate_chunk(backend, stories: list[Story], batch_size: int) -> list[list[str]]:
    """Translations of each story's sentences (aligned with `_segments`).

    The unique sentences are sorted by (length, text), so the batches depend on the chunk's
    stories alone (not on set order, which varies with the process's hash seed).
    """
    segs = [_segments(s.text) for s in stories]
    unique = sorted({core for ss in segs for _, core, _ in ss if core}, key=lambda t: (len(t), t))
    done: dict[str, str] = {}
    for b in range(0, len(unique), batch_size):
        batch = unique[b : b + batch_size]
        done.update(zip(batch, backend.translate(batch), strict=True))
    return [[done.get(core, "") for _, core, _ in ss] for ss in segs]


def _join(segs: list[tuple[str, str, str]], outs: list[str]) -> str:
    return "".join(
        lead + out + tail for (lead, _, tail), out in zip(segs, outs, strict=True)
    ).strip()


@dataclass(frozen=True)
class _Chunk:
    """Stories translated together, and the ids among them whose results are written."""

    stories: list[Story]
    write: frozenset[str]


def _plan(cfg: TranslateConfig, out: Path) -> tuple[list[_Chunk], int, int]:
    """(chunks with work left, stories in this shard, ids already done)."""
    stories = read_stories(list(cfg.inputs), cfg.text_field, cfg.id_field)
    i, n = parse_shard(cfg.shard)
    mine = [s for s in stories if shard_of(s.id, n) == i]
    done = {r["id"] for r in read_jsonl(out)}
    skipped = set() if cfg.retry_rejected else {r["id"] for r in read_jsonl(rejected_path(out))}
    pending = [s for s in mine if s.id not in done and s.id not in skipped]
    if cfg.limit:
        pending = pending[: cfg.limit]
    want = {s.id for s in pending}
    base = pending if cfg.retry_rejected else mine
    slices = [base[k : k + cfg.chunk_stories] for k in range(0, len(base), cfg.chunk_stories)]
    chunks = []
    for stories in slices:
        write = frozenset(s.id for s in stories) & want
        if write:
            if cfg.fix_text:
                import ftfy

                stories = [Story(s.id, ftfy.fix_text(s.text)) for s in stories]
            chunks.append(_Chunk(stories, write))
    return chunks, len(mine), len(done)


def _chunk_records(
    backend, chunk: _Chunk, cfg: TranslateConfig, stats: dict
) -> tuple[list[dict], list[dict]]:
    """(accepted, rejected) records of the chunk's stories to write."""
    accepted, rejected = [], []
    outs_all = _translate_chunk(backend, chunk.stories, cfg.batch_size)
    for story, outs in zip(chunk.stories, outs_all, strict=True):
        if story.id not in chunk.write:
            continue
        segs = _segments(story.text)
        text = _join(segs, outs)
        reason = check([c for _, c, _ in segs], outs, cfg.backend.tgt, cfg.filters)
        rec = {"id": story.id, "source": story.text, "text": text}
        if reason:
            rejected.append({"id": story.id, "reason": reason} | rec)
            stats["rejected"][reason] += 1
        else:
            accepted.append(rec)
    return accepted, rejected


def translation_identity(cfg: TranslateConfig) -> dict:
    """The settings a shard's translations depend on (what a resume must keep)."""
    b = cfg.backend
    model = str(Path(b.model).resolve()) if Path(b.model).exists() else b.model
    return {"model": model, "src": b.src, "tgt": b.tgt, "backend": b.kind, "beam": b.beam,
            "max_input_tokens": b.max_input_tokens, "len_ratio": b.len_ratio,
            "len_extra": b.len_extra, "min_new_tokens": b.min_new_tokens,
            "filters": dataclasses.asdict(cfg.filters), "fix_text": cfg.fix_text}  # fmt: skip


def _output(cfg: TranslateConfig, out: Path) -> Output:
    """The shard's output; a `--retry-rejected` run resumes it under its recorded identity."""
    identity = translation_identity(cfg)
    saved = read_identity(out, directory=False) if out.is_file() else None
    if cfg.retry_rejected and not cfg.overwrite and saved and saved.get("kind") == "translation":
        identity = saved["identity"]
    return Output(out, kind="translation", identity=identity, mode="resume", directory=False,
                  overwrite=cfg.overwrite)  # fmt: skip


def run(cfg: TranslateConfig) -> dict:
    """Translate this worker's pending stories; returns the stats (also printed as JSON)."""
    out = shard_out_path(cfg.out, cfg.shard)
    with _output(cfg, out) as owned:
        out.touch()  # a shard with nothing to do is an (empty) part too, with its identity
        if cfg.overwrite:
            rejected_path(out).unlink(missing_ok=True)
        if cfg.retry_rejected:
            owned.add_history({"retry_rejected": translation_identity(cfg)})
        return _run(cfg, out)


def _run(cfg: TranslateConfig, out: Path) -> dict:
    chunks, n_mine, n_done = _plan(cfg, out)
    todo = sum(len(c.write) for c in chunks)
    stats: dict[str, Any] = {"out": str(out), "shard_stories": n_mine, "already_done": n_done}
    stats |= {"todo": todo, "accepted": 0, "rejected": {r: 0 for r in cfg.filters.enabled}}
    if not todo:
        return stats
    backend = load_backend(cfg.backend)
    t0 = time.perf_counter()
    with JsonlStore(out, lock=False) as good, JsonlStore(rejected_path(out)) as bad:
        bar = tqdm(total=todo, desc="translate", unit="story")
        for chunk in chunks:
            accepted, rejected = _chunk_records(backend, chunk, cfg, stats)
            stats["accepted"] += good.append(accepted)
            bad.append(rejected)
            bar.update(len(chunk.write))
            bar.set_postfix(
                sent_s=f"{backend.counters.sentences / max(1e-9, bar.format_dict['elapsed']):.1f}"
            )
        bar.close()
    secs = time.perf_counter() - t0
    c = backend.counters
    stats |= {"seconds": round(secs, 2), "sentences": c.sentences, "truncated_inputs": c.truncated}
    stats |= {"sentences_per_s": round(c.sentences / secs, 2)}
    stats |= {"tokens_per_s": round((c.input_tokens + c.output_tokens) / secs, 1)}
    stats |= {"output_tokens_per_s": round(c.output_tokens / secs, 1)}
    return stats


def merge(
    parts: list[str], out: str, inputs: list[str] | None = None, overwrite: bool = False, **read_kw
) -> dict:
    """Join shard outputs; every id once, and (given the inputs) every input id accounted for.
    The merged file and its rejected file are atomic outputs; made already from the same parts
    and inputs (fingerprints), they are kept."""
    for p in parts:
        if not Path(p).is_file():
            raise UserError(f"part {p} not found")
    identity = {"parts": [file_fingerprint(p) for p in parts],
                "rejected": [file_fingerprint(rejected_path(Path(p))) for p in parts],
                "inputs": [file_fingerprint(p) for p in inputs or []], **read_kw}  # fmt: skip
    if Path(out).resolve() in {Path(p).resolve() for p in parts}:
        raise UserError(f"--out {out} is one of the parts; merge into another file")
    for p in parts:  # a part still being translated is refused, naming its worker
        refuse_if_being_written(Path(p).resolve())
    with (
        Output(
            out, kind="translation-merge", identity=identity, directory=False, overwrite=overwrite
        ) as merged,
        Output(
            rejected_path(Path(out)), kind="translation-merge-rejected", identity=identity,
            directory=False, overwrite=overwrite,
        ) as rejects,
    ):  # fmt: skip
        if merged.done and rejects.done:
            say_done(merged.path)
            n = sum(1 for _ in read_jsonl(merged.path))
            n_rej = sum(1 for _ in read_jsonl(rejects.path))
            return {"out": out, "translated": n, "rejected": n_rej, "parts": len(parts),
                    "already_done": True}  # fmt: skip
        translated, rejected = _join_parts(parts, inputs, read_kw)
        n = write_jsonl(merged.tmp, translated)
        write_jsonl(rejects.tmp, rejected)
        rejects.publish()
        merged.publish()
    return {"out": out, "translated": n, "rejected": len(rejected), "parts": len(parts)}


def _join_parts(parts: list[str], inputs: list[str] | None, read_kw: dict):
    """(translated records in input order, rejected records): every id once."""
    translated: dict[str, dict] = {}
    for p in parts:
        for r in read_jsonl(p):
            if r["id"] in translated:
                raise UserError(f"id {r['id']!r} appears twice (again in {p})")
            translated[r["id"]] = r
    rejected = {}
    for p in parts:
        for r in read_jsonl(rejected_path(Path(p))):
            if r["id"] not in translated:
                rejected[r["id"]] = r
    order = list(translated)
    if inputs:
        expected = [s.id for s in read_stories(inputs, **read_kw)]
        missing = [i for i in expected if i not in translated and i not in rejected]
        extra = set(translated) - set(expected)
        if missing or extra:
            raise UserError(
                f"merge: {len(missing)} input ids missing (e.g. {missing[:3]}), "
                f"{len(extra)} unknown ids (e.g. {sorted(extra)[:3]}); finish or fix the shards"
            )
        order = [i for i in expected if i in translated]
    return [translated[i] for i in order], list(rejected.values())
