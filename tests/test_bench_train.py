"""scripts/bench_train.py on a tiny model: one JSON line per implementation, then the ratios."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_train.py"
FIELDS = {"impl", "preset", "device", "vocab_size", "batch", "seq_len", "dtype", "tokens_per_s",
          "mfu", "step_ms_median", "compile_s"}  # fmt: skip
TINY = ["--presets", "ts-1m", "--vocab-size", "128", "--seq-len", "16", "--batch", "2",
        "--steps", "1", "--rounds", "2", "--warmup", "0"]  # fmt: skip


def test_bench_train_prints_every_field_and_the_ratios():
    # 0.5 s is too little for torch.compile: its failure must come back as a JSON line, as must
    # a variant's XLA option that XLA does not know
    bad_xla = "jaxlm[xla_no_such_option=1]"
    impls = ["--impls", f"jaxlm,torch-eager,torch-compile,{bad_xla}"]
    argv = [sys.executable, str(SCRIPT), *TINY, *impls, "--compile-timeout", "0.5"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    *lines, summary = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_impl = {r["impl"]: r for r in lines}
    assert set(by_impl) == {"jaxlm", "torch-eager", "torch-compile", bad_xla}
    assert "xla_no_such_option" in by_impl[bad_xla]["error"]
    for impl in ("jaxlm", "torch-eager"):
        r = by_impl[impl]
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["tokens_per_s"] > 0 and r["vocab_size"] == 128 and r["seq_len"] == 16
        assert r["dtype"] == "float32" and r["mfu"] is None  # no known peak for a CPU
    assert "error" in by_impl["torch-compile"] or "tokens_per_s" in by_impl["torch-compile"]
    assert summary["ratios"]["ts-1m"]["jaxlm/torch-eager"] > 0


def test_jaxlm_variants_are_typed_and_checked():
    import importlib.util

    from jaxlm.config import preset
    from jaxlm.errors import UserError

    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    spec = "jaxlm[remat=true+window_size=8+loss_chunk_rows=64+xla_gpu_enable_triton_gemm=true]"
    impl, overrides = bench.parse_impl(spec)
    cfg, kw = bench._variant(preset("ts-1m"), overrides, "fused", 0)
    assert (impl, cfg.remat, cfg.window_size) == ("jaxlm", True, 8)
    xla = {"xla_gpu_enable_triton_gemm": True}
    assert kw == {"loss_impl": "fused", "loss_chunk_rows": 64, "xla_options": xla}
    bad = {"foo": "1", "attention_impl": "flash", "remat": "maybe", "loss_chunk_rows": "x"}
    for key, value in bad.items():
        with pytest.raises(UserError, match=key):
            bench._variant(preset("ts-1m"), {key: value}, "fused", 0)
    # the torch peers take model fields (the same model for both sides), nothing of jaxlm's own
    impl, overrides = bench.parse_impl("torch-gpt-compile[window_size=512]")
    cfg, _ = bench._variant(preset("ts-1m"), overrides, "fused", 0, impl)
    assert (impl, cfg.window_size) == ("torch-gpt-compile", 512)
    for key in ("loss_impl", "xla_gpu_enable_triton_gemm", "residual_float32", "remat"):
        with pytest.raises(UserError, match=key):
            bench._variant(preset("ts-1m"), {key: "1"}, "fused", 0, "torch-eager")
    with pytest.raises(UserError, match="choose from"):
        bench.parse_impl("torch-jit[window_size=8]")
    # ratios pair a jaxlm impl with the torch impls on the same model only
    # (jaxlm's numerics, e.g. a float32 residual stream, leave the model as it is)
    tps = {"jaxlm": 300, "jaxlm[xla_a=1]": 330, "jaxlm[window_size=512]": 400, "torch-eager": 100,
           "torch-gpt[window_size=512]": 200, "torch-compile": None,
           "jaxlm[residual_float32=true]": 250}  # fmt: skip
    lines = [{"preset": "p", "impl": i, "tokens_per_s": t} for i, t in tps.items()]
    assert bench.like_for_like_ratios(lines) == {"p": {
        "jaxlm/torch-eager": 3.0, "jaxlm[xla_a=1]/torch-eager": 3.3,
        "jaxlm[window_size=512]/torch-gpt[window_size=512]": 2.0,
        "jaxlm[residual_float32=true]/torch-eager": 2.5}}  # fmt: skip


def test_hand_written_torch_peer_is_gpt_neo():
    """scripts/torch_gpt_neo.py (the fast torch peer) gives transformers' GPT-Neo logits: unscaled
    scores, local layers' window, tanh GELU. Larger q/k weights make the attention scale matter."""
    import torch

    from jaxlm.config import preset
    from jaxlm.testing import random_hf_gpt_neo

    sys.path.insert(0, str(SCRIPT.parent))
    from torch_gpt_neo import TorchGPTNeo

    for window in (4, 16):  # 16 tokens overflow a window of 4; one of 16 is the causal mask
        cfg = preset("ts-1m", vocab_size=128).replace(window_size=window)
        hf = random_hf_gpt_neo(cfg, seed=1)
        with torch.no_grad():
            for block in hf.transformer.h:
                block.attn.attention.q_proj.weight.mul_(20)
                block.attn.attention.k_proj.weight.mul_(20)
            ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
            want = hf(input_ids=ids).logits
            got = TorchGPTNeo(hf)(ids)
        assert want.abs().max() > 0.3
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
