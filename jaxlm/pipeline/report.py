"""`jaxlm report`: one page of what pipeline runs found, to decide whether CPT repaired the model.

    jaxlm report runs/demo [runs/other ...] --out reports/demo [--overwrite]

Reads each RUN/results.json (written by `jaxlm pipeline`, in the format of the results contract)
and writes into DIR:

* `index.html`: one self-contained page (plots embedded as data URIs; no script, style or font
  from the network; the feature dashboards copied into DIR and linked relatively), plain enough
  to print: header and findings, loss curves, validation losses per source before and after
  CPT, artifact metrics, judge scores, SAE quality, attribution, ablation, TSEA, sample stories
  side by side (right to left), a sweep's table, and the commands and config of every stage;
* `report.md`: the same tables in Markdown (plots in `figures/`);
* `metrics.json`: the numbers per model label as flat dotted keys (`artifacts.english_name_rate`,
  `eval_loss.native`, `sae.ce_loss_recovered`, `judge.grammar`, ...), an interval under
  `KEY.ci95`, and per pair of models the changes (`comparisons["A -> B"]`).

Every key of results.json may be missing (a partial run): the page says what is not there.

Choices that are ours:
* A change between two models' estimates (before -> after) gets a 95% interval by MOVER (Zou and
  Donner 2008, after Newcombe 1998): the two estimates' own asymmetric intervals combined as if
  independent. For the artifact rates (different samples) that is the case; for validation losses
  of the same rows before and after it is conservative (wider than a paired interval would be).
  Judge differences use the paired interval of `jaxlm judge compare` as it was written.
* A change is called one only when its interval excludes 0; otherwise the page says "no clear
  change". Every sentence is phrased from the figures: the method says what a direction means
  (native loss falling is repair, translated loss rising is forgetting), the numbers decide it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import math
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jaxlm.errors import UserError
from jaxlm.outputs import Output

ROLES = ("pretrain", "cpt", "control")
ROLE_WORDS = {"pretrain": "after pretraining", "cpt": "after CPT", "control": "control"}
ROLE_COLOR = {"pretrain": "tab:blue", "cpt": "tab:orange", "control": "tab:green"}
# (key, heading, digits)
ARTIFACTS = (
    ("english_name_rate", "English-name rate", 2),
    ("english_dialogue_share", "English-dialogue share", 2),
    ("distinct_2", "distinct-2", 3),
    ("repetition", "repetition", 3),
    ("latin_share", "Latin share", 3),
    ("length_words", "length (words)", 1),
)
SAE_KEYS = (
    ("explained_variance", "explained variance", 3),
    ("l0", "L0", 1),
    ("dead_fraction", "dead", 3),
    ("dense_fraction", "dense", 3),
    ("ce_loss_recovered", "CE loss recovered", 3),
    ("kl_div", "KL", 4),
    ("clean_loss", "clean loss", 3),
    ("spliced_loss", "spliced loss", 3),
    ("zero_ablated_loss", "zero-ablated loss", 3),
)
ANALYSIS_KEYS = (
    ("english_name_attribution", "English-name attribution"),
    ("english_name_error_share", "English-name error share"),
    ("english_dialogue_attribution", "English-dialogue attribution"),
    ("english_dialogue_error_share", "English-dialogue error share"),
)
ABLATION_KEYS = (
    ("english_name_rate_none", "no ablation"),
    ("english_name_rate_random", "random features"),
    ("english_name_rate_top", "top English-name features"),
)
# the name-slot logit difference (English - Arabic name first tokens at held-out name contexts,
# balanced over the two labels): each side, then each ablation's paired change from none
LOGIT_KEYS = (
    ("name_logit_diff_none", "no ablation"),
    ("name_logit_diff_random", "random features"),
    ("name_logit_diff_top", "top English-name features"),
)
LOGIT_CHANGE_KEYS = (
    ("name_logit_diff_change_random", "random - none"),
    ("name_logit_diff_change_top", "top - none"),
)
JUDGE_SCORES = ("grammar", "creativity", "consistency", "plot")
SAMPLES_SHOWN = 3  # stories per model, side by side
LOSS_DIGITS, RATE_DIGITS, JUDGE_DIGITS, LOGIT_DIGITS = 3, 2, 2, 3


# --- numbers ------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite number as float; anything else (a string, a bool, NaN, null) is None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _get(d: Any, *keys: str) -> Any:
    """d[k1][k2]... or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _dict(x: Any) -> dict:
    """x if it is an object, else {} (a part of results.json of the wrong type counts as absent)."""
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


MAX_DIGITS = 7  # the most decimals a clear change is written with


def _fmt(x: float, digits: int, sign: bool = False) -> str:
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class Est:
    """A number with its 95% interval (lo, hi None when the results gave none)."""

    value: float
    lo: float | None = None
    hi: float | None = None
    n: int | None = None

    @classmethod
    def of(cls, obj: Any) -> Est | None:
        """From `{"value"|"mean"|"loss": x, "ci95": [lo, hi], "n": k}` or a bare number."""
        if (v := _num(obj)) is not None:
            return cls(v)
        if not isinstance(obj, dict):
            return None
        v = next((_num(obj[k]) for k in ("value", "mean", "loss") if k in obj), None)
        if v is None:
            return None
        ci = obj.get("ci95")
        lo, hi = (
            (_num(ci[0]), _num(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None,) * 2
        )
        n = obj.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) else None
        return cls(v, lo, hi, n) if lo is not None and hi is not None else cls(v, n=n)

    def ci(self, digits: int) -> str:
        if self.lo is None or self.hi is None:  # both or neither
            return ""
        return f"[{_fmt(self.lo, digits)}, {_fmt(self.hi, digits)}]"

    def text(self, digits: int) -> str:
        return f"{_fmt(self.value, digits)} {self.ci(digits)}".strip()


@dataclasses.dataclass(frozen=True)
class Change:
    """after - before, with its interval (MOVER for two estimates, or as given)."""

    d: float
    lo: float | None = None
    hi: float | None = None

    @classmethod
    def between(cls, before: Est, after: Est) -> Change:
        d = after.value - before.value
        if before.lo is None or before.hi is None or after.lo is None or after.hi is None:
            return cls(d)
        lo = d - math.hypot(after.value - after.lo, before.hi - before.value)
        hi = d + math.hypot(after.hi - after.value, before.value - before.lo)
        return cls(d, lo, hi)

    @property
    def clear(self) -> bool | None:
        """Does the interval exclude 0? None without an interval."""
        return None if self.lo is None or self.hi is None else (self.lo > 0 or self.hi < 0)

    def ci(self, digits: int) -> str:
        if self.lo is None or self.hi is None:  # both or neither
            return ""
        return f"[{_fmt(self.lo, digits, True)}, {_fmt(self.hi, digits, True)}]"

    def words(self, digits: int, up: str = "rises", down: str = "falls") -> str:
        """ "falls (-0.94 [-1.00, -0.81])", "no clear change (+0.01 [-0.02, +0.04])". A clear
        change too small for `digits` gets more, up to 4 more (not "falls (-0.000 [-0.000,
        -0.000])", which reads as no change)."""
        if self.clear:
            ends = [abs(x) for x in (self.d, self.lo, self.hi) if x is not None]
            while digits < MAX_DIGITS and min(ends) < 0.5 * 10.0**-digits:
                digits += 1
        shown = f"{_fmt(self.d, digits, True)} {self.ci(digits)}".strip()
        if self.clear is None:
            return f"changes by {shown} (no interval given)"
        if not self.clear:
            return f"no clear change ({shown})"
        return f"{up if self.d > 0 else down} ({shown})"

    def as_json(self) -> dict:
        return {"change": self.d, "change_ci95": None if self.lo is None else [self.lo, self.hi]}


# --- the runs -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    dir: Path
    results: dict
    key: str  # its name, made unique among the runs of one report

    def path(self, p: Any) -> Path | None:
        """A path from results.json: absolute, or relative to the run directory."""
        if not isinstance(p, str) or not p:
            return None
        q = Path(p)
        return q if q.is_absolute() else self.dir / q

    @property
    def name(self) -> str:
        n = self.results.get("name")
        return n if isinstance(n, str) and n else self.dir.name


@dataclasses.dataclass
class Model:
    label: str  # unique over all runs of the report
    name: str  # its label inside its run
    run: Run
    rec: dict
    parent: str | None = None  # the label (over all runs) of the model it continued from

    @property
    def preset(self) -> str:
        p = self.rec.get("preset")
        return p if isinstance(p, str) and p else "(no preset)"

    @property
    def role(self) -> str:
        r = self.rec.get("role")
        return r if isinstance(r, str) and r else "(no role)"

    def est(self, *keys: str) -> Est | None:
        return Est.of(_get(self.rec, *keys))

    def part(self, key: str) -> dict | None:
        v = self.rec.get(key)
        return v if isinstance(v, dict) else None


@dataclasses.dataclass
class Pair:
    before: Model
    after: Model
    comparison: dict  # comparisons["before -> after"] of the results, {} if none

    @property
    def key(self) -> str:
        return f"{self.before.label} -> {self.after.label}"


def load_run(run_dir: str | Path) -> tuple[Path, dict]:
    """(directory, results) of one run; a missing or unreadable results.json is one line."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such run directory")
    path = d / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (is {d} a `jaxlm pipeline` workdir?)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d.resolve(), results


def _runs(run_dirs: list[Path], loaded: list[dict]) -> list[Run]:
    runs, seen = [], set()
    for d, results in zip(run_dirs, loaded, strict=True):
        run = Run(d, results, "")
        key, i = run.name, 2
        while key in seen:
            key, i = f"{run.name} ({i})", i + 1
        seen.add(key)
        run.key = key
        runs.append(run)
    return runs


def _models(runs: list[Run]) -> dict[str, Model]:
    """Every run's models; labels stay as written unless two runs share one (then `run/label`)."""
    raw = [
        (run, n, rec)
        for run in runs
        for n, rec in _dict(_get(run.results, "models")).items()
        if isinstance(rec, dict)
    ]
    count: dict[str, int] = {}
    for _, n, _ in raw:
        count[n] = count.get(n, 0) + 1
    label = {(run.key, n): (n if count[n] == 1 else f"{run.key}/{n}") for run, n, _ in raw}
    models = {label[run.key, n]: Model(label[run.key, n], n, run, rec) for run, n, rec in raw}
    for m in models.values():
        p = m.rec.get("parent")
        m.parent = label.get((m.run.key, p)) if isinstance(p, str) else None
    for m in models.values():  # a parent chain that loops (a malformed file) is cut
        seen, up = {m.label}, m.parent
        while up is not None and up not in seen:
            seen.add(up)
            up = models[up].parent
        if up is not None:
            m.parent = None
    return models


def _pairs(runs: list[Run], models: dict[str, Model]) -> list[Pair]:
    """(parent -> child) for every continued model, and every pair the comparisons name."""
    by_name = {(m.run.key, m.name): m for m in models.values()}
    pairs: dict[tuple[str, str], Pair] = {}
    for m in models.values():
        if m.parent:
            pairs[m.parent, m.label] = Pair(models[m.parent], m, {})
    for run in runs:
        for key, comp in _dict(_get(run.results, "comparisons")).items():
            a, _, b = key.partition(" -> ")
            ma, mb = by_name.get((run.key, a.strip())), by_name.get((run.key, b.strip()))
            if ma and mb and isinstance(comp, dict):
                pairs.setdefault((ma.label, mb.label), Pair(ma, mb, {})).comparison = comp
    return list(pairs.values())


def _groups(models: dict[str, Model]) -> dict[str, list[Model]]:
    """Models by (run, preset), pretrain first, then CPT, control and the rest."""
    runs = {m.run.key for m in models.values()}
    out: dict[str, list[Model]] = {}
    for m in models.values():
        g = m.preset if len(runs) == 1 else f"{m.run.key} / {m.preset}"
        out.setdefault(g, []).append(m)
    order = {r: i for i, r in enumerate(ROLES)}
    return {g: sorted(ms, key=lambda m: order.get(m.role, len(ROLES))) for g, ms in out.items()}


# --- page blocks --------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    text: str
    sub: str = ""  # a second line: an interval
    num: bool = True


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]


@dataclasses.dataclass
class Para:
    text: str
    cls: str = ""


@dataclasses.dataclass
class Bullets:
    items: list[str]


@dataclasses.dataclass
class Image:
    file: str  # relative to the report's folder
    alt: str


@dataclasses.dataclass
class Gallery:
    images: list[Image]  # small figures side by side


@dataclasses.dataclass
class Code:
    summary: str
    text: str


@dataclasses.dataclass
class Links:
    items: list[tuple[str, str]]  # (text, href relative to the report's folder)


@dataclasses.dataclass
class Stories:
    headers: list[str]
    rows: list[list[str | None]]


@dataclasses.dataclass
class Section:
    id: str
    title: str
    blocks: list


DASH = "—"


def text_cell(x: Any) -> Cell:
    return Cell(DASH if x is None or x == "" else str(x), num=False)


def num_cell(x: Any, digits: int = 3, *, pct: bool = False, sign: bool = False) -> Cell:
    """A raw number from results.json (a dash when it is not one)."""
    v = _num(x)
    if v is None:
        return Cell(DASH)
    if pct:
        return Cell(f"{v:.0%}")
    return Cell(f"{int(v):,}" if digits < 0 else _fmt(v, digits, sign))


def est_cell(e: Est | None, digits: int) -> Cell:
    return Cell(DASH) if e is None else Cell(_fmt(e.value, digits), e.ci(digits))


def change_cell(c: Change | None, digits: int) -> Cell:
    return Cell(DASH) if c is None else Cell(_fmt(c.d, digits, True), c.ci(digits))


def _gallery(blocks: list, items: list) -> None:
    """Images side by side, then whatever notes came with them."""
    images = [x for x in items if isinstance(x, Image)]
    if images:
        blocks.append(Gallery(images))
    blocks += [x for x in items if not isinstance(x, Image)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


# --- the builder --------------------------------------------------------------------------------


class Builder:
    """Reads the runs once and turns them into sections, figures and flat metrics."""

    def __init__(self, runs: list[Run], out: Path):
        self.runs, self.out = runs, out
        self.models = _models(runs)
        self.pairs = _pairs(runs, self.models)
        self.groups = _groups(self.models)
        self.missing: list[str] = []
        (out / "figures").mkdir(parents=True, exist_ok=True)

    def miss(self, blocks: list, text: str) -> None:
        """Say on the page (and in metrics.json) that something is not in the runs."""
        self.missing.append(text)
        where = "these runs" if len(self.runs) > 1 else "this run"
        blocks.append(Para(f"Not in {where}: {text}", "missing"))

    def save(self, fig: Any, name: str, alt: str) -> Image:
        fig.savefig(self.out / "figures" / f"{name}.png", dpi=100)
        return Image(f"figures/{name}.png", alt)

    def copy_image(self, blocks: list, run: Run, p: Any, name: str, what: str) -> None:
        """A PNG the run made, copied into figures/ (or said missing)."""
        src = run.path(p)
        if src is None:
            self.miss(blocks, f"{what} (no path given)")
        elif not src.is_file():
            self.miss(blocks, f"{what}: {src} not found")
        else:
            dst = f"figures/{_safe(name)}{src.suffix.lower() or '.png'}"
            shutil.copyfile(src, self.out / dst)
            blocks.append(Image(dst, what))

    def with_part(self, key: str, inner: str | None = None) -> list[Model]:
        """Models whose `key` is an object (holding an object `inner`, if named)."""
        return [
            m
            for m in self.models.values()
            if m.part(key) and (inner is None or isinstance(m.rec[key].get(inner), dict))
        ]

    def without(self, blocks: list, key: str, have: list[Model], what: str) -> None:
        lacking = [m.label for m in self.models.values() if m not in have]
        if lacking:
            who = "any model" if not have else ", ".join(lacking)
            self.miss(blocks, f"{what} for {who} (`{key}` absent or null)")

    def pair(self, before: Model, after: Model) -> Pair | None:
        return next((p for p in self.pairs if p.before is before and p.after is after), None)

    def sections(self) -> list[Section]:
        makers = [
            header,
            sweep_section,
            loss_section,
            eval_loss_section,
            artifacts_section,
            judge_section,
            sae_section,
            attribution_section,
            ablation_section,
            tsea_section,
            samples_section,
            provenance_section,
        ]
        return [s for s in (make(self) for make in makers) if s is not None]


# --- 1. header and findings ---------------------------------------------------------------------


def header(b: Builder) -> Section:
    blocks: list = [_runs_table(b)]
    if not b.models:
        b.miss(blocks, "models (no trained model is recorded yet)")
    corpus = _corpus_table(b)
    if corpus is not None:
        blocks.append(corpus)
    blocks.append(Para(f"What {'these runs' if len(b.runs) > 1 else 'this run'} found", "lead"))
    found = findings(b)
    if found:
        blocks.append(Bullets(found))
    else:
        blocks.append(
            Para(
                "Nothing to compare yet: no model continued from another (CPT or "
                "control) with results on both sides.",
                "missing",
            )
        )
    return Section("summary", "Summary", blocks)


def _runs_table(b: Builder) -> Table:
    rows = []
    for run in b.runs:
        stages = {
            k: s for k, s in _dict(_get(run.results, "stages")).items() if isinstance(s, dict)
        }
        status = {k: str(s.get("status") or "") for k, s in stages.items()}
        done = sum(1 for s in status.values() if s.startswith(("done", "skipped")))
        failed = [k for k, s in status.items() if s == "failed"]
        text = f"{done} of {len(stages)} done" if stages else "(none recorded)"
        text += f"; failed: {', '.join(failed)}" if failed else ""
        mtime = (run.dir / "results.json").stat().st_mtime
        cfg = run.results.get("config_file")
        rows.append(
            [
                text_cell(run.name),
                text_cell(run.dir),
                text_cell(cfg if isinstance(cfg, str) else "(not recorded)"),
                text_cell(time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))),
                text_cell(text),
            ]
        )
    return Table(["run", "directory", "config file", "results.json written", "stages"], rows)


def _corpus_table(b: Builder) -> Table | None:
    rows = []
    for run in b.runs:
        for source, c in _dict(_get(run.results, "corpus")).items():
            if isinstance(c, dict):
                row = [text_cell(run.name), text_cell(source)]
                rows.append(row + [num_cell(c.get(k), -1) for k in ("stories", "tokens")])
    return Table(["run", "corpus", "stories", "tokens"], rows) if rows else None


def findings(b: Builder) -> list[str]:
    """Sentences from the numbers: per group, CPT against pretraining (and the control)."""
    out = []
    for g, ms in b.groups.items():
        lead = f"{g}: " if len(b.groups) > 1 else ""
        pre = next((m for m in ms if m.role == "pretrain"), None)
        if pre is not None:  # no pretrained model in the group: no CPT to compare with it
            children = [m for m in ms if m.parent == pre.label]
            controls = [m for m in children if m.role == "control"]
            for cpt in (m for m in children if m.role == "cpt"):
                found = _artifact_findings(pre, cpt, controls) + _loss_findings(b, cpt, controls)
                found += _judge_findings(b.pair(pre, cpt)) + _tsea_findings(b.pair(pre, cpt))
                out += [lead + s for s in found]
        out += [lead + s for s in _ablation_findings(ms)]
        found = _component_findings(ms) + _all_layer_findings(ms) + _ce_findings(ms)
        out += [lead + s for s in found]
    return out


def _component_findings(ms: list[Model]) -> list[str]:
    """Where the pretrained model's preferences are made: the analysed layer's share of them."""
    out = []
    for m in (m for m in ms if m.role == "pretrain"):
        layer = _get(m.rec, "analysis", "layer")
        pairs = (("english_name", "English names"), ("english_dialogue", "English-order dialogue"))
        for key, what in pairs:
            comps = _dict(_get(m.rec, "analysis", f"{key}_components"))
            total = _num(_get(m.rec, "analysis", f"{key}_logit_diff"))
            here = _num(comps.get(f"mlp {layer}"))
            if not comps or total is None or here is None or total == 0:
                continue
            mlps = sum(v for n, v in comps.items() if n.startswith("mlp ") and _num(v) is not None)
            bias = _num(comps.get("ln_f bias"))
            out.append(
                f"{m.label}'s logit difference toward {what} at held-out contexts is "
                f"{_fmt(total, 2, True)}; the analysed layer's MLP (layer {layer}) writes "
                f"{_fmt(here, 2, True)} of it directly ({here / total:.0%}), all MLPs together "
                f"{_fmt(mlps, 2, True)}"
                + (f", ln_f's bias {_fmt(bias, 2, True)}" if bias is not None else "")
                + ": that layer's SAE can account for its part only."
            )
    return out


def _all_layer_findings(ms: list[Model]) -> list[str]:
    """With SAEs on every trained layer: the features' part summed over them, per model."""
    out = []
    pairs = (("english_name", "English names"), ("english_dialogue", "English-order dialogue"))
    for key, what in pairs:
        parts = []
        for m in ms:
            al = _dict(_get(m.rec, "analysis", "all_layers"))
            v, share = _num(al.get(f"{key}_attribution")), _num(al.get(f"{key}_error_share"))
            if v is not None:
                extra = f", error share {share:.2f}" if share is not None else ""
                parts.append(f"{m.label} {_fmt(v, 2, True)}{extra}")
        if parts:
            n = len(_list(_dict(_get(ms[0].rec, "analysis", "all_layers")).get("layers")))
            out.append(
                f"SAE features' direct push toward {what}, summed over the SAEs on "
                f"{n or 'all'} MLP layers (positive: toward English): {'; '.join(parts)}."
            )
    return out


def _ce_findings(ms: list[Model]) -> list[str]:
    """A source where an SAE's CE loss recovered is not a measure of it."""
    out = []
    for m in ms:
        for src, v in _dict(_get(m.rec, "sae", "eval", "per_source")).items():
            if isinstance(v, dict) and v.get("ce_loss_measurable") is False:
                gain = _get(v, "ablation_gain_ci95")
                g = (f" (the loss change from zero-ablating it: [{_fmt(gain[0], 3, True)}, "
                     f"{_fmt(gain[1], 3, True)}] per token)"
                     if isinstance(gain, list) and len(gain) == 2 and all(
                         _num(x) is not None for x in gain) else "")  # fmt: skip
                out.append(
                    f"{m.label}'s SAE: CE loss recovered on {src} rows is not measurable: "
                    f"zero-ablating the MLP does not clearly raise the loss there{g}, so the "
                    "score's denominator is not known to be positive."
                )
    return out


def _artifact_findings(pre: Model, cpt: Model, controls: list[Model]) -> list[str]:
    out = []
    for key, name, d in ARTIFACTS[:2]:
        before, after = pre.est("artifacts", "metrics", key), cpt.est("artifacts", "metrics", key)
        if before is None or after is None:
            continue
        s = (
            f"{name} in samples {before.text(d)} after pretraining → {after.text(d)} after "
            f"CPT: {Change.between(before, after).words(d)}"
        )
        for c in controls:
            if (e := c.est("artifacts", "metrics", key)) is not None:
                s += f"; {c.label} (control) {e.text(d)}: {Change.between(before, e).words(d)}"
        out.append(s + ".")
    return out


def _start(b: Builder, m: Model, source: str) -> Est | None:
    """A continued model's validation loss before its first update: its own `eval_loss_start`,
    else its parent's loss at the end of training (the same weights)."""
    e = m.est("eval_loss_start", source)
    if e is None and m.parent:
        e = b.models[m.parent].est("eval_loss", source)
    return e


def _sources(*ms: Model) -> list[str]:
    """The data sources any of `ms` has a validation loss for, in order of appearance."""
    seen: dict[str, None] = {}
    for m in ms:
        for key in ("eval_loss_start", "eval_loss"):
            part = m.part(key) or {}
            seen.update(dict.fromkeys(k for k, v in part.items() if Est.of(v) is not None))
    return list(seen)


def reading(source: str, c: Change) -> str:
    """What a change of a source's validation loss means for the method."""
    if c.clear is None:
        return "no interval"
    if not c.clear:
        return "no clear change"
    up = c.d > 0
    if "native" in source:
        return "native loss rises" if up else "repair: native loss falls"
    if "translated" in source:
        return "forgetting: translated loss rises" if up else "translated loss falls"
    return "rises" if up else "falls"


def _loss_findings(b: Builder, cpt: Model, controls: list[Model]) -> list[str]:
    out = []
    for source in _sources(cpt):
        before, after = _start(b, cpt, source), cpt.est("eval_loss", source)
        if before is None or after is None:
            continue
        c = Change.between(before, after)
        s = (
            f"{source} validation loss {before.text(LOSS_DIGITS)} before CPT → "
            f"{after.text(LOSS_DIGITS)} after: {c.words(LOSS_DIGITS)}, {reading(source, c)}"
        )
        for ctl in controls:
            cb, ca = _start(b, ctl, source), ctl.est("eval_loss", source)
            if cb is not None and ca is not None:
                s += f"; {ctl.label} (control): {Change.between(cb, ca).words(LOSS_DIGITS)}"
        out.append(s + ".")
    return out


def judge_pair(comp: Any) -> dict | None:
    """The paired scores of a `comparisons[...].judge` entry: the first comparison of a
    `jaxlm judge compare` output, or an entry that holds `scores` itself."""
    if not isinstance(comp, dict):
        return None
    first = comp.get("comparisons")
    if isinstance(first, list) and first and isinstance(first[0], dict):
        comp = first[0]
    return comp if isinstance(comp.get("scores"), dict) else None


def _judge_diff(s: Any) -> Change | None:
    d = _num(_get(s, "diff_b_minus_a"))
    if d is None:
        return None
    e = Est.of({"value": d, "ci95": _get(s, "ci95")})
    assert e is not None  # a dict with a numeric "value" always reads as an Est
    return Change(d, e.lo, e.hi)


def _judge_findings(p: Pair | None) -> list[str]:
    jp = judge_pair(p.comparison.get("judge")) if p else None
    if jp is None:
        return []
    clear: list[str] = []
    unclear: list[str] = []
    for score, s in jp["scores"].items():
        if (c := _judge_diff(s)) is not None:
            shown = f"{score} {_fmt(c.d, JUDGE_DIGITS, True)} {c.ci(JUDGE_DIGITS)}".strip()
            (clear if c.clear else unclear).append(shown)
    n = _num(jp.get("matched"))
    text = "Judge scores, CPT - pretraining" + (f" on {int(n)} paired stories" if n else "")
    text += ": " + ("; ".join(clear) if clear else "no clear difference in any score")
    if unclear:
        text += f"{'; no clear change in ' if clear else ' ('}{'; '.join(unclear)}"
        text += "" if clear else ")"
    return [text + "."]


def _tsea_counts(p: Pair | None) -> list[tuple[str, float | None, float | None]]:
    sets = _get(p.comparison, "tsea", "sets") if p else None
    if not isinstance(sets, dict):
        return []
    return [(k, _num(_get(v, "before")), _num(_get(v, "after"))) for k, v in sets.items()]


def _tsea_findings(p: Pair | None) -> list[str]:
    parts = [
        f"{k.replace('_', ' ')} {bv:g} → {av:g}"
        for k, bv, av in _tsea_counts(p)
        if bv is not None and av is not None
    ]
    if not parts:
        return []
    return [
        "SAE features promoting a token set beyond random directions (TSEA), before → "
        f"after CPT: {'; '.join(parts)}."
    ]


def _ablation_findings(ms: list[Model]) -> list[str]:
    out = []
    for m in ms:
        top = m.est("ablation", "english_name_rate_top")
        rnd = m.est("ablation", "english_name_rate_random")
        if top is None or rnd is None:
            continue
        feats = _get(m.rec, "ablation", "features_top")
        chosen = _get(m.rec, "ablation", "selection")
        how = f"; per layer {chosen}" if isinstance(chosen, str) else ""
        if isinstance(feats, dict) and feats:
            n = sum(len(_list(v)) for v in feats.values())
            which = f" ({n} features, at MLP layers {', '.join(map(str, feats))} at once{how})"
        else:
            which = f" ({', '.join(map(str, feats))})" if isinstance(feats, list) and feats else ""
        c = _top_minus_random(m)
        assert c is not None  # both rates are there
        said = ""
        if got := _mentions(m):
            said = (f"; name mentions (English / Arabic) {got[2]} with the top features, {got[1]} "
                    f"with random ones, {got[0]} unablated")  # fmt: skip
        out.append(
            f"Ablating {m.label}'s top English-name SAE features{which}: English-name rate "
            f"{top.text(RATE_DIGITS)}, against {rnd.text(RATE_DIGITS)} with as many random "
            f"features: {c.words(RATE_DIGITS, up='higher', down='lower')}{said}."
        )
    for m in ms:
        none = m.est("ablation", "name_logit_diff_none")
        top = m.est("ablation", "name_logit_diff_change_top")
        rnd = m.est("ablation", "name_logit_diff_change_random")
        if none is None or top is None or rnd is None:
            continue
        out.append(
            f"{m.label}'s name-slot logit difference (English - Arabic name first tokens at "
            f"held-out name contexts) {none.text(LOGIT_DIGITS)} unablated; with the top "
            f"features ablated it {_paired(top).words(LOGIT_DIGITS)}, with as many random "
            f"features it {_paired(rnd).words(LOGIT_DIGITS)}."
        )
    return out


def _top_minus_random(m: Model) -> Change | None:
    """The top ablation's English-name rate minus the random one's: the paired story-by-story
    difference where the runs kept it (same stories, so their noise cancels), else MOVER of the
    two rates' own intervals (wider: it treats the two samples as independent)."""
    if (paired := m.est("ablation", "difference_top_vs_random")) is not None:
        return _paired(paired)
    top = m.est("ablation", "english_name_rate_top")
    rnd = m.est("ablation", "english_name_rate_random")
    return Change.between(rnd, top) if top and rnd else None


def _mentions(m: Model) -> list[str] | None:
    """English / Arabic name mentions in the sampled stories: ["4346 / 1237", ...] for no
    ablation, random features, top features."""
    got = _get(m.rec, "ablation", "name_mentions")
    sides = [_get(got, k) for k in ("none", "random", "top")]
    if not all(isinstance(v, dict) for v in sides):
        return None
    return [f"{v.get('english')} / {v.get('arabic')}" for v in sides]


def _features_text(feats: Any) -> str | None:
    """The ablated features: ids (one layer), or per layer "L7: 1, 2; L6: ..." (several); a
    layer's count instead of its ids where they are many (a coverage pick: tens per layer)."""
    ids = lambda v: (", ".join(map(str, v)) if len(v) <= FEATURE_IDS_SHOWN  # noqa: E731
                     else f"{len(v)} features")  # fmt: skip
    if isinstance(feats, list):
        return ids(feats)
    if isinstance(feats, dict) and feats:
        return "; ".join(f"L{layer}: {ids(_list(v))}" for layer, v in feats.items())
    return None


FEATURE_IDS_SHOWN = 16  # a table cell lists up to this many ids per layer


def _paired(e: Est) -> Change:
    """A paired change written as an estimate (its own interval, not MOVER's)."""
    return Change(e.value, e.lo, e.hi)


# --- 8. a sweep's table -------------------------------------------------------------------------


def _sweep_rows(b: Builder) -> list[tuple[str, Model, Model]]:
    """(preset, pretrain, cpt) from each run's `sweep` list, else every pretrain -> cpt pair."""
    rows = []
    by_name = {(m.run.key, m.name): m for m in b.models.values()}
    for run in b.runs:
        for r in _list(run.results.get("sweep")):
            pre = by_name.get((run.key, _get(r, "pretrain")))
            cpt = by_name.get((run.key, _get(r, "cpt")))
            if pre and cpt:
                rows.append((str(_get(r, "preset") or cpt.preset), pre, cpt))
    if rows:
        return rows
    return [
        (p.after.preset, p.before, p.after)
        for p in b.pairs
        if p.before.role == "pretrain" and p.after.role == "cpt"
    ]


def sweep_section(b: Builder) -> Section | None:
    """The paper's table: one row per preset, before and after CPT (for a sweep, or several
    presets over the runs given)."""
    rows = _sweep_rows(b)
    if len(rows) < 2 and not any(isinstance(r.results.get("sweep"), list) for r in b.runs):
        return None
    ms = [m for _, pre, cpt in rows for m in (pre, cpt)]
    sources = _sources(*ms)
    scores = [s for s in JUDGE_SCORES if any(m.est("judge", "scores", s) for m in ms)]
    names = [f"{s} loss" for s in sources] + [h for _, h, _ in ARTIFACTS[:2]] + scores
    headers = ["preset", "parameters"] + [f"{n}: {w}" for n in names for w in ("pretrain", "CPT")]
    table = []
    for preset, pre, cpt in rows:
        params = _num(pre.rec.get("params"))
        row = [text_cell(preset), Cell(f"{params / 1e6:.2f}M" if params else DASH)]
        for s in sources:
            row.append(est_cell(pre.est("eval_loss", s) or _start(b, cpt, s), LOSS_DIGITS))
            row.append(est_cell(cpt.est("eval_loss", s), LOSS_DIGITS))
        for key, _, d in ARTIFACTS[:2]:
            row += [est_cell(m.est("artifacts", "metrics", key), d) for m in (pre, cpt)]
        for s in scores:
            row += [est_cell(m.est("judge", "scores", s), JUDGE_DIGITS) for m in (pre, cpt)]
        table.append(row)
    blocks: list = [
        Para(
            "One row per preset, before (pretrain) and after CPT; every number with "
            "its 95% interval; validation losses per data source."
        )
    ]
    if not scores:
        b.miss(blocks, "judge scores of the sweep's models")
    blocks.append(Table(headers, table))
    return Section("sweep", "Sweep: the paper's table", blocks)


# --- 2. loss curves -----------------------------------------------------------------------------


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(objects, lines skipped): a torn or malformed line is skipped, not fatal."""
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    return rows, bad


Points = list[tuple[float, float]]
Curve = tuple[Points, dict[str, Points]]  # (training loss, {source: validation loss})


def _curve(b: Builder, m: Model, blocks: list) -> Curve | None:
    """A model's metrics.jsonl: rows with `loss`, and rows with `eval_loss/<source>` (or a
    plain `eval_loss`) as validation points."""
    path = m.run.path(_get(m.rec, "train", "metrics"))
    if path is None or not path.is_file():
        b.miss(blocks, f"{m.label}'s training metrics ({path or '`train.metrics` not given'})")
        return None
    rows, bad = read_jsonl(path)
    if bad:
        blocks.append(Para(f"{path}: {bad} malformed line(s) skipped.", "missing"))
    train: Points = []
    evals: dict[str, Points] = {}
    for r in rows:
        step = _num(r.get("step"))
        if step is None:
            continue
        if (loss := _num(r.get("loss"))) is not None:
            train.append((step, loss))
        for k, v in r.items():
            if (k == "eval_loss" or k.startswith("eval_loss/")) and (x := _num(v)) is not None:
                evals.setdefault(k.partition("/")[2] or "validation", []).append((step, x))
    return train, evals


def _end_step(m: Model, curve: Curve | None) -> float:
    steps = [s for s, _ in curve[0]] + [s for p in curve[1].values() for s, _ in p] if curve else []
    return max(steps) if steps else (_num(_get(m.rec, "train", "steps")) or 0.0)


def _offset(b: Builder, m: Model, curves: dict[str, Curve | None]) -> float:
    """Where a continued model's step 0 sits on the shared axis: after its parent's last step
    (unless its own steps already count on from there)."""
    if not m.parent:
        return 0.0
    parent = b.models[m.parent]
    end = _offset(b, parent, curves) + _end_step(parent, curves.get(parent.label))
    c = curves.get(m.label)
    first = min((s for s, _ in c[0]), default=0.0) if c else 0.0
    return 0.0 if first >= end > 0 else end


def loss_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = [
        Para(
            "Training loss (lines) and validation loss per data source (markers; "
            "hollow: native) on one step axis: a continued model's steps follow its "
            "parent's, from the dashed line."
        )
    ]
    curves = {label: _curve(b, m, blocks) for label, m in b.models.items()}
    plotted = {g: ms for g, ms in b.groups.items() if any(curves[m.label] for m in ms)}
    if plotted:
        blocks.insert(1, _loss_plot(b, plotted, curves))
    images: list = []
    for m in b.models.values():  # the trainer's own plot where the metrics are missing
        if curves[m.label] is None and _get(m.rec, "train", "loss_plot"):
            what = f"{m.label}'s loss plot"
            b.copy_image(images, m.run, m.rec["train"]["loss_plot"], f"loss-{m.label}", what)
    _gallery(blocks, images)
    rows = [
        [
            text_cell(m.label),
            text_cell(m.role),
            num_cell(_get(m.rec, "train", "steps"), -1),
            *(num_cell(_get(m.rec, "train", k), LOSS_DIGITS) for k in ("first_loss", "last_loss")),
        ]
        for m in b.models.values()
    ]
    blocks.append(Table(["model", "role", "steps", "first loss", "last loss"], rows))
    return Section("loss", "Loss curves", blocks)


def _loss_plot(b: Builder, groups: dict[str, list[Model]], curves: dict) -> Image:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    markers = ["o", "s", "^", "D", "v", "P"]
    fig = Figure(figsize=(10, 3.8 * len(groups)))
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, (g, ms) in zip(axes, groups.items(), strict=True):
        sources: list[str] = []
        for i, m in enumerate(ms):
            if not (c := curves.get(m.label)):
                continue
            off, color = _offset(b, m, curves), ROLE_COLOR.get(m.role, f"C{i + 3}")
            if c[0]:
                xs, ys = [s + off for s, _ in c[0]], [v for _, v in c[0]]
                ax.plot(xs, ys, lw=1, color=color, label=m.label)
            for src, pts in c[1].items():
                sources += [] if src in sources else [src]
                mk, mfc = markers[sources.index(src) % len(markers)], _face(src, color)
                xs, ys = [s + off for s, _ in pts], [v for _, v in pts]
                ax.plot(xs, ys, ls=":", lw=0.8, marker=mk, ms=5, color=color, mfc=mfc)
            if off:
                ax.axvline(off, ls="--", lw=0.8, color="0.5")
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            Line2D(
                [],
                [],
                ls="none",
                marker=markers[i % len(markers)],
                color="0.3",
                mfc=_face(s, "0.3"),
                label=f"validation: {s}",
            )
            for i, s in enumerate(sources)
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper right")
        _log_axis(ax)
        ax.set(title=g, xlabel="step (continued training after its parent's)", ylabel="loss (log)")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return b.save(fig, "loss_curves", "training and validation loss curves")


def _log_axis(ax: Any) -> None:
    """A log y axis labelled in plain numbers (1, 2, 3, 5), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain)


def _face(source: str, color: str) -> str:
    return "white" if "native" in source else color


# --- 3. validation losses before / after --------------------------------------------------------


def eval_loss_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    have = [m for m in b.models.values() if m.part("eval_loss")]
    b.without(blocks, "eval_loss", have, "validation losses")
    title = "Validation loss per source, before and after CPT"
    if not have:
        return Section("eval-loss", title, blocks)
    sources = _sources(*have)
    rows = [
        [text_cell(m.label)] + [est_cell(m.est("eval_loss", s), LOSS_DIGITS) for s in sources]
        for m in have
    ]
    blocks.append(
        Para(
            "At the end of each model's training, per data source (mean loss per "
            "token, 95% interval):"
        )
    )
    blocks.append(Table(["model", *sources], rows))
    changes, plot = [], []
    for m in (m for m in have if m.parent):
        for s in _sources(m):
            before, after = _start(b, m, s), m.est("eval_loss", s)
            if before is not None and after is not None:
                c = Change.between(before, after)
                changes.append(
                    [
                        text_cell(m.label),
                        text_cell(s),
                        est_cell(before, LOSS_DIGITS),
                        est_cell(after, LOSS_DIGITS),
                        change_cell(c, LOSS_DIGITS),
                        text_cell(reading(s, c)),
                    ]
                )
                plot.append((m, s, before, after))
    if not changes:
        b.miss(blocks, "a continued model with validation losses before and after")
        return Section("eval-loss", title, blocks)
    blocks.append(
        Para(
            "Before (step 0 of continued training, or the parent's end) and after: "
            "repair is native loss falling, forgetting is translated loss rising. The "
            "change's interval combines the two intervals (MOVER)."
        )
    )
    blocks.append(Table(["model", "source", "before", "after", "change", "reading"], changes))
    blocks.append(_eval_bars(b, plot))
    return Section("eval-loss", title, blocks)


def _err(e: Est) -> list[list[float]] | None:
    """matplotlib's [[below], [above]] of an estimate's interval."""
    return None if e.lo is None or e.hi is None else [[e.value - e.lo], [e.hi - e.value]]


def _eval_bars(b: Builder, plot: list[tuple[Model, str, Est, Est]]) -> Image:
    from matplotlib.figure import Figure

    sources = list(dict.fromkeys(s for _, s, _, _ in plot))
    fig = Figure(figsize=(4.2 * len(sources) + 0.5, 3.4))
    axes = fig.subplots(1, len(sources), squeeze=False)[0]
    for ax, s in zip(axes, sources, strict=True):
        items = [(m, bf, af) for m, src, bf, af in plot if src == s]
        for i, (m, bf, af) in enumerate(items):
            for j, (e, color) in enumerate(((bf, "0.75"), (af, ROLE_COLOR.get(m.role, "C4")))):
                label = ("before" if j == 0 else "after") if i == 0 else None
                x = i + (j - 0.5) * 0.38
                ax.bar(x, e.value, 0.36, color=color, yerr=_err(e), capsize=3, label=label)
        ax.set_xticks(range(len(items)), [m.label for m, _, _ in items], fontsize=8)
        ax.set_title(f"{s} validation loss", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return b.save(fig, "eval_loss", "validation loss per source before and after")


# --- 4. artifact metrics ------------------------------------------------------------------------


def artifacts_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    have = b.with_part("artifacts", "metrics")
    b.without(blocks, "artifacts", have, "artifact metrics of samples")
    title = "Translation artifacts in samples"
    if not have:
        return Section("artifacts", title, blocks)
    blocks.append(
        Para(
            "Measured in stories sampled from each model (jaxlm.eval.artifacts): the "
            "share of name mentions that are transliterated English names, the share "
            "of dialogue turns in English order, distinct bigrams, repetition, Latin "
            "characters and length; 95% bootstrap intervals over stories."
        )
    )
    rows = []
    for m in have:
        n = _get(m.rec, "samples", "n") or _get(m.rec, "artifacts", "stories")
        cells = [est_cell(m.est("artifacts", "metrics", k), d) for k, _, d in ARTIFACTS]
        rows.append([text_cell(m.label), num_cell(n, -1), *cells])
    blocks.append(Table(["model", "stories", *(h for _, h, _ in ARTIFACTS)], rows))
    changes = []
    for p in b.pairs:
        for k, h, d in ARTIFACTS[:2]:
            bf, af = p.before.est("artifacts", "metrics", k), p.after.est("artifacts", "metrics", k)
            if bf is not None and af is not None:
                c = Change.between(bf, af)
                changes.append(
                    [
                        text_cell(p.key),
                        text_cell(h),
                        est_cell(bf, d),
                        est_cell(af, d),
                        change_cell(c, d),
                        text_cell(c.words(d).split(" (")[0]),
                    ]
                )
    if changes:
        blocks.append(Table(["pair", "metric", "before", "after", "change", "reading"], changes))
    metrics = [(("artifacts", "metrics", k), h) for k, h, _ in ARTIFACTS]
    blocks.append(_dot_whisker(b, have, metrics, "artifacts", "artifact metrics, 95% intervals"))
    return Section("artifacts", title, blocks)


def _dot_whisker(
    b: Builder,
    models: list[Model],
    metrics: list[tuple[tuple, str]],
    name: str,
    alt: str,
    cols: int = 3,
) -> Image:
    """One panel per metric; a dot with its interval per model."""
    from matplotlib.figure import Figure

    cols = min(cols, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.6 * cols, (0.45 * len(models) + 1.0) * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (keys, title) in zip(axes, metrics, strict=False):
        for i, m in enumerate(models):
            if (e := m.est(*keys)) is not None:
                color = ROLE_COLOR.get(m.role, "C4")
                ax.errorbar([e.value], [i], xerr=_err(e), fmt="o", capsize=3, color=color)
        ax.set_yticks(range(len(models)), [m.label for m in models], fontsize=8)
        ax.set_ylim(len(models) - 0.5, -0.5)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return b.save(fig, name, alt)


# --- 5. judge -----------------------------------------------------------------------------------


def judge_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    have = b.with_part("judge", "scores")
    b.without(blocks, "judge", have, "judge grades")
    if have:
        scores = list(dict.fromkeys(s for m in have for s in m.rec["judge"]["scores"]))
        rows = [
            [
                text_cell(m.label),
                text_cell(_get(m.rec, "judge", "judge_model")),
                num_cell(_get(m.rec, "judge", "n"), -1),
                *(est_cell(m.est("judge", "scores", s), JUDGE_DIGITS) for s in scores),
            ]
            for m in have
        ]
        blocks.append(
            Para(
                "Mean grade out of 10 over story completions, 95% bootstrap interval over stories."
            )
        )
        blocks.append(Table(["model", "judge", "stories", *scores], rows))
        metrics = [(("judge", "scores", s), s) for s in scores]
        blocks.append(_dot_whisker(b, have, metrics, "judge", "judge scores, 95% intervals", 4))
    _judge_comparisons(b, blocks)
    return Section("judge", "Judge scores", blocks)


def _judge_comparisons(b: Builder, blocks: list) -> None:
    rows, agreements = [], []
    for p in b.pairs:
        jp = judge_pair(p.comparison.get("judge"))
        if jp is None:
            continue
        for score, s in jp["scores"].items():
            c = _judge_diff(s)
            word = DASH if c is None else c.words(JUDGE_DIGITS, "B higher", "A higher")
            word = word.split(" (")[0]
            rows.append(
                [
                    text_cell(p.key),
                    text_cell(score),
                    num_cell(jp.get("matched"), -1),
                    num_cell(_get(s, "mean_a"), JUDGE_DIGITS),
                    num_cell(_get(s, "mean_b"), JUDGE_DIGITS),
                    change_cell(c, JUDGE_DIGITS),
                    *(num_cell(_get(s, k), pct=True) for k in ("b_better", "a_better", "ties")),
                    text_cell(word),
                ]
            )
        if isinstance(_get(p.comparison, "judge_agreement", "scores"), dict):
            agreements.append((p, jp, p.comparison["judge_agreement"]))
    if not rows:
        b.miss(blocks, "paired judge comparisons (`comparisons[...].judge`)")
        return
    blocks.append(
        Para(
            "Paired comparisons: the same story beginnings completed by both models, "
            "B - A per score with a paired bootstrap interval, and the shares of "
            "stories where B or A scored higher."
        )
    )
    heads = ["A -> B", "score", "stories", "A", "B", "B - A", "B better", "A better", "ties"]
    blocks.append(Table([*heads, "reading"], rows))
    if not agreements:
        b.miss(blocks, "judge agreement (`comparisons[...].judge_agreement`)")
    for p, jp, ag in agreements:
        _agreement(b, blocks, p, jp, ag)


def agreement_sentence(score: str, c: Change, noise: Est, n: Any) -> str:
    """What the judge's own disagreement on one story means for a model difference's size: a
    difference smaller than it cannot be seen story by story, only in the mean over the paired
    stories (and whether that mean is clear is its interval's business)."""
    d, over = JUDGE_DIGITS, f"the {n} paired stories" if _num(n) else "the paired stories"
    verdict = "excludes 0: a clear difference" if c.clear else "includes 0: no clear difference"
    if c.clear is None:
        verdict = "is not given"
    if abs(c.d) < noise.value:
        size = (
            "smaller than the judge's own disagreement with itself on one story "
            f"({noise.text(d)} points): single stories cannot show it, only the mean over {over}"
        )
    else:
        size = (
            "at least the judge's own disagreement with itself on one story "
            f"({noise.text(d)} points): it stands out of the judge's noise even story by story"
        )
    return f"{score}: B - A {_fmt(c.d, d, True)} {c.ci(d)} is {size}; its interval {verdict}."


def _agreement(b: Builder, blocks: list, p: Pair, jp: dict, ag: dict) -> None:
    mode = "its own repeated grades" if ag.get("mode") == "repeats" else "a second grading"
    rows, sentences, plot = [], [], []
    for score, s in ag["scores"].items():
        noise = Est.of({"value": _get(s, "mean_abs_diff"), "ci95": _get(s, "mean_abs_diff_ci95")})
        rows.append(
            [
                text_cell(score),
                num_cell(_get(s, "pearson"), 2),
                num_cell(_get(s, "spearman"), 2),
                est_cell(noise, JUDGE_DIGITS),
                num_cell(_get(s, "exact"), pct=True),
                num_cell(_get(s, "within_1"), pct=True),
            ]
        )
        c = _judge_diff(_get(jp, "scores", score))
        if noise is not None and c is not None:
            plot.append((score, c, noise))
            sentences.append(agreement_sentence(score, c, noise, jp.get("matched")))
    blocks.append(
        Para(
            f"How far the judge agrees with {mode} ({ag.get('pairs', '?')} pairs of "
            f"grades of {ag.get('stories', '?')} stories), against {p.key}:"
        )
    )
    heads = ["score", "Pearson", "Spearman", "mean |difference|", "exact", "within 1"]
    blocks.append(Table(heads, rows))
    if sentences:
        blocks.append(Bullets(sentences))
        blocks.append(_agreement_plot(b, p, plot))


def _agreement_plot(b: Builder, p: Pair, plot: list[tuple[str, Change, Est]]) -> Image:
    """Per score: the model difference with its interval, over a grey band of +- the judge's
    mean disagreement with itself on one story."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(7, 0.55 * len(plot) + 1.4))
    ax = fig.subplots()
    for i, (_, c, noise) in enumerate(plot):
        ax.fill_betweenx([i - 0.3, i + 0.3], -noise.value, noise.value, color="0.85", lw=0)
        err = None if c.lo is None or c.hi is None else [[c.d - c.lo], [c.hi - c.d]]
        ax.errorbar([c.d], [i], xerr=err, fmt="o", capsize=4, color="tab:orange")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(plot)), [s for s, _, _ in plot])
    ax.set_ylim(len(plot) - 0.5, -0.5)
    ax.set_xlabel("points out of 10")
    ax.set_title(f"{p.key}: model difference and the judge's own noise", fontsize=9)
    handles = [
        Line2D([], [], marker="o", color="tab:orange", label="B - A, 95% interval"),
        Patch(color="0.85", label="± judge's mean disagreement with itself on one story"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return b.save(fig, f"judge_agreement-{_safe(p.key)}", "model difference against judge noise")


# --- 6. SAEs: quality, attribution, ablation, TSEA, dashboards ---------------------------------


def sae_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    have = b.with_part("sae", "eval")
    b.without(blocks, "sae", have, "SAE evaluation")
    if have:
        blocks.append(
            Para(
                "Each model's SAE on an MLP layer (the analysed layer first): the variance it "
                "explains, active latents per token (L0), dead and dense latent "
                "fractions, the share of the language-model loss recovered when the "
                "reconstruction is spliced in, and the KL divergence it adds."
            )
        )
        rows, mixed = [], []
        for m in have:  # the analysed layer first, then any other layers trained with it
            for sae in [m.rec["sae"], *_list(m.rec["sae"].get("other_layers"))]:
                if srcs := _pools_unmeasurable(_dict(sae.get("eval"))):
                    mixed.append(f"{m.label} (layer {sae.get('layer')}): {', '.join(srcs)}")
                rows.append(
                    [
                        text_cell(m.label),
                        num_cell(sae.get("layer"), -1),
                        text_cell(sae.get("architecture")),
                        num_cell(sae.get("d_sae"), -1),
                        *(_sae_cell(_dict(sae.get("eval")), k, d) for k, _, d in SAE_KEYS),
                    ]
                )
        heads = ["model", "layer", "architecture", "latents", *(h for _, h, _ in SAE_KEYS)]
        blocks.append(Table(heads, rows))
        if mixed:
            blocks.append(
                Para(
                    "\u2020 Pooled over rows where CE loss recovered is not measurable "
                    "(zero-ablating the MLP does not raise the loss there; the table below has "
                    f"each source): {'; '.join(mixed)}. A mixture, not a score of the SAE on "
                    "those rows."
                )
            )
        if (per := _sae_per_source(have)) is not None:
            blocks.append(per)
    _dashboards(b, blocks)
    return Section("sae", "SAEs: quality and dashboards", blocks)


def _sae_per_source(have: list[Model]) -> Table | None:
    rows = [
        (m, src, v)
        for m in have
        for src, v in _dict(_get(m.rec, "sae", "eval", "per_source")).items()
        if isinstance(v, dict)
    ]
    keys = [
        (k, h, d) for k, h, d in SAE_KEYS if any(Est.of(v.get(k)) is not None for *_, v in rows)
    ]
    if not keys:
        return None
    body = [
        [text_cell(m.label), text_cell(src), *(_sae_cell(v, k, d) for k, _, d in keys)]
        for m, src, v in rows
    ]
    return Table(["model", "source", *(h for _, h, _ in keys)], body)


def _sae_cell(ev: dict, key: str, digits: int) -> Cell:
    """An SAE figure; CE loss recovered with its interval, and "not measurable" beside it where
    zero-ablating the MLP did not clearly cost the model anything on those rows (the score's
    denominator is not known to be positive: `sae.evaluate.ce_score_interval`)."""
    if key != "ce_loss_recovered":
        return num_cell(ev.get(key), digits)
    e = Est.of(ev.get(key))
    if e is None:
        return Cell(DASH)
    if ev.get("ce_loss_measurable") is False:
        return Cell(f"{_fmt(e.value, digits)} (not measurable)", e.ci(digits))
    if _pools_unmeasurable(ev):  # explained under the table (`sae_section`)
        return Cell(f"{_fmt(e.value, digits)} \u2020", e.ci(digits))
    return est_cell(e, digits)


def _pools_unmeasurable(ev: dict) -> list[str]:
    """The sources of a pooled CE loss recovered where it is not measurable: the pooled figure
    mixes them in, so it is not a score of the SAE there."""
    return [src for src, v in _dict(ev.get("per_source")).items()
            if isinstance(v, dict) and v.get("ce_loss_measurable") is False]  # fmt: skip


def _dashboards(b: Builder, blocks: list) -> None:
    links = []
    for m in b.with_part("sae"):
        src = m.run.path(m.rec["sae"].get("dashboards"))
        if src is None:
            b.miss(blocks, f"{m.label}'s feature dashboards (`sae.dashboards` not given)")
        elif not src.is_file():
            b.miss(blocks, f"{m.label}'s feature dashboards: {src} not found")
        else:
            rel = f"dashboards/{_safe(m.label)}/{src.name}"
            (b.out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, b.out / rel)
            links.append((f"feature dashboards of {m.label}", rel))
    if links:
        blocks.append(Para("Feature dashboards (copied beside this page):"))
        blocks.append(Links(links))


def _top_features(m: Model) -> str:
    top = _get(m.rec, "analysis", "top_english_name_features")
    if not isinstance(top, list):
        return DASH
    parts = [
        f"{t.get('feature')} ({_num(t.get('share')) or 0:.2f})"
        for t in top[:5]
        if isinstance(t, dict)
    ]
    return ", ".join(parts) or DASH


def attribution_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    have = b.with_part("analysis")
    b.without(blocks, "analysis", have, "feature attribution")
    title = "SAE features: attribution"
    if not have:
        return Section("attribution", title, blocks)
    several = any(_get(m.rec, "analysis", "all_layers") for m in have)
    layers = sorted({str(_get(m.rec, "analysis", "layer")) for m in have})
    which = (f"the analysed layer's SAE (layer {', '.join(layers)}; every layer's, summed, in the "
             "last table below)" if several else "the SAE")  # fmt: skip
    blocks.append(
        Para(
            "How much of the model's preference for English names (and English-order "
            f"dialogue) the features of {which} account for, and the share left in the "
            "SAE's reconstruction error."
        )
    )
    rows = [
        [
            text_cell(m.label),
            *(num_cell(_get(m.rec, "analysis", k), 2) for k, _ in ANALYSIS_KEYS),
            text_cell(_top_features(m)),
        ]
        for m in have
    ]
    heads = ["model", *(h for _, h in ANALYSIS_KEYS), "top English-name features (share)"]
    blocks.append(Table(heads, rows))
    blocks.append(_attribution_bars(b, have))
    if (where := _components_table(have)) is not None:
        blocks += where
    if all_layers := _all_layers_table(have):
        blocks += all_layers
    images: list = []
    for m in have:
        if plot := _get(m.rec, "analysis", "attribution_plot"):
            b.copy_image(images, m.run, plot, f"attribution-{m.label}", f"{m.label}: attribution")
    _gallery(blocks, images)
    return Section("attribution", title, blocks)


def _components_table(have: list[Model]) -> list | None:
    """Where the model's own logit difference comes from at the same contexts: embeddings, all
    attention layers, each MLP's direct part and ln_f's bias (they add up to it exactly), so the
    analysed layer's part can be read against the whole."""
    rows, names = [], None
    for m in have:
        for key, what in (("english_name", "names"), ("english_dialogue", "dialogue")):
            comps = _dict(_get(m.rec, "analysis", f"{key}_components"))
            if not comps:
                continue
            names = names or list(comps)
            layer = _get(m.rec, "analysis", "layer")
            rows.append([text_cell(m.label), text_cell(what),
                         num_cell(_get(m.rec, "analysis", f"{key}_logit_diff"), 2, sign=True),
                         *(Cell(_fmt(v, 2, True) if (v := _num(comps.get(n))) is not None
                                else DASH, "analysed layer" if n == f"mlp {layer}" else "")
                           for n in names)])  # fmt: skip
    if not rows or names is None:
        return None
    return [
        Para(
            "Where the model's own logit difference (English over Arabic, balanced over the two "
            "labels' contexts) comes from at the same contexts: what each part of the final "
            "residual stream writes along the difference with ln_f's scale frozen (direct "
            "effects; they add up to the logit difference exactly). The analysed layer's SAE "
            "can account for its own column only, not the rest."
        ),
        Table(["model", "decision", "logit difference", *names], rows),
    ]


def _all_layers_table(have: list[Model]) -> list:
    """With SAEs on several layers: each layer's features' part (its own SAE, the same contexts),
    their sum, the MLPs' direct parts summed, and the error share pooled over the layers."""
    rows, layers = [], None
    for m in have:
        al = _dict(_get(m.rec, "analysis", "all_layers"))
        per = {r.get("layer"): r for r in _list(al.get("per_layer")) if isinstance(r, dict)}
        if not per:
            continue
        layers = layers or sorted(k for k in per if isinstance(k, int))
        for key, what in (("english_name", "names"), ("english_dialogue", "dialogue")):
            rows.append([text_cell(m.label), text_cell(what),
                         num_cell(al.get(f"{key}_attribution"), 2, sign=True),
                         num_cell(al.get(f"{key}_error_share"), 2),
                         num_cell(al.get(f"{key}_layer_total"), 2, sign=True),
                         *(num_cell(_get(per.get(layer), f"{key}_attribution"), 2, sign=True)
                           for layer in layers)])  # fmt: skip
    if not rows or not layers:
        return []
    return [
        Para(
            "The same split with an SAE on every trained MLP layer: each layer's features' part "
            "of its direct push (toward English over Arabic, balanced over labels), their sum "
            "over the layers, the error share pooled over layers and contexts, and what the "
            "MLPs write directly in all (features + error + bias, summed over the layers)."
        ),
        Table(
            [
                "model",
                "decision",
                "features, all layers",
                "error share",
                "MLPs' direct part",
                *(f"layer {layer}" for layer in layers),
            ],
            rows,
        ),  # fmt: skip
    ]


def _attribution_bars(b: Builder, have: list[Model]) -> Image:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    width = 0.8 / len(have)
    for i, m in enumerate(have):
        vals = [_num(_get(m.rec, "analysis", k)) or 0.0 for k, _ in ANALYSIS_KEYS]
        xs = [j + (i - (len(have) - 1) / 2) * width for j in range(len(vals))]
        ax.bar(xs, vals, width * 0.95, color=ROLE_COLOR.get(m.role, f"C{i + 3}"), label=m.label)
    ax.set_xticks(range(len(ANALYSIS_KEYS)), [h.replace(" ", "\n", 1) for _, h in ANALYSIS_KEYS])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("attribution: logits\nerror share: fraction", fontsize=8)  # two units, one axis
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return b.save(fig, "attribution", "features' English-name and dialogue attribution")


def ablation_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    keys = (*ABLATION_KEYS, *LOGIT_KEYS)
    have = [m for m in b.with_part("ablation") if any(m.est("ablation", k) for k, _ in keys)]
    b.without(blocks, "ablation", have, "feature ablation")
    title = "SAE features: ablation"
    if not have:
        return Section("ablation", title, blocks)
    blocks.append(
        Para(
            "English-name rate in stories sampled with the top English-name features "
            "ablated, against as many random features and no ablation. All three sample the "
            "same stories (prompts and seeds), so top - random is paired story by story; "
            "name mentions say whether an ablation removed names or changed which kind."
        )
    )
    rows = []
    for m in have:
        feats = _get(m.rec, "ablation", "features_top")
        rows.append(
            [
                text_cell(m.label),
                *(est_cell(m.est("ablation", k), RATE_DIGITS) for k, _ in ABLATION_KEYS),
                change_cell(_top_minus_random(m), RATE_DIGITS),
                text_cell("; ".join(got) if (got := _mentions(m)) else None),
                text_cell(_features_text(feats)),
            ]
        )
    heads = ["model", *(h for _, h in ABLATION_KEYS), "top - random",
             "name mentions, English / Arabic (none; random; top)", "top features"]  # fmt: skip
    blocks.append(Table(heads, rows))
    if logit := _logit_table(have):
        blocks += logit
    if found := _ablation_findings(have):
        blocks.append(Bullets(found))
    metrics = [(("ablation", k), h) for k, h in ABLATION_KEYS]
    alt = "English-name rate under ablation, 95% intervals"
    blocks.append(_dot_whisker(b, have, metrics, "ablation", alt))
    return Section("ablation", title, blocks)


def _logit_table(ms: list[Model]) -> list:
    """The name-slot logit difference's table: each side, each ablation's paired change from no
    ablation (its own bootstrap interval), and top - random (MOVER of the two changes)."""
    rows = []
    for m in ms:
        if not any(m.est("ablation", k) for k, _ in LOGIT_KEYS):
            continue
        changes = [m.est("ablation", k) for k, _ in LOGIT_CHANGE_KEYS]
        rnd, top = changes
        n = _get(m.rec, "ablation", "name_logit_diff_contexts")
        rows.append(
            [
                text_cell(m.label),
                *(est_cell(m.est("ablation", k), LOGIT_DIGITS) for k, _ in LOGIT_KEYS),
                *(change_cell(_paired(c) if c else None, LOGIT_DIGITS) for c in changes),
                change_cell(Change.between(rnd, top) if top and rnd else None, LOGIT_DIGITS),
                text_cell(" / ".join(str(v) for v in n.values()) if isinstance(n, dict) else None),
            ]
        )
    if not rows:
        return []
    heads = ["model", *(h for _, h in LOGIT_KEYS), *(h for _, h in LOGIT_CHANGE_KEYS),
             "top - random", "contexts (English / Arabic)"]  # fmt: skip
    return [
        Para(
            "Name-slot logit difference: at the held-out name contexts the attribution reads, "
            "the mean logit over English-name first tokens minus that over Arabic-name first "
            "tokens, balanced over the two kinds of name, without and with each ablation "
            "(95% bootstrap intervals over contexts; the changes are paired)."
        ),
        Table(heads, rows),
    ]


def tsea_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = []
    for p in b.pairs:
        if isinstance(t := p.comparison.get("tsea"), dict):
            blocks.append(Para(f"{p.key}: token set enrichment (TSEA)", "lead"))
            _tsea_blocks(b, blocks, p, t)
        if isinstance(mt := p.comparison.get("matching"), dict):
            blocks.append(Para(f"{p.key}: feature matching", "lead"))
            _matching_blocks(b, blocks, p, mt)
    if not blocks:
        b.miss(blocks, "TSEA or feature-matching comparisons (`comparisons[...].tsea`)")
    return Section("tsea", "SAE features: TSEA before and after", blocks)


def _tsea_blocks(b: Builder, blocks: list, p: Pair, t: dict) -> None:
    counts = _tsea_counts(p)
    if counts:
        rows = [
            [
                text_cell(k),
                num_cell(bv, -1),
                num_cell(av, -1),
                num_cell(None if bv is None or av is None else av - bv, 0, sign=True),
            ]
            for k, bv, av in counts
        ]
        blocks.append(
            Para(
                "SAE features that promote each token set beyond random directions "
                "through the same model, before and after:"
            )
        )
        blocks.append(Table(["token set", "before", "after", "change"], rows))
    else:
        b.miss(blocks, f"{p.key}: TSEA counts (`tsea.sets`)")
    b.copy_image(blocks, p.before.run, t.get("plot"), f"tsea-{p.key}", f"{p.key}: TSEA plot")


def _matching_blocks(b: Builder, blocks: list, p: Pair, mt: dict) -> None:
    if isinstance(summary := mt.get("summary"), dict):
        rows = [[text_cell(k), num_cell(v, 3)] for k, v in _flat("", summary).items()]
        blocks.append(Table(["figure", "value"], rows))
    what = f"{p.key}: matching plot"
    b.copy_image(blocks, p.before.run, mt.get("plot"), f"matching-{p.key}", what)


# --- 7. samples ---------------------------------------------------------------------------------


def _stories(b: Builder, m: Model, blocks: list) -> list[str] | None:
    path = m.run.path(_get(m.rec, "samples", "file"))
    if path is None or not path.is_file():
        b.miss(blocks, f"{m.label}'s samples ({path or '`samples.file` not given'})")
        return None
    rows, bad = read_jsonl(path)
    if bad:
        blocks.append(Para(f"{path}: {bad} malformed line(s) skipped.", "missing"))
    return [r["text"] for r in rows if isinstance(r.get("text"), str)][:SAMPLES_SHOWN]


def samples_section(b: Builder) -> Section | None:
    if not b.models:
        return None
    blocks: list = [Para(f"The first {SAMPLES_SHOWN} stories sampled from each model.")]
    for g, ms in b.groups.items():
        cols = [(m, s) for m in ms if (s := _stories(b, m, blocks)) is not None]
        if not cols:
            continue
        if len(b.groups) > 1:
            blocks.append(Para(g, "lead"))
        n = max(len(s) for _, s in cols)
        rows = [[s[i] if i < len(s) else None for _, s in cols] for i in range(n)]
        blocks.append(Stories([f"{m.label} ({m.role})" for m, _ in cols], rows))
    return Section("samples", "Sample stories", blocks)


# --- 9. provenance ------------------------------------------------------------------------------


def provenance_section(b: Builder) -> Section:
    blocks: list = []
    for run in b.runs:
        blocks.append(Para(f"{run.name} ({run.dir})", "lead"))
        stages = run.results.get("stages")
        if not isinstance(stages, dict) or not stages:
            b.miss(blocks, f"{run.name}: the stages and their commands (`stages`)")
        else:
            rows = [
                [text_cell(k), text_cell(_get(s, "status")), num_cell(_get(s, "seconds"), 1)]
                for k, s in stages.items()
            ]
            blocks.append(Table(["stage", "status", "seconds"], rows))
            cmds = [
                f"# {k}\n" + "\n".join(c for c in _list(_get(s, "commands")) if isinstance(c, str))
                for k, s in stages.items()
            ]
            blocks.append(Code(f"the commands of each stage ({run.name})", "\n\n".join(cmds)))
        config = run.results.get("config")
        if config is None:
            b.miss(blocks, f"{run.name}: the resolved config (`config`)")
        else:
            cfg = run.results.get("config_file")
            text = json.dumps(config, indent=2, ensure_ascii=False)
            blocks.append(Code(f"config ({cfg if isinstance(cfg, str) else 'resolved'})", text))
    return Section("provenance", "Provenance", blocks)


# --- metrics.json -------------------------------------------------------------------------------


def _flat(prefix: str, obj: Any, out: dict | None = None) -> dict:
    """Numbers under dotted keys; an estimate `{"value"|"loss": x, "ci95": ...}` gives `prefix`
    = x, `prefix.ci95` and its other numbers (`prefix.n`, `prefix.perplexity`, ...)."""
    out = {} if out is None else out
    e = Est.of(obj) if isinstance(obj, dict) else None
    if e is not None:
        out[prefix] = e.value
        if e.lo is not None:
            out[f"{prefix}.ci95"] = [e.lo, e.hi]
        for k, v in obj.items():
            if k not in ("value", "mean", "loss", "ci95") and (x := _num(v)) is not None:
                out[f"{prefix}.{k}"] = x
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif prefix.endswith("ci95") and isinstance(obj, list) and len(obj) == 2:
        if all(_num(x) is not None for x in obj):  # an interval written beside its value
            out[prefix] = [float(x) for x in obj]
    elif (x := _num(obj)) is not None:
        out[prefix] = x
    return out


def model_metrics(m: Model) -> dict:
    """One model's numbers as flat dotted keys (see the module docstring)."""
    r = m.rec
    parts = {
        "params": r.get("params"),
        "train": r.get("train"),
        "eval_loss": r.get("eval_loss"),
        "eval_loss_start": r.get("eval_loss_start"),
        "artifacts": _get(r, "artifacts", "metrics"),
        "artifacts.counts": _get(r, "artifacts", "counts"),
        "judge": _get(r, "judge", "scores"),
        "judge.n": _get(r, "judge", "n"),
        "sae": _get(r, "sae", "eval"),
        "sae.layer": _get(r, "sae", "layer"),
        "sae.d_sae": _get(r, "sae", "d_sae"),
        "analysis": r.get("analysis"),
        "ablation": r.get("ablation"),
    }
    out: dict = {}
    for prefix, v in parts.items():
        _flat(prefix, v, out)
    return out


def pair_metrics(b: Builder, p: Pair) -> dict:
    """A pair's changes: validation losses and artifact rates (MOVER), judge differences, judge
    agreement and TSEA counts as written."""
    out: dict = {}
    continued = p.after.parent == p.before.label
    for s in _sources(p.after):
        before = _start(b, p.after, s) if continued else p.before.est("eval_loss", s)
        if before is not None and (after := p.after.est("eval_loss", s)) is not None:
            c = Change.between(before, after)
            out[f"eval_loss.{s}.change"], out[f"eval_loss.{s}.change_ci95"] = c.as_json().values()
    for k, _, _ in ARTIFACTS:
        bf, af = p.before.est("artifacts", "metrics", k), p.after.est("artifacts", "metrics", k)
        if bf is not None and af is not None:
            c = Change.between(bf, af)
            out[f"artifacts.{k}.change"], out[f"artifacts.{k}.change_ci95"] = c.as_json().values()
    jp = judge_pair(p.comparison.get("judge")) or {}
    for score, s in jp.get("scores", {}).items():
        out |= {f"judge.{score}.{k}": v for k, v in _flat("", s).items()}
    _flat("judge_agreement", _get(p.comparison, "judge_agreement", "scores"), out)
    _flat("tsea", _get(p.comparison, "tsea", "sets"), out)
    return out


def metrics_json(b: Builder) -> dict:
    runs = [
        {"name": r.name, "dir": str(r.dir), "config_file": r.results.get("config_file")}
        for r in b.runs
    ]
    return {
        "format": 1,
        "runs": runs,
        "models": {label: model_metrics(m) for label, m in b.models.items()},
        "comparisons": {p.key: pair_metrics(b, p) for p in b.pairs},
        "missing": b.missing,
    }


# --- rendering ----------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, "Segoe UI", "Noto Sans", "DejaVu Sans", Arial, sans-serif;
       max-width: 1200px; margin: 1.5em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { border-bottom: 1px solid #ddd; margin-top: 1.8em; }
nav { font-size: .9em; margin: .5em 0 1em; } nav a { margin-right: .8em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
.wide td:first-child { white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci { color: #666; font-size: .85em; }
.missing { color: #8a4b00; font-style: italic; }
.lead { font-weight: 600; margin-top: 1.2em; }
figure { margin: 1em 0; break-inside: avoid; } img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: .85em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; } .gallery figure { margin: 0; }
.wide { overflow-x: auto; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; padding: .6em;
      font-size: .85em; }
table.stories { width: 100%; table-layout: fixed; }
.story { font-family: "Noto Naskh Arabic", "Noto Sans Arabic", "Amiri", "Scheherazade New",
         "Geeza Pro", "Segoe UI", Tahoma, Arial, "DejaVu Sans", sans-serif;
         font-size: 1.05em; line-height: 1.8; white-space: pre-wrap; text-align: right; }
@media print { nav { display: none; } body { max-width: none; } a { color: inherit; }
               .wide { overflow: visible; } table { font-size: .75em; }
               h2 { break-after: avoid; } tr, figure { break-inside: avoid; } }
"""
MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_cell(c: Cell | str, tag: str = "td") -> str:
    c = c if isinstance(c, Cell) else Cell(c, num=False)
    sub = f'<br><span class="ci">{_e(c.sub)}</span>' if c.sub else ""
    cls = ' class="num"' if c.num and tag == "td" else ""
    return f"<{tag}{cls}>{_e(c.text)}{sub}</{tag}>"


def _data_uri(path: Path) -> str:
    mime = MIME.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(b: Table) -> str:
    head = "".join(_html_cell(h, "th") for h in b.headers)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in b.rows)
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def _html_stories(b: Stories) -> str:
    """Stories right to left in an Arabic font stack; escaped, so markup shows as text."""
    story = '<td class="story" dir="rtl" lang="ar">{}</td>'
    head = "".join(f"<th>{_e(h)}</th>" for h in b.headers)
    rows = "".join(
        "<tr>" + "".join(story.format(_e(s)) if s is not None else "<td></td>" for s in r) + "</tr>"
        for r in b.rows
    )
    return f'<table class="stories"><tr>{head}</tr>{rows}</table>'


def _html_block(b: Any, out: Path) -> str:
    if isinstance(b, Para):
        return f'<p class="{b.cls}">{_e(b.text)}</p>'
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Image):
        img = f'<img src="{_data_uri(out / b.file)}" alt="{_e(b.alt)}">'
        return f"<figure>{img}<figcaption>{_e(b.alt)}</figcaption></figure>"
    if isinstance(b, Gallery):
        return '<div class="gallery">' + "".join(_html_block(i, out) for i in b.images) + "</div>"
    if isinstance(b, Code):
        return f"<details><summary>{_e(b.summary)}</summary><pre>{_e(b.text)}</pre></details>"
    if isinstance(b, Links):
        items = "".join(f'<li><a href="{_e(quote(h))}">{_e(t)}</a></li>' for t, h in b.items)
        return f"<ul>{items}</ul>"
    if isinstance(b, Stories):
        return _html_stories(b)
    raise TypeError(type(b))


def render_html(b: Builder, sections: list[Section]) -> str:
    """The page: inline CSS, images as data URIs, no script and nothing from the network."""
    names = _e(", ".join(r.name for r in b.runs))
    nav = "".join(f'<a href="#{s.id}">{_e(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{_e(s.title)}</h2>'
        + "".join(_html_block(x, b.out) for x in s.blocks)
        + "</section>"
        for s in sections
    )
    made = time.strftime("%Y-%m-%d %H:%M")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>jaxlm report: {names}</title><style>{CSS}</style></head><body>"
        f'<h1>jaxlm report: {names}</h1><p class="ci">written {made} by `jaxlm report`</p>'
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )


def _md_text(text: Any) -> str:
    """Text in Markdown: markup shown as text (`&`, `<` escaped), `|` kept out of tables."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;")
    return text.replace("|", "\\|").replace("\n", "<br>")


def _md_table(b: Table) -> str:
    def cell(c: Cell | str) -> str:
        return _md_text(f"{c.text} {c.sub}".strip() if isinstance(c, Cell) else c)

    lines = ["| " + " | ".join(cell(h) for h in b.headers) + " |", "|" + "---|" * len(b.headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in b.rows])


def _md_block(b: Any) -> str:
    if isinstance(b, Para):
        return f"*{_md_text(b.text)}*" if b.cls in ("missing", "lead") else _md_text(b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"- {_md_text(i)}" for i in b.items)
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Image):
        return f"![{_md_text(b.alt)}]({quote(b.file)})"
    if isinstance(b, Gallery):
        return "\n\n".join(_md_block(i) for i in b.images)
    if isinstance(b, Code):
        fence = "~~~~" if "```" in b.text or "~~~" in b.text else "```"
        return f"{_md_text(b.summary)}:\n\n{fence}\n{b.text}\n{fence}"
    if isinstance(b, Links):
        return "\n".join(f"- [{_md_text(t)}]({quote(h)})" for t, h in b.items)
    if isinstance(b, Stories):
        parts = []
        for j, h in enumerate(b.headers):
            parts.append(f"**{_md_text(h)}**")
            parts += [f'<div dir="rtl" lang="ar">{_md_text(r[j])}</div>' for r in b.rows if r[j]]
        return "\n\n".join(parts)
    raise TypeError(type(b))


def render_md(b: Builder, sections: list[Section]) -> str:
    parts = [f"# jaxlm report: {_md_text(', '.join(r.name for r in b.runs))}"]
    for s in sections:
        parts.append(f"## {_md_text(s.title)}")
        parts += [_md_block(x) for x in s.blocks]
    return "\n\n".join(parts) + "\n"


# --- entry point --------------------------------------------------------------------------------

FILES = {"html": "index.html", "markdown": "report.md", "metrics": "metrics.json"}


def write_report(
    run_dirs: Iterable[str | Path], out: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write the report of `run_dirs` into the folder `out`; returns the paths of its files
    ({"html", "markdown", "metrics"}). The folder is published whole (jaxlm.outputs.Output):
    a report of the same runs and results is found done; one of other runs or results is
    refused, naming what differs, unless `overwrite`."""
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise UserError("give at least one RUN_DIR")
    loaded = [load_run(d) for d in run_dirs]
    digests = [hashlib.sha256((d / "results.json").read_bytes()).hexdigest() for d, _ in loaded]
    identity = {"runs": [str(d) for d, _ in loaded], "results_sha256": digests}
    with Output(out, kind="report", identity=identity, overwrite=overwrite) as o:
        if not o.done:
            b = Builder(_runs([d for d, _ in loaded], [r for _, r in loaded]), o.tmp)
            sections = b.sections()
            (o.tmp / FILES["html"]).write_text(render_html(b, sections), encoding="utf-8")
            (o.tmp / FILES["markdown"]).write_text(render_md(b, sections), encoding="utf-8")
            text = json.dumps(metrics_json(b), indent=2, ensure_ascii=False)
            (o.tmp / FILES["metrics"]).write_text(text + "\n", encoding="utf-8")
            o.publish()
        return {k: o.path / v for k, v in FILES.items()}
