"""Feature dashboards: what makes an SAE feature fire, and what it makes the model say.

Per feature: activation density over a stream of token rows, the top-k activating contexts (a
window of tokens around the maximum, each token shaded by the feature's activation there) and the
tokens its decoder direction promotes and suppresses most (`sae.tsea.feature_vocab_projection`).
Written as JSON and as one static HTML page (all text escaped; `dir="auto"` lets the browser lay
out Arabic right to left). Sized for the demo: a few hundred features over a few thousand rows on
a CPU.

The SAE is anything with `encode(x_bf) -> [B, S]` and a decoder `W_dec` / `W_dec_sf` [S, F] (a
`sae.base.SAE` qualifies), or the SAELens layout on disk (`cfg.json` + `sae_weights.safetensors`
with W_enc [F, S], W_dec [S, F], b_enc [S], b_dec [F], `threshold` [S] for JumpReLU; what
`sae.io.save_sae` writes), read by `load_sae_dir`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError

# --- the SAE, as this module needs it --------------------------------------------------------


@dataclasses.dataclass
class SAEWeights:
    """An SAE's weights and encoder (ReLU, JumpReLU or TopK) in SAELens' layout."""

    W_enc: np.ndarray  # [F, S]
    b_enc: np.ndarray  # [S]
    W_dec: np.ndarray  # [S, F]
    b_dec: np.ndarray  # [F]
    threshold: np.ndarray | None = None  # [S], JumpReLU
    k: int | None = None  # TopK
    apply_b_dec_to_input: bool = True
    cfg: dict = dataclasses.field(default_factory=dict)

    def encode(self, x_bf, features: Sequence[int] | None = None) -> jax.Array:
        """Latent activations [B, S] (or [B, len(features)] for a subset of a non-TopK SAE)."""
        cols = slice(None) if features is None or self.k is not None else np.asarray(features)
        return _encode(
            jnp.asarray(x_bf, jnp.float32),
            jnp.asarray(self.W_enc[:, cols]),
            jnp.asarray(self.b_enc[cols]),
            jnp.asarray(self.b_dec if self.apply_b_dec_to_input else np.zeros_like(self.b_dec)),
            None if self.threshold is None else jnp.asarray(self.threshold[cols]),
            self.k,
        )[:, slice(None) if features is None or self.k is None else np.asarray(features)]


@partial(jax.jit, static_argnames="k")
def _encode(x_bf, W_enc_fs, b_enc_s, b_dec_f, threshold_s, k):
    pre_bs = (x_bf - b_dec_f) @ W_enc_fs + b_enc_s
    if threshold_s is not None:
        return jnp.where(pre_bs > threshold_s, pre_bs, 0.0)
    acts_bs = jax.nn.relu(pre_bs)
    if k is not None:  # keep each row's k largest
        kth = jax.lax.top_k(acts_bs, k)[0][:, -1:]
        acts_bs = jnp.where(acts_bs >= kth, acts_bs, 0.0)
    return acts_bs


def sae_layer(cfg: dict, where: str = "cfg.json") -> int:
    """The model layer an SAE reads: `jaxlm.layer`, `hook_layer`, or N in a hook name like
    `blocks.N.mlp.hook_post` (top level as in SAELens 4.x, or under `metadata` as in 6.x)."""
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or ""
    if re.search(r"(?:blocks|h|layers)\.\d+\.", str(hook)) and not re.search(
        r"\.mlp\.(?:hook_post|act)$", str(hook)
    ):  # hook_pre has the same width; fed post-GELU activations it would read them wrongly
        raise UserError(f"{where}: the SAE reads {hook}; these analyses feed it the MLP's "
                        "post-activation (blocks.N.mlp.hook_post)")  # fmt: skip
    for layer in ((cfg.get("jaxlm") or {}).get("layer"), cfg.get("hook_layer")):
        if isinstance(layer, int):
            return layer
    m = re.search(r"(?:blocks|h|layers)\.(\d+)\.", str(hook))
    if m is None:
        raise UserError(
            f"{where}: names no layer (jaxlm.layer, hook_layer, hook_name); pass --layer"
        )
    return int(m.group(1))


def load_sae_dir(path: str | Path) -> SAEWeights:
    """cfg.json + sae_weights.safetensors (SAELens 4.x or 6.x layout) -> SAEWeights.

    Architectures: standard (ReLU), jumprelu (a `threshold` tensor), topk (`k` at the top level
    as 6.x writes it, or `activation_fn_kwargs.k` with `activation_fn_str: topk` as 4.x does).
    """
    d = Path(path)
    cfg_path, w_path = d / "cfg.json", d / "sae_weights.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: cannot read ({e})") from None
    if not w_path.is_file():
        raise UserError(f"{w_path}: missing (an SAE directory holds cfg.json + that file)")
    from safetensors.numpy import load_file

    t = load_file(str(w_path))
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in t]
    if missing:
        raise UserError(f"{w_path}: tensor {missing[0]!r} is missing")
    F, S = t["W_enc"].shape
    want = {"b_enc": (S,), "W_dec": (S, F), "b_dec": (F,), "threshold": (S,)}
    for name, shape in want.items():
        if name in t and t[name].shape != shape:
            raise UserError(f"{w_path}: {name} has shape {t[name].shape}, W_enc says {shape}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(f"{cfg_path}: normalize_activations={norm!r} is not supported here")
    arch, k = _architecture(cfg, cfg_path)
    if arch == "jumprelu" and "threshold" not in t:
        raise UserError(f"{w_path}: a jumprelu SAE needs a 'threshold' tensor")
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return SAEWeights(
        W_enc=f32(t["W_enc"]),
        b_enc=f32(t["b_enc"]),
        W_dec=f32(t["W_dec"]),
        b_dec=f32(t["b_dec"]),
        threshold=f32(t["threshold"]) if arch == "jumprelu" else None,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        cfg=cfg,
    )


def _architecture(cfg: dict, where: Path) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    if cfg.get("activation_fn_str") == "topk":  # SAELens 4.x
        arch = "topk"
    if arch not in ("standard", "jumprelu", "topk"):
        raise UserError(f"{where}: architecture {arch!r}; supported: standard, jumprelu, topk")
    if arch != "topk":
        return arch, None
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not isinstance(k, int) or k < 1:
        raise UserError(f"{where}: a topk SAE needs an integer k (got {k!r})")
    return arch, k


def decoder_weights(sae) -> np.ndarray:
    """W_dec [S, F] of an SAEWeights, a `sae.base.SAE` (W_dec_sf) or any object with W_dec."""
    w = getattr(sae, "W_dec", None)
    if w is None:
        w = getattr(sae, "W_dec_sf", None)
    if w is None:
        raise TypeError(f"{type(sae).__name__} has neither W_dec nor W_dec_sf")
    return np.asarray(w[...] if hasattr(w, "get_value") else w, np.float32)


def save_sae_dir(sae: SAEWeights, path: str | Path) -> Path:
    """The SAELens layout (for tests and hand-made SAEs)."""
    from safetensors.numpy import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(sae, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    cfg = {"d_in": sae.W_enc.shape[0], "d_sae": sae.W_enc.shape[1], **sae.cfg}
    cfg.setdefault("apply_b_dec_to_input", sae.apply_b_dec_to_input)
    if sae.k is not None:
        cfg.update(architecture="topk", k=sae.k)
    elif sae.threshold is not None:
        cfg.update(architecture="jumprelu")
    (d / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        str(d / "sae_weights.safetensors"),
    )
    return d


def _encode_features(sae, x_nf, features: np.ndarray) -> np.ndarray:
    if isinstance(sae, SAEWeights):
        return np.asarray(sae.encode(x_nf, features))
    return np.asarray(sae.encode(x_nf))[:, features]


# --- activations --------------------------------------------------------------------------------


def mlp_hidden_fn(model, layer: int):
    """A jitted tokens [B, T] -> MLP hidden [B, T, F] of `layer` (stops after that layer)."""
    if not 0 <= layer < len(model.blocks):
        raise UserError(f"layer {layer}: the model has layers 0..{len(model.blocks) - 1}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens_bt):
        return nnx.merge(graphdef, state)(tokens_bt, capture_mlp=(layer,), capture_only=True)[layer]

    return lambda tokens_bt: run(state, jnp.asarray(tokens_bt, jnp.int32))


def read_rows(
    datadir: str | Path, *, split: str = "train", max_rows: int = 2048, batch_size: int = 32
) -> Iterator[np.ndarray]:
    """Batches [B, T] of token rows from a prepared DATADIR, in order, at most `max_rows` rows.

    A prepared row holds T + 1 tokens (inputs and shifted targets); the first T are used.
    """
    from jaxlm.data.pipeline import make_loader, read_metadata

    meta = read_metadata(datadir)
    rows = meta["splits"].get(split, {}).get("rows", 0)
    if rows == 0:
        raise UserError(f"{datadir}: no rows in split {split!r}")
    n = min(max_rows, rows)
    batch_size = min(batch_size, n)
    loader = make_loader(
        [(str(datadir), 1.0)],
        split=split,
        batch_size=batch_size,
        seed=0,
        num_epochs=1,
        shuffle=False,
    )
    seen = 0
    for batch in loader:
        take = min(batch_size, n - seen)
        yield batch["tokens"][:take, :-1]
        seen += take
        if seen >= n:
            return


# --- dashboards ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ContextStore:
    """The running top-k activating contexts of a set of features."""

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
        offs = np.arange(-self.left, self.right + 1)  # [W]
        tpos = t_ks[..., None] + offs  # [k, S, W]
        inside = (tpos >= 0) & (tpos < T)
        tclip = np.clip(tpos, 0, T - 1)
        win_tok = np.where(inside, tokens_bt[b_ks[..., None], tclip], -1)
        s_idx = np.arange(S)[None, :, None]
        win_act = np.where(inside, acts_bts[b_ks[..., None], tclip, s_idx], 0.0)
        self._merge(
            vals_ks.T,
            (b_ks + row0).T,
            t_ks.T,
            win_tok.transpose(1, 0, 2),
            win_act.transpose(1, 0, 2),
        )

    def _merge(self, vals, rows, pos, win_tok, win_act) -> None:
        vals = np.where(vals > 0, vals, -np.inf)  # a context is one where the feature fires
        all_v = np.concatenate([self.values, vals], 1)  # old first: ties keep earlier rows
        all_r = np.concatenate([self.rows, rows], 1)
        all_p = np.concatenate([self.positions, pos], 1)
        # best first; among equal values the earlier row, then the earlier position
        order = np.lexsort((all_p, all_r, -all_v), axis=1)[:, : self.k]
        pick = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None], 1)  # noqa: E731
        self.values, self.rows, self.positions = pick(all_v), pick(all_r), pick(all_p)
        self.window_tokens = pick(np.concatenate([self.window_tokens, win_tok], 1))
        self.window_acts = pick(np.concatenate([self.window_acts, win_act], 1))
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
    sae,
    layer: int,
    batches: Iterable[np.ndarray],
    features: Sequence[int],
    *,
    k: int = 10,
    left: int = 12,
    right: int = 4,
    progress: bool = False,
) -> ContextStore:
    """Density and top-k contexts of `features` over batches of token rows [B, T]."""
    features = np.asarray(features)
    hidden = mlp_hidden_fn(model, layer)
    store = ContextStore(k, left, right, len(features))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="dashboard", unit="batch")
    row0 = 0
    for tokens_bt in batches:
        tokens_bt = np.asarray(tokens_bt)
        B, T = tokens_bt.shape
        h_nf = np.asarray(hidden(tokens_bt)).reshape(B * T, -1)
        acts = _encode_features(sae, h_nf, features).reshape(B, T, len(features))
        store.add(tokens_bt, acts.astype(np.float32), row0)
        row0 += B
    if row0 == 0:
        raise UserError("no token rows to build dashboards from")
    return store


def dashboards(
    model,
    sae,
    layer: int,
    batches: Iterable[np.ndarray],
    features: Sequence[int],
    texts: Sequence[str],
    *,
    k: int = 10,
    left: int = 12,
    right: int = 4,
    n_logit_tokens: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the dashboards show, JSON-ready: {"features": [...], ...}."""
    from sae.tsea import feature_vocab_projection

    features = np.asarray(features)
    store = collect_contexts(
        model, sae, layer, batches, features, k=k, left=left, right=right, progress=progress
    )
    proj = feature_vocab_projection(model, decoder_weights(sae)[features], layer)
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
    return {"layer": layer, "tokens_seen": int(store.tokens), "k": k, "features": out}


def _logit_tokens(w_v: np.ndarray, texts: Sequence[str], n: int, sign: int = 1) -> list[dict]:
    best = np.argsort(-w_v, kind="stable")[:n]
    return [{"token": texts[t], "weight": round(sign * float(w_v[t]), 5)} for t in best]


def _contexts(store: ContextStore, j: int, texts: Sequence[str]) -> list[dict]:
    """Feature j's contexts, best first; window tokens outside the row are left out."""
    out = []
    for c in np.flatnonzero(np.isfinite(store.values[j])):
        toks = store.window_tokens[j, c]
        keep = toks >= 0
        out.append(
            {
                "row": int(store.rows[j, c]),
                "position": int(store.positions[j, c]),
                "activation": round(float(store.values[j, c]), 5),
                "tokens": [texts[t] for t in toks[keep]],
                "acts": [round(float(a), 5) for a in store.window_acts[j, c][keep]],
                "max_index": int(store.left - np.sum(~keep[: store.left])),
            }
        )
    return out


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
"""


def _visible(text: str) -> str:
    return text.replace("\n", "\u21b5")  # show newlines as ↵


def _token_span(text: str, act: float, max_act: float, marked: bool) -> str:
    alpha = 0.0 if max_act <= 0 else min(max(act / max_act, 0.0), 1.0)
    body = html.escape(_visible(text))
    title = f' title="{act:.3g}"'
    style = f' style="background: rgba(255, 140, 0, {alpha:.2f})"' if alpha > 0 else ""
    if marked:
        return f"<mark{title}><span{style}>{body}</span></mark>"
    return f"<span{title}{style}>{body}</span>"


def _feature_html(f: dict) -> str:
    chips = lambda items: "".join(  # noqa: E731
        f'<span dir="auto" title="{t["weight"]:.3g}">{html.escape(_visible(t["token"]))}</span>'
        for t in items
    )
    lines = []
    for c in f["contexts"]:
        spans = "".join(
            _token_span(t, a, f["max_activation"], i == c["max_index"])
            for i, (t, a) in enumerate(zip(c["tokens"], c["acts"], strict=True))
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
