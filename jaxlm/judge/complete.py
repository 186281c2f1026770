"""Story completions for the judge: cut a story after ~40% of its words, let a model finish it.

TinyStories' protocol: the model sees the beginning of a held-out story and writes the rest; the
judge (`jaxlm.judge.grade`) then reads the beginning, `***`, and the completion.

The completions file is an atomic `jaxlm.outputs.Output` identified by the model
(`jaxlm.checkpoint.model_identity`), the tokenizer's content hash, the stories (fingerprint) and
every setting that changes a completion: grades are made from it, so a rerun with other settings
is refused (not replaced) unless `overwrite`, and one with the same settings finds it done.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from jaxlm.errors import UserError
from jaxlm.store import read_jsonl, write_jsonl


def cut_story(text: str, fraction: float = 0.4) -> tuple[str, str]:
    """(beginning, rest): the story cut after the word nearest `fraction` of its words.

    At least one word stays on each side; the original spacing and newlines are kept.
    """
    words = list(re.finditer(r"\S+", text))
    if len(words) < 2:
        raise ValueError("a story needs at least two words to be cut")
    k = min(len(words) - 1, max(1, round(len(words) * fraction)))
    end = words[k - 1].end()
    return text[:end], text[end:].strip()


def _stories(path: str, field: str) -> Iterator[str]:
    from jaxlm.data.readers import ReadOptions, read

    return read(path, options=ReadOptions(field=field))


def make_judge_inputs(
    checkpoint: str | Path,
    stories: str | Path,
    out_jsonl: str | Path,
    *,
    n: int = 50,
    fraction: float = 0.4,
    min_words: int = 10,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    field: str = "text",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Complete the beginnings of the first `n` stories (>= `min_words` words) with a checkpoint.

    Writes `out_jsonl` (`id`, `prompt`, `completion`, `reference`: the story's true rest,
    `checkpoint`) atomically; returns a small summary (`already_done` when a file made with the
    same settings is there).
    """
    from jaxlm.checkpoint import model_identity
    from jaxlm.outputs import Output, file_fingerprint, say_done
    from jaxlm.tokenizer import tokenizer_sha256

    if not 0 < fraction < 1:
        raise UserError(f"fraction={fraction} must be in (0, 1)")
    if not Path(stories).is_file():
        raise UserError(f"--stories {stories}: no such file")
    settings = {"n": n, "fraction": fraction, "min_words": min_words, "field": field,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                "seed": seed, "batch_size": batch_size}  # fmt: skip
    source = model_identity(checkpoint)
    tok_sha = tokenizer_sha256(tokenizer) if tokenizer else source.get("tokenizer_sha256")
    identity = {"model": source, "tokenizer_sha256": tok_sha,
                "stories": file_fingerprint(stories), **settings}  # fmt: skip
    with Output(out_jsonl, kind="completions", identity=identity, directory=False,
                overwrite=overwrite) as out:  # fmt: skip
        if out.done:
            say_done(out.path)
            return {"out": str(out_jsonl), "written": sum(1 for _ in read_jsonl(out.path)),
                    "already_done": True}  # fmt: skip
        records, skipped = _complete(checkpoint, stories, tokenizer, **settings)
        write_jsonl(out.tmp, records)
        out.publish()
    return {"out": str(out_jsonl), "written": len(records), "skipped": dict(skipped)}


def _complete(
    checkpoint, stories, tokenizer, *, n, fraction, min_words, field, max_new_tokens, temperature,
    top_k, seed, batch_size,
) -> tuple[list[dict], Counter[str]]:  # fmt: skip
    from jaxlm.checkpoint import load_model
    from jaxlm.generate import SamplingConfig, generate
    from jaxlm.tokenizer import load_recorded

    model, info = load_model(checkpoint)
    tok = load_recorded(info, tokenizer, vocab_size=model.cfg.vocab_size, required=True)
    assert tok is not None  # required=True: load_recorded raises rather than return None
    budget = model.cfg.max_positions - max_new_tokens
    items: list[dict] = []  # id, prompt, reference, ids; completion once generated
    skipped: Counter[str] = Counter()
    for i, story in enumerate(_stories(str(stories), field)):
        if len(items) >= n:
            break
        if len(story.split()) < max(2, min_words):
            skipped["too_short"] += 1
            continue
        beginning, rest = cut_story(story, fraction)
        ids = [tok.eos_id] + tok.encode(beginning)  # a story starts right after an EOS
        if len(ids) > budget:
            skipped["too_long"] += 1
            continue
        items.append({"id": f"story-{i:06d}", "prompt": beginning, "reference": rest, "ids": ids})
    if not items:
        raise UserError(f"{stories}: no story with at least {min_words} words")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k)
    for b in tqdm(range(0, len(items), batch_size), desc="complete", unit="batch"):
        batch = items[b : b + batch_size]
        new = generate(
            model, [it["ids"] for it in batch], max_new_tokens=max_new_tokens,
            sampling=sampling, seed=seed + b, eos_id=tok.eos_id, pad_id=tok.pad_id,
        )  # fmt: skip
        for it, toks in zip(batch, new, strict=True):
            it["completion"] = tok.decode([t for t in toks if t != tok.eos_id]).strip()
    records = [
        {"id": it["id"], "prompt": it["prompt"], "completion": it["completion"],
         "reference": it["reference"], "checkpoint": str(checkpoint)}
        for it in items
    ]  # fmt: skip
    return records, skipped
