"""The README's main job has a pulse: every stage of scripts/pipeline.py on a tiny corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.demo import Demo, DemoConfig, artifact_stats
from jaxlm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_runs_every_stage_and_skips_them_on_rerun(tmp_path):
    tiny = (
        "model: {preset: ts-1m}\nbatch_size: 8\nsteps: 3\ncheckpoint: {every: 3}\nlog: {every: 1}\n"
    )
    (tmp_path / "pre.yaml").write_text(tiny)
    (tmp_path / "cpt.yaml").write_text(tiny.replace("steps: 3", "steps: 2"))
    cmd = [sys.executable, str(ROOT / "scripts/pipeline.py"), "--workdir", str(tmp_path / "w"),
           "--n-translated", "2000", "--samples", "4", "--pretrain-config",
           str(tmp_path / "pre.yaml"), "--cpt-config", str(tmp_path / "cpt.yaml"),
           "--sae-config", str(ROOT / "configs/sae/tiny.yaml")]  # fmt: skip
    # As the README runs it: one CPU device, not the suite's 8 fake ones.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = ["corpus", "tokenizer", "shards", "pretrain", "cpt", "samples", "sae", "tsea",
              "export"]  # fmt: skip
    for s in stages:
        assert f"[{s}] " in first.stdout
    w = tmp_path / "w"
    assert (w / "hf/cpt/model.safetensors").exists() and (w / "hf/cpt/tokenizer.json").exists()
    samples = [json.loads(line) for line in (w / "samples/cpt.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    assert "English-name share" in first.stdout
    assert (w / "sae/pretrain/sae_weights.safetensors").exists() and (
        w / "sae/cpt/cfg.json"
    ).exists()
    report = json.loads((w / "tsea/tsea_compare.json").read_text())
    assert {"english_names", "arabic_names", "latin_double_quote", "arabic_quotes"} <= set(
        report["sets"]
    )
    assert (w / "tsea/tsea_compare.png").exists() and "TSEA report" in first.stdout

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0
    assert all(f"[{s}] done already" in again.stdout for s in stages)


def test_artifact_stats_counts_names_and_dialogue_style():
    from jaxlm.data.demo_corpus import generate

    native = artifact_stats(generate("native", 50, 0))
    translated = artifact_stats(generate("translated", 50, 0))
    assert native["english_name_share"] == 0.0 and translated["english_name_share"] == 1.0
    assert native["english_dialogue_share"] == 0.0
    assert translated["english_dialogue_share"] == pytest.approx(1.0)


def test_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path):
    """Finished stages are skipped, so other settings on a rerun would report the old results."""
    cfg_file = tmp_path / "pre.yaml"
    cfg_file.write_text("model: {preset: ts-1m}\n")
    cfg = DemoConfig(n_translated=100, pretrain_config=str(cfg_file))
    Demo(tmp_path / "w", cfg).check_settings()
    recorded = (tmp_path / "w/.stages/settings.json").read_text()
    Demo(tmp_path / "w", cfg).check_settings()  # the same settings: fine

    with pytest.raises(UserError, match=r"n_translated 100 -> 200.*another --workdir"):
        Demo(
            tmp_path / "w", DemoConfig(n_translated=200, pretrain_config=str(cfg_file))
        ).check_settings()
    cfg_file.write_text("model: {preset: ts-3m}\n")  # an edited config file is a change too
    with pytest.raises(UserError, match=r"pretrain_config \(the file's contents\)"):
        Demo(tmp_path / "w", cfg).check_settings()
    assert (tmp_path / "w/.stages/settings.json").read_text() == recorded
    with pytest.raises(UserError, match=r"pretrain-config: cannot read .*missing.yaml"):
        Demo(tmp_path / "v", DemoConfig(pretrain_config=str(tmp_path / "missing.yaml"))).settings()
