"""`RUN/results.json`: what a pipeline run found, gathered from its stages' outputs for the report.

Written after every stage (a partial run has a partial file). The format is the report's input
(jaxlm/pipeline/report.py): models by label with their training, per-source losses, artifact
metrics, judge scores, SAE quality, attribution and ablation; comparisons before -> after CPT.
Numbers with uncertainty are {"value", "ci95", "n"} or carry a "ci95" beside them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from jaxlm.pipeline.engine import Outcome


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _losses(row: dict | None) -> dict | None:
    """{source: {loss, perplexity}} of a metrics row's `eval_loss/NAME` keys (eval_native ->
    native)."""
    if not row:
        return None
    out = {}
    for k, v in row.items():
        if k.startswith("eval_loss/"):
            name = k.split("/", 1)[1].removeprefix("eval_")
            out[name] = {"loss": v, "perplexity": row.get(f"eval_ppl/{k.split('/', 1)[1]}")}
    return out or None


def _train(w: Path, workdir: Path) -> dict:
    from jaxlm.train.metrics_log import read_metrics

    metrics = workdir / "metrics.jsonl"
    if not metrics.exists():
        return {}
    rows = read_metrics(metrics)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = [r for r in rows if any(k.startswith("eval_loss/") for k in r)]
    start = next((r for r in evals if r["step"] == 0), None)
    end = evals[-1] if evals and evals[-1]["step"] > 0 else None
    ev = _load(workdir / "eval.json") or {}  # the trainer's per-source losses with intervals
    named = lambda d: {k.removeprefix("eval_"): v for k, v in d.items()} if d else None  # noqa: E731
    out: dict = {
        "train": {"steps": max(losses) if losses else 0,
                  "first_loss": losses[min(losses)] if losses else None,
                  "last_loss": losses[max(losses)] if losses else None,
                  "metrics": _rel(metrics, w), "loss_plot": _rel(workdir / "loss.png", w)},
        "eval_loss": named(ev.get("end")) or _losses(end),
        "eval_loss_start": named(ev.get("start")) or _losses(start),
        "params": _params(workdir),
    }  # fmt: skip
    return out


def _params(workdir: Path) -> int | None:
    """The model's parameter count, from its recorded architecture (the sweep table's column)."""
    from jaxlm.checkpoint import read_meta
    from jaxlm.errors import UserError

    try:
        return read_meta(workdir)[0].num_params()
    except UserError:
        return None


def _judge(w: Path, label: str) -> dict | None:
    from jaxlm.judge.stats import load_grades, summarize

    grades = w / "judge" / f"{label}.grades.jsonl"
    if not grades.exists():
        return None
    records = load_grades(grades, allow_empty=True)
    return {"grades": _rel(grades, w), **summarize(records)} if records else None


def gather(method, outcomes: dict[str, Outcome], config_file: str | None) -> dict:
    """results.json's content for a run of `method` (jaxlm.pipeline.method.Method)."""
    w, cfg = method.w, method.cfg
    done = lambda name: name in outcomes and outcomes[name].status in ("done", "skipped")  # noqa: E731
    result = lambda name: outcomes[name].result if done(name) else None  # noqa: E731
    models = {}
    for label, role, preset, parent in method.labels():
        rec: dict = {"preset": preset, "role": role, "parent": parent,
                     "workdir": _rel(method.model(label), w)}  # fmt: skip
        if done(label):
            rec.update(_train(w, method.model(label)))
        if done(f"samples-{label}"):
            art = _load(w / "samples" / f"{label}.artifacts.json")
            if art:
                art.pop("per_story", None)
            rec["samples"] = {"file": f"samples/{label}.jsonl", "n": cfg.samples.n}
            rec["artifacts"] = art
        rec["judge"] = _judge(w, label) if done(f"judge-{label}") else None
        sae = result(f"sae-{label}")
        if sae:
            dash = method.analysis_dir(label) / "dashboards" / "dashboards.html"
            rec["sae"] = _sae_rec(sae, w)
            rec["sae"]["dashboards"] = _rel(dash, w) if dash.exists() else None
        analysis = result(f"analysis-{label}")
        if analysis:
            plot = method.analysis_dir(label) / "attribution.png"
            rec["analysis"] = {**analysis, "attribution_plot": _rel(plot, w)}
        if role == "pretrain" and result(f"ablation-{label}"):
            rec["ablation"] = result(f"ablation-{label}")
        if done(f"export-{label}"):
            rec["export"] = _rel(w / "hf" / label, w)
        models[label] = rec
    return {
        "format": 1,
        "name": cfg.name,
        "config_file": config_file,
        "config": dataclasses.asdict(cfg),
        "stages": {n: {"seconds": o.seconds, "commands": o.commands,
                       "status": "skipped (done before)" if o.status == "skipped" else o.status}
                   for n, o in outcomes.items() if o.status != "not selected"},  # fmt: skip
        "corpus": result("prepare"),
        "models": models,
        "comparisons": _comparisons(method, outcomes),
        "sweep": [{"preset": p, "pretrain": f"pretrain-{p}", "cpt": f"cpt-{p}",
                   "control": f"control-{p}" if cfg.models.control else None}
                  for p in cfg.models.presets] if len(cfg.models.presets) > 1 else None,
    }  # fmt: skip


def _comparisons(method, outcomes: dict[str, Outcome]) -> dict:
    from jaxlm.judge.agreement import agreement
    from jaxlm.judge.stats import compare

    w, cfg, out = method.w, method.cfg, {}
    for p in cfg.models.presets:
        before, after = f"pretrain-{p}", f"cpt-{p}"
        rec: dict = {}
        grades = [w / "judge" / f"{m}.grades.jsonl" for m in (before, after)]
        if cfg.judge.enabled and all(g.exists() for g in grades):
            rec["judge"] = compare(grades)
            if cfg.judge.repeat > 1:
                rec["judge_agreement"] = agreement([grades[0]])
        o = outcomes.get(f"compare-{p}")
        if o is not None and o.status in ("done", "skipped"):
            d = w / "analysis" / f"compare-{p}"
            rec["tsea"] = {"report": _rel(d / "tsea" / "tsea_compare.json", w),
                           "plot": _rel(d / "tsea" / "tsea_compare.png", w),
                           "sets": o.result.get("tsea")}  # fmt: skip
            rec["matching"] = {"report": _rel(d / "match" / "match.json", w),
                               "plot": _rel(d / "match" / "match.png", w),
                               "summary": o.result.get("matching")}  # fmt: skip
        if rec:
            out[f"{before} -> {after}"] = rec
    return out


def write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1, default=str) + "\n")
    tmp.replace(path)


def _sae_rec(sae: dict, w: Path) -> dict:
    """One SAE's record for the report (the analysed layer; others under `other_layers`)."""
    own = ("layer", "dir", "architecture", "d_sae", "other_layers")
    return {"dir": _rel(Path(sae["dir"]), w), "layer": sae.get("layer"),
            "architecture": sae.get("architecture"), "d_sae": sae.get("d_sae"),
            "eval": {k: v for k, v in sae.items() if k not in own},
            "other_layers": [_sae_rec(o, w) for o in sae.get("other_layers", [])]}  # fmt: skip
