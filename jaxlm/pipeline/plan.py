"""`jaxlm pipeline --plan`: what a config will do and cost, before anything runs.

For each stage: where it runs, what it reads, and an estimate: tokens, steps, LLM calls,
accelerator hours and dollars. Every figure names its source: a count from the configs
(steps x batch x sequence), a formula (training FLOPs: 6 x parameters + attention, PaLM's
appendix B, `jaxlm.train.lm.flops_per_token`), or an assumption written in the config's `plan`
section (an MFU, a translation rate, prices). Compiled figures for a TPU step come from
`tpu/aot_check.py` (its cost analysis); the plan names that command for each training stage.
"""

from __future__ import annotations

import dataclasses

from jaxlm.pipeline.engine import Stage


@dataclasses.dataclass
class Row:
    stage: str
    where: str
    what: str
    reads: tuple[str, ...]
    figures: dict  # name -> value
    sources: list[str]  # where each figure comes from
    hours: float = 0.0  # accelerator (or GPU) hours
    usd: float = 0.0


def _train_cfg(method, label: str, role: str, preset: str):
    from jaxlm import overlay
    from jaxlm.train.lm import TrainConfig, load_config, model_config

    m = method.cfg.models
    path = method.path(m.pretrain_config if role == "pretrain" else m.cpt_config)
    sets = m.pretrain_set if role == "pretrain" else m.cpt_set
    over = [overlay.parse_override(s, TrainConfig) for s in sets]
    cfg = load_config(path, [{"model": {"preset": preset}}, *over])
    return cfg, model_config(cfg, method.cfg.data.vocab_size)


def _train_row(method, stage: Stage) -> Row:
    from jaxlm.train.lm import flops_per_token

    label = stage.name
    role, preset = label.split("-", 1)
    cfg, model = _train_cfg(method, label, role, preset)
    p = method.cfg.plan
    seq = method.cfg.data.seq_len
    tokens = cfg.steps * cfg.batch_size * seq
    flops = flops_per_token(model, seq) * tokens
    hours = flops / (p.peak_tflops * 1e12 * p.mfu) / 3600
    usd = hours * p.accelerator_hourly_usd if stage.where == "tpu" else 0.0
    return Row(label, stage.where, stage.describe, stage.deps,
               {"params": model.num_params(), "steps": cfg.steps, "batch": cfg.batch_size,
                "tokens": tokens, "pflops": round(flops / 1e15, 1),
                "hours": round(hours, 3), "usd": round(usd, 2)},
               [f"steps x batch x seq_len from {method.cfg.models.pretrain_config if role == 'pretrain' else method.cfg.models.cpt_config}",  # noqa: E501
                "FLOPs: 6 x matmul parameters + attention per token (flops_per_token)",
                f"time at an assumed MFU {p.mfu} of {p.peak_tflops} TFLOP/s "
                f"({p.accelerator}; plan.mfu, plan.peak_tflops)",
                f"check the step on the slice: python tpu/aot_check.py --topology "
                f"{p.accelerator} --config configs/pretrain.yaml --set model.preset={preset}",
                f"price: plan.accelerator_hourly_usd = {p.accelerator_hourly_usd}"],
               hours, usd)  # fmt: skip


def _llm_row(stage: Stage, calls: float, tok_in: int, tok_out: int, p, source: str) -> Row:
    usd = calls * (tok_in * p.llm_input_usd_per_mtok + tok_out * p.llm_output_usd_per_mtok) / 1e6
    return Row(stage.name, stage.where, stage.describe, stage.deps,
               {"llm_calls": round(calls), "tokens_in": round(calls * tok_in),
                "tokens_out": round(calls * tok_out), "usd": round(usd, 2)},
               [source, "prices: plan.llm_input_usd_per_mtok, plan.llm_output_usd_per_mtok",
                "tokens per call: plan.synth_tokens_out / judge_tokens_out (assumed)"],
               0.0, usd)  # fmt: skip


def _sae_row(method, stage: Stage) -> Row:
    from jaxlm import overlay
    from jaxlm.config import preset as make_preset
    from sae.train import SAETrainConfig, load_config

    label = stage.name.removeprefix("sae-")
    preset = label.split("-", 1)[1]
    s = method.cfg.sae
    cfg = load_config(method.path(s.config),
                      [overlay.parse_override(x, SAETrainConfig) for x in s.set])  # fmt: skip
    model = make_preset(preset, vocab_size=method.cfg.data.vocab_size)
    d_sae = cfg.sae.d_sae or cfg.sae.expansion_factor * model.d_ff
    tokens = cfg.data.training_tokens
    # the SAE: encode + decode, forward and backward (3 x 2 x 2 x F x S per row); the store: the
    # model's forward up to the layer (2 x parameters per token), counted in full
    flops = tokens * (12 * model.d_ff * d_sae + 2 * model.num_params())
    p = method.cfg.plan
    hours = flops / (p.peak_tflops * 1e12 * p.mfu) / 3600
    return Row(stage.name, stage.where, stage.describe, stage.deps,
               {"training_tokens": tokens, "d_in": model.d_ff, "d_sae": d_sae,
                "pflops": round(flops / 1e15, 2), "hours": round(hours, 3)},
               [f"training tokens and width from {s.config}",
                "FLOPs: 12 x F x S per row (SAE) + 2 x parameters per token (model forward)",
                f"time at the same assumed MFU {p.mfu}; see tpu/README.md's SAE table"],
               hours, 0.0)  # fmt: skip


def _translate_row(method, stage: Stage) -> Row:
    p, n = method.cfg.plan, method.cfg.corpus.n_translated
    sentences = n * p.sentences_per_story
    hours = sentences / p.translate_sentences_per_s / 3600
    usd = hours * p.gpu_hourly_usd
    return Row(stage.name, stage.where, stage.describe, stage.deps,
               {"stories": n, "sentences": round(sentences), "gpu_hours": round(hours, 2),
                "usd": round(usd, 2)},
               [f"stories: corpus.n_translated = {n}",
                f"sentences a story: plan.sentences_per_story = {p.sentences_per_story}",
                f"rate: plan.translate_sentences_per_s = {p.translate_sentences_per_s} "
                "(measure with scripts/bench_translate.py on the GPU)",
                f"price: plan.gpu_hourly_usd = {p.gpu_hourly_usd}"], hours, usd)  # fmt: skip


def plan(method, stages: list[Stage]) -> list[Row]:
    c, p = method.cfg, method.cfg.plan
    rows = []
    for st in stages:
        name = st.name
        if name == "translate":
            rows.append(_translate_row(method, st))
        elif name == "synthesize":
            calls = c.synthesize.n * (1 + p.synth_rejection)
            why = (f"{c.synthesize.n} stories, plan.synth_rejection = {p.synth_rejection} of "
                   "them rejected and asked again")  # fmt: skip
            rows.append(_llm_row(st, calls, 250, p.synth_tokens_out, p, why))
        elif name.startswith(("pretrain-", "cpt-", "control-", "replay-")):
            rows.append(_train_row(method, st))
        elif name.startswith("judge-"):
            calls = c.judge.n * c.judge.repeat
            rows.append(_llm_row(st, calls, 700, p.judge_tokens_out, p,
                                 f"judge.n = {c.judge.n} completions x judge.repeat = "
                                 f"{c.judge.repeat}"))  # fmt: skip
        elif name.startswith("sae-"):
            rows.append(_sae_row(method, st))
        else:
            rows.append(Row(name, st.where, st.describe, st.deps, {}, ["minutes on one host"]))
    return rows


def render(rows: list[Row]) -> str:
    lines = [f"{'stage':24s} {'where':6s} {'hours':>8s} {'usd':>9s}  what"]
    for r in rows:
        lines.append(f"{r.stage:24s} {r.where:6s} {r.hours:8.3f} {r.usd:9.2f}  {r.what}")
        if r.figures:
            lines.append(" " * 26 + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                                              for k, v in r.figures.items()))  # fmt: skip
        for s in r.sources:
            lines.append(" " * 28 + "source: " + s)
    hours = {w: sum(r.hours for r in rows if r.where == w) for w in {r.where for r in rows}}
    total = sum(r.usd for r in rows)
    lines.append("")
    lines.append("totals: " + ", ".join(f"{w} {h:.2f} h" for w, h in sorted(hours.items()))
                 + f"; ${total:,.2f}")  # fmt: skip
    return "\n".join(lines)
