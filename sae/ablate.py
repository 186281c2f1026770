"""Do the features an analysis names cause a behaviour? Remove them and sample again.

`FeatureAblation` is an MLPEdit that takes chosen SAE features out of layer `layer`'s MLP hidden
state while the model writes: with acts = sae.encode(h),

    zero:   h' = h - decode_F(acts)            (decode_F: the features F' decoded part only)
    clamp:  h' = h - decode_F(acts - X)        (features F set to X on every token)

where decode_F(a) = sae.decode(a masked to F) - sae.decode(0), i.e. a[:, F] @ W_dec[F, :] for the
plain decoder (and the decoder-norm rescaling of a topk SAE, whatever `decode` does). Only those
features' decoded part changes: the SAE's error term h - sae.decode(acts) and every other feature
stay, so the edit tests the features, not the SAE's reconstruction (which splicing the SAE in
would). Ablating every feature leaves the error term + b_dec.

Several SAEs at several layers (`jaxlm.model.LayerEdits` of one FeatureAblation per SAE) remove
their features at all those layers in one forward pass: a preference spread over the layers'
MLPs (the demo's English names: the last layer's MLP carries only ~5% of it) cannot be taken out
at one layer, and downstream layers then see the upstream removals. Each layer keeps its own
SAE's error term, as one ablation does. Everything below takes either kind of edit.

`ablation_report` samples the same stories (prompts, seeds, batches) with and without the edit,
so the edit is the only difference, and reads their translation artifacts (English-name rate,
English-dialogue share, jaxlm.eval.artifacts) side by side, with a paired bootstrap interval of
the change. Two such runs with other features (top and random) sample the same stories too, so
`paired_runs` compares their ablated sides story by story, from the counts each row keeps. Random
control features (`--random K`) are drawn, seeded, from the LIVE ones: active on rows of the
DATADIRs, or, without any, firing in the SAE's training (its sparsity.safetensors);
with several SAEs, K from each (or `--random K1,K2,...`: as many at each layer as the features
they control for there), SAE i drawing with seed + i so that the layers' draws differ.

A sample-level rate sits at its ceiling when the model never writes the other kind of name (the
demo's pretrained model writes only English names: no ablation can move 1.00), so
`name_logit_diff` also measures the edit where the decision is made, continuously: at the name
contexts `jaxlm sae attribute` finds in held-out rows (`attribution.find_contexts`), the model's
full logit difference (mean logit over the English-name first tokens minus that over the Arabic
ones, exactly attribute's `logit_diff`), without and with the edit, balanced over the two labels
(the mean of the English-target contexts' mean and the Arabic-target contexts' mean), with
bootstrap intervals over contexts (paired for the change). Fixed before measuring the demo.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError
from sae.base import SAE
from sae.io import SPARSITY

if TYPE_CHECKING:
    from jaxlm.eval.artifacts import NameLists
    from jaxlm.generate import SamplingConfig
    from jaxlm.model import GPTNeo, LayerEdits
    from jaxlm.tokenizer import Tokenizer

Mode = Literal["zero", "clamp"]
# SAELens and jaxlm write log10(frequency + 1e-10): a latent that never fired reads -10 (up to
# float32 rounding); anything above -9.999 fired at least once (frequency > 2.3e-13).
LOG10_NEVER_FIRED = -10.0
_POOLED = {
    "english_name_rate": ("english_mentions", "arabic_mentions"),
    "english_dialogue_share": ("english_turns", "arabic_turns"),
}  # as artifacts pools them


class FeatureAblation(nnx.Module):
    """MLPEdit removing SAE features' decoded contribution (see the module docstring).

    The chosen features are a 0/1 mask [S] and the clamp value a traced scalar, so sampling with
    other features reuses the compiled program. An nnx.Module, as `generate` takes edits."""

    def __init__(
        self,
        sae: SAE,
        layer: int,
        features: Sequence[int],
        *,
        mode: Mode = "zero",
        value: float = 0.0,
    ):
        S = sae.cfg.n_latents
        bad = [f for f in features if not 0 <= int(f) < S]
        if bad:
            raise UserError(f"features {bad} are not latents of the SAE (0..{S - 1})")
        if mode not in ("zero", "clamp"):
            raise UserError(f"--mode {mode!r}: zero or clamp")
        mask_s = np.zeros(S, np.float32)
        mask_s[np.asarray(features, np.int64)] = 1.0
        # only arrays beyond the layer: a static attribute (mode, the ids) would be part of the
        # compiled program's key, and other features or modes would compile it again
        self.sae, self.layer = sae, layer
        self.mask_s = nnx.Variable(jnp.asarray(mask_s))
        self.value = nnx.Variable(jnp.float32(value if mode == "clamp" else 0.0))

    def __call__(self, h_btf: jax.Array) -> jax.Array:
        x_nf = h_btf.reshape(-1, h_btf.shape[-1]).astype(jnp.float32)  # [N, F]
        acts_ns = self.sae.encode(x_nf)
        delta_ns = (acts_ns - self.value[...]) * self.mask_s[...]
        # decode(0) is b_dec exactly, so an empty mask removes exactly 0
        base_1f = self.sae.decode(jnp.zeros((1, acts_ns.shape[-1]), jnp.float32))
        return (x_nf - (self.sae.decode(delta_ns) - base_1f)).reshape(h_btf.shape)


# --- which features -----------------------------------------------------------------------------


def parse_features(spec: str, n_latents: int) -> list[int]:
    """`3,17,42` (ids, as TSEA and the dashboards number them) -> sorted unique ids."""
    try:
        ids = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--features {spec!r}: expected comma-separated latent ids") from None
    if not ids:
        raise UserError("--features: no ids given")
    bad = [i for i in ids if not 0 <= i < n_latents]
    if bad:
        raise UserError(f"--features: {bad} are not latents of the SAE (0..{n_latents - 1})")
    return ids


def parse_counts(spec: str, n_saes: int) -> list[int]:
    """`--random`'s `K` (the same for every SAE) or `K1,K2,...` (one per SAE, in --sae order) ->
    one count per SAE. Each is checked against the live latents when drawn (`pick_random`)."""
    try:
        ks = [int(p) for p in spec.split(",")]
    except ValueError:
        raise UserError(f"--random {spec!r}: expected K or comma-separated counts") from None
    if len(ks) not in (1, n_saes):
        raise UserError(f"--random {spec}: {len(ks)} counts for {n_saes} SAEs: give one K, or "
                        "one per --sae in the same order")  # fmt: skip
    return ks * n_saes if len(ks) == 1 else ks


def live_from_sparsity(sae_dir: str | Path) -> np.ndarray:
    """Ids of latents that fired in training: log10 frequency above -10 in sparsity.safetensors
    (the trainer's last feature-sampling window; SAELens writes the same file)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(sae_dir) / SPARSITY
    if not path.is_file():
        raise UserError(f"{path}: missing; pass --data DATADIR to find live features on data")
    try:
        log_s = load_file(str(path))["sparsity"]
    except (OSError, KeyError, SafetensorError) as e:
        raise UserError(f"{path}: cannot read a 'sparsity' tensor ({e})") from None
    return np.flatnonzero(log_s > LOG10_NEVER_FIRED + 1e-3)


def pick_random(live: np.ndarray, k: int, seed: int) -> list[int]:
    """`k` distinct live latents, drawn with numpy's generator seeded by `seed`; sorted."""
    if k < 1:
        raise UserError(f"--random {k}: must be >= 1")
    if k > len(live):
        raise UserError(f"--random {k}: only {len(live)} live features to draw from")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(np.asarray(live), size=k, replace=False))


# --- the experiment -----------------------------------------------------------------------------


def paired_difference(
    per_a: Sequence[dict], per_b: Sequence[dict], *, resamples: int = 1000, seed: int = 0
) -> dict:
    """{metric: {"value", "ci95", "n"}}: pooled rate of the stories `per_a` minus that of their
    pairs `per_b` (story i of both came from the same prompt and seed), with a percentile
    bootstrap over story pairs (resampled together, so the pairing is kept). The value is None
    where either side has nothing to count; resamples where one side has nothing are skipped."""
    n = len(per_a)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n)) if n else np.zeros((0, 0), np.int64)
    out: dict[str, dict[str, Any]] = {}
    for name, (hit, other) in _POOLED.items():
        counts = [
            np.array([[p[hit], p[hit] + p[other]] for p in per], np.float64).reshape(-1, 2)
            for per in (per_a, per_b)
        ]
        (num_a, den_a), (num_b, den_b) = (c.T for c in counts)
        if not n or den_a.sum() == 0 or den_b.sum() == 0:
            out[name] = {"value": None, "ci95": None, "n": n}
            continue
        value = num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            rate_a = num_a[idx].sum(1) / den_a[idx].sum(1)  # [R]
            diffs = rate_a - num_b[idx].sum(1) / den_b[idx].sum(1)
        diffs = diffs[np.isfinite(diffs)]
        lo, hi = np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (value, value)
        out[name] = {
            "value": float(value),
            "ci95": [float(min(lo, value)), float(max(hi, value))],
            "n": n,
        }
    return out


def paired_runs(
    rows_a: Sequence[dict], rows_b: Sequence[dict], *, resamples: int = 1000, seed: int = 0
) -> dict:
    """`paired_difference` of two ablations' ablated stories (e.g. the top features' minus random
    ones'): the stories of one `ablation_report` (its JSONL rows) against another's, story i of
    each from the same prompt and seed. Two runs are paired only when they sampled the same
    stories without an edit (same prompts, seeds and baseline texts), so the edits are the only
    difference; otherwise ValueError says which story differs. The pairing is what makes the
    interval narrower than two independent intervals combined: the samples share their noise."""
    if len(rows_a) != len(rows_b):
        raise ValueError(f"{len(rows_a)} stories against {len(rows_b)}: not the same sampling")
    for a, b in zip(rows_a, rows_b, strict=True):
        for k in ("prompt", "seed", "baseline"):
            if a.get(k) != b.get(k):
                raise ValueError(f"story {a.get('i')}: another {k}, not the same sampling")
        if "counts" not in a or "counts" not in b:
            raise ValueError(f"story {a.get('i')}: no per-story counts (written before they were)")
    per_a = [r["counts"]["ablated"] for r in rows_a]
    per_b = [r["counts"]["ablated"] for r in rows_b]
    return paired_difference(per_a, per_b, resamples=resamples, seed=seed)


def ablation_report(
    model: GPTNeo,
    tok: Tokenizer,
    edit: FeatureAblation | LayerEdits,
    *,
    n: int,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 160,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 64,
    lists: NameLists | None = None,
    resamples: int = 1000,
    baseline: Sequence[str] | None = None,
) -> tuple[list[dict], dict]:
    """(one row per story: prompt, seed, ablated and baseline text, each side's name and dialogue
    counts; the report: both sides' artifact metrics and their paired difference). Sampling as
    `jaxlm.eval.samples` samples (the demo's temperature 0.8, top-k 50 unless `sampling` says
    otherwise). `baseline`: the unedited stories of an earlier run with the same model, prompts,
    seeds and sampling settings (the caller checks), read instead of sampled again: sampling
    without an edit does not depend on the edit, so they are the stories this run would sample."""
    from jaxlm.eval.artifacts import artifact_metrics
    from jaxlm.eval.samples import DEMO_SAMPLING, sample_stories

    def sample(ablation: FeatureAblation | LayerEdits | None) -> list[str]:
        return sample_stories(
            model,
            tok,
            n,
            prompts,
            max_new_tokens=max_new_tokens,
            sampling=sampling or DEMO_SAMPLING,
            seed=seed,
            batch_size=batch_size,
            edit=ablation,
        )

    if baseline is not None and len(baseline) != n:
        raise ValueError(f"{len(baseline)} baseline stories for n={n}")
    baseline = list(baseline) if baseline is not None else sample(None)
    ablated = sample(edit)
    reports = {
        side: artifact_metrics(stories, lists, resamples=resamples, seed=seed)
        for side, stories in (("ablated", ablated), ("baseline", baseline))
    }
    per = {side: r.pop("per_story") for side, r in reports.items()}
    begin = list(prompts) if prompts else [""]
    counted = [k for pair in _POOLED.values() for k in pair]
    rows = [
        {
            "i": i,
            "prompt": begin[i % len(begin)],
            "seed": seed + i // batch_size,
            "ablated": a,
            "baseline": b,
            # what the rates pool, per story: another run's rows pair with these (`paired_runs`)
            "counts": {side: {k: per[side][i][k] for k in counted} for side in per},
        }
        for i, (a, b) in enumerate(zip(ablated, baseline, strict=True))
    ]
    diff = paired_difference(per["ablated"], per["baseline"], resamples=resamples, seed=seed)
    return rows, {**reports, "difference": diff}


# --- the name-slot logit difference --------------------------------------------------------------


def _residuals_fn(model: GPTNeo, edit: FeatureAblation | LayerEdits):
    """tokens [B, T] -> (final residual without the edit, with it) [B, T, D] float32, jit'd once:
    the residual attribute reads (`attribution.final_residual`, bit for bit). The edited forward
    starts at the first edited layer from the clean one's input to it (`GPTNeo.trace`, `resume`)."""
    from jaxlm.model import LayerEdits

    graphdef, params = nnx.split(model, nnx.Param)
    egraph, estate = nnx.split(edit)
    first = min(edit.layers, default=0) if isinstance(edit, LayerEdits) else edit.layer

    @jax.jit
    def run(params, estate, tokens_bt):
        m, e = nnx.merge(graphdef, params), nnx.merge(egraph, estate)
        x_btd, inputs, _ = m.trace(tokens_bt)
        return (x_btd.astype(jnp.float32),
                m.resume(inputs[first], first, edit=e).astype(jnp.float32))  # fmt: skip

    return partial(run, params, estate)


def name_slot_logit_diffs(
    model: GPTNeo,
    tok: Tokenizer,
    edit: FeatureAblation | LayerEdits,
    batches: Iterable[np.ndarray],
    lists: Mapping[str, Iterable[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(label [C], logit difference without the edit [C], with it [C], rows read) at the name
    contexts of token rows ([B, T] batches): attribute's contexts (`name_contrast` of `lists`,
    {label: words} with the positive label first, the demo's English and Arabic names when None;
    `find_contexts`) and its logit difference (`Readout.directions`, `logit_difference`)."""
    from sae.analysis import attribution as at

    contrast = at.name_contrast(tok, at.demo_name_lists() if lists is None else lists)
    ro = at.Readout.of(model, 0)  # only its ln_f and unembedding enter the logit difference
    us = ro.directions(contrast)
    tbytes = at.token_bytes(tok)
    run = _residuals_fn(model, edit)
    labels, base, ablated = [np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)]
    row0 = 0
    for tokens_bt in batches:
        tokens_bt = np.asarray(tokens_bt)
        ctx = at.find_contexts(tokens_bt, tbytes, contrast, row0=row0)
        row0 += tokens_bt.shape[0]
        if not len(ctx):  # nothing to read: skip the forward
            continue
        u_cd = at.context_directions(us, ctx.form)
        local = ctx.row - (row0 - tokens_bt.shape[0])
        for x_btd, out in zip(run(jnp.asarray(tokens_bt, jnp.int32)), (base, ablated),
                              strict=True):  # fmt: skip
            x_cd = np.asarray(jax.device_get(x_btd)[local, ctx.pos], np.float64)
            out.append(at.logit_difference(ro, u_cd, x_cd))
        labels.append(ctx.label)
    return np.concatenate(labels), np.concatenate(base), np.concatenate(ablated), row0


def name_logit_diff(
    model: GPTNeo,
    tok: Tokenizer,
    edit: FeatureAblation | LayerEdits,
    batches: Iterable[np.ndarray],
    lists: Mapping[str, Iterable[str]] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """The report's `name_logit_diff`: baseline, ablated and their paired difference (ablated -
    baseline), each `{"value", "ci95", "n"}`, balanced over the two labels, and per label.

    The balanced mean is the weighted mean with each context weighing 1 / (its label's count),
    so `jaxlm.eval.artifacts.bootstrap` (a percentile bootstrap of a weighted mean, resampling
    contexts) gives the interval; the three share their resamples (same seed, same n), and the
    difference resamples per-context changes, so it is paired."""
    from jaxlm.eval.artifacts import bootstrap
    from sae.analysis.attribution import demo_name_lists

    lists = demo_name_lists() if lists is None else lists
    labels = list(lists)
    label_c, base_c, abl_c, rows = name_slot_logit_diffs(model, tok, edit, batches, lists)
    counts = np.bincount(label_c, minlength=2)
    weight_c = (1.0 / counts[label_c]).tolist()  # empty without contexts
    sides = {"baseline": base_c, "ablated": abl_c, "difference": abl_c - base_c}
    by_label = {
        lab: {"contexts": int(counts[j])}
        | {k: float(v[label_c == j].mean()) if counts[j] else None for k, v in sides.items()}
        for j, lab in enumerate(labels)
    }
    return {
        "definition": f"mean logit over {labels[0]}-name first tokens minus over {labels[1]}-"
        "name first tokens at attribute's name contexts, balanced over the two labels",
        "rows": rows,
        "contexts": {lab: int(counts[j]) for j, lab in enumerate(labels)},
        **{k: bootstrap(v, weight_c, resamples=resamples, seed=seed) for k, v in sides.items()},
        "by_label": by_label,
    }
