"""The model commands have a pulse: init, generate, export-hf, import-hf, through the real CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_init_generate_export_import_roundtrip(tmp_path, capsys):
    m = tmp_path / "model"
    assert (
        main(["init", "--preset", "ts-1m", "--vocab-size", "256", "--seed", "3", "--out", str(m)])
        == 0
    )
    ids = "5,6,7,8"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(m),
                "--prompt-ids",
                ids,
                "--max-new-tokens",
                "8",
                "--greedy",
                "--json",
            ]
        )
        == 0
    )
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(first["token_ids"]) == 8 and "text" not in first

    hf = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(m), "--out", str(hf)]) == 0
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    ref = transformers.GPTNeoForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([[5, 6, 7, 8]]),
            max_new_tokens=8,
            do_sample=False,
            attention_mask=torch.ones(1, 4, dtype=torch.long),
            pad_token_id=0,
        )
    assert out[0, 4:].tolist() == first["token_ids"]

    # no tokenizer: the ids are null, not transformers' default (GPT-2's 50256)
    assert (ref.config.bos_token_id, ref.config.eos_token_id) == (None, None)
    hf_config = json.loads((hf / "config.json").read_text())
    hf_config.update(bos_token_id=3, eos_token_id=3)  # a checkpoint from elsewhere, with ids
    (hf / "config.json").write_text(json.dumps(hf_config))

    back = tmp_path / "back"
    assert main(["import-hf", "--hf", str(hf), "--out", str(back)]) == 0
    again = tmp_path / "again"
    assert main(["export-hf", "--checkpoint", str(back), "--out", str(again)]) == 0
    again_config = json.loads((again / "config.json").read_text())
    assert (again_config["bos_token_id"], again_config["eos_token_id"]) == (3, 3)
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(back),
                "--prompt-ids",
                ids,
                "--max-new-tokens",
                "8",
                "--greedy",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first


def test_sampling_flags_and_seed(tmp_path, capsys):
    m = tmp_path / "model"
    main(["init", "--preset", "ts-1m", "--vocab-size", "128", "--out", str(m)])
    outs = []
    for seed in ("1", "1", "2"):
        main(
            [
                "generate",
                "--checkpoint",
                str(m),
                "--prompt-ids",
                "1,2",
                "--temperature",
                "1.2",
                "--top-k",
                "50",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--max-new-tokens",
                "16",
                "--json",
            ]
        )
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"])
    assert outs[0] == outs[1] != outs[2]


def test_user_errors_are_one_line(tmp_path):
    r = run_cli("init", "--preset", "ts-9m", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "jaxlm init: error: unknown preset 'ts-9m'; choose one of ts-1m, ts-3m, ts-8m, ts-28m, "
        "ts-33m, ts-1l-21m, ts-2l-33m"
    ]
    r = run_cli("generate", "--checkpoint", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no such checkpoint directory" in r.stderr
    np.testing.assert_equal(r.stdout, "")
    m = tmp_path / "m"
    assert main(["init", "--preset", "ts-1m", "--vocab-size", "64", "--out", str(m)]) == 0
    r = run_cli("generate", "--checkpoint", str(m), "--prompt-ids", "1", "--max-new-tokens", "0")
    assert r.returncode == 2 and "max_new_tokens=0 must be >= 1" in r.stderr
