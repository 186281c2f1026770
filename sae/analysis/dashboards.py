"""Feature dashboards: what makes an SAE feature fire, and what it makes the model say.

Per feature: activation density over a stream of token rows, the top-k activating contexts (a
window of tokens around the maximum, each token shaded by the feature's activation there) and the
tokens its decoder direction promotes and suppresses most
(`sae.analysis.tsea.feature_vocab_projection`).
Written as JSON and as one static HTML page (all text escaped; `dir="auto"` lets the browser lay
out Arabic right to left). Sized for the demo: a few hundred features over a few thousand rows on
a CPU.

The JSON keeps each token's own text (`tsea.display_texts`: a byte-fallback piece stays `<0xC2>`),
so positions and activations index tokens. The page shows what a person reads instead
(`shown_tokens`): a character the tokenizer wrote as several byte pieces (the demo's `»` is
`<0xC2><0xBB>`) appears once, decoded, and a byte that is no character on its own (a lone `<0xC2>`
among the promoted tokens) as `‹byte C2›`. A context whose window cuts a character keeps the
pieces just outside it that complete it ("before"/"after"), so that character reads too.

The SAE is a `sae.base.SAE` of any registered architecture, as `sae.io.load_sae` gives it: its
own `encode` gives the activations (of the model's MLP post-activation, captured by
`sae.activations.capture_fn`) and its `W_dec_sf` the logit directions, so a new variant needs
nothing here.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError
from jaxlm.tokenizer import BOS, EOS, PAD, UNK
from sae.activations import capture_fn
from sae.analysis.attribution import piece_byte, row_text, text_bytes
from sae.base import SAE

# --- activations --------------------------------------------------------------------------------


def feature_acts_fn(model, sae: SAE, layer: int, features: Sequence[int] | np.ndarray):
    """A tokens [B, T] -> activations [B, T, len(features)] of `features`, through the model's
    `layer` MLP post-activation (`sae.activations.capture_fn`) and the SAE's own `encode`."""
    run = feature_acts_layers_fn(model, [(sae, layer, features)])
    return lambda tokens_bt: run(tokens_bt)[0]


def firing_count_fn(model, sae: SAE, layer: int):
    """A tokens [B, T] -> int64 [S]: at how many of the B * T positions each feature fires
    (activation > 0), counted on the device so [B, T, S] activations never reach the host (on the
    demo's models `sae tsea-compare` took the same time either way: its cost is the forward)."""
    capture = capture_fn(model, layer)
    graphdef, state = nnx.split(sae)

    @jax.jit
    def count(state, h_nf):
        return (nnx.merge(graphdef, state).encode(h_nf) > 0).sum(0, dtype=jnp.int32)  # [S]

    def run(tokens_bt: np.ndarray) -> np.ndarray:
        return np.asarray(count(state, capture(jnp.asarray(tokens_bt, jnp.int32))), np.int64)

    return run


def rows_read(datadir: str | Path, *, split: str = "train", max_rows: int = 2048) -> int:
    """How many rows `read_rows` yields: `max_rows`, or every row of the split when it has
    fewer. `sae tsea-compare` and `sae match` check a saved attribution's row count against it."""
    from jaxlm.data.pipeline import read_metadata

    rows = read_metadata(datadir)["splits"].get(split, {}).get("rows", 0)
    if rows == 0:
        raise UserError(f"{datadir}: no rows in split {split!r}")
    return min(max_rows, rows)


def read_rows(
    datadir: str | Path, *, split: str = "train", max_rows: int = 2048, batch_size: int = 32
) -> Iterator[np.ndarray]:
    """Batches [B, T] of token rows from a prepared DATADIR, in order: the first `rows_read`
    rows, every one of them. All batches hold `batch_size` rows but the last, which holds what is
    left (the loader keeps its remainder: dropping it lost 21 of the demo's 1,397 held-out rows).

    A prepared row holds T + 1 tokens (inputs and shifted targets); the first T are used.
    """
    from jaxlm.data.pipeline import make_loader

    n = rows_read(datadir, split=split, max_rows=max_rows)
    batch_size = min(batch_size, n)
    loader = make_loader(
        [(str(datadir), 1.0)],
        split=split,
        batch_size=batch_size,
        seed=0,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
    )
    seen = 0
    for batch in loader:
        take = min(len(batch["tokens"]), n - seen)
        yield batch["tokens"][:take, :-1]
        seen += take
        if seen >= n:
            return


# --- dashboards ---------------------------------------------------------------------------------


EDGE = 3  # tokens kept either side of a window: a UTF-8 character has <= 3 bytes after its first


@dataclasses.dataclass
class ContextStore:
    """The running top-k activating contexts of a set of features.

    Besides each window, the `EDGE` tokens either side of it (`edge_tokens`): where the window
    cuts a character written as byte pieces, they hold its other bytes (`_contexts`).
    """

    k: int
    left: int
    right: int
    n_features: int

    def __post_init__(self):
        S, k, W = self.n_features, self.k, self.left + self.right + 1
        self.values = np.full((S, k), -np.inf, np.float32)  # [S, k], best first
        self.rows = np.full((S, k), -1, np.int64)  # global row index
        self.positions = np.full((S, k), -1, np.int64)
        self.window_tokens = np.full((S, k, W), -1, np.int32)  # -1: outside the row
        self.window_acts = np.zeros((S, k, W), np.float32)
        self.edge_tokens = np.full((S, k, 2, EDGE), -1, np.int32)  # before, after; -1 as above
        self.active = np.zeros(S, np.int64)  # tokens with activation > 0
        self.tokens = 0
        self.max_act = np.zeros(S, np.float32)

    def add(self, tokens_bt: np.ndarray, acts_bts: np.ndarray, row0: int) -> None:
        """Fold in a batch: tokens [B, T], activations [B, T, S], its first row's index."""
        B, T, S = acts_bts.shape
        self.tokens += B * T
        self.active += (acts_bts > 0).reshape(-1, S).sum(0)
        self.max_act = np.maximum(self.max_act, acts_bts.reshape(-1, S).max(0))
        flat_ns = acts_bts.reshape(B * T, S)
        k = min(self.k, B * T)
        cand_ks = np.argpartition(-flat_ns, k - 1, axis=0)[:k]  # [k, S] positions in the batch
        vals_ks = np.take_along_axis(flat_ns, cand_ks, 0)
        b_ks, t_ks = cand_ks // T, cand_ks % T
        offs = np.arange(-self.left - EDGE, self.right + EDGE + 1)  # [W + 2 EDGE]
        tpos = t_ks[..., None] + offs  # [k, S, W + 2 EDGE]
        inside = (tpos >= 0) & (tpos < T)
        tclip = np.clip(tpos, 0, T - 1)
        all_tok = np.where(inside, tokens_bt[b_ks[..., None], tclip], -1)
        win_tok, win_pos, win_in = (a[..., EDGE:-EDGE] for a in (all_tok, tclip, inside))
        edge_tok = np.stack([all_tok[..., :EDGE], all_tok[..., -EDGE:]], -2)  # [k, S, 2, EDGE]
        s_idx = np.arange(S)[None, :, None]
        win_act = np.where(win_in, acts_bts[b_ks[..., None], win_pos, s_idx], 0.0)
        self._merge(
            vals_ks.T,
            (b_ks + row0).T,
            t_ks.T,
            win_tok.transpose(1, 0, 2),
            win_act.transpose(1, 0, 2),
            edge_tok.transpose(1, 0, 2, 3),
        )

    def _merge(self, vals, rows, pos, win_tok, win_act, edge_tok) -> None:
        vals = np.where(vals > 0, vals, -np.inf)  # a context is one where the feature fires
        all_v = np.concatenate([self.values, vals], 1)  # old first: ties keep earlier rows
        all_r = np.concatenate([self.rows, rows], 1)
        all_p = np.concatenate([self.positions, pos], 1)
        # best first; among equal values the earlier row, then the earlier position
        order = np.lexsort((all_p, all_r, -all_v), axis=1)[:, : self.k]

        def pick(a):  # a [S, 2k, ...] -> [S, k, ...] in `order`
            return np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 1)

        self.values, self.rows, self.positions = pick(all_v), pick(all_r), pick(all_p)
        self.window_tokens = pick(np.concatenate([self.window_tokens, win_tok], 1))
        self.window_acts = pick(np.concatenate([self.window_acts, win_act], 1))
        self.edge_tokens = pick(np.concatenate([self.edge_tokens, edge_tok], 1))
        empty = ~np.isfinite(self.values)
        self.rows[empty], self.positions[empty] = -1, -1


def parse_features(spec: str, n_features: int) -> np.ndarray:
    """`0-99,120,200-209` -> sorted unique ids, each checked against the SAE's size."""
    ids: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise UserError(f"--features {spec!r}: expected ids and ranges like 0-99,120")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= n_features:
            raise UserError(
                f"--features {part.strip()!r}: the SAE has features 0..{n_features - 1}"
            )
        ids.update(range(lo, hi + 1))
    return np.asarray(sorted(ids), np.int64)


def collect_contexts(
    model,
    sae: SAE,
    layer: int,
    batches: Iterable[np.ndarray],
    features: Sequence[int] | np.ndarray,
    *,
    k: int = 10,
    left: int = 12,
    right: int = 4,
    progress: bool = False,
) -> ContextStore:
    """Density and top-k contexts of `features` over batches of token rows [B, T]."""
    return collect_contexts_layers(model, [(sae, layer, features)], batches, k=k, left=left,
                                   right=right, progress=progress)[0]  # fmt: skip


def feature_acts_layers_fn(model, items: Sequence[tuple[SAE, int, Sequence[int] | np.ndarray]]):
    """`feature_acts_fn` for several (SAE, layer, features) of one model from one forward: a
    tokens [B, T] -> [each item's activations [B, T, len(features)]] function."""
    layers = sorted({layer for _, layer, _ in items})
    capture = capture_fn(model, layers)
    split = [nnx.split(sae) for sae, _, _ in items]
    graphs, states = [g for g, _ in split], [st for _, st in split]
    where = [layers.index(layer) for _, layer, _ in items]
    idxs = [jnp.asarray(np.asarray(f, np.int64)) for _, _, f in items]

    @jax.jit
    def acts(states, h_lnf):
        return [nnx.merge(g, st).encode(h_lnf[i])[:, idx]  # [N, C]
                for g, st, i, idx in zip(graphs, states, where, idxs, strict=True)]  # fmt: skip

    def run(tokens_bt: np.ndarray) -> list[np.ndarray]:
        B, T = tokens_bt.shape
        h_lnf = capture(jnp.asarray(tokens_bt, jnp.int32))  # [L, B * T, F]
        return [np.asarray(a, np.float32).reshape(B, T, len(idx))
                for a, idx in zip(acts(states, h_lnf), idxs, strict=True)]  # fmt: skip

    return run


def collect_contexts_layers(
    model,
    items: Sequence[tuple[SAE, int, Sequence[int] | np.ndarray]],
    batches: Iterable[np.ndarray],
    *,
    k: int = 10,
    left: int = 12,
    right: int = 4,
    progress: bool = False,
) -> list[ContextStore]:
    """`collect_contexts` for several (SAE, layer, features) of one model, in one pass: each
    store is the one `collect_contexts` gives for its item alone."""
    acts_fn = feature_acts_layers_fn(model, items)
    stores = [ContextStore(k, left, right, len(np.asarray(f))) for _, _, f in items]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="dashboard", unit="batch")
    row0 = 0
    for tokens_bt in batches:
        tokens_bt = np.asarray(tokens_bt)
        for store, acts_bts in zip(stores, acts_fn(tokens_bt), strict=True):
            store.add(tokens_bt, acts_bts, row0)
        row0 += tokens_bt.shape[0]
    if row0 == 0:
        raise UserError("no token rows to build dashboards from")
    return stores


def dashboards(
    model,
    sae: SAE,
    layer: int,
    batches: Iterable[np.ndarray],
    features: Sequence[int] | np.ndarray,
    texts: Sequence[str],
    *,
    k: int = 10,
    left: int = 12,
    right: int = 4,
    n_logit_tokens: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the dashboards show, JSON-ready: {"features": [...], ...}."""
    one = [(sae, layer, features)]
    return dashboards_layers(model, one, batches, texts, k=k, left=left, right=right,
                             n_logit_tokens=n_logit_tokens, progress=progress)[0]  # fmt: skip


def dashboards_layers(
    model,
    items: Sequence[tuple[SAE, int, Sequence[int] | np.ndarray]],
    batches: Iterable[np.ndarray],
    texts: Sequence[str],
    *,
    k: int = 10,
    left: int = 12,
    right: int = 4,
    n_logit_tokens: int = 10,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """`dashboards` for several (SAE, layer, features) of one model, from one pass."""
    from sae.analysis.tsea import feature_vocab_projection

    stores = collect_contexts_layers(model, items, batches, k=k, left=left, right=right,
                                     progress=progress)  # fmt: skip
    result = []
    for (sae, layer, features), store in zip(items, stores, strict=True):
        features = np.asarray(features)
        proj = feature_vocab_projection(model, np.asarray(sae.W_dec_sf[...])[features], layer)
        n = min(n_logit_tokens, proj.shape[1])
        out = []
        for j, f in enumerate(features):
            out.append(
                {
                    "feature": int(f),
                    "density": float(store.active[j] / store.tokens),
                    "max_activation": round(float(store.max_act[j]), 5),
                    "promotes": _logit_tokens(proj[j], texts, n),
                    "suppresses": _logit_tokens(-proj[j], texts, n, sign=-1),
                    "contexts": _contexts(store, j, texts),
                }
            )
        result.append({"layer": layer, "tokens_seen": int(store.tokens), "k": k,
                       "features": out})  # fmt: skip
    return result


def _logit_tokens(w_v: np.ndarray, texts: Sequence[str], n: int, sign: int = 1) -> list[dict]:
    best = np.argsort(-w_v, kind="stable")[:n]
    return [{"token": texts[t], "weight": round(sign * float(w_v[t]), 5)} for t in best]


def _contexts(store: ContextStore, j: int, texts: Sequence[str]) -> list[dict]:
    """Feature j's contexts, best first; window tokens outside the row are left out. Where the
    window cuts a character written as byte pieces, "before"/"after" hold the pieces just outside
    it that complete the character (for the page: `shown_tokens`)."""
    out = []
    for c in np.flatnonzero(np.isfinite(store.values[j])):
        toks = store.window_tokens[j, c]
        keep = toks >= 0
        tokens = [texts[t] for t in toks[keep]]
        entry: dict[str, Any] = {
            "row": int(store.rows[j, c]),
            "position": int(store.positions[j, c]),
            "activation": round(float(store.values[j, c]), 5),
            "tokens": tokens,
            "acts": [round(float(a), 5) for a in store.window_acts[j, c][keep]],
            "max_index": int(store.left - np.sum(~keep[: store.left])),
        }
        before, after = ([texts[t] for t in e if t >= 0] for e in store.edge_tokens[j, c])
        shown = shown_tokens(tokens, before, after)
        if shown and shown[0].before:
            entry["before"] = list(shown[0].before)
        if shown and shown[-1].after:
            entry["after"] = list(shown[-1].after)
        out.append(entry)
    return out


# --- what a person reads ------------------------------------------------------------------------


def byte_label(byte: int) -> str:
    """A byte that is no character on its own, as a person reads it: `‹byte C2›`. SentencePiece's
    `<0xC2>` says the same only to someone who knows its byte fallback, and beside Arabic it reads
    like markup; the page's legend explains the label."""
    return f"\u2039byte {byte:02X}\u203a"


# SentencePiece's control pieces as a person reads them: in the packed rows `</s>` is the token
# between two stories (no `<s>`), which read as markup beside Arabic text
CONTROL_LABELS = {EOS: "end of story", BOS: "start", PAD: "padding", UNK: "unknown"}


def control_label(piece: str) -> str | None:
    """`‹end of story›` for `</s>` (any control piece of CONTROL_LABELS); None for other text."""
    label = CONTROL_LABELS.get(piece)
    return None if label is None else f"\u2039{label}\u203a"


@dataclasses.dataclass(frozen=True)
class Shown:
    """What a person reads for the window's tokens start .. stop - 1 (`shown_tokens`)."""

    text: str
    start: int
    stop: int
    before: tuple[str, ...] = ()  # pieces before the window holding the character's first bytes
    after: tuple[str, ...] = ()  # pieces after the window holding its last bytes
    byte: bool = False  # `text` is `byte_label`: the token is a byte that decodes to nothing
    control: bool = False  # `text` is `control_label`: the token is a control piece, not text


def shown_tokens(
    texts: Sequence[str], before: Sequence[str] = (), after: Sequence[str] = ()
) -> list[Shown]:
    """A window of tokens (their texts as the JSON keeps them: `tsea.display_texts`) as a person
    reads it, covering every window token once, in order.

    Decoded with `attribution.row_text` (each character belongs to the token holding its first
    byte): a token and the tokens after it that start no character (a character's other byte
    pieces) are one item showing the character. `before`/`after`, the tokens just outside the
    window, complete a character the window's edges cut; one that stays incomplete (a row's
    edge, or a lone byte) shows each of its byte pieces as `byte_label`, and a control piece
    shows as `control_label`.
    """
    seq = [*before, *texts, *after]
    lo, hi = len(before), len(before) + len(texts)
    rt = row_text(range(len(seq)), [text_bytes(t) for t in seq])
    heads = [k for k in range(len(seq)) if k == 0 or rt.start[k] >= 0]
    out: list[Shown] = []
    for g0, g1 in zip(heads, [*heads[1:], len(seq)], strict=True):
        a, b = max(g0, lo), min(g1, hi)
        if a >= b:  # wholly outside the window
            continue
        group = seq[g0:g1]
        if not _reads_as_text(group):  # each token on its own: a byte, a control piece
            for k in range(a, b):
                if (label := control_label(seq[k])) is not None:
                    out.append(Shown(label, k - lo, k - lo + 1, control=True))
                    continue
                byte = piece_byte(seq[k])
                text = seq[k] if byte is None else byte_label(byte)
                out.append(Shown(text, k - lo, k - lo + 1, byte=byte is not None))
            continue
        c0, c1 = np.searchsorted(rt.owner, [g0, g1])  # owners never decrease
        out.append(Shown(rt.text[c0:c1], a - lo, b - lo, tuple(seq[g0:a]), tuple(seq[b:g1])))
    return out


def _reads_as_text(group: Sequence[str]) -> bool:
    """Whether `shown_tokens`' group of tokens is whole characters of text: no control piece, and
    bytes that decode (not a character an edge or a lone byte leaves incomplete)."""
    if any(t in CONTROL_LABELS for t in group):
        return False
    try:
        b"".join(text_bytes(t) for t in group).decode()
    except UnicodeDecodeError:
        return False
    return True


def shown_text(text: str) -> str:
    """One token on its own (its `tsea.display_texts` text) as a person reads it."""
    return shown_tokens([text])[0].text


# --- output -------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, "Noto Naskh Arabic", sans-serif; margin: 1.5em; color: #222; }
section { border-top: 1px solid #ccc; padding: .6em 0; }
h2 { font-size: 1.05em; margin: .2em 0; }
.meta { color: #666; font-size: .85em; }
.chips span { display: inline-block; margin: 1px 3px; padding: 0 4px; border-radius: 3px;
  white-space: pre; font-size: .9em; }
.pos span { background: #fde0c5; } .neg span { background: #d6e6f7; }
.ctx { margin: 2px 0; font-size: 1.05em; line-height: 1.9; }
.ctx span { white-space: pre; border-radius: 2px; }
.ctx mark { outline: 2px solid #c0392b; background: inherit; white-space: pre; }
.act { color: #888; font-size: .8em; font-family: monospace; margin-inline-end: .5em; }
.byte { color: #777; font-family: monospace; font-size: .8em; }
.legend { color: #555; font-size: .85em; max-width: 60em; }
"""

_LEGEND = (
    "Each context is a window of tokens around the feature's maximum (outlined), each token shaded "
    "by the feature's activation there; hover a token for its activation. \u21b5 is a newline. "
    "A character the tokenizer writes as several byte tokens (\u00bb is &lt;0xC2&gt;&lt;0xBB&gt;)"
    " shows once, shaded by the highest of their activations; hover it for each byte token and "
    'its activation. <span class="byte">\u2039byte C2\u203a</span> is a byte token that is no '
    "character on its own (SentencePiece's &lt;0xC2&gt;: part of a character's UTF-8 bytes). "
    '<span class="byte">\u2039end of story\u203a</span> is the token between two stories '
    "(SentencePiece's &lt;/s&gt;)."
)


def _visible(text: str) -> str:
    return text.replace("\n", "\u21b5")  # show newlines as ↵


def _shown_title(s: Shown, tokens: Sequence[str], acts: Sequence[float]) -> str:
    """The tooltip of one shown item: its activation, or, where it is not simply one token, each
    token it covers (and any just outside the window) with its activation."""
    own = [f"{tokens[i]} {acts[i]:.3g}" for i in range(s.start, s.stop)]
    if s.control:
        return f"{own[0]} (a control token, not text)"
    if not (s.byte or s.before or s.after or s.stop - s.start > 1):
        return f"{acts[s.start]:.3g}"
    if s.byte:
        return f"{own[0]} (one byte of a character's UTF-8, no character on its own)"
    pieces = [*(f"{p} (before this context)" for p in s.before), *own,
              *(f"{p} (after this context)" for p in s.after)]  # fmt: skip
    return "\n".join([f"{_visible(s.text)} is {len(pieces)} tokens:", *pieces])


def _token_span(s: Shown, tokens: Sequence[str], acts: Sequence[float], max_act: float,
                marked: bool) -> str:  # fmt: skip
    """One shown item, shaded by the highest activation of the tokens it covers."""
    act = max(acts[s.start : s.stop])
    alpha = 0.0 if max_act <= 0 else min(max(act / max_act, 0.0), 1.0)
    body = html.escape(_visible(s.text))
    if s.byte or s.control:
        body = f'<span class="byte">{body}</span>'
    title = f' title="{html.escape(_shown_title(s, tokens, acts))}"'
    style = f' style="background: rgba(255, 140, 0, {alpha:.2f})"' if alpha > 0 else ""
    if marked:
        return f"<mark{title}><span{style}>{body}</span></mark>"
    return f"<span{title}{style}>{body}</span>"


def _chip(t: dict) -> str:
    """A promoted or suppressed token: its text, or `byte_label` for a byte that is none."""
    shown = shown_text(t["token"])
    if shown == t["token"]:
        return f'<span dir="auto" title="{t["weight"]:.3g}">{html.escape(_visible(shown))}</span>'
    title = f"{t['weight']:.3g}: {t['token']}"
    return f'<span class="byte" title="{html.escape(title)}">{html.escape(shown)}</span>'


def _feature_html(f: dict) -> str:
    chips = lambda items: "".join(_chip(t) for t in items)  # noqa: E731
    lines = []
    for c in f["contexts"]:
        toks, acts = c["tokens"], c["acts"]
        spans = "".join(
            _token_span(s, toks, acts, f["max_activation"], s.start <= c["max_index"] < s.stop)
            for s in shown_tokens(toks, c.get("before", ()), c.get("after", ()))
        )
        lines.append(
            f'<div class="ctx"><span class="act">{c["activation"]:.3g}</span>'
            f'<bdi dir="auto">{spans}</bdi></div>'
        )
    return (
        f'<section id="f{f["feature"]}"><h2>Feature {f["feature"]}</h2>'
        f'<div class="meta">density {100 * f["density"]:.3g}% · max activation '
        f"{f['max_activation']:.3g}</div>"
        f'<div class="chips pos">promotes: {chips(f["promotes"])}</div>'
        f'<div class="chips neg">suppresses: {chips(f["suppresses"])}</div>'
        + ("".join(lines) or '<div class="meta">never active on these rows</div>')
        + "</section>"
    )


def render_html(data: dict, title: str = "SAE feature dashboards") -> str:
    """One static page, every text escaped."""
    body = "".join(_feature_html(f) for f in data["features"])
    head = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="meta">layer {data["layer"]} · {data["tokens_seen"]} tokens · '
        f"top {data['k']} contexts per feature</p>"
        f'<p class="legend">{_LEGEND}</p>'
    )
    return head + body + "</body></html>\n"


def write_dashboards(data: dict, out_dir: str | Path, title: str = "SAE feature dashboards"):
    """dashboards.json + dashboards.html in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, h = out / "dashboards.json", out / "dashboards.html"
    j.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    h.write_text(render_html(data, title), encoding="utf-8")
    return j, h
