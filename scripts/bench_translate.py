#!/usr/bin/env python
"""Sentences/s of the transformers and CTranslate2 backends on one random NLLB-sized model.

A randomly initialised M2M100 (NLLB's architecture) with a test-made character tokenizer, padded
with filler tokens up to `--vocab-size`, translates the same sentences with a fixed output length
(min = max = `--new-tokens`), so both backends do the same work. One JSON line per backend.

  python scripts/bench_translate.py --size nllb-600m --device cuda           # NLLB-600M dims
  python scripts/bench_translate.py --size small --sentences 64 --new-tokens 16   # quick CPU run
  python scripts/bench_translate.py --backends transformers,ctranslate2,ctranslate2:int8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SIZES = {  # d_model, layers (enc = dec), heads, ffn
    "nllb-600m": (1024, 12, 16, 4096),
    "small": (256, 3, 4, 1024),
    "tiny": (16, 1, 2, 32),
}
_SENTENCES = (
    "Once upon a time, there was a little girl named Lily who loved to play outside.",
    "She saw a big red ball in the park.",
    'Her mom said, "Be careful, the grass is wet!"',
    "The dog barked and ran after the cat.",
    "They played together all day and became best friends.",
    "Tom was sad because he lost his favorite toy.",
)


def build_model(workdir: Path, size: str, vocab_size: int) -> tuple[Path, int]:
    """Save a random model and its tokenizer; returns (path, parameter count)."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    from jaxlm.mt.testing import tiny_vocab

    vocab = tiny_vocab()
    n_codes = 203  # NLLB's language codes and <mask>, added by the tokenizer
    for i in range(max(0, vocab_size - len(vocab) - n_codes)):
        vocab[f"▁w{i}"] = len(vocab)
    tok = NllbTokenizer(vocab=vocab, merges=[], src_lang="eng_Latn", tgt_lang="arb_Arab")
    d, layers, heads, ffn = SIZES[size]
    cfg = M2M100Config(
        vocab_size=len(tok), d_model=d, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn, max_position_embeddings=1024, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, scale_embedding=True, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(cfg).eval()
    path = workdir / f"random-{size}-v{len(tok)}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def bench(backend: str, model: Path, args, device: str, dtype: str) -> dict:
    from jaxlm.mt.backends import BackendConfig, load_backend

    cfg = BackendConfig(
        model=str(model), kind=backend, device=device, dtype=dtype, len_ratio=0.0,
        len_extra=args.new_tokens, min_new_tokens=args.new_tokens,
        ct2_cache=str(Path(args.workdir) / "ct2"),
    )  # fmt: skip
    t_load = time.perf_counter()
    b = load_backend(cfg)
    load_s = time.perf_counter() - t_load
    sents = [f"{_SENTENCES[i % len(_SENTENCES)]} ({i})" for i in range(args.sentences)]
    b.translate(sents[: args.batch_size])  # warm-up
    b.counters.sentences = b.counters.input_tokens = b.counters.output_tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(sents), args.batch_size):
        b.translate(sents[i : i + args.batch_size])
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    c = b.counters
    return {
        "backend": backend, "device": device, "dtype": dtype, "sentences": c.sentences,
        "batch_size": args.batch_size, "new_tokens": args.new_tokens,
        "output_tokens": c.output_tokens, "seconds": round(secs, 3),
        "sentences_per_s": round(c.sentences / secs, 2),
        "output_tokens_per_s": round(c.output_tokens / secs, 1), "load_s": round(load_s, 2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="nllb-600m")
    p.add_argument("--vocab-size", type=int, default=256206, help="0: the bare test tokenizer")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32, help="forced output length")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--backends", default="transformers,ctranslate2", help="comma list of BACKEND[:DTYPE]"
    )
    p.add_argument("--workdir", default="", help="where the model and its CT2 copy go (temp)")
    args = p.parse_args(argv)
    import torch

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_translate_")
    model, n_params = build_model(Path(args.workdir), args.size, args.vocab_size)
    print(json.dumps({"model": args.size, "params": n_params, "device": device}), flush=True)
    for spec in args.backends.split(","):
        backend, _, dtype = spec.partition(":")  # e.g. ctranslate2:int8
        try:
            row = bench(backend, model, args, device, dtype or args.dtype)
        except Exception as e:  # report and go on: one backend may lack GPU support here
            row = {"backend": backend, "device": device, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps({"size": args.size, **row}), flush=True)


if __name__ == "__main__":
    main()
