"""Next-token loss per data source: repair (native loss falls) and forgetting (translated loss
rises) side by side, instead of one mixed number.

Each source is a prepared DATADIR, read in order (no shuffle) from one split, the same rows every
time; a row's loss is its mean cross-entropy over its seq_len predictions. A source's figure is
the mean over rows, with perplexity exp(loss) and a 95% interval from the spread of row losses
(normal approximation, rows taken as independent: they are consecutive windows of a stream, so
the interval is a little optimistic for stories that span rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError


def source_names(paths: Sequence[str]) -> list[str]:
    """Each DATADIR by its folder's name (`translated`, `native`), made unique with its index."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def row_losses(model, tokens_bt1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of each row [B] (float32) of tokens [B, T + 1]. The logits
    are made one row at a time ([T, V], not [B, T, V]: 25 GB for a 384 x 512 batch at V=32k)."""
    x_btd = model.hidden(tokens_bt1[:, :-1])

    def one(args):
        x_td, targets_t = args
        logits_tv = model.unembed(x_td[None])[0]  # [T, V] float32
        gold_t = jnp.take_along_axis(logits_tv, targets_t[:, None], axis=-1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits_tv, axis=-1) - gold_t)

    return jax.lax.map(one, (x_btd, tokens_bt1[:, 1:]))


def summarize(losses: np.ndarray, seq_len: int) -> dict:
    """{loss, perplexity, ci95, rows, tokens} of row losses."""
    n = len(losses)
    mean = float(np.mean(losses))
    half = 1.96 * float(np.std(losses, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "ci95": [mean - half, mean + half] if n > 1 else None,
        "rows": n,
        "tokens": n * seq_len,
    }


def evaluate_sources(
    losses_fn: Callable[[np.ndarray], np.ndarray],
    sources: Sequence[str],
    *,
    split: str = "validation",
    max_rows: int = 512,
    batch_size: int = 32,
) -> dict[str, dict]:
    """{source name: summary} with `losses_fn(tokens [B, T + 1]) -> row losses [B]` on the first
    `max_rows` rows of each source's `split` (every row when fewer). A source without that split
    is named in one line."""
    from jaxlm.data.pipeline import make_loader, read_metadata

    out = {}
    for name, path in zip(source_names(sources), sources, strict=True):
        meta = read_metadata(path)
        rows = meta["splits"].get(split, {}).get("rows", 0)
        if rows == 0:
            raise UserError(f"{path} has no rows in split {split!r}")
        n = min(rows, max_rows)
        b = min(batch_size, n)
        # the last partial batch kept: "every row when fewer" means every row
        loader = make_loader([(str(path), 1.0)], split=split, batch_size=b, seed=0,
                             shuffle=False, num_epochs=1, drop_remainder=False)  # fmt: skip
        got: list[np.ndarray] = []
        seen = 0
        for batch in loader:
            take = min(len(batch["tokens"]), n - seen)
            got.append(np.asarray(losses_fn(batch["tokens"]))[:take])
            seen += take
            if seen >= n:
                break
        out[name] = {"path": str(path), "split": split,
                     **summarize(np.concatenate(got), meta["seq_len"])}  # fmt: skip
    return out


def model_losses_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """A jitted `row_losses` of a model (for `evaluate_sources`)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        return row_losses(nnx.merge(graphdef, state), tokens)

    return lambda tokens: np.asarray(run(state, jnp.asarray(tokens, jnp.int32)))
