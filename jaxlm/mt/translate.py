"""Sharded, resumable translation of a story corpus, and the merge of shard outputs.

`run(cfg)` reads the inputs (`jaxlm.mt.io`), keeps this worker's shard, skips every id already in
the output or in its rejected side file, and translates the rest chunk by chunk: the chunk's
stories are split into sentences (`jaxlm.mt.split`, dialogue kept whole), the unique sentences are
sorted by length and translated in batches, and each story is re-joined with its original
whitespace (so sentences and paragraphs keep their order and layout); `source` is the text as
translated, i.e. after ftfy's mojibake repair unless `--no-fix-text`. Each finished story goes
through the filters (`jaxlm.mt.filters`): accepted ones are appended to the output
`{"id", "source", "text"}`, rejected ones to `<out>.rejected.jsonl` `{"id", "reason", "source",
"text"}`, both flushed and fsynced per chunk. Rejected stories are not retried on a rerun unless
`--retry-rejected` (for instance with a bigger beam or model); a later success wins in `merge`.

With `--shard i/N` the output is `<stem>.shard-i-of-N.jsonl` beside `--out`. `merge` joins the
parts and fails unless every input id is accounted for exactly once (translated or rejected).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from jaxlm.errors import UserError
from jaxlm.mt.backends import BackendConfig, load_backend
from jaxlm.mt.filters import REASONS, FilterConfig, check
from jaxlm.mt.io import Story, parse_shard, read_stories, shard_of
from jaxlm.mt.split import split_sentences, strip_piece
from jaxlm.mt.store import JsonlStore, read_jsonl, write_jsonl_atomic


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


def rejected_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejected.jsonl")


def shard_out_path(out: str | Path, shard: str) -> Path:
    out = Path(out)
    i, n = parse_shard(shard)
    return out if n == 1 else out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix or '.jsonl'}")


def _segments(text: str) -> list[tuple[str, str, str]]:
    return [strip_piece(p) for p in split_sentences(text)]


def _translate_chunk(backend, stories: list[Story], batch_size: int) -> list[list[str]]:
    """Translations of each story's sentences (aligned with `_segments`)."""
    segs = [_segments(s.text) for s in stories]
    unique = sorted({core for ss in segs for _, core, _ in ss if core}, key=len)
    done: dict[str, str] = {}
    for b in range(0, len(unique), batch_size):
        batch = unique[b : b + batch_size]
        done.update(zip(batch, backend.translate(batch), strict=True))
    return [[done.get(core, "") for _, core, _ in ss] for ss in segs]


def _join(segs: list[tuple[str, str, str]], outs: list[str]) -> str:
    return "".join(
        lead + out + tail for (lead, _, tail), out in zip(segs, outs, strict=True)
    ).strip()


def _pending(cfg: TranslateConfig, out: Path) -> tuple[list[Story], int, int]:
    stories = read_stories(list(cfg.inputs), cfg.text_field, cfg.id_field)
    i, n = parse_shard(cfg.shard)
    mine = [s for s in stories if shard_of(s.id, n) == i]
    done = {r["id"] for r in read_jsonl(out)}
    skipped = set() if cfg.retry_rejected else {r["id"] for r in read_jsonl(rejected_path(out))}
    todo = [s for s in mine if s.id not in done and s.id not in skipped]
    if cfg.fix_text:
        import ftfy

        todo = [Story(s.id, ftfy.fix_text(s.text)) for s in todo]
    return (todo[: cfg.limit] if cfg.limit else todo), len(mine), len(done)


def run(cfg: TranslateConfig) -> dict:
    """Translate this worker's pending stories; returns the stats (also printed as JSON)."""
    out = shard_out_path(cfg.out, cfg.shard)
    todo, n_mine, n_done = _pending(cfg, out)
    stats = {"out": str(out), "shard_stories": n_mine, "already_done": n_done, "todo": len(todo)}
    stats |= {"accepted": 0, "rejected": {r: 0 for r in cfg.filters.enabled}}
    if not todo:
        return stats
    backend = load_backend(cfg.backend)
    t0 = time.perf_counter()
    with JsonlStore(out) as good, JsonlStore(rejected_path(out)) as bad:
        bar = tqdm(total=len(todo), desc="translate", unit="story")
        for k in range(0, len(todo), cfg.chunk_stories):
            chunk = todo[k : k + cfg.chunk_stories]
            accepted, rejected = [], []
            for story, outs in zip(
                chunk, _translate_chunk(backend, chunk, cfg.batch_size), strict=True
            ):
                segs = _segments(story.text)
                text = _join(segs, outs)
                reason = check([c for _, c, _ in segs], outs, cfg.backend.tgt, cfg.filters)
                rec = {"id": story.id, "source": story.text, "text": text}
                if reason:
                    rejected.append({"id": story.id, "reason": reason} | rec)
                    stats["rejected"][reason] += 1
                else:
                    accepted.append(rec)
            stats["accepted"] += good.append(accepted)
            bad.append(rejected)
            bar.update(len(chunk))
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


def merge(parts: list[str], out: str, inputs: list[str] | None = None, **read_kw) -> dict:
    """Join shard outputs; every id once, and (given the inputs) every input id accounted for."""
    translated: dict[str, dict] = {}
    for p in parts:
        if not Path(p).is_file():
            raise UserError(f"part {p} not found")
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
    n = write_jsonl_atomic(out, (translated[i] for i in order))
    write_jsonl_atomic(rejected_path(Path(out)), rejected.values())
    return {"out": out, "translated": n, "rejected": len(rejected), "parts": len(parts)}


def _translate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="translate.py", description="Translate stories (NLLB/M2M100).")
    p.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    p.add_argument("--out", required=True, help="output .jsonl (append-only, resumable)")
    p.add_argument("--model", default="facebook/nllb-200-3.3B")
    p.add_argument("--src", default="eng_Latn")
    p.add_argument("--tgt", default="arb_Arab")
    p.add_argument("--backend", choices=["transformers", "ctranslate2"], default="transformers")
    p.add_argument("--shard", default="", help="i/N: translate the i-th of N disjoint parts")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"]
    )
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-stories", type=int, default=256)
    p.add_argument("--max-input-tokens", type=int, default=256)
    p.add_argument("--len-ratio", type=float, default=2.0)
    p.add_argument("--len-extra", type=int, default=10)
    p.add_argument("--filters", default=",".join(REASONS), help="comma list, or 'none'")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--no-fix-text", action="store_true", help="do not repair mojibake (ftfy)")
    p.add_argument("--retry-rejected", action="store_true")
    p.add_argument("--ct2-cache", default="")
    p.add_argument("--limit", type=int, default=0)
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="translate.py merge", description="Merge shard outputs.")
    p.add_argument("parts", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--input",
        action="append",
        help="an input file (repeatable): check every id is accounted for",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    return p


def config_from_args(a: argparse.Namespace) -> TranslateConfig:
    filters = () if a.filters == "none" else tuple(f for f in a.filters.split(",") if f)
    try:
        fcfg = FilterConfig(enabled=filters)
    except ValueError as e:
        raise UserError(f"--filters: {e}") from e
    bcfg = BackendConfig(
        model=a.model, src=a.src, tgt=a.tgt, kind=a.backend, device=a.device, dtype=a.dtype,
        beam=a.beam, max_input_tokens=a.max_input_tokens, len_ratio=a.len_ratio,
        len_extra=a.len_extra, ct2_cache=a.ct2_cache,
    )  # fmt: skip
    return TranslateConfig(
        inputs=tuple(a.input), out=a.out, backend=bcfg, filters=fcfg, shard=a.shard,
        batch_size=a.batch_size, chunk_stories=a.chunk_stories, text_field=a.text_field,
        id_field=a.id_field, fix_text=not a.no_fix_text, retry_rejected=a.retry_rejected,
        limit=a.limit,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["merge"]:
            a = _merge_parser().parse_args(argv[1:])
            stats = merge(a.parts, a.out, a.input, text_field=a.text_field, id_field=a.id_field)
        else:
            stats = run(config_from_args(_translate_parser().parse_args(argv)))
    except UserError as e:
        print(f"translate.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, ensure_ascii=False))
    return 0
