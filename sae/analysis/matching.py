"""Matching the features of two SAEs (before / after continual pre-training) one to one.

Similarity: the cosine of the two SAEs' effective decoder rows (`attribution.effective_decoder`:
the saved W_dec, or the SAE's own affine decode), in the MLP hidden space F both read. CPT starts
from the pretrained weights, so the MLP neurons keep their meaning and a feature that survives
keeps its decoder row; the rows through W_down (the residual write) would mix in how W_down itself
changed, and D is a quarter of F, so unrelated directions look alike more often there (the matched
pairs' write cosine is reported beside, for reading).

One to one: `scipy.optimize.linear_sum_assignment` maximising the summed cosine over the live
features of each SAE (dead ones have no behaviour to match; their decoder rows are whatever
training left). A pair is a *counterpart* when its cosine is at least `threshold`, 0.7 by default:
far above chance (two random directions in F = 256 dimensions have cosine SD 1/16; the largest of
a million such pairs is about 0.33) and the usual bar for "the same feature" in work on feature
universality. `chance_cosine` reports the best match of the same number of random directions, so
a reader can see the margin. Memory is O(S_before * S_after) (the cosine matrix): fine for the
demo's 1024 latents, 1 GB at 16k x 16k.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError

THRESHOLD = 0.7


@dataclasses.dataclass(frozen=True)
class Match:
    """A one-to-one assignment: before[i] <-> after[i] with their cosine, best first."""

    before: np.ndarray  # [M] feature ids of the first SAE
    after: np.ndarray  # [M] feature ids of the second
    cosine: np.ndarray  # [M]
    n_before: int  # live features matched over
    n_after: int

    def counterpart(self, f: int, threshold: float = THRESHOLD) -> tuple[int, float] | None:
        """(after id, cosine) of before-feature f when they match above `threshold`."""
        i = np.flatnonzero(self.before == f)
        if not len(i) or self.cosine[i[0]] < threshold:
            return None
        return int(self.after[i[0]]), float(self.cosine[i[0]])

    def reverse(self) -> Match:
        return Match(self.after, self.before, self.cosine, self.n_after, self.n_before)


def _unit_rows(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W, np.float64)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-30)


def match_features(
    W_before_sf: np.ndarray,
    W_after_sf: np.ndarray,
    *,
    live_before: np.ndarray | None = None,
    live_after: np.ndarray | None = None,
) -> Match:
    """The one-to-one matching of decoder rows [S1, F] and [S2, F] maximising summed cosine."""
    from scipy.optimize import linear_sum_assignment

    if W_before_sf.ndim != 2 or W_before_sf.shape[1] != W_after_sf.shape[1]:
        raise UserError(f"decoders of shapes {W_before_sf.shape} and {W_after_sf.shape} do not "
                        "read the same space")  # fmt: skip
    ids_b = _ids(live_before, W_before_sf.shape[0])
    ids_a = _ids(live_after, W_after_sf.shape[0])
    if not len(ids_b) or not len(ids_a):
        raise UserError("no live features to match")
    cos = _unit_rows(W_before_sf[ids_b]) @ _unit_rows(W_after_sf[ids_a]).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    order = np.argsort(-cos[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    return Match(ids_b[rows], ids_a[cols], cos[rows, cols], len(ids_b), len(ids_a))


def _ids(live: np.ndarray | None, S: int) -> np.ndarray:
    return np.arange(S) if live is None else np.flatnonzero(np.asarray(live, bool))


def chance_cosine(n_before: int, n_after: int, dim: int, seed: int = 0) -> float:
    """The best one-to-one matched cosine between random Gaussian directions of these sizes."""
    rng = np.random.default_rng(seed)
    m = match_features(rng.normal(size=(n_before, dim)), rng.normal(size=(n_after, dim)))
    return float(m.cosine.max())


def write_cosine(W_b_sf, W_a_sf, W_down_b_fd, W_down_a_fd, m: Match) -> np.ndarray:
    """[M] the matched pairs' cosine through each model's W_down (their residual writes)."""
    r_b = _unit_rows(np.asarray(W_b_sf, np.float64)[m.before] @ np.asarray(W_down_b_fd, np.float64))
    r_a = _unit_rows(np.asarray(W_a_sf, np.float64)[m.after] @ np.asarray(W_down_a_fd, np.float64))
    return (r_b * r_a).sum(1)


# --- the report ---------------------------------------------------------------------------------


def _feature_view(att, tsea_res, f: int, contrast: str, pair_index: int | None) -> dict:
    """One feature in one model: its attribution entry (balanced part; per label part, mean
    activation, firing rate at the contexts) and its TSEA contrast."""
    r = att[contrast]
    entry = r.feature_entry(f, r.mean_parts())
    entry.pop("feature")
    if tsea_res is not None and pair_index is not None:
        entry["tsea_contrast"] = round(float(tsea_res.contrast[pair_index, f]), 6)
    entry["live"] = bool(att.live[f])
    return entry


def match_report(
    att_before,
    att_after,
    m: Match,
    *,
    contrast: str = "names",
    tsea_before=None,
    tsea_after=None,
    pair_index: int | None = None,
    threshold: float = THRESHOLD,
    top: int = 10,
    write_cos: np.ndarray | None = None,
    chance: float | None = None,
) -> dict:
    """Which of the first model's top features toward the contrast's first label (by their
    attribution) have a counterpart in the second, how they changed, and which of the second
    model's top features are new (no counterpart)."""
    rb, ra = att_before[contrast], att_after[contrast]
    mb, ma = rb.mean_parts(), ra.mean_parts()
    view_b = lambda f: _feature_view(att_before, tsea_before, f, contrast, pair_index)  # noqa: E731
    view_a = lambda f: _feature_view(att_after, tsea_after, f, contrast, pair_index)  # noqa: E731
    rev = m.reverse()
    top_b = [int(f) for f in np.argsort(-mb, kind="stable")[:top] if mb[f] > 0]
    top_a = [int(f) for f in np.argsort(-ma, kind="stable")[:top] if ma[f] > 0]
    before_rows = []
    for f in top_b:
        row = {"feature": f, "before": view_b(f)}
        cp = m.counterpart(f, threshold)
        nearest = m.counterpart(f, -np.inf)
        if nearest is not None:
            row["assigned"], row["cosine"] = nearest[0], round(nearest[1], 4)
        row["has_counterpart"] = cp is not None
        if cp is not None:
            row["after"] = view_a(cp[0])
        before_rows.append(row)
    after_rows = []
    for f in top_a:
        cp = rev.counterpart(f, threshold)
        nearest = rev.counterpart(f, -np.inf)
        row = {"feature": f, "after": view_a(f), "new": cp is None}
        if nearest is not None:
            row["assigned"], row["cosine"] = nearest[0], round(nearest[1], 4)
        if cp is not None:
            row["before"] = view_b(cp[0])
        after_rows.append(row)
    good = m.cosine >= threshold
    push_b = _push_share(mb, m.before[good])
    push_a = _push_share(ma, m.after[good])
    out = {
        "contrast": contrast,
        "similarity": "cosine of effective decoder rows (F)",
        "threshold": threshold,
        "live_before": m.n_before,
        "live_after": m.n_after,
        "matched_above_threshold": int(good.sum()),
        "cosine_quantiles": {
            q: round(float(np.quantile(m.cosine, float(q))), 4) for q in ("0.1", "0.5", "0.9")
        },  # fmt: skip
        "lost_before": int(m.n_before - good.sum()),
        "new_after": int(m.n_after - good.sum()),
        "toward_positive_push_by_matched": {"before": push_b, "after": push_a},
        "top_before": before_rows,
        "top_after": after_rows,
    }
    if write_cos is not None:
        out["write_cosine_of_matched_median"] = round(float(np.median(write_cos[good])), 4) if (
            good.any()) else None  # fmt: skip
    if chance is not None:
        out["chance_cosine"] = round(chance, 4)
    return out


def _push_share(mean_s: np.ndarray, matched: np.ndarray) -> float | None:
    """Of the features' positive balanced push, the fraction carried by matched features."""
    pos = np.clip(mean_s, 0, None)
    return round(float(pos[matched].sum() / pos.sum()), 4) if pos.sum() > 0 else None


def scatter_plot(att_before, att_after, m: Match, path: str | Path, *, contrast: str = "names",
                 threshold: float = THRESHOLD, label_top: int = 5) -> Path:  # fmt: skip
    """Matched features (cosine >= threshold): balanced part before vs after, and mean activation
    at the first label's contexts before vs after; the top `label_top` before carry their ids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rb, ra = att_before[contrast], att_after[contrast]
    good = m.cosine >= threshold
    fb, fa = m.before[good], m.after[good]
    lab = rb.contrast.labels[0]
    nb, na = max(rb.n(0), 1), max(ra.n(0), 1)
    panels = [
        ("balanced mean part (+ toward " + lab + ")", rb.mean_parts()[fb], ra.mean_parts()[fa]),
        (f"mean activation at {lab} contexts", rb.act_sum[0, fb] / nb, ra.act_sum[0, fa] / na),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (name, x, y) in zip(axes, panels, strict=True):
        ax.scatter(x, y, s=6, c=m.cosine[good], cmap="viridis", vmin=threshold, vmax=1)
        lo = float(min(x.min(initial=0), y.min(initial=0)))
        hi = float(max(x.max(initial=0), y.max(initial=0)))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.6)
        for i in np.argsort(-x, kind="stable")[:label_top]:
            ax.annotate(f"{fb[i]}->{fa[i]}", (x[i], y[i]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("before", fontsize=8)
        ax.set_ylabel("after", fontsize=8)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{int(good.sum())} features matched at cosine >= {threshold} "
                 f"({m.n_before} / {m.n_after} live)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
