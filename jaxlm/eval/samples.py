"""Stories sampled from a model, as the demo samples them: one implementation for both.

A story starts right after an EOS (training rows separate stories with EOS only), so each prompt
is EOS followed by an optional story beginning. The stories returned are the model's
continuations only, without the prompt: the artifacts measured are the ones the model wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxlm.errors import UserError
from jaxlm.generate import SamplingConfig
from jaxlm.model import LayerEdits, MLPEdit

DEMO_SAMPLING = SamplingConfig(temperature=0.8, top_k=50)  # as the demo samples


def load_prompts(path: str | Path, field: str = "text") -> list[str]:
    """Story beginnings: a JSON Lines file's `field`, or else one per non-empty line."""
    from jaxlm.data.readers import ReadOptions, read, text_lines

    path = str(path)
    if not Path(path).is_file():
        raise UserError(f"--prompts: no such file {path}")
    if path.lower().endswith((".jsonl", ".json", ".ndjson")):
        prompts = list(read(path, "jsonl", ReadOptions(field=field)))
    else:
        prompts = [line.strip() for _, line in text_lines(path) if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it")
    return prompts


def sample_stories(
    model,
    tok,
    n: int,
    prompts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 160,
    sampling: SamplingConfig = DEMO_SAMPLING,
    seed: int = 0,
    batch_size: int = 64,
    edit: MLPEdit | LayerEdits | None = None,
) -> list[str]:
    """`n` continuations; story i continues prompts[i % len(prompts)] (none: EOS alone).
    Batch b samples with seed `seed + b`, so the stories depend on `batch_size` too. `edit` (an
    `nnx.Module` MLPEdit, e.g. SAE features ablated, or a LayerEdits of several) applies at
    every step: with the same seeds, the edit is the only difference from unedited samples."""
    from jaxlm.generate import generate

    if n < 1 or batch_size < 1:
        raise UserError(f"need n >= 1 and batch size >= 1 (got {n} and {batch_size})")
    begin = [tok.encode(p) for p in prompts] if prompts else [[]]
    ids = [[tok.eos_id, *begin[i % len(begin)]] for i in range(n)]
    stories: list[str] = []
    for b, start in enumerate(range(0, n, batch_size)):
        rows = generate(model, ids[start : start + batch_size], max_new_tokens=max_new_tokens,
                        sampling=sampling, seed=seed + b, eos_id=tok.eos_id,
                        edit=edit)  # fmt: skip
        stories += [tok.decode([t for t in r if t != tok.eos_id]) for r in rows]
    return stories
