"""Exact attribution of one MLP layer's direct push between two continuations, over SAE features.

The question (jaxlm issue 18): where the model is about to write a person's name, does layer L's
MLP push it toward an English name or an Arabic one, and which SAE features carry that push?
Likewise where it is about to open a quotation: English `"` or Arabic `«`. Token set enrichment
(`sae.analysis.tsea`) asks what each feature *could* promote over the whole vocabulary; this asks
what the features *do* at the positions where the decision is made, on held-out text.

Contexts (`find_contexts`). Each token row is decoded to text with the character -> token map
(byte-fallback pieces included). A *name* is a whole word of a list (not inside another word,
NFKC as the cleaning step writes text; a word in both lists is left out; a match that ends the row
is left out, its word may go on in the next row). An *opening quotation* is the mark (`"` or `«`)
after whitespace, a story boundary or the row start and before a non-space character (a closing
`"` follows the quoted words). The target's first token is the token holding its first character,
in one of two forms: "bare" (the token starts at that character: after a newline or a quote) or
"space" (the token is the character's preceding space plus it, SentencePiece's "▁X"); a token that
starts anywhere else (a piece merged across punctuation) is "unaligned" and left out. The context
is the position before the first token: there the logits choose it. A name may be several tokens:
only its first token is predicted at the context.

Direction. For each form, the two labels' first-token sets (names: the first token of every list
word written in that form, `encode(w)` and `encode(" " + w)`; quotes: every piece starting with the
mark in that form); a token in both sets of a form cannot tell the labels apart: it is dropped from
both, and a context whose first token is such a token is left out ("ambiguous_first_token"). The
logit difference at a context of form f is mean_{t in A_f} logit_t - mean_{t in B_f} logit_t
= LN(x) . u_f with u_f the difference of the sets' mean unembedding rows (tied embeddings):
exactly linear, no linearisation of a log-sum-exp needed. Positive means toward labels[0]
(English names, English-style quotes). Comparing within a form keeps the two candidates
interchangeable at that position (after a space the model chooses between "▁توم" and "▁سلمى", not
"توم"); where a form has no piece of one label (a tokenizer with "▁"" but no "▁«" writes " «" as
"▁" + "«"), its contexts use the sets pooled over both forms ("pooled").

Decomposition. With the final LayerNorm's 1/std at that position frozen (direct logit
attribution), any additive part c of the final residual x contributes c . r, with
r = rstd * (gamma * u - mean(gamma * u)) (LayerNorm's centring moves onto the reader). Layer L's
MLP output is m = h @ W_down + b_down with h the MLP hidden state the SAE reads, and
h = sum_s a_s W_eff[s] + b_eff + err, where W_eff, b_eff are the SAE's affine decode (the saved
weights when its class keeps the base `acts @ W_dec + b_dec`, else its own `decode` on one-hot
rows, checked to be affine) and err = h - that reconstruction. So, exactly,

    m . r = sum_s a_s (W_eff[s] @ W_down) . r + (b_eff @ W_down + b_down) . r + (err @ W_down) . r
            features' parts                     bias part                     error part

(`ContrastAttribution.max_residual` records |sum - m . r| over the contexts, float64).

Definitions fixed before measuring the demo:
* label means: each quantity is averaged over the contexts of each label; `balanced` is the mean of
  the two labels' means, so neither data source's size dominates; features are ranked by their
  balanced mean part.
* error share = sum_c |error_c| / sum_c (|features_c| + |error_c| + |bias_c|), pooled over all
  contexts of both labels: how much of the layer's direct push the dictionary leaves unexplained.
* a feature's share = its balanced mean part / sum over features of |balanced mean part|.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError

SPACE = "\u2581"  # SentencePiece's visible space
BOUNDARY = "\x00"  # the text of a control token (<s>, </s>, ...): a story boundary
FORMS = ("bare", "space")  # how a target's first token is written
DIRECTIONS = (*FORMS, "pooled")  # a form's own sets, or both forms' when a form lacks a side
QUOTES = ('"', "«")  # the opening marks of English-style and Arabic-style dialogue
# Arabic diacritics and Quranic marks belong to the word they sit on (not in `\w`)
_MARKS = "\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed"
_WORD = rf"\w{_MARKS}"


# --- text of token rows -------------------------------------------------------------------------


def piece_byte(piece: str) -> int | None:
    """The byte of a SentencePiece byte-fallback piece (`<0xC2>` -> 0xC2); None for any other."""
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    return None if m is None else int(m.group(1), 16)


def text_bytes(text: str) -> bytes:
    """A token's bytes from its display text (`tsea.display_texts`, as dashboards.json keeps it):
    a byte piece `<0xC2>` is its byte, any other text its UTF-8. For decoding what was written out
    without the tokenizer; `token_bytes` reads the tokenizer itself."""
    b = piece_byte(text)
    return text.encode() if b is None else bytes([b])


def token_bytes(tok) -> list[bytes]:
    """Each id's bytes: the piece with "▁" as a space, a byte piece as its byte, a control piece
    (<pad> <unk> <s> </s>) as one NUL, read as a boundary."""
    out: list[bytes] = []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if (b := piece_byte(piece)) is not None:
            out.append(bytes([b]))
        elif i < 4 and re.fullmatch(r"<[a-z/]+>", piece):
            out.append(BOUNDARY.encode())
        else:
            out.append(piece.replace(SPACE, " ").encode())
    return out


@dataclasses.dataclass(frozen=True)
class RowText:
    """A token row as text: each character's token, each token's first character."""

    text: str
    owner: np.ndarray  # [chars] the token holding the character's first byte
    start: np.ndarray  # [T] the token's first character; -1: it starts no character


def row_text(ids: Sequence[int], tbytes: Sequence[bytes]) -> RowText:
    """Decode ids [T] with `tbytes` (`token_bytes`), mapping characters to tokens.

    A character split over byte pieces belongs to the token holding its first byte; invalid UTF-8
    reads as U+FFFD. Token rows are windows of valid text, so invalid bytes sit only at a cut: a
    row (or a dashboard's window) starting inside a character or ending before its last byte. A
    byte that cannot continue the pending character ends it: that character's U+FFFD stays with
    the token that started it, and what the byte starts is its own token's (else the text after a
    cut-off lead byte, or a second lead byte's character, would be owned by the earlier token).
    """
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    chars: list[str] = []
    owner: list[int] = []
    first = 0
    for k, i in enumerate(ids):
        b = tbytes[int(i)]
        if not dec.getstate()[0]:
            try:  # the usual case: a whole piece decodes on its own
                s = b.decode()
                chars.append(s)
                owner.extend([k] * len(s))
                continue
            except UnicodeDecodeError:
                pass
        for byte in b:
            pending = dec.getstate()[0]
            s = dec.decode(bytes([byte]))
            if not pending:
                first = k
            elif s and s.encode() != pending + bytes([byte]):  # the byte broke the character
                chars.append(s[0])  # its U+FFFD
                owner.append(first)
                s, first = s[1:], k
            chars.append(s)
            owner.extend([first] * len(s))
    tail = dec.decode(b"", final=True)
    chars.append(tail)
    owner.extend([first] * len(tail))
    owner_c = np.asarray(owner, np.int64)
    start = np.full(len(ids), -1, np.int64)
    ks, cs = np.unique(owner_c, return_index=True)
    start[ks] = cs
    return RowText("".join(chars), owner_c, start)


def first_token(rt: RowText, c: int) -> tuple[int, str] | None:
    """(token, form) of the token holding character c, when it starts there ("bare") or at the
    space just before it ("space"); None when it starts anywhere else."""
    k = int(rt.owner[c])
    if rt.start[k] == c:
        return k, "bare"
    if rt.start[k] == c - 1 and rt.text[c - 1] == " ":
        return k, "space"
    return None


def _nfkc(word: str) -> str:
    return unicodedata.normalize("NFKC", word.strip())


def word_pattern(words: Iterable[str]) -> re.Pattern:
    """Any of `words` as a whole word (NFKC), longest first."""
    alts = sorted({_nfkc(w) for w in words if w.strip()}, key=len, reverse=True)
    if not alts:
        raise UserError("a word list is empty")
    return re.compile(rf"(?<![{_WORD}])(?:{'|'.join(map(re.escape, alts))})(?![{_WORD}])")


def opening_pattern(mark: str) -> re.Pattern:
    """`mark` opening a quotation: after whitespace, a boundary or the start, before a non-space."""
    return re.compile(rf"(?<![^\s{BOUNDARY}]){re.escape(mark)}(?=[^\s{BOUNDARY}])")


# --- contrasts ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contrast:
    """Two continuations the model chooses between, and how to find where it chooses."""

    name: str  # "names", "dialogue"
    labels: tuple[str, str]  # positive parts push toward labels[0]
    patterns: tuple[re.Pattern, re.Pattern]  # a match starts a target of that label
    sets: dict[str, tuple[np.ndarray, np.ndarray]]  # direction -> first-token ids per label
    ambiguous: dict[str, np.ndarray]  # direction -> ids in both labels' sets (dropped)
    whole_word: bool  # a match ending the row is left out (the word may go on)
    what: str  # the decision, in words
    notes: dict = dataclasses.field(default_factory=dict)


def _split_sets(per_form: Mapping[str, tuple[set, set]]):
    """Per direction (each form, and both pooled): each label's ids less those in both."""
    per_form = dict(per_form)
    per_form["pooled"] = (
        set().union(*(per_form[f][0] for f in FORMS)),
        set().union(*(per_form[f][1] for f in FORMS)),
    )
    sets, ambiguous = {}, {}
    for form, (a, b) in per_form.items():
        both = a & b
        sets[form] = tuple(np.asarray(sorted(s - both), np.int64) for s in (a, b))
        ambiguous[form] = np.asarray(sorted(both), np.int64)
    return sets, ambiguous


def name_contrast(tok, lists: Mapping[str, Iterable[str]], name: str = "names") -> Contrast:
    """Two word lists ({label: words}, the first label positive) as a contrast of first tokens."""
    if len(lists) != 2:
        raise UserError(f"a contrast needs exactly two word lists, got {len(lists)}")
    labels = tuple(lists)
    words = [{_nfkc(w) for w in lists[lab] if w.strip()} for lab in labels]
    both = words[0] & words[1]
    words = [w - both for w in words]
    for lab, w in zip(labels, words, strict=True):
        if not w:
            raise UserError(f"word list {lab!r} has no word that is not also in the other list")
    tbytes = token_bytes(tok)
    per_form: dict[str, tuple[set, set]] = {f: (set(), set()) for f in FORMS}
    for j, ws in enumerate(words):
        for word in ws:
            for prefix in ("", " "):
                ids = tok.encode(prefix + word)
                ft = first_token(row_text(ids, tbytes), len(prefix))
                if ft is not None:
                    per_form[ft[1]][j].add(int(ids[ft[0]]))
    sets, ambiguous = _split_sets(per_form)
    return Contrast(
        name=name,
        labels=labels,  # type: ignore[arg-type]
        patterns=(word_pattern(words[0]), word_pattern(words[1])),
        sets=sets,
        ambiguous=ambiguous,
        whole_word=True,
        what=f"the first token of a {labels[0]} vs a {labels[1]} name (a whole word)",
        notes={"words": [len(w) for w in words], "words_in_both_lists": len(both)},
    )


def quote_contrast(tok, name: str = "dialogue") -> Contrast:
    """English-style `"` vs Arabic-style `«` opening a quotation: the pieces that start with the
    mark (after a space for the "space" form).

    Why the opening mark: it is the one token that marks the dialogue style in every dialogue of
    the demo corpus (both translated word orders, `قالت ليلي، "..."` and `"..." قال توم.`, open
    with `"`; the native `قالت سلمى: «...»` with `«`), while the punctuation after the speaker
    (`،` vs `:`) exists in one translated order only and `،` is an ordinary comma elsewhere.
    """
    from sae.analysis.tsea import token_texts

    texts = token_texts(tok)
    per_form: dict[str, tuple[set, set]] = {f: (set(), set()) for f in FORMS}
    for i, t in enumerate(texts):
        if t is None:
            continue
        for j, mark in enumerate(QUOTES):
            if t.startswith(mark):
                per_form["bare"][j].add(i)
            elif t.startswith(" " + mark):
                per_form["space"][j].add(i)
    sets, ambiguous = _split_sets(per_form)
    return Contrast(
        name=name,
        labels=("english_style", "arabic_style"),
        patterns=(opening_pattern(QUOTES[0]), opening_pattern(QUOTES[1])),
        sets=sets,
        ambiguous=ambiguous,
        whole_word=False,
        what='the opening quotation mark: English-style " vs Arabic-style «',
    )


def demo_name_lists() -> dict[str, list[str]]:
    """The demo corpus' English (in Arabic script) and Arabic names, English first (positive)."""
    from jaxlm.eval.wordlists import demo_word_lists

    demo = demo_word_lists()
    return {"english": list(demo["english_names"]), "arabic": list(demo["arabic_names"])}


def demo_contrasts(tok, lists: Mapping[str, Iterable[str]] | None = None) -> list[Contrast]:
    """Names (the demo corpus' lists unless `lists`) and dialogue openings."""
    return [name_contrast(tok, demo_name_lists() if lists is None else lists), quote_contrast(tok)]


# --- contexts -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Contexts:
    """Positions where the model is about to write a target: [C] arrays, plus what was left out."""

    row: np.ndarray  # global row index
    pos: np.ndarray  # the position whose logits choose the first token
    label: np.ndarray  # 0: labels[0], 1: labels[1]
    form: np.ndarray  # index into DIRECTIONS: the sets its direction is made of
    token: np.ndarray  # the first token actually written
    skipped: dict[str, int]
    outside_set: int  # contexts whose written first token is not in its label's set
    examples: list[dict]

    def __len__(self) -> int:
        return len(self.row)


def find_contexts(
    rows: Sequence[Sequence[int]] | np.ndarray,
    tbytes: Sequence[bytes],
    contrast: Contrast,
    *,
    row0: int = 0,
    n_examples: int = 3,
    example_chars: int = 40,
) -> Contexts:
    """The contexts of `contrast` in token rows (row i is global row `row0 + i`)."""
    out: dict[str, list] = {k: [] for k in ("row", "pos", "label", "form", "token")}
    skipped = dict.fromkeys(
        ("unaligned", "row_start", "ambiguous_first_token", "no_contrast", "row_end"), 0
    )
    outside = 0
    examples: list[dict] = []
    for r, ids in enumerate(rows):
        rt = row_text(ids, tbytes)
        for j, pattern in enumerate(contrast.patterns):
            for m in pattern.finditer(rt.text):
                if contrast.whole_word and m.end() == len(rt.text):
                    skipped["row_end"] += 1
                    continue
                ft = first_token(rt, m.start())
                if ft is None:
                    skipped["unaligned"] += 1
                    continue
                k, form = ft
                tid = int(ids[k])
                if not all(map(len, contrast.sets[form])):  # e.g. "▁«" is no piece, "▁"" is
                    form = "pooled"
                a, b = contrast.sets[form]
                if k == 0:
                    skipped["row_start"] += 1
                elif tid in contrast.ambiguous[form]:
                    skipped["ambiguous_first_token"] += 1
                elif not len(a) or not len(b):
                    skipped["no_contrast"] += 1
                else:
                    values = (row0 + r, k - 1, j, DIRECTIONS.index(form), tid)
                    for key, v in zip(out, values, strict=True):
                        out[key].append(v)
                    outside += tid not in (a, b)[j]
                    if sum(e["label"] == contrast.labels[j] for e in examples) < n_examples:
                        lo = max(0, m.start() - example_chars)
                        examples.append({"label": contrast.labels[j], "row": row0 + r,
                                         "position": k - 1, "before": rt.text[lo : m.start()],
                                         "target": m.group()})  # fmt: skip
    arrays = {k: np.asarray(v, np.int64) for k, v in out.items()}
    return Contexts(**arrays, skipped=skipped, outside_set=outside, examples=examples)


# --- the SAE as an affine map -------------------------------------------------------------------


def effective_decoder(
    sae, *, chunk: int = 1024, atol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """(W_eff [S, F], b_eff [F]) float64 with `sae.decode(a) == a @ W_eff + b_eff`.

    The saved weights when the class keeps the base decode (`acts @ W_dec + b_dec`: standard,
    jumprelu, and topk as `load_sae` gives it, its decoder norms folded in); otherwise the SAE's
    own decode on one-hot rows minus its decode of zero, then checked on random sparse rows
    (a decode that is not affine is a UserError: no exact split over features exists).
    """
    from sae.base import SAE

    W_dec = np.asarray(sae.W_dec_sf[...], np.float64)
    S = W_dec.shape[0]
    if type(sae).decode is SAE.decode:
        return W_dec, np.asarray(sae.b_dec_f[...], np.float64)
    b_eff = np.asarray(sae.decode(jnp.zeros((1, S), jnp.float32))[0], np.float64)
    rows = []
    for i in range(0, S, chunk):
        eye = jnp.eye(min(chunk, S - i), S, i, dtype=jnp.float32)
        rows.append(np.asarray(sae.decode(eye), np.float64) - b_eff)
    W_eff = np.concatenate(rows)
    rng = np.random.default_rng(0)
    a = rng.exponential(size=(8, S)) * (rng.uniform(size=(8, S)) < min(1.0, 32 / S))
    got = np.asarray(sae.decode(jnp.asarray(a, jnp.float32)), np.float64)
    want = a @ W_eff + b_eff
    if np.abs(got - want).max() > atol * (1.0 + np.abs(want).max()):
        raise UserError(f"the {sae.architecture} SAE's decode is not affine in its activations: "
                        "its features' parts cannot be split exactly")  # fmt: skip
    return W_eff, b_eff


# --- the model's side ---------------------------------------------------------------------------


def final_residual(model, tokens_bt: jax.Array) -> jax.Array:
    """The residual stream [B, T, D] before ln_f (`GPTNeo.residual`)."""
    return model.residual(tokens_bt)


def forward_fn(model, sae, layer: int):
    """A tokens [B, T] -> (final residual [B, T, D], layer's MLP hidden [B, T, F], SAE acts
    [B, T, S]) function, float32, jit'd once."""
    graphdef, params = nnx.split(model, nnx.Param)
    sgraph, sstate = nnx.split(sae)

    @jax.jit
    def run(params, sstate, tokens_bt):
        m = nnx.merge(graphdef, params)
        x_btd = final_residual(m, tokens_bt).astype(jnp.float32)
        h_btf = m.mlp_activations(tokens_bt, (layer,))[layer].astype(jnp.float32)
        B, T, F = h_btf.shape
        acts = nnx.merge(sgraph, sstate).encode(h_btf.reshape(B * T, F))
        return x_btd, h_btf, acts.reshape(B, T, -1)

    return partial(run, params, sstate)


def components_fn(model):
    """A tokens [B, T] -> additive parts of the final residual [1 + L, B, T, D] function, float32,
    jit'd once: the embeddings (token + position), then each layer's MLP output (its bias
    included). The residual minus their sum is every attention layer's output together."""
    graphdef, params = nnx.split(model, nnx.Param)
    L = model.cfg.n_layers

    @jax.jit
    def run(params, tokens_bt):
        m = nnx.merge(graphdef, params)
        T = tokens_bt.shape[1]
        emb_btd = m.wte_vd[...][tokens_bt] + m.wpe_pd[...][jnp.arange(T)][None]
        hs = m.mlp_activations(tokens_bt, tuple(range(L)))
        outs = [hs[i].astype(jnp.float32) @ m.blocks[i].mlp.w_down_fd[...].astype(jnp.float32)
                + m.blocks[i].mlp.b_down_d[...].astype(jnp.float32) for i in range(L)]  # fmt: skip
        return jnp.stack([emb_btd.astype(jnp.float32), *outs])

    return partial(run, params)


def gathered_fn(model, sae, layer: int):
    """What `attribute` reads, in one jit'd forward: tokens [B, T] and P context positions (rows
    [P], positions [P]) -> at those positions the final residual [P, D], the layer's MLP hidden
    [P, F], the SAE's acts [P, S] and the residual's parts [P, 1 + L, D] (`components_fn`'s,
    float32), and per feature how many of the B * T positions it fires at [S]. Gathering and
    counting on the device keeps [B, T, S] acts and [1 + L, B, T, D] parts off the host, where
    copying them was most of an attribution's time; the values are `forward_fn`'s and
    `components_fn`'s at those positions (a test checks)."""
    call = gathered_layers_fn(model, [(sae, layer)])

    def one(tokens_bt, row_p: np.ndarray, pos_p: np.ndarray):
        (x_pd, hs, acts, parts_pkd), counts = call(tokens_bt, row_p, pos_p)
        return [x_pd, hs[0], acts[0], parts_pkd], counts[0]

    return one


def gathered_layers_fn(model, saes: Sequence[tuple[Any, int]]):
    """`gathered_fn` for several (SAE, layer) pairs from one forward: tokens [B, T], rows [P],
    positions [P] -> ((final residual [P, D], [each pair's MLP hidden [P, F]], [each pair's acts
    [P, S]], the residual's parts [P, 1 + L, D]), [each pair's firing counts [S]]), float64 and
    int64 on the host. The model's forward is most of an attribution's device time, so the
    layers of one model share it (`attribute_layers`)."""
    graphdef, params = nnx.split(model, nnx.Param)
    split = [nnx.split(sae) for sae, _ in saes]
    sgraphs, sstates = [g for g, _ in split], [st for _, st in split]
    layers = [layer for _, layer in saes]
    L = model.cfg.n_layers

    @jax.jit
    def run(params, sstates, tokens_bt, row_p, pos_p):
        m = nnx.merge(graphdef, params)
        x_btd = final_residual(m, tokens_bt).astype(jnp.float32)
        hs = m.mlp_activations(tokens_bt, tuple(range(L)))
        at = lambda a: a[row_p, pos_p]  # noqa: E731
        h_at, a_at, counts = [], [], []
        for sgraph, sstate, layer in zip(sgraphs, sstates, layers, strict=True):
            h_btf = hs[layer].astype(jnp.float32)
            B, T, F = h_btf.shape
            acts_bts = nnx.merge(sgraph, sstate).encode(h_btf.reshape(B * T, F)).reshape(B, T, -1)
            h_at.append(at(h_btf))
            a_at.append(at(acts_bts))
            counts.append((acts_bts > 0).sum((0, 1), dtype=jnp.int32))
        emb_pd = m.wte_vd[...][at(tokens_bt)] + m.wpe_pd[...][pos_p]
        f32 = lambda a: a[...].astype(jnp.float32)  # noqa: E731
        outs = [at(hs[i]).astype(jnp.float32) @ f32(m.blocks[i].mlp.w_down_fd)
                + f32(m.blocks[i].mlp.b_down_d) for i in range(L)]  # fmt: skip
        parts_pkd = jnp.stack([emb_pd.astype(jnp.float32), *outs], axis=1)
        return (at(x_btd), h_at, a_at, parts_pkd), counts

    def call(tokens_bt, row_p: np.ndarray, pos_p: np.ndarray):
        n = len(row_p)
        size = max(16, 1 << max(n - 1, 0).bit_length())  # a few padded sizes: few compiles
        pad = lambda a: np.concatenate([a, np.zeros(size - n, np.int32)])  # noqa: E731
        args = (jnp.asarray(tokens_bt, jnp.int32), jnp.asarray(pad(row_p)), jnp.asarray(pad(pos_p)))
        (x, hs, acts, parts), counts = jax.device_get(run(params, sstates, *args))
        f64 = lambda a: np.asarray(a[:n], np.float64)  # noqa: E731
        return ((f64(x), [f64(h) for h in hs], [f64(a) for a in acts], f64(parts)),
                [np.asarray(c, np.int64) for c in counts])  # fmt: skip

    return call


def component_names(n_layers: int) -> list[str]:
    """The names of `components`' columns."""
    return ["embeddings", "attention", *(f"mlp {i}" for i in range(n_layers)), "ln_f bias"]


def components(ro: Readout, u_cd: np.ndarray, x_cd: np.ndarray, parts_ckd: np.ndarray):
    """[C, 3 + L]: the model's own logit difference at C contexts split exactly into what each
    part of the final residual x writes along the frozen-LayerNorm reader (`decompose`'s r):
    embeddings, all attention layers (x minus the other parts), each MLP layer, and ln_f's bias
    (beta . u, the same at every context of a direction). Columns: `component_names`; each row
    sums to `logit_difference` (x = embeddings + attention + MLPs, exactly)."""
    _, rstd_c1 = _layer_norm_parts(x_cd, ro.eps)
    w_cd = ro.gamma_d * u_cd
    r_cd = rstd_c1 * (w_cd - w_cd.mean(-1, keepdims=True))
    read_ck = np.einsum("ckd,cd->ck", parts_ckd, r_cd)  # embeddings, MLP 0..L-1
    attention_c = ((x_cd - parts_ckd.sum(1)) * r_cd).sum(-1)
    bias_c = (ro.beta_d * u_cd).sum(-1)
    return np.concatenate([read_ck[:, :1], attention_c[:, None], read_ck[:, 1:], bias_c[:, None]],
                          axis=1)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Readout:
    """What turns a final-residual part into the logit difference: float64 copies of the model's
    final LayerNorm, tied unembedding and layer L's MLP output projection."""

    gamma_d: np.ndarray
    beta_d: np.ndarray
    eps: float
    wte_vd: np.ndarray
    W_down_fd: np.ndarray
    b_down_d: np.ndarray

    @classmethod
    def of(cls, model, layer: int) -> Readout:
        f64 = lambda p: np.asarray(p[...], np.float64)  # noqa: E731
        mlp = model.blocks[layer].mlp
        return cls(f64(model.ln_f.scale_d), f64(model.ln_f.bias_d), float(model.cfg.layer_norm_eps),
                   f64(model.wte_vd), f64(mlp.w_down_fd), f64(mlp.b_down_d))  # fmt: skip

    def direction(self, ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
        """u [D]: mean unembedding row of set a minus that of set b."""
        return self.wte_vd[ids_a].mean(0) - self.wte_vd[ids_b].mean(0)

    def directions(self, contrast: Contrast) -> dict[str, np.ndarray | None]:
        """Each direction's u [D] (`DIRECTIONS`); None where one of its two sets is empty."""
        return {f: self.direction(*contrast.sets[f]) if all(map(len, contrast.sets[f])) else None
                for f in DIRECTIONS}  # fmt: skip


def context_directions(us: Mapping[str, np.ndarray | None], form_c: np.ndarray) -> np.ndarray:
    """u [C, D] of contexts whose direction index (`Contexts.form`) is form [C]; `us` is
    `Readout.directions`."""
    out = []
    for form in np.asarray(form_c):
        u = us[DIRECTIONS[form]]
        # find_contexts keeps a context only in a direction whose two sets are both non-empty
        assert u is not None, f"a context in direction {DIRECTIONS[form]!r}, which has no side"
        out.append(u)
    return np.stack(out)


def _layer_norm_parts(x_cd: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    mu = x_cd.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(np.square(x_cd - mu).mean(-1, keepdims=True) + eps)
    return (x_cd - mu) * rstd, rstd  # [C, D], [C, 1]


def logit_difference(ro: Readout, u_cd: np.ndarray, x_cd: np.ndarray) -> np.ndarray:
    """[C] the model's own logit difference at C contexts, float64: ln_f(x) . u, i.e. the mean
    logit over set a minus that over set b (tied unembedding, no output bias)."""
    xhat_cd, _ = _layer_norm_parts(x_cd, ro.eps)
    return ((xhat_cd * ro.gamma_d + ro.beta_d) * u_cd).sum(-1)


def decompose(
    ro: Readout,
    u_cd: np.ndarray,
    x_cd: np.ndarray,
    h_cf: np.ndarray,
    a_cs: np.ndarray,
    W_eff: np.ndarray,
    b_eff: np.ndarray,
) -> dict[str, np.ndarray]:
    """The exact split at C contexts, float64 (see the module docstring).

    u [C, D] each context's direction, x [C, D] final residual, h [C, F] layer L's MLP hidden,
    a [C, S] SAE activations. Returns parts [C, S], error/bias/total/logit_diff [C].
    """
    _, rstd_c1 = _layer_norm_parts(x_cd, ro.eps)
    w_cd = ro.gamma_d * u_cd
    r_cd = rstd_c1 * (w_cd - w_cd.mean(-1, keepdims=True))  # the reader of a residual part
    v_cf = r_cd @ ro.W_down_fd.T  # ... of an MLP hidden part
    err_cf = h_cf - (a_cs @ W_eff + b_eff)
    m_cd = h_cf @ ro.W_down_fd + ro.b_down_d  # the MLP's output
    return {
        "parts": a_cs * (v_cf @ W_eff.T),
        "error": (err_cf * v_cf).sum(-1),
        "bias": v_cf @ b_eff + r_cd @ ro.b_down_d,
        "total": (m_cd * r_cd).sum(-1),
        "logit_diff": logit_difference(ro, u_cd, x_cd),
    }


# --- the whole attribution ----------------------------------------------------------------------


def balanced_parts(part_sum_ls: np.ndarray, label_c: np.ndarray) -> np.ndarray:
    """[S] the mean over labels (those with contexts) of each feature's mean part per label: both
    labels weigh the same however many contexts each has."""
    ns = np.bincount(np.asarray(label_c, np.int64), minlength=2)[:2].astype(np.float64)
    have = ns > 0
    if not have.any():
        return np.zeros(part_sum_ls.shape[1])
    return (part_sum_ls[have] / ns[have, None]).mean(0)


def coverage_features(parts_s: np.ndarray, share: float) -> list[int]:
    """The fewest features, largest part first, whose positive parts add up to at least `share`
    of all the positive parts (sorted ids; none when no part is positive). A fixed number of top
    features removes a different fraction of the push at each layer (a handful carries most of
    it at one layer, a small part at another); a share removes the same fraction at each."""
    if not 0 < share <= 1:
        raise UserError(f"coverage {share}: must be in (0, 1]")
    order = np.argsort(-parts_s, kind="stable")
    pos = order[parts_s[order] > 0]
    if not len(pos):
        return []
    csum = np.cumsum(parts_s[pos])
    k = min(int(np.searchsorted(csum, share * csum[-1])) + 1, len(pos))
    return sorted(int(f) for f in pos[:k])


@dataclasses.dataclass
class ContrastAttribution:
    """One contrast's contexts and their parts: per context, and per label and feature summed."""

    contrast: Contrast
    contexts: Contexts
    features: np.ndarray  # [C] sum of the features' parts
    error: np.ndarray  # [C]
    bias: np.ndarray  # [C]
    total: np.ndarray  # [C] the layer's direct contribution, computed from its output
    logit_diff: np.ndarray  # [C] the model's own logit difference (all components)
    part_sum: np.ndarray  # [2, S] per label
    act_sum: np.ndarray  # [2, S]
    active: np.ndarray  # [2, S] contexts where the feature fires
    max_residual: float  # max |features + error + bias - total|
    components: np.ndarray  # [C, 3 + L] the logit difference split by the model's parts
    component_names: list[str]

    def n(self, j: int) -> int:
        return int((self.contexts.label == j).sum())

    def label_mean(self, values_c: np.ndarray, j: int) -> float | None:
        sel = self.contexts.label == j
        return float(values_c[sel].mean()) if sel.any() else None

    def mean_parts(self) -> np.ndarray:
        """[S] balanced mean part: the mean over labels (with contexts) of the label means."""
        return balanced_parts(self.part_sum, self.contexts.label)

    def error_share(self) -> float | None:
        denom = np.abs(self.features) + np.abs(self.error) + np.abs(self.bias)
        return float(np.abs(self.error).sum() / denom.sum()) if denom.sum() > 0 else None

    def balanced_mean(self, values_c: np.ndarray) -> float | None:
        """The mean over labels (with contexts) of the per-label means of values [C]."""
        means = [m for j in (0, 1) if (m := self.label_mean(values_c, j)) is not None]
        return float(np.mean(means)) if means else None

    def summary(
        self, *, top: int = 10, texts: Sequence[str] | None = None, dashboard: str | None = None
    ) -> dict:
        """JSON-ready: contexts, per-label and balanced means of every part, the error share and
        the `top` features each way (`dashboard`: the page their entries link to)."""
        c, labels = self.contrast, self.contrast.labels
        parts = {
            "logit_diff": self.logit_diff,
            "layer_total": self.total,
            "features": self.features,
            "error": self.error,
            "bias": self.bias,
        }
        by_label = {
            lab: {"contexts": self.n(j)}
            | {k: _round(self.label_mean(v, j)) for k, v in parts.items()}
            for j, lab in enumerate(labels)
        }
        balanced = {k: _round(self.balanced_mean(v)) for k, v in parts.items()}
        mean_s = self.mean_parts()
        order = np.argsort(-mean_s, kind="stable")
        toward = lambda ids: [self.feature_entry(int(f), mean_s, dashboard) for f in ids]  # noqa: E731
        return {
            "decision": c.what,
            "positive": labels[0],
            "negative": labels[1],
            "first_tokens": {
                f: {
                    lab: [_text(texts, i) for i in ids]
                    for lab, ids in zip(labels, c.sets[f], strict=True)
                }
                for f in DIRECTIONS
            },
            "ambiguous_first_tokens": {
                f: [_text(texts, i) for i in c.ambiguous[f]] for f in DIRECTIONS
            },
            "contexts": {lab: self.n(j) for j, lab in enumerate(labels)},
            "contexts_by_direction": {
                f: int((self.contexts.form == i).sum()) for i, f in enumerate(DIRECTIONS)
            },
            "contexts_skipped": self.contexts.skipped,
            "contexts_first_token_outside_set": self.contexts.outside_set,
            "by_label": by_label,
            "balanced": balanced,
            "error_share": _round(self.error_share()),
            # what error_share pools, so shares of several layers can be pooled the same way
            "abs_sums": {
                k: _round(np.abs(getattr(self, k)).sum()) for k in ("features", "error", "bias")
            },  # fmt: skip
            "max_decomposition_residual": float(f"{self.max_residual:.3g}"),
            "components": self.component_summary(),
            "top_features": toward(order[:top][mean_s[order[:top]] > 0]),
            "bottom_features": toward(order[::-1][:top][mean_s[order[::-1][:top]] < 0]),
            "examples": self.contexts.examples,
            **({"notes": c.notes} if c.notes else {}),
        }

    def component_summary(self) -> dict:
        """Where the model's logit difference comes from: each part of the final residual's
        balanced mean push (embeddings, attention, each MLP, ln_f's bias), summing to the balanced
        mean logit difference, and per label."""
        names, comp = self.component_names, self.components
        return {
            "balanced": {n: _round(self.balanced_mean(comp[:, k])) for k, n in enumerate(names)},
            "by_label": {
                lab: {n: _round(self.label_mean(comp[:, k], j)) for k, n in enumerate(names)}
                for j, lab in enumerate(self.contrast.labels)
            },
            "max_sum_residual": float(f"{self.max_component_residual():.3g}"),
        }

    def max_component_residual(self) -> float:
        """max |sum of the components - the logit difference| over the contexts."""
        if not len(self.logit_diff):
            return 0.0
        return float(np.abs(self.components.sum(1) - self.logit_diff).max())

    def feature_entry(self, f: int, mean_s: np.ndarray, dashboard: str | None = None) -> dict:
        """A feature's balanced part, share, and per label: mean part, mean act, firing rate."""
        denom = np.abs(mean_s).sum()
        entry: dict = {
            "feature": f,
            "part": _round(float(mean_s[f])),
            "share": _round(float(mean_s[f] / denom)) if denom > 0 else None,
        }
        for j, lab in enumerate(self.contrast.labels):
            n = self.n(j)
            entry[lab] = {
                "part": _round(self.part_sum[j, f] / n) if n else None,
                "mean_act": _round(self.act_sum[j, f] / n) if n else None,
                "fires": _round(self.active[j, f] / n) if n else None,
            }
        if dashboard is not None:
            entry["dashboard"] = f"{dashboard}#f{f}"
        return entry


def _round(x, digits: int = 6):
    return None if x is None else round(float(x), digits)


def _text(texts: Sequence[str] | None, i: int):
    return int(i) if texts is None else texts[int(i)]


@dataclasses.dataclass
class Attribution:
    """Every contrast's attribution over the same rows, and each feature's firing count there."""

    results: list[ContrastAttribution]
    active_count: np.ndarray  # [S] positions (all of them) where the feature fires
    n_tokens: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def live(self) -> np.ndarray:
        """[S] bool: fired at least once on these rows."""
        return self.active_count > 0

    def __getitem__(self, name: str) -> ContrastAttribution:
        for r in self.results:
            if r.contrast.name == name:
                return r
        raise KeyError(name)

    def summary(self, *, top: int = 10, texts=None, dashboard: str | None = None) -> dict:
        return {
            **self.meta,
            "tokens": self.n_tokens,
            "features": int(len(self.active_count)),
            "dead_features": int((~self.live).sum()),
            "contrasts": {
                r.contrast.name: r.summary(top=top, texts=texts, dashboard=dashboard)
                for r in self.results
            },  # fmt: skip
        }

    def save(self, path: str | Path) -> Path:
        """Everything this holds, for `load`: `jaxlm sae match --attribution-before` reads what
        `sae attribute` computed instead of running the forwards again (`sae tsea-compare`'s
        reads the firing counts: `saved_counts`). An .npz of plain arrays
        (no pickles), the rest as one JSON string in it (`HEADER`). The contrasts' regexes are not
        saved: `load` is handed them rebuilt and checks them against the saved token sets."""
        arrays: dict[str, Any] = {"active_count": self.active_count}
        rest = []
        for r in self.results:
            c, ctx, p = r.contrast, r.contexts, f"{r.contrast.name}."
            arrays |= {p + k: getattr(r, k) for k in _RESULT_ARRAYS}
            arrays |= {f"{p}contexts.{k}": getattr(ctx, k) for k in _CONTEXT_ARRAYS}
            arrays |= {f"{p}sets.{d}.{j}": ids for d, pair in c.sets.items()
                       for j, ids in enumerate(pair)}  # fmt: skip
            arrays |= {f"{p}ambiguous.{d}": ids for d, ids in c.ambiguous.items()}
            rest.append({"name": c.name, "labels": list(c.labels), "max_residual": r.max_residual,
                         "component_names": r.component_names, "skipped": ctx.skipped,
                         "outside_set": ctx.outside_set, "examples": ctx.examples})  # fmt: skip
        header = {"format": SAVE_FORMAT, "n_tokens": self.n_tokens, "meta": self.meta,
                  "contrasts": rest}  # fmt: skip
        arrays[HEADER] = np.asarray(json.dumps(header, ensure_ascii=False))
        out = Path(path)
        with open(out, "wb") as f:  # a file object: savez would append .npz to another name
            np.savez(f, **arrays)
        return out

    @classmethod
    def load(cls, path: str | Path, contrasts: Sequence[Contrast]) -> Attribution:
        """What `save` wrote, with `contrasts` (`demo_contrasts` of the same tokenizer and word
        lists) in place of the saved ones: a UserError unless their names, labels and token sets
        are the saved ones (a token set built otherwise would make other contexts)."""
        path = Path(path)
        arrays, header = _read(path)
        saved = [(h["name"], tuple(h["labels"])) for h in header["contrasts"]]
        given = [(c.name, tuple(c.labels)) for c in contrasts]
        if saved != given:
            raise UserError(f"{path}: holds the contrasts {saved}, not {given}")
        results = [_load_result(arrays, c, h, path)
                   for c, h in zip(contrasts, header["contrasts"], strict=True)]  # fmt: skip
        return cls(results, arrays["active_count"], header["n_tokens"], header["meta"])


def saved_mean_parts(path: str | Path, contrast: str = "names") -> np.ndarray:
    """[S] one contrast's balanced mean part per feature (`ContrastAttribution.mean_parts`) from
    what `Attribution.save` wrote, reading only the two arrays it needs (no model, no contrasts
    to rebuild): the pipeline picks the features to ablate from it."""
    keys = (f"{contrast}.part_sum", f"{contrast}.contexts.label")
    arrays, _ = _read(Path(path), keys=keys)
    return balanced_parts(*(arrays[k] for k in keys))


def saved_counts(path: str | Path) -> tuple[np.ndarray, int, dict]:
    """(active_count [S], n_tokens, meta) of what `Attribution.save` wrote: each feature's firing
    count on the rows attribute read, which is all `sae tsea-compare --attribution-before` needs
    (no contrasts to rebuild: the word lists and tokenizer do not change a count)."""
    arrays, header = _read(Path(path), keys=("active_count",))  # the one array it needs
    return arrays["active_count"], header["n_tokens"], header["meta"]


def saved_meta(path: str | Path) -> dict:
    """The meta of what `Attribution.save` wrote (layer, rows read, ...), its arrays left unread:
    `sae tsea-compare` and `sae match` check the rows it read before loading a model."""
    return _read(Path(path), keys=())[1]["meta"]


def _read(path: Path, *, keys: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(the arrays, every one or only `keys`, the header) of a saved attribution; a UserError for
    anything else, a missing key included. An .npz entry is read only when asked for."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(z[HEADER].item())
            names = [k for k in z.files if k != HEADER] if keys is None else keys
            out = {k: z[k] for k in names}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a saved attribution ({e})") from None
    if header.get("format") != SAVE_FORMAT:
        raise UserError(f"{path}: format {header.get('format')}, this jaxlm reads "
                        f"{SAVE_FORMAT}; attribute again")  # fmt: skip
    return out, header


SAVE_FORMAT = 1  # `Attribution.save`'s layout
HEADER = "header.json"  # the .npz entry holding what is not an array
_RESULT_ARRAYS = ("features", "error", "bias", "total", "logit_diff", "part_sum", "act_sum",
                  "active", "components")  # fmt: skip
_CONTEXT_ARRAYS = ("row", "pos", "label", "form", "token")


def _load_result(arrays: dict, c: Contrast, h: dict, path: Path) -> ContrastAttribution:
    """One contrast's part of `Attribution.load`: its saved token sets checked against `c`'s."""
    p = f"{c.name}."
    try:
        same = all(np.array_equal(arrays[f"{p}sets.{d}.{j}"], ids)
                   for d, pair in c.sets.items() for j, ids in enumerate(pair)) and all(
            np.array_equal(arrays[f"{p}ambiguous.{d}"], ids) for d, ids in c.ambiguous.items()
        )  # fmt: skip
        ctx = Contexts(**{k: arrays[f"{p}contexts.{k}"] for k in _CONTEXT_ARRAYS},
                       skipped=h["skipped"], outside_set=h["outside_set"],
                       examples=h["examples"])  # fmt: skip
        parts = {k: arrays[p + k] for k in _RESULT_ARRAYS}
    except KeyError as e:
        raise UserError(f"{path}: not a saved attribution (no {e})") from None
    if not same:
        raise UserError(
            f"{path}: the {c.name} contrast's first-token sets are not the ones "
            "built now (other word lists, tokenizer or jaxlm); attribute again"
        )
    return ContrastAttribution(c, ctx, **parts, max_residual=h["max_residual"],
                               component_names=h["component_names"])  # fmt: skip


class _Accumulator:
    def __init__(self, contrast: Contrast, ro: Readout, S: int, n_layers: int):
        self.contrast = contrast
        self.names = component_names(n_layers)
        self.comps: list[np.ndarray] = []
        self.u = ro.directions(contrast)
        self.per_ctx: dict[str, list] = {
            k: [] for k in ("features", "error", "bias", "total", "logit_diff")
        }
        self.part_sum = np.zeros((2, S))
        self.act_sum = np.zeros((2, S))
        self.active = np.zeros((2, S), np.int64)
        self.max_residual = 0.0
        self.contexts: list[Contexts] = []

    def add(self, ctx: Contexts, x_cd, h_cf, a_cs, parts_ckd, ro, W_eff, b_eff):
        """The contexts `ctx` of one batch and, at them, the final residual, the MLP hidden, the
        SAE's acts and the residual's parts (float64, `gathered_fn`'s)."""
        self.contexts.append(ctx)
        if not len(ctx):
            return
        u_cd = context_directions(self.u, ctx.form)
        self.comps.append(components(ro, u_cd, x_cd, parts_ckd))
        d = decompose(ro, u_cd, x_cd, h_cf, a_cs, W_eff, b_eff)
        feats = d["parts"].sum(-1)
        resid = np.abs(feats + d["error"] + d["bias"] - d["total"]).max()
        self.max_residual = max(self.max_residual, float(resid))
        d["features"] = feats
        for k, values in self.per_ctx.items():
            values.append(d[k])
        for j in (0, 1):
            sel = ctx.label == j
            self.part_sum[j] += d["parts"][sel].sum(0)
            self.act_sum[j] += a_cs[sel].sum(0)
            self.active[j] += (a_cs[sel] > 0).sum(0)

    def result(self) -> ContrastAttribution:
        cs = self.contexts
        skipped = {k: sum(c.skipped[k] for c in cs) for k in cs[0].skipped} if cs else {}
        arrays = {
            k: np.concatenate([getattr(c, k) for c in cs]) if cs else np.zeros(0, np.int64)
            for k in ("row", "pos", "label", "form", "token")
        }
        ctx = Contexts(
            **arrays,
            skipped=skipped,
            outside_set=sum(c.outside_set for c in cs),
            examples=[e for c in cs for e in c.examples][:6],
        )
        cat = lambda k: np.concatenate(self.per_ctx[k]) if self.per_ctx[k] else np.zeros(0)  # noqa: E731
        comps = (np.concatenate(self.comps) if self.comps
                 else np.zeros((0, len(self.names))))  # fmt: skip
        return ContrastAttribution(self.contrast, ctx, cat("features"), cat("error"), cat("bias"),
                                   cat("total"), cat("logit_diff"), self.part_sum, self.act_sum,
                                   self.active, self.max_residual, comps, self.names)  # fmt: skip


def attribute(
    model,
    sae,
    layer: int,
    batches: Iterable[np.ndarray],
    tok,
    contrasts: Sequence[Contrast],
    *,
    progress: bool = False,
) -> Attribution:
    """Contexts of every contrast in the token rows of `batches` ([B, T] each), and the exact split
    of layer `layer`'s direct contribution to each contrast's logit difference there."""
    return attribute_layers(model, [(sae, layer)], batches, tok, contrasts, progress=progress)[0]


def attribute_layers(
    model,
    saes: Sequence[tuple[Any, int]],
    batches: Iterable[np.ndarray],
    tok,
    contrasts: Sequence[Contrast],
    *,
    progress: bool = False,
) -> list[Attribution]:
    """`attribute` for each (SAE, layer) pair of one model, from one pass over the batches: the
    contexts are found once and one forward a batch serves every pair (`gathered_layers_fn`).
    Each Attribution is the one `attribute` gives for its pair alone (a test checks)."""
    if not contrasts:
        raise UserError("no contrasts to attribute")
    if not saes:
        raise UserError("no SAEs to attribute")
    decoders = [effective_decoder(sae) for sae, _ in saes]
    for W_eff, _ in decoders:
        if W_eff.shape[1] != model.cfg.d_ff:
            raise UserError(
                f"the SAE reads {W_eff.shape[1]} dims; the model's MLP has {model.cfg.d_ff}"
            )
    ros = [Readout.of(model, layer) for _, layer in saes]
    tbytes = token_bytes(tok)
    run = gathered_layers_fn(model, saes)
    accs = [[_Accumulator(c, ro, W_eff.shape[0], model.cfg.n_layers) for c in contrasts]
            for ro, (W_eff, _) in zip(ros, decoders, strict=True)]  # fmt: skip
    active_counts = [np.zeros(W_eff.shape[0], np.int64) for W_eff, _ in decoders]
    n_tokens, row0 = 0, 0
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="attribute", unit="batch")
    for tokens_bt in batches:
        tokens_bt = np.asarray(tokens_bt)
        ctxs = [find_contexts(tokens_bt, tbytes, c, row0=row0) for c in contrasts]
        rows = np.concatenate([c.row - row0 for c in ctxs]).astype(np.int32)
        pos = np.concatenate([c.pos for c in ctxs]).astype(np.int32)
        (x_pd, hs, acts, parts_pkd), counts = run(tokens_bt, rows, pos)
        n_tokens += tokens_bt.size
        for i, (W_eff, b_eff) in enumerate(decoders):
            active_counts[i] += counts[i]
            start = 0
            for acc, ctx in zip(accs[i], ctxs, strict=True):
                sl = slice(start, start + len(ctx))
                acc.add(ctx, x_pd[sl], hs[i][sl], acts[i][sl], parts_pkd[sl], ros[i], W_eff,
                        b_eff)  # fmt: skip
                start += len(ctx)
        row0 += tokens_bt.shape[0]
    if row0 == 0:
        raise UserError("no token rows to attribute on")
    return [Attribution([a.result() for a in accs[i]], active_counts[i], n_tokens,
                        {"layer": layer, "rows": row0})
            for i, (_, layer) in enumerate(saes)]  # fmt: skip


# --- plot ---------------------------------------------------------------------------------------


def bar_plot(att: Attribution, path: str | Path, *, top: int = 8, title: str = "") -> Path:
    """Per contrast: the balanced mean part of the top features each way, of the error and of the
    bias, and the features' sum (positive: toward the contrast's first label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(att.results), figsize=(4.6 * len(att.results), 4.2),
                             squeeze=False)  # fmt: skip
    for ax, r in zip(axes[0], att.results, strict=True):
        mean_s = r.mean_parts()
        order = np.argsort(-mean_s, kind="stable")
        ids = [f for f in order[:top] if mean_s[f] > 0] + [
            f for f in order[::-1][:top][::-1] if mean_s[f] < 0
        ]
        bal = r.summary(top=0)["balanced"]
        names = [f"f{f}" for f in ids] + ["features (sum)", "error", "bias"]
        vals = [mean_s[f] for f in ids] + [bal[k] or 0.0 for k in ("features", "error", "bias")]
        colors = ["tab:orange" if v > 0 else "tab:blue" for v in vals[: len(ids)]] + ["0.3"] * 3
        y = np.arange(len(names))[::-1]
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y, names, fontsize=7)
        ax.axvline(0, c="k", lw=0.6)
        lab = r.contrast.labels
        ax.set_title(f"{r.contrast.name}: + toward {lab[0]}, - toward {lab[1]}\n"
                     f"contexts {r.n(0)} / {r.n(1)}, error share {r.error_share() or 0:.2f}",
                     fontsize=8)  # fmt: skip
        ax.set_xlabel("mean direct logit-difference part (balanced over labels)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
