"""Realistic `jaxlm pipeline` run directories for the report's tests (results_contract.md).

`write_run(root, kind)` writes RUN/results.json and every file it points to: metrics.jsonl loss
curves (pretraining, then CPT and a control continuing from it), loss and attribution and TSEA
PNGs made with matplotlib, samples JSONL of Arabic stories from the demo corpus generator (the
translated style for pretrained and control models, mostly the native style after CPT) with
their artifact metrics computed by `jaxlm.eval.artifacts`, and a feature dashboards page.
Judge summaries, paired comparisons and agreement come from `jaxlm.judge.stats` and
`jaxlm.judge.agreement` on synthetic grades, so their shapes follow the real code.

Kinds: "demo" (one preset: pretrain, cpt, control; SAEs, analysis, ablation, TSEA; no judge),
"judge" (the demo with judge results) and "sweep" (ts-1m and ts-3m, pretrain + cpt each, no SAE).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Literal

from matplotlib.figure import Figure

from jaxlm.data.demo_corpus import generate
from jaxlm.eval.artifacts import artifact_metrics
from jaxlm.judge.agreement import figures, pairs_within
from jaxlm.judge.stats import AGE_GROUPS, SCORES, paired, per_story, summarize

Kind = Literal["demo", "judge", "sweep"]
N_SAMPLES = 16
PARAMS = {"ts-1m": 2_612_345, "ts-3m": 7_104_512}
# where each model's losses end, per source: pretraining on translated stories leaves native
# text poorly modelled; CPT on native stories repairs it and forgets a little; the control
# (as many steps on translated stories) changes neither much
LOSS_END = {
    ("ts-1m", "pretrain"): {"translated": 1.02, "native": 2.31},
    ("ts-1m", "cpt"): {"translated": 1.16, "native": 1.47},
    ("ts-1m", "control"): {"translated": 1.01, "native": 2.30},
    ("ts-3m", "pretrain"): {"translated": 0.88, "native": 2.12},
    ("ts-3m", "cpt"): {"translated": 0.97, "native": 1.31},
}
STEPS = {"pretrain": 300, "cpt": 60, "control": 60}


def write_run(root: Path, kind: Kind) -> Path:
    """A run directory of `kind` under `root`; returns it."""
    run = root / kind
    run.mkdir(parents=True)
    presets = ["ts-1m", "ts-3m"] if kind == "sweep" else ["ts-1m"]
    roles = ["pretrain", "cpt"] if kind == "sweep" else ["pretrain", "cpt", "control"]
    models = {}
    for preset in presets:
        for role in roles:
            label = f"{role}-{preset}"
            models[label] = _model(run, preset, role, sae=kind != "sweep")
    if kind == "judge":
        for label in models:
            models[label]["judge"] = _judge_summary(label)
    results = {
        "format": 1,
        "name": kind,
        "config_file": f"configs/pipeline/{kind}.yaml",
        "config": _config(kind, presets),
        "stages": _stages(kind, models),
        "corpus": {
            "translated": {"stories": 20000, "tokens": 2906277},
            "native": {"stories": 200, "tokens": 29871},
            "heldout_translated": {"stories": 400, "tokens": 58012},
        },
        "models": models,
        "comparisons": _comparisons(run, kind, presets),
        "sweep": [{"preset": p, "pretrain": f"pretrain-{p}", "cpt": f"cpt-{p}"} for p in presets]
        if kind == "sweep"
        else None,
    }
    (run / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    return run


# --- models -------------------------------------------------------------------------------------


def _model(run: Path, preset: str, role: str, *, sae: bool) -> dict:
    label = f"{role}-{preset}"
    parent = None if role == "pretrain" else f"pretrain-{preset}"
    workdir = run / "models" / label
    workdir.mkdir(parents=True)
    rows = _loss_rows(preset, role)
    _write_jsonl(workdir / "metrics.jsonl", rows)
    _loss_png(workdir / "loss.png", rows, label)
    train_losses = [r["loss"] for r in rows if "loss" in r]
    record = {
        "preset": preset,
        "role": role,
        "parent": parent,
        "workdir": f"models/{label}",
        "params": PARAMS[preset],
        "train": {
            "steps": STEPS[role],
            "first_loss": round(train_losses[0], 3),
            "last_loss": round(train_losses[-1], 3),
            "metrics": f"models/{label}/metrics.jsonl",
            "loss_plot": f"models/{label}/loss.png",
        },
        "eval_loss": _eval_losses(LOSS_END[preset, role]),
        "samples": {"file": f"samples/{label}.jsonl", "n": N_SAMPLES},
        "artifacts": _samples(run, label, role, preset),
        "judge": None,
        "sae": None,
        "analysis": None,
        "ablation": None,
        "export": f"hf/{label}",
    }
    if parent is not None:
        record["eval_loss_start"] = _eval_losses(LOSS_END[preset, "pretrain"])
    if sae:
        record |= _sae_parts(run, label, role)
    return record


def _eval_losses(ends: dict) -> dict:
    out = {}
    for source, loss in ends.items():
        half = 0.018 if source == "translated" else 0.045  # fewer native validation rows
        out[source] = {
            "loss": loss,
            "perplexity": round(math.exp(loss), 3),
            "ci95": [round(loss - half, 3), round(loss + half, 3)],
            "rows": 512 if source == "translated" else 96,
            "tokens": 65536 if source == "translated" else 12288,
        }
    return out


def _loss_rows(preset: str, role: str) -> list[dict]:
    """Training loss every 5 steps, per-source validation losses every 50 (and at the start
    and end), from the model's own step 0: CPT's curve starts where pretraining ends."""
    rng = random.Random(f"{preset}-{role}")
    end = LOSS_END[preset, role]
    start = (
        LOSS_END[preset, "pretrain"] if role != "pretrain" else {"translated": 7.6, "native": 7.6}
    )
    steps = STEPS[role]
    train_source = "native" if role == "cpt" else "translated"
    rows = []
    for step in range(0, steps + 1):
        frac = math.exp(-step / (steps / 6))
        ev = {s: end[s] + (start[s] - end[s]) * frac for s in end}
        if step % 5 == 0 and step > 0:
            rows.append(
                {
                    "step": step,
                    "loss": round(ev[train_source] + rng.gauss(0, 0.04), 4),
                    "lr": 1e-3,
                    "tokens_per_sec": 41000.0,
                }
            )
        if step % 50 == 0 or step == steps:
            rows.append({"step": step} | {f"eval_loss/{s}": round(v, 4) for s, v in ev.items()})
    return rows


def _samples(run: Path, label: str, role: str, preset: str) -> dict:
    """Stories in the style the model would write: translated after pretraining and for the
    control, native after CPT with a few translated-style stories left."""
    seed = 7 if preset == "ts-1m" else 11
    stories = generate("native" if role == "cpt" else "translated", N_SAMPLES, seed)
    if role == "cpt":
        stories[3] = generate("translated", 1, seed + 1)[0]
    if role == "pretrain" and preset == "ts-1m":  # markup in a story must show as text
        stories[2] = "<script>window.__pwned = 1</script> " + stories[2]
    path = run / "samples" / f"{label}.jsonl"
    path.parent.mkdir(exist_ok=True)
    _write_jsonl(path, [{"text": s} for s in stories])
    report = artifact_metrics(stories, seed=0)
    del report["per_story"]
    return report


def _sae_parts(run: Path, label: str, role: str) -> dict:
    after = role == "cpt"
    dash = run / "analysis" / f"dashboards-{label}"
    dash.mkdir(parents=True)
    tokens = "".join(
        f'<tr><td>{f}</td><td dir="auto">{w}</td></tr>'
        for f, w in ((17, "توم"), (3, "ليلي"), (41, "قال"))
    )
    (dash / "dashboards.html").write_text(
        f'<!doctype html><meta charset="utf-8"><title>Feature dashboards: {label}</title>'
        f"<h1>Feature dashboards: {label}</h1><table>{tokens}</table>",
        encoding="utf-8",
    )
    plot = run / "analysis" / f"attribution-{label}.png"
    top = [
        {"feature": 17, "share": 0.31, "mean_part": 0.12},
        {"feature": 3, "share": 0.18, "mean_part": 0.07},
        {"feature": 41, "share": 0.06, "mean_part": 0.02},
    ]
    _bar_png(plot, [f"f{t['feature']}" for t in top], [t["share"] for t in top], label)
    rate = (0.04, 0.06) if after else (0.97, 0.99)
    return {
        "sae": {
            "dir": f"sae/{label}/layer-7",
            "layer": 7,
            "architecture": "standard",
            "d_in": 256,
            "d_sae": 1024,
            "eval": {
                "explained_variance": 0.84 if after else 0.86,
                "l0": 22.4 if after else 20.6,
                "dead_fraction": 0.05 if after else 0.03,
                "dense_fraction": 0.0,
                "ce_loss_recovered": {"value": 0.91, "ci95": [0.89, 0.93]} if after else 0.93,
                "ce_loss_measurable": True,
                "kl_div": 0.03 if after else 0.02,
                "clean_loss": 1.0,
                "spliced_loss": 1.05,
                "zero_ablated_loss": 1.9,
                "per_source": {
                    "translated": {
                        "explained_variance": 0.87,
                        "l0": 20.1,
                        "ce_loss_recovered": {"value": 0.716, "ci95": [0.2, 1.4]},
                        "ce_loss_measurable": not after,
                        "ablation_gain_ci95": [-0.054, -0.042],
                    },
                    "native": {"explained_variance": 0.82, "l0": 23.0},
                },
            },
            "dashboards": f"analysis/dashboards-{label}/dashboards.html",
        },
        "analysis": {
            "english_name_attribution": 0.09 if after else 0.41,
            "english_name_error_share": 0.31 if after else 0.12,
            "english_dialogue_attribution": 0.05 if after else 0.3,
            "english_dialogue_error_share": 0.22 if after else 0.2,
            "layer": 7,
            "english_name_logit_diff": 9.77,
            "all_layers": {
                "layers": [6, 7],
                "english_name_attribution": 1.25,
                "english_name_error_share": 0.21,
                "english_name_layer_total": 1.5,
                "english_dialogue_attribution": -0.4,
                "english_dialogue_error_share": 0.33,
                "english_dialogue_layer_total": -0.5,
                "per_layer": [
                    {
                        "layer": 6,
                        "english_name_attribution": 0.84,
                        "english_dialogue_attribution": -0.1,
                    },
                    {
                        "layer": 7,
                        "english_name_attribution": 0.41,
                        "english_dialogue_attribution": -0.3,
                    },
                ],
            },  # fmt: skip
            "english_name_components": {
                "embeddings": 1.5,
                "attention": 6.0,
                **{f"mlp {i}": 0.25 for i in range(8)},
                "ln_f bias": 0.27,
            },  # fmt: skip
            "top_english_name_features": top,
            "attribution_plot": f"analysis/attribution-{label}.png",
        },
        "ablation": {
            "english_name_rate_top": _est(0.35 if not after else 0.01, 0.08),
            "english_name_rate_random": _est(rate[0], 0.03),
            "english_name_rate_none": _est(rate[1], 0.02),
            "features_top": [17, 3],
            "features_random": [512, 88],
            # the name-slot logit difference (sae ablate --data): sides and paired changes
            "name_logit_diff_none": _logit(9.77),
            "name_logit_diff_top": _logit(9.31),
            "name_logit_diff_random": _logit(9.74),
            "name_logit_diff_change_top": _logit(-0.46, 0.05),
            "name_logit_diff_change_random": _logit(-0.03, 0.02),
            "name_logit_diff_contexts": {"english": 6888, "arabic": 6819},
            # top - random, paired story by story (narrower than the two rates' intervals)
            "difference_top_vs_random": {"value": -0.62, "ci95": [-0.7, -0.55], "n": N_SAMPLES},
            "name_mentions": {
                "stories": N_SAMPLES,
                "none": {"english": 151, "arabic": 2},
                "top": {"english": 40, "arabic": 61},
                "random": {"english": 149, "arabic": 3},
            },  # fmt: skip
        },
    }


def _logit(value: float, half: float = 0.1) -> dict:
    return {"value": value, "ci95": [round(value - half, 4), round(value + half, 4)], "n": 13707}


def _est(value: float, half: float) -> dict:
    lo, hi = max(0.0, value - half), min(1.0, value + half)
    return {"value": value, "ci95": [round(lo, 4), round(hi, 4)], "n": N_SAMPLES}


# --- judge --------------------------------------------------------------------------------------

JUDGE = {"judge_model": "gemini-2.5-flash", "prompt_version": "v1", "temperature": 0.0}
# mean grade per model kind: CPT writes better Arabic; the control changes little
JUDGE_MEAN = {"pretrain": 5.6, "cpt": 6.4, "control": 5.7}


def _grades(label: str, repeats: int = 1) -> list[dict]:
    role = label.split("-")[0]
    rng = random.Random(label)
    out = []
    for i in range(24):
        story_level = rng.gauss(0, 1.0)
        for rep in range(repeats):
            g = {
                k: min(10, max(1, round(JUDGE_MEAN[role] + story_level + rng.gauss(0, 0.7))))
                for k in SCORES
            }
            out.append(
                {
                    "id": f"s{i}",
                    "prompt_sha256": f"p{i}",
                    "completion_sha256": f"{label}{i}",
                    "repeat": rep,
                    "checkpoint": label,
                    **JUDGE,
                    **g,
                    "age_group": AGE_GROUPS[2 + (i % 2)],
                }
            )
    return out


def _judge_summary(label: str) -> dict:
    s = summarize(_grades(label), resamples=1000)
    return {
        "judge_model": JUDGE["judge_model"],
        "n": s["n_stories"],
        "scores": {
            k: {"value": s[k]["mean"], "ci95": s[k]["ci95"], "n": s["n_stories"]} for k in SCORES
        },
        "age_groups": s["age_groups"],
    }


def _judge_compare(a: str, b: str) -> dict:
    """`jaxlm judge compare` output for grades of a and b (b - a)."""
    ga, gb = _grades(a), _grades(b)
    # both models completed the same beginnings
    pair = {"a": f"judge/{a}.grades.jsonl", "b": f"judge/{b}.grades.jsonl"}
    pair |= paired(per_story(ga), per_story(gb), resamples=1000)
    return {
        "files": [pair["a"], pair["b"]],
        "warnings": [],
        "summaries": [summarize(ga, resamples=1000), summarize(gb, resamples=1000)],
        "comparisons": [pair],
    }


def _judge_agreement(label: str) -> dict:
    """`jaxlm judge agreement` on `label`'s grades repeated twice (the judge against itself)."""
    records = _grades(label, repeats=2)
    return {"files": [f"judge/{label}.repeats.jsonl"], "sources": [JUDGE], "mode": "repeats"} | (
        figures(pairs_within(records), resamples=1000)
    )


# --- comparisons, stages, config ----------------------------------------------------------------


def _comparisons(run: Path, kind: Kind, presets: list[str]) -> dict:
    out = {}
    for preset in presets:
        before, after = f"pretrain-{preset}", f"cpt-{preset}"
        c: dict = {"judge": None, "judge_agreement": None, "tsea": None, "matching": None}
        if kind != "sweep":
            c["tsea"] = _tsea(run, before, after)
        if kind == "judge":
            c["judge"] = _judge_compare(before, after)
            c["judge_agreement"] = _judge_agreement(before)
        out[f"{before} -> {after}"] = c
        if kind == "judge":
            control = f"control-{preset}"
            out[f"{before} -> {control}"] = {"judge": _judge_compare(before, control)}
    return out


TSEA_SETS = {
    "english_names": (0, 10),
    "arabic_names": (3, 80),
    "english_dialogue": (5, 2),
    "arabic_dialogue": (1, 6),
}


def _tsea(run: Path, before: str, after: str) -> dict:
    d = run / "analysis" / "tsea-pretrain-cpt"
    d.mkdir(parents=True, exist_ok=True)
    sets = {k: {"before": b, "after": a} for k, (b, a) in TSEA_SETS.items()}
    (d / "tsea_compare.json").write_text(json.dumps({"alpha": 0.05, "sets": sets}) + "\n")
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    names = list(TSEA_SETS)
    ax.bar([i - 0.2 for i in range(4)], [TSEA_SETS[n][0] for n in names], 0.4, label=before)
    ax.bar([i + 0.2 for i in range(4)], [TSEA_SETS[n][1] for n in names], 0.4, label=after)
    ax.set_xticks(range(4), names, fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "tsea_compare.png", dpi=80)
    return {
        "report": "analysis/tsea-pretrain-cpt/tsea_compare.json",
        "plot": "analysis/tsea-pretrain-cpt/tsea_compare.png",
        "sets": sets,
    }


def _config(kind: Kind, presets: list[str]) -> dict:
    return {
        "name": kind,
        "presets": presets,
        "n_translated": 20000,
        "native_fraction": 0.01,
        "seq_len": 128,
        "vocab_size": 2000,
        "samples": N_SAMPLES,
        "seed": 0,
        "judge": {"model": JUDGE["judge_model"]} if kind == "judge" else None,
    }


def _stages(kind: Kind, models: dict) -> dict:
    stages = {
        "corpus": [
            "jaxlm data demo-corpus --style translated --n 20000 --seed 0 "
            "--out corpus/translated.jsonl"
        ],
        "tokenizer": [
            "jaxlm tokenizer train --input corpus/translated.jsonl "
            "--vocab-size 2000 --out tokenizer"
        ],
    }
    for label, m in models.items():
        init = f" --init-from models/{m['parent']}" if m["parent"] else ""
        stages[f"train {label}"] = [
            f"jaxlm train --config configs/{m['role']}.yaml --preset "
            f"{m['preset']} --workdir models/{label}{init}"
        ]
    stages["samples"] = [
        f"jaxlm generate --checkpoint models/{label} --n {N_SAMPLES}" for label in models
    ]
    if kind != "sweep":
        stages["sae"] = [f"jaxlm sae train --model models/{label} --layer 7" for label in models]
        stages["tsea"] = [
            "jaxlm sae tsea-compare --before models/pretrain-ts-1m sae/pretrain-ts-1m "
            "--after models/cpt-ts-1m sae/cpt-ts-1m --demo-sets"
        ]
    if kind == "judge":
        stages["judge"] = [
            f"jaxlm judge grade --inputs judge/{label}.inputs.jsonl" for label in models
        ]
    return {
        name: {"seconds": 1.5 + i, "commands": cmds, "status": "done", "outputs": []}
        for i, (name, cmds) in enumerate(stages.items())
    }


# --- files --------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _loss_png(path: Path, rows: list[dict], label: str) -> None:
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ax.plot(*zip(*pts, strict=True))
    ax.set_title(label)
    fig.savefig(path, dpi=60)


def _bar_png(path: Path, names: list[str], values: list[float], title: str) -> None:
    fig = Figure(figsize=(4, 2.5))
    ax = fig.subplots()
    ax.bar(names, values)
    ax.set_title(f"{title}: English-name attribution", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
