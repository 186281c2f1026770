"""Tiny, randomly initialised NLLB-style models for tests and benchmarks (no downloads).

The tokenizer is character-level: a BPE with no merges whose vocabulary is the printable ASCII
range, the Arabic letters and the SentencePiece word marker, plus NLLB's language codes as special
tokens. The model is an `M2M100ForConditionalGeneration` (NLLB's architecture) with random weights.
"""

from __future__ import annotations

from pathlib import Path

_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def tiny_vocab() -> dict[str, int]:
    """Specials first (fairseq order), then the word marker, ASCII and Arabic characters."""
    chars = ["▁"] + [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0x0621, 0x0653)]
    chars += ["«", "»", "“", "”", "’", "…", "،", "؟", "؛"]
    return {tok: i for i, tok in enumerate(list(_SPECIALS) + chars)}


def make_tiny_tokenizer(src_lang: str = "eng_Latn", tgt_lang: str = "arb_Arab"):
    """A character-level `NllbTokenizer` with all NLLB language codes."""
    from transformers import NllbTokenizer

    return NllbTokenizer(vocab=tiny_vocab(), merges=[], src_lang=src_lang, tgt_lang=tgt_lang)


def make_tiny_nllb(
    out_dir: str | Path,
    *,
    d_model: int = 16,
    layers: int = 1,
    heads: int = 2,
    ffn: int = 32,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a random M2M100 model and its tokenizer to `out_dir` (`from_pretrained`-loadable)."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    tok = make_tiny_tokenizer()
    cfg = M2M100Config(
        vocab_size=len(tok),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=max_positions,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        scale_embedding=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(cfg).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
