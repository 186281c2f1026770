"""`jaxlm pipeline`: the whole method, stage by stage (the README's main job runs the demo).

    jaxlm pipeline                                   # configs/pipeline/demo.yaml into runs/demo
    jaxlm pipeline --config configs/paper/full.yaml --plan
    jaxlm pipeline --config configs/pipeline/sweep-tiny.yaml --presets ts-1m --only 'sae-*'
    jaxlm pipeline --config configs/paper/full.yaml --dry-run   # the TPU stages' commands

Rerunning skips the stages done with the same settings, reruns the ones whose settings (or
inputs) changed, and resumes an interrupted one (jaxlm/pipeline/engine.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from jaxlm.errors import UserError

DEFAULT_CONFIG = "configs/pipeline/demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `pipeline`."""
    p = sub.add_parser("pipeline", help="the whole method, stage by stage (default: the demo)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML ({DEFAULT_CONFIG})")
    p.add_argument("--workdir", help="the run directory (default: the config's workdir)")
    p.add_argument(
        "--plan", action="store_true", help="print the stages and their costs; run nothing"
    )
    p.add_argument("--dry-run", action="store_true",
                   help="run nothing: say which stages would run, and print the commands of "
                   "the TPU stages (gcloud, tpu/babysit.py with its own --dry-run)")  # fmt: skip
    p.add_argument("--only", metavar="STAGES", help="only these stages (globs: 'sae-*,report')")
    p.add_argument("--presets", help="a subset of models.presets, e.g. ts-1m,ts-33m")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config field, e.g. --set samples.n=100")  # fmt: skip
    p.set_defaults(func=cmd_pipeline)
    _register_report(sub)


def _register_report(sub: argparse._SubParsersAction) -> None:
    """Adds `report`: one HTML page (+ report.md, metrics.json) of what pipeline runs found."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page, report.md and metrics.json of pipeline runs",
        description="Reads RUN_DIR/results.json of each run (as `jaxlm pipeline` writes it) and "
        "writes DIR/index.html, DIR/report.md and DIR/metrics.json; what a run lacks is said.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a `jaxlm pipeline` workdir")
    p.add_argument("--out", required=True, metavar="DIR", help="the report's folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from jaxlm.pipeline.report import write_report

    paths = write_report(args.runs, args.out, overwrite=args.overwrite)
    for what, path in paths.items():
        print(f"  {what:9s} {path}")
    return 0


def load(args):
    """(config, its file, the run directory) from the flags."""
    from jaxlm import overlay
    from jaxlm.pipeline.config import PipelineConfig, load, resolve

    config_file = resolve(args.config, None)
    if not config_file.is_file():
        raise UserError(f"--config {args.config}: no such file")
    over = [overlay.parse_override(s, PipelineConfig) for s in args.set]
    cfg = load(config_file, over)
    if args.presets:
        wanted = tuple(p.strip() for p in args.presets.split(",") if p.strip())
        unknown = [p for p in wanted if p not in cfg.models.presets]
        if unknown:
            raise UserError(f"--presets {unknown[0]}: the config's presets are "
                            f"{', '.join(cfg.models.presets)}")  # fmt: skip
        models = overlay.build(type(cfg.models), {**overlay.to_dict(cfg.models),
                                                  "presets": list(wanted)})  # fmt: skip
        sae_presets = tuple(p for p in cfg.sae.presets if p in wanted)
        sae = overlay.build(type(cfg.sae), {**overlay.to_dict(cfg.sae),
                                            "presets": list(sae_presets)})  # fmt: skip
        if cfg.sae.presets and not sae_presets:
            sae = overlay.build(type(cfg.sae), {**overlay.to_dict(cfg.sae), "enabled": False})
        import dataclasses

        cfg = dataclasses.replace(cfg, models=models, sae=sae)
    workdir = Path(args.workdir or cfg.workdir).resolve()
    return cfg, config_file, workdir


def compilation_cache(workdir: Path) -> None:
    """Compile each program once per run: JAX's persistent compilation cache in WORKDIR/cache/xla,
    for this process and the stages' child processes (they inherit the environment).

    The stages start fresh processes that compile the same programs again (three SAE trainings,
    analyses and samplings of models of one shape; CPT and the control): on the demo (2 CPU cores)
    the cache took the run from 10 min 43 s to 10 min 12 s, with equal results. Every program is
    cached, however quick to compile (JAX's default skips those under 1 s: most of the demo's).
    A cache the user chose (JAX_COMPILATION_CACHE_DIR or jax's config) is left as it is."""
    import os

    import jax

    chosen = getattr(jax.config, "jax_compilation_cache_dir", None)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or chosen:
        return
    settings = {
        "jax_compilation_cache_dir": str(workdir.resolve() / "cache" / "xla"),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for name, value in settings.items():
        if name.upper() not in os.environ:
            os.environ[name.upper()] = str(value)
            jax.config.update(name, value)


def cmd_pipeline(args) -> int:
    from jaxlm.pipeline import results
    from jaxlm.pipeline.engine import Outcome, run_stages
    from jaxlm.pipeline.method import Method
    from jaxlm.train.metrics_log import log_to_stderr

    cfg, config_file, workdir = load(args)
    method = Method(cfg, workdir, config_file)
    stages = method.stages()
    if args.plan:
        from jaxlm.pipeline.plan import plan, render

        print(render(plan(method, stages)))
        return 0
    only = None
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        names = [s.name for s in stages]
        for pat in patterns:
            if not fnmatch.filter(names, pat):
                raise UserError(f"--only {pat}: no such stage; the stages: {', '.join(names)}")
        only = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
    if args.dry_run or cfg.tpu.dry_run:
        planned = run_stages(stages, workdir, only=only, dry_run=True)
        if method.slice and method.slice.used and cfg.tpu.delete_when_done:
            from jaxlm.pipeline import on_tpu

            on_tpu.delete(method.slice, print, dry_run=True)
        n = sum(o.status == "dry run" for o in planned.values())
        print(f"# dry run: {n} stage(s) would run; nothing was run or written")
        return 0
    log_to_stderr()
    workdir.mkdir(parents=True, exist_ok=True)
    compilation_cache(workdir)
    rel = str(config_file)
    tpu_stages = [s.name for s in stages if s.where == "tpu"]

    def release(outcomes, final: bool = False) -> None:
        """Delete the slice once no TPU stage is left to run (tpu.delete_when_done)."""
        sl = method.slice
        if sl is None or not sl.used or not cfg.tpu.delete_when_done:
            return
        if final or all(name in outcomes for name in tpu_stages):
            from jaxlm.pipeline import on_tpu

            on_tpu.delete(sl, print)

    def save(outcomes):
        results.write(workdir / "results.json", results.gather(method, outcomes, rel))
        release(outcomes)

    outcomes: dict[str, Outcome] = {}
    try:
        outcomes = run_stages(stages, workdir, only=only, after_each=save)
    finally:  # stopped by an error, or the last stages not selected: the slice goes too
        try:
            release(outcomes, final=True)
        except UserError as e:
            print(f"warning: {e}; delete the slice by hand (tpu/delete.py)", file=sys.stderr)
    _summary(workdir, json.loads((workdir / "results.json").read_text()))
    return 0


def _fmt(m) -> str:
    """A figure with its interval: `0.95 [0.90, 0.99]`."""
    if not m:
        return "-"
    if isinstance(m, dict) and m.get("ci95") and m.get("value") is not None:
        return f"{m['value']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
    return str(m.get("value") if isinstance(m, dict) else m)


def _summary(workdir: Path, r: dict) -> None:
    """The headline figures, as the report's first paragraph has them."""
    print(f"\nDone: {workdir}")
    for label, m in r.get("models", {}).items():
        art = (m.get("artifacts") or {}).get("metrics", {})
        losses = m.get("eval_loss") or {}
        loss = ", ".join(f"{k} {v['loss']:.3f}" for k, v in losses.items())
        print(
            f"  {label:22s} English names {_fmt(art.get('english_name_rate'))}; English "
            f"dialogue {_fmt(art.get('english_dialogue_share'))}; validation loss {loss}"
        )
        sae, a = m.get("sae") or {}, m.get("analysis") or {}
        if sae:
            ev = sae.get("eval", {})
            print(
                f"  {'':22s} SAE: CE loss recovered {_ce(ev)}, "
                f"KL {_num(ev.get('kl_div'), '.4f')}; features' push toward English names "
                f"{_num(a.get('english_name_attribution'), '+.3f')} (error share "
                f"{_num(a.get('english_name_error_share'), '.2f')})"
            )
        if m.get("ablation"):
            ab = m["ablation"]
            print(
                f"  {'':22s} ablation: English names {_fmt(ab.get('english_name_rate_none'))} "
                f"-> top features off {_fmt(ab.get('english_name_rate_top'))}, random off "
                f"{_fmt(ab.get('english_name_rate_random'))}; top - random (paired) "
                f"{_fmt(ab.get('difference_top_vs_random'))}"
            )
    page = workdir / "report" / "index.html"
    if page.exists():
        print(f"  report: {page}")


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ce(ev: dict, *, sources: bool = True) -> str:
    """CE loss recovered as printed: pooled (SAELens's figure), then per source, each "not
    measurable" where zero-ablating the MLP does not clearly cost the model anything there."""
    v = ev.get("ce_loss_recovered")
    v = v.get("value") if isinstance(v, dict) else v
    out = _num(v, ".3f") + (" (not measurable)" if ev.get("ce_loss_measurable") is False else "")
    per = ev.get("per_source") or {}
    if sources and per:
        out += " (" + ", ".join(f"{k} {_ce(e, sources=False)}" for k, e in per.items()) + ")"
    return out
