"""Translation backends: HF transformers `generate` and CTranslate2 `Translator`.

Both take any NLLB or M2M100 checkpoint (a local directory, or a hub name when online) and
translate a batch of sentences with greedy or beam search. Output length is guarded relative to
the input: `max_new = ceil(len_ratio * input_tokens + len_extra)`; inputs longer than
`max_input_tokens` are truncated and counted. Language codes: NLLB tokenizers take `eng_Latn`;
M2M100 tokenizers take `en` (token `__en__`); an NLLB code given to an M2M100 model is mapped
through `_NLLB_TO_ISO`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from jaxlm.errors import UserError

_NLLB_TO_ISO = {
    "eng": "en", "arb": "ar", "ary": "ar", "arz": "ar", "fra": "fr", "deu": "de", "spa": "es",
    "rus": "ru", "zho": "zh", "jpn": "ja", "por": "pt", "ita": "it", "tur": "tr", "hin": "hi",
    "urd": "ur", "pes": "fa", "heb": "he", "ind": "id", "kor": "ko", "nld": "nl", "pol": "pl",
    "swh": "sw", "ben": "bn", "vie": "vi", "tha": "th", "ell": "el", "ukr": "uk",
}  # fmt: skip


@dataclass(frozen=True)
class BackendConfig:
    """How to load and run a translation model."""

    model: str  # local checkpoint dir or hub name
    src: str = "eng_Latn"
    tgt: str = "arb_Arab"
    kind: str = "transformers"  # transformers | ctranslate2
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = (
        "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16 | int8 (ct2)
    )
    beam: int = 1
    max_input_tokens: int = 256
    len_ratio: float = 2.0  # max_new_tokens = len_ratio * input tokens + len_extra
    len_extra: int = 10
    min_new_tokens: int = 0  # > 0 forces output length (benchmarks)
    ct2_cache: str = ""  # where converted CTranslate2 models live (default ~/.cache/jaxlm/ct2)


@dataclass
class Counters:
    """Running totals for throughput."""

    sentences: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    truncated: int = 0
    extra: dict = field(default_factory=dict)


def resolve_lang(tokenizer, code: str) -> tuple[str, str]:
    """(code for `tokenizer.src_lang`, language token) for an NLLB or M2M100 tokenizer."""
    unk = tokenizer.unk_token_id
    iso = _NLLB_TO_ISO.get(code.split("_")[0]) if "_" in code else None
    for cand in [code, code.strip("_")] + ([iso] if iso else []):
        for token in (cand, f"__{cand}__"):
            if tokenizer.convert_tokens_to_ids(token) not in (None, unk):
                return cand, token
    raise UserError(f"language code {code!r} is not known to the tokenizer of this model")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _tokenizer(cfg: BackendConfig):
    """The HF tokenizer set to the source language, and the target-language token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    tok.src_lang, _ = resolve_lang(tok, cfg.src)
    _, tgt_token = resolve_lang(tok, cfg.tgt)
    return tok, tgt_token


class TransformersBackend:
    """`AutoModelForSeq2SeqLM.generate` with a forced target-language token."""

    def __init__(self, cfg: BackendConfig):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        self.cfg, self.counters = cfg, Counters()
        self.device = _device(cfg.device)
        self.tok, tgt_token = _tokenizer(cfg)
        self.tgt_id = self.tok.convert_tokens_to_ids(tgt_token)
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if dtype == "int8":
            raise UserError("--dtype int8 needs --backend ctranslate2")
        self.model = AutoModelForSeq2SeqLM.from_pretrained(cfg.model, dtype=getattr(torch, dtype))
        self.model = self.model.to(self.device).eval()

    def translate(self, sentences: list[str]) -> list[str]:
        import torch

        enc = self.tok(
            sentences, return_tensors="pt", padding=True, truncation=True,
            max_length=self.cfg.max_input_tokens,
        )  # fmt: skip
        lengths = enc["attention_mask"].sum(1)
        self.counters.truncated += int((lengths >= self.cfg.max_input_tokens).sum())
        max_new = math.ceil(self.cfg.len_ratio * int(lengths.max()) + self.cfg.len_extra)
        with torch.inference_mode():
            out = self.model.generate(
                **enc.to(self.device),
                forced_bos_token_id=self.tgt_id,
                max_new_tokens=max(max_new, self.cfg.min_new_tokens),
                min_new_tokens=self.cfg.min_new_tokens or None,
                num_beams=self.cfg.beam,
                do_sample=False,
            )
        pad = self.tok.pad_token_id
        self.counters.sentences += len(sentences)
        self.counters.input_tokens += int(lengths.sum())
        self.counters.output_tokens += int((out[:, 1:] != pad).sum())
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]


def ct2_model_dir(cfg: BackendConfig, quantization: str) -> Path:
    """The cache directory of one converted model (keyed by the model name or absolute path)."""
    root = Path(cfg.ct2_cache or os.path.expanduser("~/.cache/jaxlm/ct2"))
    src = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", src.strip("/"))[-60:]
    digest = hashlib.sha1(f"{src}|{quantization}".encode()).hexdigest()[:8]
    return root / f"{slug}-{quantization or 'none'}-{digest}"


def convert_to_ct2(cfg: BackendConfig, quantization: str) -> Path:
    """Convert the HF checkpoint once (to a temporary dir, then an atomic rename)."""
    from ctranslate2.converters import TransformersConverter

    out = ct2_model_dir(cfg, quantization)
    if (out / "model.bin").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    TransformersConverter(cfg.model).convert(
        str(tmp), quantization=quantization or None, force=True
    )
    try:
        os.replace(tmp, out)
    except OSError:  # another worker converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


class CTranslate2Backend:
    """A CTranslate2 `Translator` on a converted copy of the checkpoint (cached)."""

    def __init__(self, cfg: BackendConfig):
        import ctranslate2

        self.cfg, self.counters = cfg, Counters()
        self.device = _device(cfg.device)
        self.tok, self.tgt_token = _tokenizer(cfg)
        compute = {"auto": "default", "float32": "float32"}.get(cfg.dtype, cfg.dtype)
        if cfg.dtype == "auto" and self.device == "cuda":
            compute = "bfloat16"
        path = convert_to_ct2(cfg, "")
        # CTranslate2 defaults to 4 threads; use the machine, as torch does.
        threads = int(os.environ.get("JAXLM_CT2_THREADS", "0")) or (os.cpu_count() or 4)
        self.translator = ctranslate2.Translator(
            str(path), device=self.device, compute_type=compute, intra_threads=threads
        )
        try:  # CUDA libraries load lazily: fail here, with a hint, not mid-run
            self.translator.translate_batch([[self.tgt_token]], max_decoding_length=2)
        except RuntimeError as e:
            raise UserError(
                f"CTranslate2 cannot run on {self.device} ({e}); its wheels need CUDA 12 "
                "cuBLAS and cuDNN 9 on GPU; or use --device cpu"
            ) from None

    def translate(self, sentences: list[str]) -> list[str]:
        ids = self.tok(sentences, truncation=True, max_length=self.cfg.max_input_tokens)[
            "input_ids"
        ]
        tokens = [self.tok.convert_ids_to_tokens(x) for x in ids]
        longest = max(len(t) for t in tokens)
        self.counters.truncated += sum(len(t) >= self.cfg.max_input_tokens for t in tokens)
        max_len = math.ceil(self.cfg.len_ratio * longest + self.cfg.len_extra)
        results = self.translator.translate_batch(
            tokens,
            target_prefix=[[self.tgt_token]] * len(tokens),
            beam_size=self.cfg.beam,
            max_decoding_length=max(max_len, self.cfg.min_new_tokens),  # counts the prefix, as HF
            min_decoding_length=self.cfg.min_new_tokens,
            max_batch_size=len(tokens),
        )
        outs = []
        for r in results:
            hyp = r.hypotheses[0][1:]  # drop the target-language prefix
            self.counters.output_tokens += len(hyp) + 1
            outs.append(
                self.tok.decode(
                    self.tok.convert_tokens_to_ids(hyp), skip_special_tokens=True
                ).strip()
            )
        self.counters.sentences += len(sentences)
        self.counters.input_tokens += sum(map(len, tokens))
        return outs


BACKENDS = {"transformers": TransformersBackend, "ctranslate2": CTranslate2Backend}


def load_backend(cfg: BackendConfig):
    if cfg.kind not in BACKENDS:
        raise UserError(f"--backend {cfg.kind!r}: choose from {', '.join(BACKENDS)}")
    if not Path(cfg.model).exists():
        # a hub id is "name" or "owner/name"; anything else can only be a local directory
        if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1:
            raise UserError(f"--model {cfg.model}: no such directory")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(f"--model {cfg.model}: no such directory, and the hub is offline")
    try:
        return BACKENDS[cfg.kind](cfg)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # not a model folder, not a hub id, no network, ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"--model {cfg.model}: cannot load it ({why})") from None
