"""Translation backends: HF transformers `generate` and CTranslate2 `Translator`.

Both take any NLLB or M2M100 checkpoint (a local directory, or a hub name when online) and
translate a batch of sentences with greedy or beam search. Output length is guarded relative to
each sentence's own input: `length_budget = ceil(len_ratio * input_tokens + len_extra)` new tokens
(the target-language token included); inputs longer than `max_input_tokens` are truncated and
counted. Language codes: NLLB tokenizers take `eng_Latn`; M2M100 tokenizers take `en` (token
`__en__`); an NLLB code given to an M2M100 model is mapped through `_NLLB_TO_ISO`.

A sentence's output does not depend on its neighbours in the batch through the length guard:
greedy search runs the batch to its largest budget and cuts each output to its own (greedy
decoding is prefix-consistent, so the cut output is the output decoded with that budget, token for
token); beam search, whose hypotheses do depend on the limit, decodes rows of equal budget
together. Neither backend forces an end token at the limit (a forced one would make the cut
output differ). What remains is floating point: CPU and GPU matrix kernels are chosen by shape (a
batch of one goes through a matrix-vector kernel, larger batches through blocked GEMMs whose
blocking depends on the row count, and padding lengthens the attention sums), so a sentence's
logits move in the last bits (measured: <= 1e-7 on the tiny test model) with the batch it is in,
and its tokens change only where two candidates tie to that precision. `jaxlm.mt.translate`
therefore builds every batch from the input alone, so reruns and resumes are bitwise identical.
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


def length_budget(cfg: BackendConfig, n_input: int) -> int:
    """New tokens (the target-language token included) for a sentence of `n_input` tokens."""
    return max(math.ceil(cfg.len_ratio * n_input + cfg.len_extra), cfg.min_new_tokens)


def decode_groups(budgets: list[int], beam: int) -> list[list[int]]:
    """Rows decoded in one call: all of them for greedy search (each output is then cut to its
    own budget), rows of equal budget for beam search (whose result depends on the limit)."""
    if beam == 1:
        return [list(range(len(budgets)))]
    groups: dict[int, list[int]] = {}
    for row, budget in enumerate(budgets):
        groups.setdefault(budget, []).append(row)
    return list(groups.values())


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
        self.model.generation_config.forced_eos_token_id = None  # the length guard cuts

    def translate(self, sentences: list[str]) -> list[str]:
        ids = self.tok(sentences, truncation=True, max_length=self.cfg.max_input_tokens)
        ids = ids["input_ids"]
        self.counters.truncated += sum(len(x) >= self.cfg.max_input_tokens for x in ids)
        budgets = [length_budget(self.cfg, len(x)) for x in ids]
        outs: list[list[int]] = [[] for _ in ids]
        for rows in decode_groups(budgets, self.cfg.beam):
            gen = self._generate([ids[r] for r in rows], max(budgets[r] for r in rows))
            for r, seq in zip(rows, gen, strict=True):
                outs[r] = seq[1 : 1 + budgets[r]]  # after the decoder start: language token, text
        pad = self.tok.pad_token_id
        self.counters.sentences += len(sentences)
        self.counters.input_tokens += sum(map(len, ids))
        self.counters.output_tokens += sum(t != pad for seq in outs for t in seq)
        return [t.strip() for t in self.tok.batch_decode(outs, skip_special_tokens=True)]

    def _generate(self, ids: list[list[int]], max_new: int) -> list[list[int]]:
        """Token ids (decoder start first, right-padded) of one `generate` call."""
        import torch

        enc = self.tok.pad({"input_ids": ids}, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(
                **enc.to(self.device),
                forced_bos_token_id=self.tgt_id,
                max_new_tokens=max_new,
                min_new_tokens=self.cfg.min_new_tokens or None,
                num_beams=self.cfg.beam,
                do_sample=False,
            )
        return out.tolist()


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
        ids = self.tok(sentences, truncation=True, max_length=self.cfg.max_input_tokens)
        tokens = [self.tok.convert_ids_to_tokens(x) for x in ids["input_ids"]]
        self.counters.truncated += sum(len(t) >= self.cfg.max_input_tokens for t in tokens)
        budgets = [length_budget(self.cfg, len(t)) for t in tokens]
        hyps: list[list[str]] = [[] for _ in tokens]
        for rows in decode_groups(budgets, self.cfg.beam):
            results = self.translator.translate_batch(
                [tokens[r] for r in rows],
                target_prefix=[[self.tgt_token]] * len(rows),
                beam_size=self.cfg.beam,
                max_decoding_length=max(budgets[r] for r in rows),  # counts the prefix, as HF
                min_decoding_length=self.cfg.min_new_tokens,
                max_batch_size=len(rows),
            )
            for r, res in zip(rows, results, strict=True):
                hyps[r] = res.hypotheses[0][1 : budgets[r]]  # cut, then drop the language prefix
        self.counters.output_tokens += sum(len(h) + 1 for h in hyps)
        self.counters.sentences += len(sentences)
        self.counters.input_tokens += sum(map(len, tokens))
        return [
            self.tok.decode(self.tok.convert_tokens_to_ids(h), skip_special_tokens=True).strip()
            for h in hyps
        ]


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
