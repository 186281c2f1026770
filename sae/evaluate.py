"""How good an SAE is, as SAELens measures it: does it keep what the model uses?

Mirrors SAELens 6.54.12 `sae_lens/evals.py` (the version jaxlm pins, read in the installed
package: `get_recons_loss`, `_kl`, `get_downstream_reconstruction_metrics`,
`ExplainedVarianceCalculator`, `get_sparsity_and_variance_metrics`), on held-out rows of prepared
DATADIRs:

* `ce_loss_without_sae`: the model's mean next-token loss; `ce_loss_with_sae`: the same with the
  SAE's reconstruction spliced in at the hook (`SpliceSAE`, SAELens' `standard_replacement_hook`);
  `ce_loss_with_ablation`: with the hook's activations set to 0 (`ZeroAblate`).
* `ce_loss_score` ("CE loss recovered") = (ablation - with_sae) / (ablation - without_sae)
  = 1 - (with_sae - without_sae) / (ablation - without_sae): 1 when splicing costs nothing, 0 when
  it is as bad as deleting the layer's MLP output. None where ablation costs nothing.
* `kl_div_with_sae`, `kl_div_with_ablation`: KL(clean || edited) of the next-token distributions,
  mean over tokens (SAELens' `_kl`); `kl_div_score` = 1 - with_sae / with_ablation.
* `explained_variance` = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2): squared error over the
  variance of the activations around their mean, both pooled over all tokens (numerator and
  denominator averaged separately, sums in float64), as `ExplainedVarianceCalculator` computes it.
  SAELens releases from PR #443 (April 2025) until PR #665 (March 2026; issue #659), e.g. v6.18.0
  (github jbloomAus/SAELens at 91ca16c), divided by a garbled E||x||^2-like term instead: their
  values read higher.
* `mse`: squared error summed over F, mean over tokens; `l0`: mean latents != 0 per token;
  `dead_fraction`: latents never != 0 on these rows; `dense_fraction`: latents != 0 on more than
  10% of the tokens (the SAE trainer's `dense_features` threshold).

Token positions: a prepared row holds seq_len + 1 tokens; the model reads the first seq_len and
each position's loss is against the next token, so losses and KL are means over the same
seq_len positions per row. (SAELens feeds a context of n tokens and averages the CE over n - 1
positions, the KL over all n: one position more in the KL, the same definitions.) No token is
ignored: jaxlm rows run mid-stream, with EOS between stories and no BOS to leave out.

Each data source is evaluated on its own (named by its directory's last component) and pooled
(every token weighs the same, so a pooled mean is a token-weighted mix of the sources). Rows come
from the validation split (held out from SAE and model training) when it has rows; otherwise the
train split, and the result says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError
from jaxlm.model import GPTNeo
from sae.base import SAE
from sae.io import CFG, hook_name, read_cfg

log = logging.getLogger("jaxlm")

SAE_LENS_REFERENCE = "SAELens 6.54.12 sae_lens/evals.py"
DENSE_THRESHOLD = 0.1  # a latent firing on more than this share of tokens is dense
EVAL_JSON = "eval.json"


# --- the two edits SAELens evaluates with -------------------------------------------------------


class SpliceSAE(nnx.Module):
    """MLPEdit: layer `layer`'s MLP hidden state replaced by the SAE's reconstruction of it
    (SAELens' `standard_replacement_hook`). An nnx.Module, so `generate` takes it too."""

    def __init__(self, sae: SAE, layer: int):
        self.sae, self.layer = sae, layer

    def __call__(self, h_btf: jax.Array) -> jax.Array:
        x_nf = h_btf.reshape(-1, h_btf.shape[-1])  # [B * T, F]
        return self.sae.decode(self.sae.encode(x_nf)).reshape(h_btf.shape)


class ZeroAblate(nnx.Module):
    """MLPEdit: layer `layer`'s MLP hidden state set to 0 (SAELens' `standard_zero_ablate_hook`)."""

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(self, h_btf: jax.Array) -> jax.Array:
        return jnp.zeros_like(h_btf)


# --- rows ---------------------------------------------------------------------------------------


def eval_split(datadir: str | Path, split: str = "validation") -> tuple[str, str | None]:
    """(the split to read, a note when it is not the one asked for): `validation` falls back to
    `train` when a DATADIR has no validation rows (a tiny native set may have none)."""
    from jaxlm.data.pipeline import read_metadata

    splits = read_metadata(datadir)["splits"]
    if splits.get(split, {}).get("rows", 0) > 0:
        return split, None
    if split == "validation" and splits.get("train", {}).get("rows", 0) > 0:
        note = f"{datadir} has no validation rows: evaluated on train rows (not held out)"
        log.warning("%s", note)
        return "train", note
    raise UserError(f"{datadir}: no rows in split {split!r}")


def read_rows(
    datadir: str | Path, *, split: str, max_rows: int, batch_size: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Batches [B, seq_len + 1] of whole rows (inputs and next tokens): `max_rows` rows (or all
    the split has) drawn without replacement in an order seeded by `seed`, so a subset of a
    split is a random sample of it, not its first stories; the last batch may be smaller."""
    from jaxlm.data.pipeline import make_loader

    if max_rows < 1 or batch_size < 1:
        raise UserError(f"--rows {max_rows} and --batch-size {batch_size} must be >= 1")
    loader = make_loader(
        [(str(datadir), 1.0)], split=split, batch_size=1, seed=seed, num_epochs=1, shuffle=True
    )
    rows: list[np.ndarray] = []
    for batch in loader:
        rows.append(batch["tokens"][0])
        if len(rows) == batch_size:
            yield np.stack(rows)
            rows = []
        max_rows -= 1
        if max_rows == 0:
            break
    if rows:
        yield np.stack(rows)


def source_names(paths: Sequence[str | Path]) -> list[str]:
    """Each DATADIR's last path component; more of the path where two would share a name."""
    parts = [Path(os.path.normpath(p)).parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise UserError(f"--data: a directory is given twice ({', '.join(map(str, paths))})")


# --- one batch ----------------------------------------------------------------------------------


def _stats_fn(model: GPTNeo, pairs: Sequence[tuple[SAE, int]]):
    """Jitted tokens [B, T + 1] -> each (SAE, layer) pair's per-token values [N] (summed in
    float64 on the host) and per-latent firing counts [S]. One clean forward serves every pair
    (`GPTNeo.trace`), and each pair's two edited forwards start at its layer (`GPTNeo.resume`):
    the clean blocks before it are the same for both edits and for every pair, so evaluating the
    SAEs of all 8 layers runs 8 + 2 * 36 blocks a batch instead of 8 * 4 * 8."""
    graphdef, state = nnx.split(model)
    split = [nnx.split(sae) for sae, _ in pairs]
    sgraphs, sstates = [g for g, _ in split], [st for _, st in split]
    layers = [layer for _, layer in pairs]

    def logp(logits_btv: jax.Array) -> jax.Array:  # [N, V]
        return jax.nn.log_softmax(logits_btv.reshape(-1, logits_btv.shape[-1]), axis=-1)

    @jax.jit
    def run(state, sstates, tokens_bt1):
        m = nnx.merge(graphdef, state)
        inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
        gold_n1 = targets_bt.reshape(-1, 1)
        x_btd, x_in, hidden = m.trace(inputs_bt)
        clean_nv = logp(m.unembed(m.ln_f(x_btd)))
        ce_clean_n = -jnp.take_along_axis(clean_nv, gold_n1, axis=-1)[:, 0]
        outs = []
        for sgraph, sstate, layer in zip(sgraphs, sstates, layers, strict=True):
            sae = nnx.merge(sgraph, sstate)
            h_btf = hidden[layer]
            x_nf = h_btf.reshape(-1, h_btf.shape[-1]).astype(jnp.float32)  # [N = B * T, F]
            acts_ns = sae.encode(x_nf)
            out_nf = sae.decode(acts_ns)
            fired_ns = acts_ns != 0
            out = {"ce_clean_n": ce_clean_n}
            for name, edit in (("sae", SpliceSAE(sae, layer)), ("zero", ZeroAblate(layer))):
                edited_nv = logp(m.unembed(m.ln_f(m.resume(x_in[layer], layer, edit=edit))))
                out[f"ce_{name}_n"] = -jnp.take_along_axis(edited_nv, gold_n1, axis=-1)[:, 0]
                # KL(clean || edited), as torch's kl_div(log q, p) summed over V: p (log p - log q)
                out[f"kl_{name}_n"] = (jnp.exp(clean_nv) * (clean_nv - edited_nv)).sum(-1)
            outs.append(out | {
                "sq_norm_n": jnp.square(x_nf).sum(-1),
                "sq_resid_n": jnp.square(x_nf - out_nf).sum(-1),
                "sum_x_f": x_nf.sum(0),
                "l0_n": fired_ns.sum(-1),
                "fired_s": fired_ns.sum(0),
            })  # fmt: skip
        return outs

    return lambda tokens_bt1: run(state, sstates, tokens_bt1)


@dataclasses.dataclass
class _Totals:
    """Float64 sums over the tokens seen, and how many tokens each latent fired on."""

    fired_s: np.ndarray
    sum_x_f: np.ndarray
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    tokens: int = 0
    rows: int = 0
    # [rows, 3] each row's summed next-token loss: clean, SAE spliced in, MLP zero-ablated
    row_ce: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3)))

    @classmethod
    def zeros(cls, n_latents: int, d_in: int) -> _Totals:
        return cls(np.zeros(n_latents, np.int64), np.zeros(d_in, np.float64))

    def add(self, stats: dict, rows: int) -> None:
        self.fired_s += np.asarray(stats["fired_s"], np.int64)
        self.sum_x_f += np.asarray(stats["sum_x_f"], np.float64)
        for k, v in stats.items():
            if k.endswith("_n"):
                self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(v, np.float64).sum())
        self.tokens += int(np.asarray(stats["l0_n"]).size)
        self.rows += rows
        per_row = [np.asarray(stats[k], np.float64).reshape(rows, -1).sum(1)
                   for k in ("ce_clean_n", "ce_sae_n", "ce_zero_n")]  # fmt: skip
        self.row_ce = np.concatenate([self.row_ce, np.stack(per_row, 1)])

    def __add__(self, other: _Totals) -> _Totals:
        keys = set(self.sums) | set(other.sums)
        sums = {k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in keys}
        return _Totals(
            self.fired_s + other.fired_s,
            self.sum_x_f + other.sum_x_f,
            sums,
            self.tokens + other.tokens,
            self.rows + other.rows,
            np.concatenate([self.row_ce, other.row_ce]),
        )

    def metrics(self) -> dict:
        n = max(self.tokens, 1)
        mean = {k[:-2]: v / n for k, v in self.sums.items()}  # "ce_clean_n" -> "ce_clean"
        density_s = self.fired_s / n
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "explained_variance": _explained_variance(
                mean["sq_resid"], mean["sq_norm"], self.sum_x_f / n
            ),
            "mse": mean["sq_resid"],
            "l0": mean["l0"],
            "dead_fraction": float((self.fired_s == 0).mean()),
            "dense_fraction": float((density_s > DENSE_THRESHOLD).mean()),
            "ce_loss_without_sae": mean["ce_clean"],
            "ce_loss_with_sae": mean["ce_sae"],
            "ce_loss_with_ablation": mean["ce_zero"],
            "ce_loss_score": _ratio(
                mean["ce_zero"] - mean["ce_sae"], mean["ce_zero"] - mean["ce_clean"]
            ),
            "kl_div_with_sae": mean["kl_sae"],
            "kl_div_with_ablation": mean["kl_zero"],
            "kl_div_score": _ratio(mean["kl_zero"] - mean["kl_sae"], mean["kl_zero"]),
            **ce_score_interval(self.row_ce, self.tokens),
        }


def ce_score_interval(
    row_ce: np.ndarray, tokens: int, *, resamples: int = 1000, seed: int = 0
) -> dict:
    """The CE loss score's uncertainty over rows, and whether it is measurable at all.

    `ce_loss_score_ci95`: percentile bootstrap over rows (every row has the same token count, so a
    row-resampled ratio of sums is the token-pooled score). `ablation_gain` (ce_loss_with_ablation
    - ce_loss_without_sae) with its interval: the score divides by it, so where the interval does
    not lie above 0 (zero-ablating the MLP does not clearly cost the model anything on these rows,
    or even helps it) the score is not a measure of the SAE and `ce_loss_score_measurable` is
    False. Decided before reading any such case off a model: a ratio is only read where its
    denominator is known to be positive."""
    n = len(row_ce)
    if n == 0 or tokens == 0:
        return {"ce_loss_score_ci95": None, "ablation_gain_ci95": None,
                "ce_loss_score_measurable": False}  # fmt: skip
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    sums = row_ce[idx].sum(1)  # [R, 3]
    gain_r = sums[:, 2] - sums[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        score_r = (sums[:, 2] - sums[:, 1]) / gain_r
    score_r = score_r[np.isfinite(score_r)]
    gain_lo, gain_hi = np.percentile(gain_r, [2.5, 97.5]) / max(tokens, 1)  # per token
    return {
        "ce_loss_score_ci95": (
            [float(x) for x in np.percentile(score_r, [2.5, 97.5])] if len(score_r) else None
        ),  # fmt: skip
        "ablation_gain_ci95": [float(gain_lo), float(gain_hi)],
        "ce_loss_score_measurable": bool(gain_lo > 0),
    }


def _explained_variance(mse: float, mean_sq_norm: float, mean_x_f: np.ndarray) -> float:
    """SAELens' `ExplainedVarianceCalculator.compute`, edge cases included."""
    total_variance = mean_sq_norm - float(np.square(mean_x_f).sum())
    if total_variance < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / total_variance


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None (JSON null) where b is 0: the score is undefined, not infinite."""
    return a / b if b != 0 and math.isfinite(a / b) else None


# --- the evaluation -----------------------------------------------------------------------------


def check_fits(model: GPTNeo, sae: SAE, layer: int, where: str = "the SAE") -> None:
    """The SAE reads this model's layer: widths agree, the layer exists, no activation scale left
    to apply (training folds it into the weights before saving)."""
    if not 0 <= layer < model.cfg.n_layers:
        raise UserError(
            f"{where}: layer {layer}, but the model has layers 0..{model.cfg.n_layers - 1}"
        )
    if sae.cfg.d_in != model.cfg.d_ff:
        raise UserError(f"{where} reads {sae.cfg.d_in} dims; the model's MLP has {model.cfg.d_ff}")
    if sae.cfg.normalize_activations != "none":
        raise UserError(
            f"{where}: normalize_activations={sae.cfg.normalize_activations!r} is not "
            "supported here (save it with the scale folded in)"
        )


def _check_data(model: GPTNeo, datadir: str) -> None:
    from jaxlm.data.pipeline import read_metadata

    seq_len = read_metadata(datadir)["seq_len"]
    if seq_len > model.cfg.max_positions:
        raise UserError(
            f"{datadir}: rows of {seq_len} tokens exceed the model's "
            f"{model.cfg.max_positions} positions"
        )


def evaluate(
    model: GPTNeo,
    sae: SAE,
    layer: int,
    sources: Sequence[str | Path | tuple[str, float] | Any],
    **kwargs: Any,
) -> dict:
    """SAELens' reconstruction and downstream metrics of `sae` on `model`'s MLP `layer`, per
    source and pooled (see the module docstring): `evaluate_layers` of one SAE."""
    return evaluate_layers(model, [(sae, layer)], sources, **kwargs)[0]


def evaluate_layers(
    model: GPTNeo,
    pairs: Sequence[tuple[SAE, int]],
    sources: Sequence[str | Path | tuple[str, float] | Any],
    *,
    split: str = "validation",
    rows: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """`evaluate` of several (SAE, layer) pairs of one model on the same rows, sharing each
    batch's clean forward (`_stats_fn`); each result is what `evaluate` returns for its pair.
    `sources` are DATADIRs, (DATADIR, weight) pairs, or the trainers' `DataSource`s (weights are
    ignored: `rows` rows of each). Returns JSON-ready dicts; `save_eval` writes one beside its
    SAE."""
    from tqdm.auto import tqdm

    for sae, layer in pairs:
        check_fits(model, sae, layer)
    if rows < 1 or batch_size < 1:
        raise UserError(f"--rows {rows} and --batch-size {batch_size} must be >= 1")
    paths = [str(s[0] if isinstance(s, tuple) else getattr(s, "path", s)) for s in sources]
    if not paths:
        raise UserError("evaluate needs at least one data source (--data DATADIR)")
    stats_fn = _stats_fn(model, pairs)
    zeros = lambda: [_Totals.zeros(sae.cfg.n_latents, sae.cfg.d_in) for sae, _ in pairs]  # noqa: E731
    per_source: list[dict] = [{} for _ in pairs]
    pooled = zeros()
    for name, path in zip(source_names(paths), paths, strict=True):
        _check_data(model, path)
        used, note = eval_split(path, split)
        totals = zeros()
        batches = read_rows(path, split=used, max_rows=rows, batch_size=batch_size, seed=seed)
        for tokens in tqdm(batches, desc=f"eval {name}", unit="batch", disable=not progress):
            if tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size:
                raise UserError(
                    f"{path}: token ids outside the model's vocabulary [0, {model.cfg.vocab_size})"
                )
            for t, stats in zip(totals, jax.device_get(stats_fn(jnp.asarray(tokens))), strict=True):
                t.add(stats, tokens.shape[0])
        for i, t in enumerate(totals):
            per_source[i][name] = {
                "path": path,
                "split": used,
                **({"note": note} if note else {}),
                **t.metrics(),
            }
            pooled[i] = pooled[i] + t
    return [
        {
            "reference": SAE_LENS_REFERENCE,
            "layer": layer,
            "hook_name": hook_name(layer),
            "d_sae": sae.cfg.n_latents,
            "split": split,
            "rows_per_source": rows,
            "seed": seed,
            "dense_threshold": DENSE_THRESHOLD,
            "sources": per_source[i],
            "pooled": pooled[i].metrics(),
        }
        for i, (sae, layer) in enumerate(pairs)
    ]


def save_eval(sae_dir: str | Path, result: dict) -> Path:
    """Write `result` to SAE_DIR/eval.json and under cfg.json's `jaxlm.eval` (SAELens ignores the
    `jaxlm` block; nothing outside it changes). cfg.json is replaced atomically: its presence
    means a complete SAE."""
    d = Path(sae_dir)
    path = d / CFG
    cfg = read_cfg(path)
    if not isinstance(cfg.get("jaxlm"), dict):
        cfg["jaxlm"] = {}
    cfg["jaxlm"]["eval"] = result
    try:
        (d / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
        tmp = path.with_name(CFG + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{d}: cannot write the evaluation ({e.strerror})") from None
    return d / EVAL_JSON


def firing_counts(
    model: GPTNeo, sae: SAE, layer: int, batches: Iterator[np.ndarray]
) -> tuple[np.ndarray, int]:
    """(tokens each latent fired on [S], tokens seen) over batches of rows [B, seq_len + 1]."""
    from sae.activations import capture_fn

    capture = capture_fn(model, layer)
    encode = nnx.jit(lambda s, x_nf: (s.encode(x_nf) != 0).sum(0))
    counts, tokens = np.zeros(sae.cfg.n_latents, np.int64), 0
    for rows in batches:
        x_nf = capture(jnp.asarray(rows[:, :-1]))
        counts += np.asarray(encode(sae, x_nf), np.int64)
        tokens += x_nf.shape[0]
    return counts, tokens
