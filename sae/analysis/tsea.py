"""Token set enrichment analysis (TSEA) of SAE features, after SAELens' `analysis/tsea.py`.

Joseph Bloom's method: give every SAE feature a score per vocabulary token (its decoder direction
projected onto the unembedding), rank the vocabulary by that score, and ask whether a named set of
tokens (English names, Arabic names, Latin double quotes, ...) sits unusually high (or low) in the
ranking. The enrichment score is GSEA's running sum: walk down the ranking adding 1/|set| at each
set token and subtracting 1/(V - |set|) at each other token; the score is the largest |sum|.
Without ties that is exactly the two-sample Kolmogorov-Smirnov statistic between the scores of set
and non-set tokens, so its null distribution (the set is a random subset of the vocabulary) is
the KS one: the p-values here are `scipy.stats.ks_2samp(method="asymp")`'s, corrected across the
features of one SAE (Benjamini-Hochberg by default, or Bonferroni).

That null is often too weak for a trained model: names, say, sit together in embedding space, so
almost any direction ranks them together (at the top or at the bottom), and about half of a
*random* SAE's features come out "significant" for them. Hence a second baseline, reported next to
the p-values: the scores of `n_null` random Gaussian directions in F through the same model, and
per set their `null_quantile` (0.99 by default). A feature "beats the null" for a set when its
score exceeds that quantile; counting those that also promote the set is the honest measure of
"features for English names" (and it also covers tiny sets, where the asymptotic KS p-value is
too small: a single token at rank 0 scores exactly 1).

Our SAEs read MLP hidden activations (F), not the residual stream, so a feature's direction
reaches the logits through the MLP output projection and the tied unembedding:

    projection_sv = W_dec_sf @ W_out_fd @ W_U_dv

with the final LayerNorm folded in as TransformerLens' `fold_ln` + `center_writing_weights` +
`center_unembed` do (SAELens' tutorial uses those defaults): W_U = diag(ln_f scale) @ wte.T,
centred over D (LayerNorm removes a direction's mean, so it cannot move the logits) and over V
(a shift shared by all tokens changes no ranking). For the last layer this is exactly the logit
change, up to LayerNorm's 1/std, of adding the direction to the final residual stream (tested);
for earlier layers it is the direct path only, as in SAELens. `cosine_sim=True` divides each
token's unembedding column by its norm (as SAELens' `get_W_U_W_dec_stats_df` does, so tokens with
large embeddings do not dominate the ranking) and the residual direction by its norm, giving
cosines in [-1, 1].

Token sets come from a tokenizer's pieces: exact words (a piece equal to a listed word, with or
without SentencePiece's "▁"), word starts (the first token of each listed word as the tokenizer
writes it, bare and after a space: a name split into several pieces is counted by the piece that
starts it, the one a model must predict first; `word_start_set`), or a regular expression over the
piece's text.

Two additions answer what counts against a null miss (jaxlm issue 18):
* dead features (never active on held-out rows, or in the saved training sparsity) are left out of
  every count, summary and top list when `live` is given;
* a continuous contrast between two sets per feature: the difference of the feature's mean
  projection on set A's tokens and on set B's tokens, in units of the feature's projection SD over
  the whole vocabulary (tokens in both sets dropped). The vocabulary-wide SD, not the pooled
  within-set one: names sit close together in embedding space, so any direction spreads them
  little and a within-set SD would inflate every feature's contrast; the vocabulary SD also
  works for sets of one token. The same contrast of the random null directions gives its chance
  range (`null_contrast`); summaries report its mean over live features (plain, and weighted by
  each feature's firing frequency where known) and the top features each way.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.eval.wordlists import demo_word_lists
from jaxlm.eval.wordlists import load_word_list as load_word_list  # callers read them from here
from jaxlm.eval.wordlists import parse_names_spec as parse_names_spec
from sae.analysis.attribution import first_token, piece_byte, row_text, token_bytes

SPACE = "\u2581"  # SentencePiece's visible space
Correction = Literal["bh", "bonferroni"]

# Regex sets over a token's text (the piece with "▁" read as a space). `re.search` semantics.
REGEX_SETS: dict[str, str] = {
    "latin_double_quote": r'"',  # English dialogue punctuation left by translation
    "arabic_quotes": r"[«»]",  # native Arabic dialogue punctuation
    "arabic_comma": r"،",  # `قالت ليلي، "..."`: the translated dialogue order
    "digits": r"^\s*[0-9٠-٩]+\s*$",
    "punctuation": r"^\s*[^\w\s]+\s*$",
    "latin_letters": r"[A-Za-z]",
    "starts_with_space": r"^ ",
}
# What `--demo-sets` analyses: the demo corpus' two kinds of artifacts and their native forms.
DEMO_REGEX_SETS = ("latin_double_quote", "arabic_quotes", "arabic_comma", "punctuation")


# --- token sets ---------------------------------------------------------------------------------


def token_texts(tok) -> list[str | None]:
    """Each id's text: the piece with "▁" as a space; an ASCII byte piece as its character.

    None for control pieces (<pad>, <s>, ...) and for non-ASCII byte pieces (a fragment of a
    UTF-8 character), which belong to no word or regex set.
    """
    out: list[str | None] = []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if (byte := piece_byte(piece)) is not None:
            out.append(chr(byte) if byte < 0x80 else None)
        elif re.fullmatch(r"<[a-z/]+>", piece) and i < 4:  # <pad> <unk> <s> </s>
            out.append(None)
        else:
            out.append(piece.replace(SPACE, " "))
    return out


def display_texts(tok) -> list[str]:
    """Each id's text for people to read: control and partial-UTF-8 pieces stay as `<...>`."""
    return [t if t is not None else tok.id_to_piece(i) for i, t in enumerate(token_texts(tok))]


def word_set(texts: Sequence[str | None], words: Iterable[str]) -> np.ndarray:
    """Ids whose text, without a leading space, is exactly one of `words` (also tried NFKC)."""
    wanted = set()
    for w in words:
        wanted.add(w.strip())
        wanted.add(unicodedata.normalize("NFKC", w.strip()))
    ids = [i for i, t in enumerate(texts) if t is not None and t.removeprefix(" ") in wanted]
    return np.asarray(ids, np.int32)


def regex_set(texts: Sequence[str | None], pattern: str) -> np.ndarray:
    """Ids whose text matches `pattern` anywhere (`re.search`)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"regex {pattern!r}: {e}") from None
    return np.asarray([i for i, t in enumerate(texts) if t is not None and rx.search(t)], np.int32)


def word_start_set(tok, words: Iterable[str]) -> np.ndarray:
    """Ids of the token that starts each word (NFKC), written bare and after a space.

    That is the piece holding the word's first character (after a space, SentencePiece's "▁X";
    a lone "▁" piece before the word is not it): what `sae.analysis.attribution` reads as a
    word's first token.
    """
    tbytes = token_bytes(tok)
    ids = set()
    for w in words:
        w = unicodedata.normalize("NFKC", w.strip())
        for prefix in ("", " ") if w else ():
            enc = tok.encode(prefix + w)
            ft = first_token(row_text(enc, tbytes), len(prefix))
            if ft is not None:
                ids.add(int(enc[ft[0]]))
    return np.asarray(sorted(ids), np.int32)


def build_token_sets(
    tok,
    *,
    words: Mapping[str, Iterable[str]] = {},
    regexes: Mapping[str, str] = {},
    word_starts: Mapping[str, Iterable[str]] = {},
    where: str = "tokenizer",
) -> dict[str, np.ndarray]:
    """Named token sets (sorted ids) from word lists (whole pieces), regexes and word lists read
    as their words' first tokens (`word_start_set`); an empty set is a UserError."""
    texts = token_texts(tok)
    sets: dict[str, np.ndarray] = {}
    for name, ws in words.items():
        ws = list(ws)
        sets[name] = word_set(texts, ws)
        if not len(sets[name]):
            raise UserError(
                f"token set {name!r} is empty: none of its {len(ws)} words is a whole piece "
                f"of {where} (vocabulary {len(texts)})"
            )
    for name, ws in word_starts.items():
        sets[name] = word_start_set(tok, ws)
        if not len(sets[name]):
            raise UserError(f"token set {name!r} is empty: its word list has no words")
    for name, pattern in regexes.items():
        sets[name] = regex_set(texts, pattern)
        if not len(sets[name]):
            raise UserError(f"token set {name!r} is empty: no piece of {where} matches {pattern!r}")
    for name, ids in sets.items():
        if len(ids) >= len(texts):
            raise UserError(f"token set {name!r} holds the whole vocabulary; nothing to compare")
    return sets


def starts_name(name: str) -> str:
    """The name of a word list's word-start set: `english_names` -> `english_names_starts`."""
    return f"{name}_starts"


# What `--demo-sets` contrasts: English vs Arabic name starts, Latin vs Arabic quotes.
DEMO_CONTRASTS = (
    (starts_name("english_names"), starts_name("arabic_names")),
    ("latin_double_quote", "arabic_quotes"),
)


def demo_token_sets(
    tok, where: str = "tokenizer", *, starts: bool = False
) -> dict[str, np.ndarray]:
    """The demo's sets: English and Arabic names (whole pieces; with `starts` also their
    word-start sets), Latin and Arabic quotes, Arabic comma, punctuation."""
    lists = demo_word_lists()
    return build_token_sets(
        tok,
        words=lists,
        regexes={k: REGEX_SETS[k] for k in DEMO_REGEX_SETS},
        word_starts={starts_name(k): v for k, v in lists.items()} if starts else {},
        where=where,
    )


# --- projection ---------------------------------------------------------------------------------


def folded_unembedding(model, *, cosine_sim: bool = False) -> jax.Array:
    """W_U [D, V] with ln_f's scale folded in, centred over D and over V (TransformerLens)."""
    gamma_d = jnp.asarray(model.ln_f.scale_d[...], jnp.float32)
    W_U_dv = gamma_d[:, None] * jnp.asarray(model.wte_vd[...], jnp.float32).T
    W_U_dv = W_U_dv - W_U_dv.mean(0, keepdims=True)  # fold_ln's centring of the reader
    W_U_dv = W_U_dv - W_U_dv.mean(1, keepdims=True)  # center_unembed
    if cosine_sim:
        W_U_dv = W_U_dv / jnp.maximum(jnp.linalg.norm(W_U_dv, axis=0, keepdims=True), 1e-12)
    return W_U_dv


def mlp_out_weight(model, layer: int) -> jax.Array:
    """W_out [F, D] of block `layer`'s MLP (transformers' `mlp.c_proj.weight.T`)."""
    n = len(model.blocks)
    if not 0 <= layer < n:
        raise UserError(f"layer {layer}: the model has layers 0..{n - 1}")
    return jnp.asarray(model.blocks[layer].mlp.w_down_fd[...], jnp.float32)


@partial(jax.jit, static_argnames="cosine_sim")
def _project(W_dec_cf, W_out_fd, W_U_dv, cosine_sim: bool = False):
    r_cd = W_dec_cf @ W_out_fd  # [C, D] residual directions
    r_cd = r_cd - r_cd.mean(-1, keepdims=True)  # center_writing_weights
    if cosine_sim:
        r_cd = r_cd / jnp.maximum(jnp.linalg.norm(r_cd, axis=-1, keepdims=True), 1e-12)
    return r_cd @ W_U_dv  # [C, V]


def _check_dec(W_dec_sf, W_out_fd) -> jax.Array:
    W = jnp.asarray(W_dec_sf, jnp.float32)
    if W.ndim != 2 or W.shape[1] != W_out_fd.shape[0]:
        raise UserError(
            f"SAE W_dec has shape {tuple(W.shape)}; this layer's MLP needs [S, {W_out_fd.shape[0]}]"
        )
    return W


def feature_vocab_projection(
    model, W_dec_sf, layer: int, *, cosine_sim: bool = False, chunk: int = 1024
) -> np.ndarray:
    """[S, V] float32: each feature's logit weight per token (see the module docstring).

    At S=16k, V=32k this is 2 GB; `tsea` never builds it whole (it works chunk by chunk).
    """
    W_out_fd = mlp_out_weight(model, layer)
    W_dec = _check_dec(W_dec_sf, W_out_fd)
    W_U_dv = folded_unembedding(model, cosine_sim=cosine_sim)
    parts = [
        np.asarray(_project(W_dec[i : i + chunk], W_out_fd, W_U_dv, cosine_sim))
        for i in range(0, W_dec.shape[0], chunk)
    ]
    return np.concatenate(parts, 0)


# --- enrichment ---------------------------------------------------------------------------------


def _pad_sets(sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ids [n, M] padded with 0, and sizes [n]."""
    M = max(len(s) for s in sets)
    idx = np.zeros((len(sets), M), np.int32)
    for i, s in enumerate(sets):
        idx[i, : len(s)] = s
    return idx, np.asarray([len(s) for s in sets], np.int32)


@jax.jit
def _ks_chunk(proj_cv, idx_nm, size_n):
    """Enrichment scores and signs [n, C] of a chunk of features (SAELens' running sum).

    Rank the vocabulary by descending score (rank 0 = top; ties in id order). Between two set
    tokens the running sum only falls, so its maximum is just after a set token and its minimum
    just before one: with the j-th set token (1-based) at rank r, the sum is
    j/n - (r + 1 - j)/(V - n) after it and (j - 1)/n - (r - j + 1)/(V - n) before it.
    """
    C, V = proj_cv.shape
    order_cv = jnp.argsort(-proj_cv, axis=1, stable=True)
    rows = jnp.arange(C)[:, None]
    ranks_cv = jnp.zeros((C, V), jnp.int32).at[rows, order_cv].set(jnp.arange(V, dtype=jnp.int32))
    M = idx_nm.shape[1]
    j_m = jnp.arange(1, M + 1, dtype=jnp.float32)
    valid_nm = j_m[None] <= size_n[:, None]
    r_ncm = jnp.where(valid_nm[:, None], ranks_cv[:, idx_nm].transpose(1, 0, 2), V)
    r_ncm = jnp.sort(r_ncm, axis=-1).astype(jnp.float32)
    n = size_n.astype(jnp.float32)[:, None, None]
    hit, miss = 1.0 / n, 1.0 / (V - n)
    after = j_m * hit - (r_ncm + 1 - j_m) * miss
    before = (j_m - 1) * hit - (r_ncm - j_m + 1) * miss
    valid = valid_nm[:, None]
    top = jnp.where(valid, after, -jnp.inf).max(-1)  # [n, C]
    bottom = -jnp.where(valid, before, jnp.inf).min(-1)
    score = jnp.maximum(jnp.maximum(top, bottom), 0.0)
    return score, jnp.where(top >= bottom, 1, -1).astype(jnp.int8)


def enrichment_scores(
    proj_sv: np.ndarray, sets: Sequence[np.ndarray], *, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n_sets, S], signs [n_sets, S]) as SAELens' `calculate_batch_enrichment_scores`.

    The sign is +1 where the running sum peaks above zero (the set sits at the top of the
    feature's ranking: the feature promotes it) and -1 where it dips below (suppresses it).
    """
    idx, sizes = _pad_sets(sets)
    scores, signs = [], []
    for i in range(0, proj_sv.shape[0], chunk):
        s, d = _ks_chunk(jnp.asarray(proj_sv[i : i + chunk], jnp.float32), idx, sizes)
        scores.append(np.asarray(s))
        signs.append(np.asarray(d))
    return np.concatenate(scores, 1), np.concatenate(signs, 1)


def ks_pvalues(
    scores_ns: np.ndarray, sizes_n: Sequence[int] | np.ndarray, vocab_size: int
) -> np.ndarray:
    """Two-sided KS p-values of enrichment scores, as `ks_2samp(method="asymp")` computes them."""
    from scipy.stats import kstwo

    n = np.asarray(sizes_n, np.float64)[:, None]
    m = vocab_size - n
    en = np.round(m * n / (m + n))
    return kstwo.sf(np.asarray(scores_ns, np.float64), en)


def adjust_pvalues(p_ns: np.ndarray, method: Correction = "bh") -> np.ndarray:
    """Per row (one token set), corrected across features: Benjamini-Hochberg or Bonferroni."""
    p = np.asarray(p_ns, np.float64)
    S = p.shape[-1]
    if method == "bonferroni":
        return np.minimum(p * S, 1.0)
    if method != "bh":
        raise UserError(f"correction {method!r}: choose bh or bonferroni")
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, -1) * S / np.arange(1, S + 1)
    ranked = np.minimum.accumulate(ranked[..., ::-1], axis=-1)[..., ::-1]  # step-up
    out = np.empty_like(p)
    np.put_along_axis(out, order, np.minimum(ranked, 1.0), -1)
    return out


def projection_stats(proj_sv) -> dict[str, np.ndarray]:
    """Per feature: mean, std, skewness, kurtosis (not excess) over the vocabulary, as SAELens'
    `get_stats_df` (population moments)."""
    x = jnp.asarray(proj_sv, jnp.float32)
    return {k: np.asarray(v) for k, v in _stats(x).items()}


@jax.jit
def _stats(x_cv):
    mean = x_cv.mean(-1, keepdims=True)
    diffs = x_cv - mean
    std = jnp.sqrt(jnp.square(diffs).mean(-1, keepdims=True))
    z = diffs / std
    return {
        "mean": mean[:, 0],
        "std": std[:, 0],
        "skewness": (z**3).mean(-1),
        "kurtosis": (z**4).mean(-1),
    }


# --- the whole analysis -------------------------------------------------------------------------


@dataclasses.dataclass
class TseaResult:
    """TSEA of one SAE: scores per (set, feature), per-feature stats and top logit tokens."""

    set_names: list[str]
    set_sizes: list[int]
    vocab_size: int
    scores: np.ndarray  # [n_sets, S] enrichment score (KS statistic)
    signs: np.ndarray  # [n_sets, S] +1: the set is promoted, -1: suppressed
    pvalues: np.ndarray  # [n_sets, S]
    p_adjusted: np.ndarray  # [n_sets, S] across features, by `correction`
    correction: str
    stats: dict[str, np.ndarray]  # mean, std, skewness, kurtosis: [S] each
    top_ids: np.ndarray  # [S, k] highest-scoring tokens
    top_values: np.ndarray  # [S, k]
    bottom_ids: np.ndarray  # [S, k] lowest-scoring tokens
    bottom_values: np.ndarray  # [S, k]
    null_scores: np.ndarray  # [n_sets, R] scores of R random directions (R may be 0)
    null_quantile: float = 0.99
    meta: dict = dataclasses.field(default_factory=dict)
    live: np.ndarray | None = None  # [S] bool: features active on held-out rows; None: all
    frequency: np.ndarray | None = None  # [S] firing frequency on those rows, where known
    contrast_pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    contrast: np.ndarray | None = None  # [n_pairs, S] mean(A) - mean(B) in vocabulary SDs
    null_contrast: np.ndarray | None = None  # [n_pairs, R] the same of the null directions

    @property
    def live_mask(self) -> np.ndarray:
        """[S] bool: the features every count and list reads (all, without `live`)."""
        return np.ones(self.n_features, bool) if self.live is None else np.asarray(self.live, bool)

    @property
    def null_thresholds(self) -> np.ndarray:
        """[n_sets] the `null_quantile` of each set's random-direction scores (inf: no null)."""
        if self.null_scores.shape[1] == 0:
            return np.full(len(self.set_names), np.inf)
        return np.quantile(self.null_scores, self.null_quantile, axis=1)

    def beats_null(self) -> np.ndarray:
        """[n_sets, S] bool: the score exceeds the set's random-direction threshold."""
        return self.scores > self.null_thresholds[:, None]

    @property
    def n_features(self) -> int:
        return self.scores.shape[1]

    def set_summary(
        self, name: str, *, alpha: float = 0.05, top: int = 10, texts: Sequence[str] | None = None
    ) -> dict:
        """How many features the set enriches, and the best of them with their top tokens."""
        i = self.set_names.index(name)
        live = self.live_mask
        sig = (self.p_adjusted[i] < alpha) & live
        up = sig & (self.signs[i] > 0)
        above = self.beats_null()[i] & live
        scores = np.where(live, self.scores[i], -np.inf)
        best = np.argsort(-scores, kind="stable")[: min(top, int(live.sum()))]
        out: dict[str, Any] = {
            "size": self.set_sizes[i],
            "n_features": self.n_features,
            "n_live": int(live.sum()),
            "n_significant": int(sig.sum()),
            "n_significant_promoting": int(up.sum()),
            "fraction_promoting": round(float(up.sum() / max(live.sum(), 1)), 6),
            "max_score": round(float(scores.max()), 6) if live.any() else None,
        }
        if self.null_scores.shape[1]:
            out.update(
                null_directions=int(self.null_scores.shape[1]),
                null_threshold=round(float(self.null_thresholds[i]), 6),
                n_promoting_above_null=int((above & (self.signs[i] > 0)).sum()),
                n_suppressing_above_null=int((above & (self.signs[i] < 0)).sum()),
            )
        out["top_features"] = [self.feature_entry(int(f), i, texts) for f in best]
        return out

    def contrast_summary(
        self, k: int, *, top: int = 10, texts: Sequence[str] | None = None
    ) -> dict:
        """Contrast pair k over live features: mean (plain and frequency-weighted), where the
        null directions put it, and the top features toward each set."""
        a, b = self.contrast_pairs[k]
        assert self.contrast is not None, "contrast_pairs without their contrast"
        c_s = self.contrast[k]
        live = self.live_mask
        out: dict = {"positive": a, "negative": b, "n_live": int(live.sum())}
        if not live.any():
            return out
        out["mean"] = round(float(c_s[live].mean()), 6)
        out["mean_abs"] = round(float(np.abs(c_s[live]).mean()), 6)
        if self.frequency is not None and self.frequency[live].sum() > 0:
            w = self.frequency[live]
            out["mean_frequency_weighted"] = round(float((c_s[live] * w).sum() / w.sum()), 6)
        if self.null_contrast is not None and self.null_contrast.shape[1]:
            lo, hi = np.quantile(self.null_contrast[k], [0.01, 0.99])
            out.update(null_q01=round(float(lo), 6), null_q99=round(float(hi), 6),
                       null_mean=round(float(self.null_contrast[k].mean()), 6),
                       n_above_null=int((live & (c_s > hi)).sum()),
                       n_below_null=int((live & (c_s < lo)).sum()))  # fmt: skip
        order = np.argsort(-np.where(live, c_s, -np.inf), kind="stable")[: min(top, live.sum())]
        low = np.argsort(np.where(live, c_s, np.inf), kind="stable")[: min(top, live.sum())]
        entry = lambda f: self.contrast_entry(int(f), k, texts)  # noqa: E731
        out["top_positive"] = [entry(f) for f in order]
        out["top_negative"] = [entry(f) for f in low]
        return out

    def contrast_entry(self, f: int, k: int, texts: Sequence[str] | None = None) -> dict:
        assert self.contrast is not None, "contrast_pairs without their contrast"
        entry: dict[str, Any] = {"feature": f, "contrast": round(float(self.contrast[k, f]), 6)}
        if self.frequency is not None:
            entry["frequency"] = float(f"{self.frequency[f]:.4g}")
        if texts is not None:
            entry["top_tokens"] = [texts[t] for t in self.top_ids[f]]
        return entry

    def feature_entry(self, f: int, set_index: int, texts: Sequence[str] | None = None) -> dict:
        i = set_index
        entry: dict[str, Any] = {
            "feature": f,
            "score": round(float(self.scores[i, f]), 6),
            "log_score": round(float(-np.log(max(1.0 - self.scores[i, f], 1e-12))), 4),
            "direction": "promotes" if self.signs[i, f] > 0 else "suppresses",
            "p_adjusted": float(f"{self.p_adjusted[i, f]:.3g}"),
            "above_null": bool(self.beats_null()[i, f]),
            "skewness": round(float(self.stats["skewness"][f]), 4),
        }
        if texts is not None:
            entry["top_tokens"] = [texts[t] for t in self.top_ids[f]]
            entry["bottom_tokens"] = [texts[t] for t in self.bottom_ids[f]]
        return entry

    def summary(self, *, alpha: float = 0.05, top: int = 10, texts=None) -> dict:
        sets = {n: self.set_summary(n, alpha=alpha, top=top, texts=texts) for n in self.set_names}
        out = {**self.meta, "alpha": alpha, "correction": self.correction, "sets": sets}
        if self.contrast_pairs:
            out["contrasts"] = {
                f"{a}-{b}": self.contrast_summary(k, top=top, texts=texts)
                for k, (a, b) in enumerate(self.contrast_pairs)
            }
        return out

    def save_npz(self, path: str | Path) -> None:
        """Every per-feature array, for plots and further analysis."""
        # Any, not np.ndarray: numpy's stub would match a dict of arrays against savez's own
        # `allow_pickle: bool` keyword
        arrays: dict[str, Any] = dict(
            set_names=np.asarray(self.set_names),
            set_sizes=np.asarray(self.set_sizes),
            scores=self.scores,
            signs=self.signs,
            pvalues=self.pvalues,
            p_adjusted=self.p_adjusted,
            top_ids=self.top_ids,
            top_values=self.top_values,
            bottom_ids=self.bottom_ids,
            bottom_values=self.bottom_values,
            null_scores=self.null_scores,
            live=self.live_mask,
            **({"frequency": self.frequency} if self.frequency is not None else {}),
            contrast_pairs=np.asarray(self.contrast_pairs, dtype=str).reshape(-1, 2),
            contrast=self.contrast if self.contrast is not None else np.zeros((0, self.n_features)),
            null_contrast=(
                self.null_contrast if self.null_contrast is not None else np.zeros((0, 0))
            ),
            **{f"stat_{k}": v for k, v in self.stats.items()},
        )
        np.savez_compressed(path, **arrays)


@partial(jax.jit, static_argnames="k")
def _analyse_chunk(proj_cv, idx_nm, size_n, k: int):
    score, sign = _ks_chunk(proj_cv, idx_nm, size_n)
    top_v, top_i = jax.lax.top_k(proj_cv, k)
    bot_v, bot_i = jax.lax.top_k(-proj_cv, k)
    return score, sign, _stats(proj_cv), top_i, top_v, bot_i, -bot_v


def tsea(
    model,
    W_dec_sf,
    layer: int,
    token_sets: Mapping[str, np.ndarray],
    *,
    cosine_sim: bool = False,
    correction: Correction = "bh",
    n_tokens: int = 10,
    chunk: int = 256,
    n_null: int = 256,
    null_quantile: float = 0.99,
    seed: int = 0,
    progress: bool = False,
    contrasts: Sequence[tuple[str, str]] = (),
    live: np.ndarray | None = None,
    frequency: np.ndarray | None = None,
) -> TseaResult:
    """TSEA of an SAE on `layer`'s MLP hidden state: memory O(chunk * V), never [S, V].

    `n_null` random Gaussian directions in F (seeded) give each set's null scores; 0 skips them.
    `contrasts` names pairs of `token_sets` to contrast per feature (see the module docstring);
    `live` [S] marks the features the summaries read, `frequency` [S] their firing frequency.
    """
    if not token_sets:
        raise UserError("no token sets to analyse")
    W_out_fd = mlp_out_weight(model, layer)
    W_dec = _check_dec(W_dec_sf, W_out_fd)
    W_U_dv = folded_unembedding(model, cosine_sim=cosine_sim)
    V = W_U_dv.shape[1]
    names = list(token_sets)
    for n in names:
        ids = np.asarray(token_sets[n])
        if len(ids) == 0 or len(ids) >= V or ids.min() < 0 or ids.max() >= V:
            raise UserError(f"token set {n!r}: needs 1..{V - 1} ids in [0, {V})")
    idx, sizes = _pad_sets([np.asarray(token_sets[n]) for n in names])
    weights_vk = contrast_weights(token_sets, contrasts, V)
    for name, arr in (("live", live), ("frequency", frequency)):
        if arr is not None and np.shape(arr) != (W_dec.shape[0],):
            raise UserError(
                f"{name} has shape {np.shape(arr)}; the SAE has {W_dec.shape[0]} features"
            )
    k = min(n_tokens, V)
    starts = range(0, W_dec.shape[0], chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="tsea", unit="chunk")
    outs, contrast = [], []
    for i in starts:  # the projection is `feature_vocab_projection`'s, to the bit
        proj_cv = _project(W_dec[i : i + chunk], W_out_fd, W_U_dv, cosine_sim)
        outs.append(jax.device_get(_analyse_chunk(proj_cv, idx, sizes, k)))
        contrast.append(np.asarray(_contrast(proj_cv, weights_vk)))
    cat = lambda j, axis=0: np.concatenate([o[j] for o in outs], axis)  # noqa: E731
    scores, signs = cat(0, 1), cat(1, 1)
    pvalues = ks_pvalues(scores, sizes, V)
    W_null = jax.random.normal(jax.random.key(seed), (n_null, W_dec.shape[1]), jnp.float32)
    null, null_contrast = [], []
    for i in range(0, n_null, chunk):
        proj_cv = _project(W_null[i : i + chunk], W_out_fd, W_U_dv, cosine_sim)
        null.append(np.asarray(_ks_chunk(proj_cv, idx, sizes)[0]))
        null_contrast.append(np.asarray(_contrast(proj_cv, weights_vk)))
    return TseaResult(
        set_names=names,
        set_sizes=[int(s) for s in sizes],
        vocab_size=V,
        scores=scores,
        signs=signs,
        pvalues=pvalues,
        p_adjusted=adjust_pvalues(pvalues, correction),
        correction=correction,
        stats={s: np.concatenate([o[2][s] for o in outs]) for s in outs[0][2]},
        top_ids=cat(3),
        top_values=cat(4),
        bottom_ids=cat(5),
        bottom_values=cat(6),
        null_scores=np.concatenate(null, 1) if null else np.zeros((len(names), 0), np.float32),
        null_quantile=null_quantile,
        meta={"layer": layer, "n_features": int(W_dec.shape[0]), "cosine_sim": cosine_sim},
        live=None if live is None else np.asarray(live, bool),
        frequency=None if frequency is None else np.asarray(frequency, np.float64),
        contrast_pairs=[(a, b) for a, b in contrasts],
        contrast=np.concatenate(contrast, 1),  # [n_pairs, S]
        null_contrast=(
            np.concatenate(null_contrast, 1) if null_contrast else np.zeros((len(contrasts), 0))
        ),
    )


def contrast_weights(
    token_sets: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], vocab_size: int
) -> jax.Array:
    """[V, n_pairs]: +1/|A| on A's tokens, -1/|B| on B's, tokens in both dropped from both."""
    w = np.zeros((vocab_size, len(pairs)), np.float32)
    for k, (a, b) in enumerate(pairs):
        for n in (a, b):
            if n not in token_sets:
                raise UserError(f"contrast {a}:{b}: no token set {n!r}")
        ids_a, ids_b = np.asarray(token_sets[a]), np.asarray(token_sets[b])
        ids_a, ids_b = np.setdiff1d(ids_a, ids_b), np.setdiff1d(ids_b, ids_a)
        if not len(ids_a) or not len(ids_b):
            raise UserError(f"contrast {a}:{b}: no token is in one set and not the other")
        w[ids_a, k] = 1.0 / len(ids_a)
        w[ids_b, k] = -1.0 / len(ids_b)
    return jnp.asarray(w)


@jax.jit
def _contrast(proj_cv, weights_vk):
    """[k, C]: each pair's mean difference over the chunk's features, in vocabulary SDs."""
    std_c = jnp.sqrt(jnp.square(proj_cv - proj_cv.mean(-1, keepdims=True)).mean(-1))
    return (proj_cv @ weights_vk).T / jnp.maximum(std_c, 1e-30)


# --- before / after -----------------------------------------------------------------------------


def compare(
    before: TseaResult,
    after: TseaResult,
    *,
    alpha: float = 0.05,
    top: int = 10,
    texts_before: Sequence[str] | None = None,
    texts_after: Sequence[str] | None = None,
) -> dict:
    """Per token set in both results: its enriched features before and after (e.g. CPT).

    The paper's claim reads off `sets[english_names].change.n_promoting_above_null` (negative:
    fewer features promote English names after continual pre-training, counting only those that
    beat random directions through the same model; see the module docstring), and, continuously,
    off `contrasts[english_names_starts-arabic_names_starts].change.mean` (negative: live
    features lean less toward English name starts than Arabic ones after CPT).
    """
    shared = [n for n in before.set_names if n in after.set_names]
    if not shared:
        raise UserError("the two analyses share no token set")
    out = {}
    for name in shared:
        b = before.set_summary(name, alpha=alpha, top=top, texts=texts_before)
        a = after.set_summary(name, alpha=alpha, top=top, texts=texts_after)
        change = {
            k: (round(a[k] - b[k], 6) if isinstance(a[k], float) else a[k] - b[k])
            for k in (
                "n_significant",
                "n_significant_promoting",
                "n_promoting_above_null",
                "fraction_promoting",
                "max_score",
            )
            if a.get(k) is not None and b.get(k) is not None  # None: no live feature
        }
        out[name] = {"before": b, "after": a, "change": change}
    result: dict[str, Any] = {
        "alpha": alpha,
        "correction": before.correction,
        "before": before.meta,
        "after": after.meta,
        "sets": out,
    }
    pairs = [p for p in before.contrast_pairs if p in after.contrast_pairs]
    if pairs:
        result["contrasts"] = {}
        for a_name, b_name in pairs:
            b = before.contrast_summary(before.contrast_pairs.index((a_name, b_name)), top=top,
                                        texts=texts_before)  # fmt: skip
            a = after.contrast_summary(after.contrast_pairs.index((a_name, b_name)), top=top,
                                       texts=texts_after)  # fmt: skip
            keys = ("mean", "mean_abs", "mean_frequency_weighted", "n_above_null", "n_below_null")
            change = {k: round(a[k] - b[k], 6) for k in keys if k in a and k in b}
            result["contrasts"][f"{a_name}-{b_name}"] = {"before": b, "after": a, "change": change}
    return result


# --- plots --------------------------------------------------------------------------------------


def manhattan_plot(
    results: Mapping[str, TseaResult],
    path: str | Path,
    *,
    alpha: float = 0.05,
    sets: Sequence[str] | None = None,
    label_top: int = 3,
) -> Path:
    """-log(1 - score) per feature, one panel per token set, one row per result (model).

    Features that are significant and beat the random-direction null (dashed line) are orange
    when they promote the set, blue when they suppress it; the `label_top` highest of each panel
    carry their feature id (SAELens' `manhattan_plot_enrichment_scores`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    names = list(sets) if sets is not None else first.set_names
    rows = list(results.items())
    fig, axes = plt.subplots(
        len(rows), len(names), figsize=(3.2 * len(names), 2.6 * len(rows)), squeeze=False
    )
    ymax = {n: 0.0 for n in names}
    for r, (label, res) in enumerate(rows):
        for c, name in enumerate(names):
            ax = axes[r, c]
            if name not in res.set_names:
                ax.set_axis_off()
                continue
            i = res.set_names.index(name)
            y = -np.log(np.maximum(1.0 - res.scores[i], 1e-12))
            hit = (res.p_adjusted[i] < alpha) & res.beats_null()[i]
            colors = np.where(~hit, "0.7", np.where(res.signs[i] > 0, "tab:orange", "tab:blue"))
            ax.scatter(np.arange(len(y)), y, s=3, c=colors, rasterized=True)
            if np.isfinite(res.null_thresholds[i]):
                null_y = -np.log(max(1.0 - res.null_thresholds[i], 1e-12))
                ax.axhline(null_y, ls="--", lw=0.7, c="k")
            for f in np.argsort(-y, kind="stable")[:label_top]:
                ax.annotate(
                    str(f), (f, y[f]), fontsize=7, xytext=(2, 2), textcoords="offset points"
                )
            up = int((hit & (res.signs[i] > 0)).sum())
            ax.set_title(f"{name} (n={res.set_sizes[i]})\n{label}: {up} promoting", fontsize=8)
            ax.set_xlabel("feature", fontsize=7)
            ax.tick_params(labelsize=6)
            ymax[name] = max(ymax[name], float(y.max()))
        axes[r, 0].set_ylabel("-log(1 - enrichment)", fontsize=7)
    for c, name in enumerate(names):  # the same y scale for a set in every row
        for r in range(len(rows)):
            if axes[r, c].axison:
                axes[r, c].set_ylim(0, ymax[name] * 1.1 + 1e-3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
