"""Loss per data source: `jaxlm eval loss` against transformers' own loss on the same rows, and
the trainer's per-source evaluation (at the start of continual pre-training and at its end)."""

import json

import numpy as np
import pytest
import torch

from jaxlm.cli import main
from jaxlm.data.pipeline import make_loader
from jaxlm.train.metrics_log import read_metrics

TINY = ["--preset", "ts-1m", "--batch-size", "8", "--set", "log.every=1",
        "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "log.plot=false", "--set", "eval.batches=2"]  # fmt: skip


def test_eval_loss_equals_transformers_per_source(tmp_path, demo_data, capsys):
    """The mean of per-row losses equals transformers' GPTNeoForCausalLM loss on the same rows."""
    from transformers import GPTNeoForCausalLM

    m = tmp_path / "m"
    assert main(["init", "--preset", "ts-1m", "--vocab-size", "400", "--seed", "4",
                 "--tokenizer", str(demo_data["tok"]), "--out", str(m)]) == 0  # fmt: skip
    assert main(["export-hf", "--checkpoint", str(m), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    data = [str(demo_data["translated"]), str(demo_data["native"])]
    argv = ["eval", "loss", "--checkpoint", str(m), "--data", data[0], "--data", data[1],
            "--split", "train", "--rows", "24", "--batch-size", "10"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "loss.json")]) == 0
    got = json.loads((tmp_path / "loss.json").read_text())["sources"]
    assert list(got) == ["data_translated", "data_native"]
    ref_model = GPTNeoForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for name, path in zip(got, data, strict=True):
        rows = next(iter(make_loader([(path, 1.0)], split="train", batch_size=24, seed=0,
                                     shuffle=False, num_epochs=1)))["tokens"]  # fmt: skip
        with torch.no_grad():
            ids = torch.tensor(rows, dtype=torch.long)
            logits = ref_model(ids[:, :-1]).logits.float()
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).reshape(len(rows), -1)
        per_row = ce.mean(-1).numpy()
        assert got[name]["rows"] == 24
        assert got[name]["loss"] == pytest.approx(float(per_row.mean()), rel=1e-4)
        assert got[name]["perplexity"] == pytest.approx(float(np.exp(per_row.mean())), rel=1e-4)
        lo, hi = got[name]["ci95"]
        assert lo < got[name]["loss"] < hi
    # a split smaller than --rows is read whole, also when the batch size does not divide it
    n_val = json.loads((demo_data["native"] / "metadata.json").read_text())["splits"]
    n_val = n_val["validation"]["rows"]
    assert n_val % 4 != 0  # the case a loader dropping its last partial batch gets wrong
    argv = ["eval", "loss", "--checkpoint", str(m), "--data", data[1], "--rows", "1000",
            "--batch-size", "4", "--out", str(tmp_path / "val.json")]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "val.json").read_text())["sources"]
    assert got["data_native"]["rows"] == n_val


@pytest.mark.slow
def test_cpt_reports_each_source_at_its_start_and_end(tmp_path, demo_data, capsys):
    base, cpt = tmp_path / "base", tmp_path / "cpt"
    assert main(["train", "--workdir", str(base), "--data", str(demo_data["translated"]),
                 "--steps", "3", *TINY]) == 0  # fmt: skip
    capsys.readouterr()
    sources = f"[{{path: {demo_data['native']}}}, {{path: {demo_data['translated']}}}]"
    assert main(["train", "--workdir", str(cpt), "--init-from", str(base), "--data",
                 str(demo_data["native"]), "--steps", "2", *TINY, "--set",
                 f"eval.sources={sources}", "--set", "eval.at_start=true"]) == 0  # fmt: skip
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(final["eval_losses"]) == ["data_native", "data_translated"]
    assert final["eval_loss"] == final["eval_losses"]["data_native"]["loss"]
    rows = [r for r in read_metrics(cpt / "metrics.jsonl") if "eval_loss" in r]
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == 2
    for r in (start, end):
        assert {"eval_loss/data_native", "eval_loss/data_translated"} <= set(r)
        assert r["eval_ppl/data_native"] == pytest.approx(np.exp(r["eval_loss/data_native"]))
    # the baseline is the pretrained model's own loss on the same batches
    base_end = [r for r in read_metrics(base / "metrics.jsonl") if "eval_loss" in r][-1]
    assert start["eval_loss/data_translated"] == pytest.approx(base_end["eval_loss"], rel=1e-6)
    capsys.readouterr()
    assert main(["train", "--workdir", str(tmp_path / "base2"), "--data",
                 str(demo_data["native"]), "--steps", "1", *TINY, "--set",
                 "eval.sources=[{path: /nonexistent}]"]) == 2  # fmt: skip
    assert "/nonexistent" in capsys.readouterr().err
