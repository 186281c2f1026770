"""Training throughput: jaxlm's jitted train step against transformers' GPT-Neo in PyTorch.

One full optimizer step (forward, backward, AdamW with the TinyStories settings, gradient
clipping) on synthetic random tokens, no data loader. The implementations are timed in
interleaved rounds (A B C A B C ...) so that noisy neighbours hit them alike; each round times
`--steps` steps and syncs once. Prints one JSON line per (preset, impl) with the median step,
then one line with the jaxlm / torch ratios per preset.

The torch impls: `torch-eager` and `torch-compile` run transformers' GPTNeoForCausalLM (the
issue's peer); `torch-gpt` and `torch-gpt-compile` (on request) run the same parameters through
scripts/torch_gpt_neo.py, a hand-written GPT-Neo with PyTorch's fused SDPA attention.

    python scripts/bench_train.py --presets ts-8m,ts-33m --batch 8 --steps 3 --rounds 3

Variants run side by side as extra impls, `impl[key=value+key=value]`. For jaxlm a key is
`loss_impl`, `loss_chunk_rows`, a ModelConfig field or an XLA option (`xla_...`), e.g.
`--impls jaxlm,jaxlm[loss_impl=plain],jaxlm[xla_gpu_enable_triton_gemm=true],torch-eager`; the
torch impls take ModelConfig fields, e.g. `jaxlm[window_size=512],torch-gpt[window_size=512]`
(at 512 tokens every layer is then global: the nanoGPT-like "flash everywhere" model, not the
TinyStories one). The ratios pair each jaxlm impl with the torch impls on the same model.
`--profile DIR` writes a jax.profiler trace (Perfetto JSON too) of a few steps of the first jaxlm
impl.

fp32 on CPU; bf16 on accelerators (torch autocast with fp32 master weights; jaxlm
dtype=bfloat16 with fp32 params and cuDNN flash attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxlm import overlay
from jaxlm.config import COMPUTE_FIELDS, preset
from jaxlm.errors import UserError
from jaxlm.train.lm import (
    OptimSection,
    flops_per_token,
    make_optimizer,
    make_train_step,
    peak_flops,
)
from jaxlm.xla_options import compiler_options

IMPLS = ("jaxlm", "torch-eager", "torch-compile", "torch-gpt", "torch-gpt-compile")
DEFAULT_IMPLS = IMPLS[:3]  # the hand-written torch-gpt peers on request


class _Timeout(Exception):
    pass


def _alarm(seconds: float):
    """Raise _Timeout in the main thread after `seconds` (0: never); returns a cancel function."""

    def handler(signum, frame):
        raise _Timeout(f"over the {seconds:g} s budget")

    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        return lambda: None
    prev = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def cancel():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev)

    return cancel


def _batches(vocab: int, batch: int, seq_len: int, n: int = 4) -> np.ndarray:
    """n random token batches [n, B, T+1] (inputs and shifted targets)."""
    return np.random.RandomState(0).randint(0, vocab, (n, batch, seq_len + 1)).astype(np.int32)


LOSS_KEYS = ("loss_impl", "loss_chunk_rows")
# How jaxlm computes, not the model (the bench sets dtype per device): the ratios pair these with
# the plain torch impls, and the torch impls refuse them.
NUMERICS_FIELDS = tuple(f for f in COMPUTE_FIELDS if f != "dtype")


def parse_impl(spec: str) -> tuple[str, dict[str, str]]:
    """'jaxlm[loss_impl=plain+loss_chunk_rows=4096]' -> ('jaxlm', {'loss_impl': 'plain', ...})."""
    m = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", spec)
    if not m or m[1] not in IMPLS:
        raise UserError(f"impl {spec!r}: choose from {IMPLS}, each with [key=value+...] or not")
    overrides = {}
    for kv in filter(None, (m[2] or "").split("+")):
        key, sep, value = kv.partition("=")
        if not sep:
            raise UserError(f"impl {spec!r}: {kv!r} is not key=value")
        overrides[key] = value
    return m[1], overrides


def _kind(key: str) -> str:
    """What an impl[...] key sets: an XLA option, jaxlm's loss, jaxlm's numerics (a ModelConfig
    field that leaves the model as it is), or (else) a model field."""
    if key.startswith("xla_"):
        return "xla"
    return "loss" if key in LOSS_KEYS else "numerics" if key in NUMERICS_FIELDS else "model"


def _model_overrides(spec: str) -> dict[str, str]:
    """The overrides of an impl spec that change the model (not jaxlm's loss, numerics or XLA)."""
    return {k: v for k, v in parse_impl(spec)[1].items() if _kind(k) == "model"}


def _variant(
    cfg, overrides: dict[str, str], loss_impl: str, loss_chunk_rows: int, impl: str = "jaxlm"
):
    """cfg and jaxlm_runner's keywords with an impl[...]'s overrides applied. Values are parsed
    as YAML; ModelConfig fields are typed and checked as `--set` overrides are (jaxlm.overlay);
    for jaxlm, keys starting `xla_` are XLA compiler options for the train step, on top of
    jaxlm's defaults (jaxlm.xla_options; XLA rejects an unknown one when it compiles)."""
    kw = {"loss_impl": loss_impl, "loss_chunk_rows": loss_chunk_rows, "xla_options": {}}
    model = {}
    for key, value in overrides.items():
        value, kind = yaml.safe_load(value), _kind(key)
        if impl != "jaxlm" and kind != "model":
            raise UserError(f"{impl}[{key}=...]: the torch impls take the model's fields only")
        {"xla": kw["xla_options"], "loss": kw, "model": model, "numerics": model}[kind][key] = value
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key in set(model) - set(fields):
        raise UserError(f"jaxlm[{key}=...]: not a ModelConfig field, xla_ option nor {LOSS_KEYS}")
    if model:
        cfg = overlay.build(type(cfg), {**fields, **model}, "jaxlm")
    if kw["loss_impl"] not in ("fused", "plain") or type(kw["loss_chunk_rows"]) is not int:
        raise UserError(f"jaxlm[...]: loss_impl is fused or plain, loss_chunk_rows an int: {kw}")
    return cfg, kw


def jaxlm_runner(
    cfg,
    batches: np.ndarray,
    steps: int,
    loss_impl: str = "fused",
    loss_chunk_rows: int = 0,
    xla_options: dict | None = None,
) -> Callable[[int], None]:
    """A function running k jitted train steps (params and optimizer state donated), compiled
    with the trainer's XLA options plus `xla_options`."""
    from flax import nnx

    from jaxlm.model import init_model

    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)
    tx, _ = make_optimizer(OptimSection(), steps)
    train_step = make_train_step(graphdef, tx, 1, loss_impl, loss_chunk_rows)
    opts = compiler_options(extra=xla_options)
    step = jax.jit(train_step, donate_argnums=(0, 1), compiler_options=opts)
    tokens = [jax.device_put(jnp.asarray(b)) for b in batches]
    state = {"params": params, "opt": tx.init(params), "i": 0}

    def run(k: int) -> None:
        m = None
        for _ in range(k):
            t = tokens[state["i"] % len(tokens)]
            state["params"], state["opt"], m = step(state["params"], state["opt"], t)
            state["i"] += 1
        jax.block_until_ready(m["loss"])

    return run


def torch_runner(
    cfg, batches: np.ndarray, compiled: bool, accel: bool, hand: bool = False
) -> Callable[[int], None]:
    """The same step for transformers' GPTNeoForCausalLM, eager or torch.compile'd; hand: its
    forward pass by scripts/torch_gpt_neo.py (SDPA attention) over the same parameters."""
    import torch

    from jaxlm.testing import random_hf_gpt_neo

    dev = "cuda" if accel else "cpu"
    model = net = random_hf_gpt_neo(cfg).to(dev).train()
    if hand:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from torch_gpt_neo import TorchGPTNeo

        net = TorchGPTNeo(model)
    fwd = torch.compile(net) if compiled else net
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = OptimSection()
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
        fused=accel,
    )
    tokens = [torch.from_numpy(b).long().to(dev) for b in batches]
    V = cfg.vocab_size
    state = {"i": 0}

    def one(t) -> torch.Tensor:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=accel):
            logits_btv = fwd(t[:, :-1]) if hand else fwd(input_ids=t[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits_btv.float().view(-1, V), t[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(k: int) -> None:
        for _ in range(k):
            loss = one(tokens[state["i"] % len(tokens)])
            state["i"] += 1
        loss.item()  # sync

    return run


def bench_preset(name: str, impls: list[str], args, accel: bool, device: str) -> list[dict]:
    dtype = "bfloat16" if accel else "float32"
    attn = "cudnn" if accel and jax.default_backend() == "gpu" else "xla"
    cfg = preset(name, vocab_size=args.vocab_size, dtype=dtype, attention_impl=attn)
    batches = _batches(cfg.vocab_size, args.batch, args.seq_len)
    base = {"preset": name, "device": device, "vocab_size": cfg.vocab_size,
            "batch": args.batch, "seq_len": args.seq_len, "dtype": dtype}  # fmt: skip
    runners, results = {}, {}
    for spec in impls:  # build and warm up (compile) each
        impl, overrides = parse_impl(spec)
        t0 = time.perf_counter()
        cancel = _alarm(args.compile_timeout if impl.endswith("-compile") else 0)
        extra = {}
        try:
            vcfg, kw = _variant(cfg, overrides, args.loss_impl, args.loss_chunk_rows, impl)
            if impl == "jaxlm":
                extra = {"attention_impl": vcfg.attention_impl, **kw}
                try:
                    run = jaxlm_runner(vcfg, batches, args.steps, **kw)
                    run(1)
                except Exception as e:  # no cuDNN flash here: say so, fall back to XLA's
                    if vcfg.attention_impl == "xla":
                        raise
                    extra.update(attention_impl="xla", cudnn_error=str(e)[:300])
                    vcfg = vcfg.replace(attention_impl="xla")
                    run = jaxlm_runner(vcfg, batches, args.steps, **kw)
                    run(1)
            else:
                run = torch_runner(
                    vcfg, batches, impl.endswith("-compile"), accel, impl.startswith("torch-gpt")
                )
                run(1)
            if overrides:
                extra["overrides"] = overrides
            compile_s = time.perf_counter() - t0
            if args.warmup:
                run(args.warmup)
        except Exception as e:  # torch.compile may be unsupported or too slow here
            cancel()
            if impl.endswith("-compile"):
                import torch

                torch._dynamo.reset()
            results[spec] = {"impl": spec, **base, "error": f"{type(e).__name__}: {e}"[:500]}
            continue
        cancel()
        runners[spec] = run
        results[spec] = {"impl": spec, **base, **extra, "compile_s": round(compile_s, 2)}
        results[spec]["times"] = []
    for _ in range(args.rounds):  # interleaved timed rounds
        for impl, run in runners.items():
            t0 = time.perf_counter()
            run(args.steps)
            results[impl]["times"].append((time.perf_counter() - t0) / args.steps)
    tokens = args.batch * args.seq_len
    peak = peak_flops(jax.devices()[0]) if accel else None
    for impl in runners:
        r = results[impl]
        times = r.pop("times")
        step_s = statistics.median(times)
        tps = tokens / step_s
        r["step_ms_median"] = round(step_s * 1e3, 2)
        r["step_ms_min"] = round(min(times) * 1e3, 2)  # the round least disturbed by the others
        r["tokens_per_s"] = round(tps, 1)
        r["mfu"] = round(tps * flops_per_token(cfg, args.seq_len) / peak, 4) if peak else None
    if args.profile and (first := next((s for s in runners if s.startswith("jaxlm")), None)):
        out = os.path.join(args.profile, name)
        os.makedirs(out, exist_ok=True)
        with jax.profiler.trace(out, create_perfetto_trace=True):
            runners[first](args.steps)
    runners.clear()
    gc.collect()  # free this preset's models before the next one's
    return [results[i] for i in impls]


def breakdown(name: str, args, accel: bool, device: str) -> list[dict]:
    """Where jaxlm's step goes: forward, forward + backward, with the plain and the fused loss,
    the XLA attention path instead of cuDNN. A probe for the next optimisation, not a benchmark."""
    from flax import nnx

    from jaxlm.model import init_model
    from jaxlm.train.lm import next_token_loss

    dtype = "bfloat16" if accel else "float32"
    batches = _batches(args.vocab_size, args.batch, args.seq_len)
    tokens = jnp.asarray(batches[0])
    out = []
    for attn in ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",):
        cfg = preset(name, vocab_size=args.vocab_size, dtype=dtype, attention_impl=attn)
        graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)

        def loss(p, t, graphdef=graphdef):
            return next_token_loss(nnx.merge(graphdef, p), t, "plain")

        def loss_fused(p, t, graphdef=graphdef):
            return next_token_loss(nnx.merge(graphdef, p), t, "fused")

        parts = {
            "forward": jax.jit(loss),
            "fwd+bwd": jax.jit(jax.value_and_grad(loss)),
            "fwd+bwd fused loss": jax.jit(jax.value_and_grad(loss_fused)),
        }
        for part, f in parts.items():
            try:
                jax.block_until_ready(f(params, tokens))
                times = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        r = f(params, tokens)
                    jax.block_until_ready(r)
                    times.append((time.perf_counter() - t0) / args.steps)
                ms = round(statistics.median(times) * 1e3, 2)
                rec = {"impl": "jaxlm", "part": part, "attention_impl": attn, "step_ms_median": ms}
            except Exception as e:
                rec = {"impl": "jaxlm", "part": part, "attention_impl": attn, "error": str(e)[:300]}
            rec.update(preset=name, device=device, batch=args.batch, seq_len=args.seq_len)
            print(json.dumps(rec), flush=True)
            out.append(rec)
    return out


def like_for_like_ratios(lines: list[dict]) -> dict[str, dict[str, float]]:
    """{preset: {"jaxlm.../torch...": tokens/s ratio}} for each jaxlm impl against each torch impl
    that runs the same model: the same model overrides (jaxlm's loss and XLA options aside)."""
    ratios: dict[str, dict[str, float]] = {}
    for name in {r["preset"] for r in lines}:
        tps = {r["impl"]: r.get("tokens_per_s") for r in lines if r["preset"] == name}
        for ours in [i for i in tps if i.startswith("jaxlm")]:
            for other in [i for i in tps if not i.startswith("jaxlm")]:
                same = _model_overrides(other) == _model_overrides(ours)
                if same and tps.get(ours) and tps.get(other):
                    ratio = round(tps[ours] / tps[other], 3)
                    ratios.setdefault(name, {})[f"{ours}/{other}"] = ratio
    return ratios


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="ts-8m,ts-33m")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--compile-timeout", type=float, default=600, help="torch.compile budget (s)")
    p.add_argument("--breakdown", action="store_true", help="time jaxlm's parts instead")
    p.add_argument("--loss-impl", choices=("fused", "plain"), default="fused", help="jaxlm's loss")
    p.add_argument("--loss-chunk-rows", type=int, default=0, help="fused-loss rows (0: default)")
    p.add_argument("--profile", metavar="DIR", help="trace the first jaxlm impl into DIR/PRESET")
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    for spec in impls:  # every spec and variant checked before anything long starts
        try:
            impl, overrides = parse_impl(spec)
            _variant(preset("ts-1m"), overrides, args.loss_impl, args.loss_chunk_rows, impl)
        except UserError as e:
            p.error(str(e))

    accel = jax.default_backend() != "cpu"
    if not accel:  # compile in this process, so that a timed-out torch.compile leaves no workers
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # busy on our two cores
    import torch

    if accel and not torch.cuda.is_available():
        p.error("jax sees an accelerator but torch has no CUDA")
    if not accel:
        torch.set_num_threads(os.cpu_count())
    device = jax.devices()[0].device_kind
    if args.breakdown:
        return [r for name in args.presets.split(",") for r in breakdown(name, args, accel, device)]
    lines = []
    for name in [s for s in args.presets.split(",") if s]:
        for r in bench_preset(name, impls, args, accel, device):
            print(json.dumps(r), flush=True)
            lines.append(r)
    ratios = like_for_like_ratios(lines)
    summary = {"ratios": ratios, "device": device}
    print(json.dumps(summary), flush=True)
    return lines + [summary]


if __name__ == "__main__":
    sys.exit(main() and 0)
