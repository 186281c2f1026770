"""The README's main job has a pulse: `jaxlm pipeline` runs every stage of the method on a tiny
corpus, skips them all on a rerun, reruns only what a changed setting touches, and plans the
paper's setting without running anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.errors import UserError
from jaxlm.pipeline.engine import Context, Stage, run_stages

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it

TINY = """\
name: tiny
corpus: {kind: demo, n_translated: 1500, native_fraction: 0.05, eval_stories: 100, seed: 0}
data: {vocab_size: 2000, seq_len: 32, val_fraction: 0.05}
models:
  presets: [ts-1m]
  pretrain_config: configs/demo/pretrain.yaml
  pretrain_set: ["steps=6", "batch_size=8", "eval.every=3", "eval.batches=1",
                 "checkpoint.every=6", "log.every=2"]
  cpt_config: configs/demo/cpt.yaml
  cpt_set: ["steps=4", "batch_size=8", "eval.batches=1", "checkpoint.every=4", "log.every=2"]
  control: true
samples: {n: 4, max_new_tokens: 16}
sae: {enabled: true, layers: [-1, 0], config: configs/sae/tiny.yaml,
      set: ["data.training_tokens=2560"], ablation_features: 2, dashboards: 2}
"""


def _pipeline(cfg: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxlm.cli", "pipeline", "--config", str(cfg), "--workdir",
           str(workdir), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=ENV, cwd=ROOT)


def _ran(out: str) -> set[str]:
    return {line.split("]")[0][1:] for line in out.splitlines() if "] running" in line}


@pytest.mark.slow
def test_pipeline_runs_every_stage_skips_them_on_rerun_and_reruns_only_what_changed(tmp_path):
    cfg, w = tmp_path / "tiny.yaml", tmp_path / "run"
    cfg.write_text(TINY)
    first = _pipeline(cfg, w)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    stages = {p.stem for p in (w / ".stages").glob("*.json") if ".started" not in p.name}
    want = ["corpus", "tokenizer", "prepare", "pretrain-ts-1m", "cpt-ts-1m", "control-ts-1m",
            "samples-cpt-ts-1m", "sae-pretrain-ts-1m", "analysis-cpt-ts-1m",
            "ablation-pretrain-ts-1m", "compare-ts-1m", "export-cpt-ts-1m", "report"]  # fmt: skip
    assert set(want) <= stages, set(want) - stages
    r = json.loads((w / "results.json").read_text())
    cpt = r["models"]["cpt-ts-1m"]
    assert set(cpt["eval_loss"]) == {"native", "translated"}  # repair and forgetting
    assert set(cpt["eval_loss_start"]) == {"native", "translated"}
    assert "english_name_rate" in cpt["artifacts"]["metrics"]
    assert cpt["sae"]["eval"]["ce_loss_recovered"] is not None
    assert "english_name_error_share" in cpt["analysis"]
    # the CE score's interval and measurability, and where the logit difference comes from
    assert "ce_loss_measurable" in cpt["sae"]["eval"]
    comps = cpt["analysis"]["english_name_components"]
    assert list(comps)[:2] == ["embeddings", "attention"] and "ln_f bias" in comps
    if (ld := cpt["analysis"]["english_name_logit_diff"]) is not None:  # the tiny run has contexts
        assert sum(comps.values()) == pytest.approx(ld, abs=1e-4)
    assert r["stages"]["pretrain-ts-1m"]["commands"][0].startswith("jaxlm train --config ")
    assert (w / "report" / "index.html").exists() and (w / "hf/cpt-ts-1m/config.json").exists()
    assert "Done:" in first.stdout
    # SAEs on two layers from one pass, each evaluated at the end of its training, beside it
    sae = r["models"]["cpt-ts-1m"]["sae"]
    assert sae["layer"] == 7 and [o["layer"] for o in sae["other_layers"]] == [0]
    for layer in (0, 7):
        ev = json.loads((w / "sae" / "cpt-ts-1m" / f"layer-{layer}" / "eval.json").read_text())
        assert ev["layer"] == layer and ev["pooled"]["ce_loss_score"] is not None
        # on the held-out evaluation sets the analysis reads, not the training sources
        assert {s["path"] for s in ev["sources"].values()} == {
            str(w / "data" / e) for e in ("eval_native", "eval_translated")}  # fmt: skip
    assert set(sae["eval"]["per_source"]) == {"native", "translated"}  # named as the losses are
    # each layer's attribution, and their sum
    al = r["models"]["cpt-ts-1m"]["analysis"]["all_layers"]
    assert al["layers"] == [0, 7] and [x["layer"] for x in al["per_layer"]] == [0, 7]
    for key in ("english_name", "english_dialogue"):
        parts = [x[f"{key}_attribution"] for x in al["per_layer"]]
        if None not in parts:
            assert al[f"{key}_attribution"] == pytest.approx(sum(parts), abs=1e-5)
            assert 0 <= al[f"{key}_error_share"] <= 1
    for layer in (0, 7):
        assert (w / "analysis" / "cpt-ts-1m" / f"layer-{layer}" / "attribution.json").is_file()
    # tsea-compare and match read the analysed layer's (the first configured: -1) attributions,
    # not their own forwards
    for cmd in (" tsea-compare ", " match "):
        c = next(c for c in r["stages"]["compare-ts-1m"]["commands"] if cmd in c)
        for side, label in (("before", "pretrain-ts-1m"), ("after", "cpt-ts-1m")):
            assert f"--attribution-{side} {w / 'analysis' / label / 'layer-7'} " in c, c
    # the tiny SAEs (2,560 tokens) have no feature pushing toward English names, so the ablation
    # says so (the demo-scale run ablates at every layer at once; tests/test_sae_eval.py runs
    # `sae ablate` with two SAEs, and the test below checks its flags)
    ab = r["models"]["pretrain-ts-1m"]["ablation"]
    if "skipped" not in ab:
        d = w / "analysis" / "ablation-pretrain-ts-1m"
        top = json.loads((d / "top.json").read_text())
        assert set(ab["layers"]) <= {0, 7} and top.get("layers", [top.get("layer")]) == ab["layers"]
        # the random control reads the top run's unedited stories rather than sampling them again
        rand = json.loads((d / "random.json").read_text())
        assert rand["baseline_from"] == str((d / "top.json").resolve())

    again = _pipeline(cfg, w)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _ran(again.stdout) == set(), again.stdout

    # settings only the ablation reads (the SAE stage leaves them out of its fingerprint): the
    # ablation and the report run again, nothing else (the SAEs, models and analyses are kept)
    changed = _pipeline(cfg, w, "--set", "sae.ablation_features=3",
                        "--set", "sae.ablation_coverage=0.8")  # fmt: skip
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert _ran(changed.stdout) == {"ablation-pretrain-ts-1m", "report"}, changed.stdout
    ab = json.loads((w / "results.json").read_text())["models"]["pretrain-ts-1m"]["ablation"]
    if "skipped" not in ab:
        assert "80%" in ab["selection"], ab["selection"]


def test_plan_of_the_papers_setting_names_every_figures_source():
    r = subprocess.run([sys.executable, "-m", "jaxlm.cli", "pipeline", "--config",
                        "configs/paper/full.yaml", "--plan"], capture_output=True, text=True,
                       timeout=300, env=ENV, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for stage in ("translate", "synthesize", "pretrain-ts-33m", "cpt-ts-2l-33m", "judge-cpt-ts-1m",
                  "sae-pretrain-ts-33m", "report"):  # fmt: skip
        assert f"\n{stage} " in out or out.startswith(stage), stage
    assert out.count("source:") > 40 and "totals:" in out
    assert not (ROOT / "runs" / "paper").exists()  # nothing ran


# --- the engine, on stages that only count -------------------------------------------------------


def _stages(log: list, settings: dict) -> list[Stage]:
    def runner(name):
        def run(ctx: Context) -> dict:
            log.append((name, ctx.overwrite))
            return {"n": len(log)}

        return run

    return [
        Stage("a", {"x": settings["a"]}, (), runner("a")),
        Stage("b", {"y": settings["b"]}, ("a",), runner("b")),
        Stage("c", {}, ("a",), runner("c")),
        Stage("d", {}, ("b", "c"), runner("d")),
    ]


def test_a_changed_setting_reruns_its_stage_and_those_downstream_only(tmp_path):
    log: list = []
    quiet = lambda *_: None  # noqa: E731
    run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path, log=quiet)
    assert [n for n, _ in log] == ["a", "b", "c", "d"]
    log.clear()
    run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path, log=quiet)
    assert log == []  # all done with these settings
    run_stages(_stages(log, {"a": 1, "b": 2}), tmp_path, log=quiet)
    assert log == [("b", True), ("d", True)]  # b's outputs replaced, then d's
    log.clear()
    run_stages(_stages(log, {"a": 2, "b": 2}), tmp_path, log=quiet)
    assert [n for n, _ in log] == ["a", "b", "c", "d"]


def test_a_stage_run_again_with_the_same_settings_reruns_those_downstream(tmp_path, monkeypatch):
    """Its marker deleted by hand, a stage runs again and makes new outputs: the stages that read
    them run again too (their fingerprints read the run that made their inputs), and no other.
    A workdir from before runs were recorded keeps its fingerprints: nothing reruns."""
    from jaxlm.pipeline import engine

    log: list = []
    quiet = lambda *_: None  # noqa: E731
    run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path / "new", log=quiet)
    log.clear()
    (tmp_path / "new" / ".stages" / "b.json").unlink()
    run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path / "new", log=quiet)
    assert log == [("b", False), ("d", True)]  # b anew; d's outputs (from the old b) replaced
    log.clear()
    with monkeypatch.context() as m:  # markers as an older jaxlm wrote them: no run
        m.setattr(engine.secrets, "token_hex", lambda n: None)
        run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path / "old", log=quiet)
    assert json.loads((tmp_path / "old" / ".stages" / "a.json").read_text())["run"] is None
    log.clear()
    run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path / "old", log=quiet)
    assert log == []


def test_an_interrupted_stage_resumes_and_only_refuses_stale_inputs(tmp_path):
    log: list = []
    quiet = lambda *_: None  # noqa: E731
    stages = _stages(log, {"a": 1, "b": 1})

    def dies(ctx):
        raise KeyboardInterrupt  # killed while running

    stages[1].run = dies
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, tmp_path, log=quiet)
    assert (tmp_path / ".stages" / "b.started.json").exists()
    run_stages(_stages(log, {"a": 1, "b": 1}), tmp_path, log=quiet)
    assert ("b", False) in log  # the same settings: resumed, its outputs not replaced
    log.clear()
    # a rerun with changed settings, interrupted, still replaces on its resume: the outputs it
    # left are partly the old settings' (a command refuses those without --overwrite)
    stages = _stages(log, {"a": 1, "b": 2})
    stages[1].run = dies
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, tmp_path, log=quiet)
    run_stages(_stages(log, {"a": 1, "b": 2}), tmp_path, log=quiet)
    assert log == [("b", True), ("d", True)]
    log.clear()
    # --only: a stage whose input is not done with the current settings is refused
    with pytest.raises(UserError, match="needs a"):
        run_stages(_stages(log, {"a": 3, "b": 1}), tmp_path, log=quiet, only=lambda n: n == "b")
    assert log == []


def _subparser(parser, words: list[str]):
    """The parser of `jaxlm WORDS...` (as deep as the words go), and how many words it used."""
    import argparse

    used = 0
    for w in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or w not in subs[0].choices:
            break
        parser, used = subs[0].choices[w], used + 1
    return parser, used


def test_every_command_a_rerun_passes_overwrite_to_accepts_it():
    """A stage whose settings changed runs its commands again with `--overwrite` unless it says
    `overwrite_flag=False`; a command without that flag would fail only on a rerun (as `sae
    ablate` once did). Read off the pipeline's source: each `ctx.jaxlm("cmd", "sub", ...)`."""
    import ast

    from jaxlm.cli import build_parser

    parser = build_parser()
    src = (ROOT / "jaxlm" / "pipeline" / "method.py").read_text()
    checked = []
    for node in ast.walk(ast.parse(src)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "jaxlm"):  # fmt: skip
            continue
        if any(k.arg == "overwrite_flag" for k in node.keywords):
            continue
        words = []
        for a in node.args:
            if not (isinstance(a, ast.Constant) and isinstance(a.value, str)):
                break
            words.append(a.value)
        if not words:  # arguments built elsewhere (`*args`): the stage's own test covers it
            continue
        sub, used = _subparser(parser, words)
        assert used, words
        flags = {s for a in sub._actions for s in a.option_strings}
        assert "--overwrite" in flags, f"jaxlm {' '.join(words[:used])} has no --overwrite"
        checked.append(" ".join(words[:used]))
    assert {"sae attribute", "sae match", "export-hf", "report"} <= set(checked), checked


def test_the_pipeline_caches_compiled_programs_in_its_workdir_unless_the_user_chose_a_cache(
    tmp_path,
):
    """Stages in fresh processes compile the same programs again: the pipeline turns on JAX's
    persistent cache in WORKDIR/cache/xla for itself and its children, but leaves a cache the
    user set alone (the tests' own, here, is one)."""
    code = (
        "import os, sys, jax, jax.numpy as jnp; from pathlib import Path;"
        "from jaxlm.pipeline.cli import compilation_cache;"
        "compilation_cache(Path(sys.argv[1]));"
        "jax.jit(lambda x: x * 3 + 1)(jnp.ones(5)).block_until_ready();"
        "print(os.environ.get('JAX_COMPILATION_CACHE_DIR'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    run = lambda wd, env: subprocess.run([sys.executable, "-c", code, str(wd)], env=env,  # noqa: E731
                                         capture_output=True, text=True, check=True)  # fmt: skip
    r = run(tmp_path / "a", env)
    assert r.stdout.strip() == str(tmp_path / "a" / "cache" / "xla")
    assert any((tmp_path / "a" / "cache" / "xla").iterdir())  # the child's program is in it
    mine = tmp_path / "mine"
    r = run(tmp_path / "b", {**env, "JAX_COMPILATION_CACHE_DIR": str(mine)})
    assert r.stdout.strip() == str(mine) and not (tmp_path / "b" / "cache").exists()
