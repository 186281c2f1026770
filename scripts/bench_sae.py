"""SAE training throughput: jaxlm's jitted SAE step against SAELens 6.54.12's in PyTorch.

One full SAE training step on random activation batches already on the device, no activation
store: for `jaxlm`, `sae.train.make_train_step` (the registry SAE, optax Adam with global-norm
clipping, the per-latent firing statistics and the step's metrics) jitted with its state donated,
as `sae.train.train` runs it; for `saelens`, SAELens's own training SAE (`StandardTrainingSAE`,
`TopKTrainingSAE`, ... and their configs) through `SAETrainer._train_step`'s body: the training
forward pass with the dead-latent mask, the firing statistics, backward, `clip_grad_norm_` at 1.0
and `torch.optim.Adam`. Both start from the same weights (jaxlm's initialisation, copied into
SAELens's parameters) and see the same batches in the same order, so each line's `loss` (the
last step's) says they did the same work. SAELens's lr scheduler and coefficient schedulers are
left out: they are host-side counters (with constant lr and no warm-up they change nothing).

The impls are timed in interleaved rounds (A B A B ...) so that noisy neighbours hit them alike;
each round times `--steps` steps and syncs once. Prints one JSON line per (architecture, shape,
dtype, impl) with the median and the fastest round, then one line with the jaxlm / saelens
ratios of vectors per second.

    python scripts/bench_sae.py --architectures standard,topk --shapes 256x4096,768x12288 \
        --batch 1024 --dtypes float32 --steps 5 --rounds 5

`--dtypes bfloat16` feeds bf16 activation batches: SAELens runs its step under
`torch.autocast(bfloat16)` (`LanguageModelSAERunnerConfig.autocast`, fp32 master weights), while
jaxlm's SAE casts its input to float32 and computes in float32, as its trainer does (the
activation store serves float32): `compute_dtype` says which. Float32 matmuls run at each
library's default precision (`--fp32-matmul default`): JAX's lets a recent NVIDIA GPU use TF32,
PyTorch's does not; `--fp32-matmul tf32` or `float32` sets both alike (on a CPU all three are
float32). Each line names the setting as `fp32_matmul`. On CPU, torch uses as many threads
as the machine has cores (`torch_threads` in each line). `--breakdown` times the parts of jaxlm's
step in isolation instead (forward, forward and backward, + Adam, the whole step, and the top-k
selection with its scatter); `--profile DIR` writes a jax.profiler trace of one round of each jaxlm
configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's sae/ and tests/

from sae.base import Buffer, SAEConfig  # noqa: E402
from sae.registry import create  # noqa: E402
from sae.train import (  # noqa: E402
    DataSection,
    SAETrainConfig,
    init_stats,
    make_optimizer,
    make_train_step,
)

IMPLS = ("jaxlm", "saelens")
ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
DTYPES = ("float32", "bfloat16")
# --fp32-matmul: (jax_default_matmul_precision, torch.set_float32_matmul_precision)
FP32_MATMUL = {"default": (None, None), "tf32": ("tensorfloat32", "high"),
               "float32": ("float32", "highest")}  # fmt: skip
# our parameter name -> SAELens's
NAMES = {"W_enc_fs": "W_enc", "W_dec_sf": "W_dec", "b_enc_s": "b_enc", "b_dec_f": "b_dec",
         "threshold_s": "threshold"}  # fmt: skip


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """'256x4096,768x12288' -> [(256, 4096), (768, 12288)]: (d_in F, d_sae S) pairs."""
    shapes = []
    for part in filter(None, spec.split(",")):
        d_in, sep, d_sae = part.partition("x")
        if not (sep and d_in.isdigit() and d_sae.isdigit()) or not int(d_in) or not int(d_sae):
            raise ValueError(f"shape {part!r}: write D_INxD_SAE, e.g. 768x12288")
        shapes.append((int(d_in), int(d_sae)))
    return shapes


def _batches(d_in: int, batch: int, n: int = 4) -> np.ndarray:
    """n random activation batches [n, N, F]: gelu-like (mostly small, some large positive)."""
    x = np.random.RandomState(0).standard_normal((n, batch, d_in)).astype(np.float32)
    return np.maximum(x, -0.17 * np.abs(x))


def train_config(arch: str, d_in: int, d_sae: int, batch: int, k: int) -> SAETrainConfig:
    """The trainer's config (SAELens's defaults) for one SAE shape."""
    sae = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k)
    data = DataSection(train_batch_size_tokens=batch, training_tokens=batch * 10**6)
    return SAETrainConfig(sae=sae, data=data)


def jaxlm_runner(cfg: SAETrainConfig, batches: np.ndarray, dtype: str, dead: int = 0):
    """(run(k) -> last loss, the step's pieces for `breakdown`): k jitted SAE steps. `dead`: that
    many latents dead from the first step (`_kill`)."""
    sae = create(cfg.sae, seed=cfg.seed)
    graphdef, params, buffers = nnx.split(sae, nnx.Param, Buffer)
    _kill(params, dead)
    weights = {name: np.array(v[...]) for name, v in params.items()}  # copies: params are donated
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    step_fn = make_train_step(graphdef, tx, sae, cfg)
    step = jax.jit(step_fn, donate_argnums=(0, 1, 2, 3))
    xs = [jax.device_put(jnp.asarray(b, dtype)) for b in batches]
    stats = init_stats(cfg.sae.n_latents)
    since = np.zeros(cfg.sae.n_latents, np.float32)
    since[:dead] = cfg.features.dead_feature_window + 1
    stats["since_fired_s"] = jnp.asarray(since)
    state = {"s": (params, buffers, jax.jit(tx.init)(params), stats)}
    state["i"] = 0

    def run(k: int) -> float:
        m = None
        for _ in range(k):
            x_nf = xs[state["i"] % len(xs)]
            *s, m = step(*state["s"], x_nf, jnp.int32(state["i"]), jnp.float32(1.0))
            state["s"], state["i"] = tuple(s), state["i"] + 1
        return float(jax.block_until_ready(m["loss"]))

    return run, weights, (graphdef, tx, sae, xs, state)


def _kill(params, dead: int) -> None:
    """The first `dead` latents do not fire (encoder bias -5, far below the live latents'
    pre-activations, near enough for AuxK's reconstruction from them to stay of the residual's
    size): from the first step, as their firing counters start past the dead-feature window in
    both impls, the dead-latent losses (TopK's AuxK) run on exactly those latents, as in a
    trained SAE with some latents dead. Their weights go to SAELens too (`jaxlm_runner`'s)."""
    if dead:
        b = np.array(params["b_enc_s"][...])
        b[:dead] = -5.0
        params["b_enc_s"][...] = jnp.asarray(b)


def saelens_runner(
    cfg: SAETrainConfig,
    batches: np.ndarray,
    dtype: str,
    weights: dict,
    accel: bool,
    dead: int = 0,
) -> Callable[[int], float]:
    """k steps of SAELens's training SAE as `SAETrainer._train_step` takes them."""
    import torch

    from tests.helpers_sae_lens import training_class

    dev = "cuda" if accel else "cpu"
    c = cfg.sae
    cls, cfg_cls = training_class(c.architecture)  # registers SAELens without its package root
    from sae_lens.saes.sae import TrainStepInput

    kw = {"k": c.k} if c.architecture in ("topk", "batchtopk") else {}
    sae = cls(cfg_cls(d_in=c.d_in, d_sae=c.n_latents, device=dev, **kw))
    with torch.no_grad():  # jaxlm's initial weights, so that both do the same steps
        for name, w in weights.items():
            getattr(sae, NAMES[name]).copy_(torch.from_numpy(w))
    o = cfg.optim
    opt = torch.optim.Adam(sae.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2))
    coefs = {n: v for n, (v, _) in create(c).coefficient_schedule().items()}
    torch_dtype = getattr(torch, dtype)
    xs = [torch.from_numpy(b).to(dev, torch_dtype) for b in batches]
    since = torch.zeros(c.n_latents, device=dev)
    since[:dead] = cfg.features.dead_feature_window + 1  # as `jaxlm_runner`'s
    act_freq = torch.zeros(c.n_latents, device=dev)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    window = cfg.features.dead_feature_window
    state = {"i": 0, "rows": 0}

    def one(x) -> torch.Tensor:
        sae.train()
        with autocast:
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    dead_neuron_mask=(since > window).bool(),
                    coefficients=coefs,
                    n_training_steps=state["i"],
                    is_logging_step=False,
                )  # fmt: skip
            )
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                since.add_(1)
                since[did_fire] = 0
                act_freq.add_(firing.sum(0))
                state["rows"] += x.shape[0]
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), o.clip_norm)
        opt.step()
        opt.zero_grad()
        return out.loss

    def run(k: int) -> float:
        loss = None
        for _ in range(k):
            loss = one(xs[state["i"] % len(xs)])
            state["i"] += 1
        return float(loss.item())  # sync

    return run


def _time(run: Callable[[int], float], steps: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = run(steps)
    return (time.perf_counter() - t0) / steps, loss


def bench_config(arch, d_in, d_sae, dtype, impls, args, accel, device) -> list[dict]:
    """Build, warm up and time each impl on one (architecture, shape, dtype), interleaved."""
    import torch

    cfg = train_config(arch, d_in, d_sae, args.batch, args.k)
    batches = _batches(d_in, args.batch)
    base = {"device": device, "architecture": arch, "d_in": d_in, "d_sae": d_sae,
            "batch": args.batch, "dtype": dtype, "fp32_matmul": args.fp32_matmul}  # fmt: skip
    if arch in ("topk", "batchtopk"):
        base["k"] = args.k
    if args.dead:
        base["dead"] = args.dead
    runners, results, weights = {}, {}, None
    for impl in [i for i in IMPLS if i in impls]:  # jaxlm first: its initial weights go to SAELens
        t0 = time.perf_counter()
        try:
            if impl == "jaxlm":
                run, weights, _ = jaxlm_runner(cfg, batches, dtype, args.dead)
                extra = {"compute_dtype": "float32"}
            else:
                if weights is None:
                    weights = jaxlm_runner(cfg, batches[:1], dtype, args.dead)[1]
                run = saelens_runner(cfg, batches, dtype, weights, accel, args.dead)
                extra = {"compute_dtype": "bfloat16 autocast" if dtype == "bfloat16" else dtype}
                if not accel:
                    extra["torch_threads"] = torch.get_num_threads()
            run(1)  # compile (jaxlm) and first-touch allocations
            compile_s = time.perf_counter() - t0
            if args.warmup:
                run(args.warmup)
        except Exception as e:
            results[impl] = {"impl": impl, **base, "error": f"{type(e).__name__}: {e}"[:500]}
            continue
        runners[impl] = run
        results[impl] = {"impl": impl, **base, **extra, "compile_s": round(compile_s, 2)}
        results[impl]["times"] = []
    for _ in range(args.rounds):
        for impl, run in runners.items():
            step_s, loss = _time(run, args.steps)
            results[impl]["times"].append(step_s)
            results[impl]["loss"] = round(loss, 6)
    for impl in runners:
        r = results[impl]
        times = r.pop("times")
        r["step_ms"] = round(statistics.median(times) * 1e3, 3)
        r["step_ms_min"] = round(min(times) * 1e3, 3)  # the round least disturbed by the others
        r["vectors_per_s"] = round(args.batch / statistics.median(times), 1)
    if args.profile and "jaxlm" in runners:
        out = os.path.join(args.profile, f"{arch}-{d_in}x{d_sae}-{dtype}")
        os.makedirs(out, exist_ok=True)
        with jax.profiler.trace(out, create_perfetto_trace=True):
            runners["jaxlm"](args.steps)
    runners.clear()
    gc.collect()
    return [results[i] for i in impls if i in results]


def breakdown(arch, d_in, d_sae, dtype, args, device) -> list[dict]:
    """The parts of jaxlm's step, each jitted and timed alone: where the step's time goes."""
    cfg = train_config(arch, d_in, d_sae, args.batch, args.k)
    _, _, (graphdef, tx, sae, xs, state) = jaxlm_runner(cfg, _batches(d_in, args.batch), dtype)
    params, buffers, opt_state, stats = state["s"]
    dead_s = stats["since_fired_s"] > cfg.features.dead_feature_window
    coefs = {n: jnp.float32(v) for n, (v, _) in sae.coefficient_schedule().items()}
    x = xs[0]

    def loss(p, x):
        out = nnx.merge(graphdef, p, buffers)(x, coefficients=coefs, dead_s=dead_s)
        return out.loss

    grad = jax.value_and_grad(loss)

    def grad_adam(p, o, x):
        _, g = grad(p, x)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    def encode(p, x):
        return nnx.merge(graphdef, p, buffers).encode(x)

    def matmuls(p, x):  # the forward's two matmuls alone
        pre = x.astype(jnp.float32) @ p["W_enc_fs"][...]
        return pre @ p["W_dec_sf"][...]

    def adam(p, o):  # the optimizer alone, the parameters standing in for their gradients
        u, o = tx.update(p, o, p)
        return optax.apply_updates(p, u), o

    parts = {
        "matmuls (fwd)": (matmuls, (params, x)),
        "adam + clipping": (adam, (params, opt_state)),
        "encode": (encode, (params, x)),
        "forward + losses": (loss, (params, x)),
        "fwd + bwd": (grad, (params, x)),
        "fwd + bwd + adam": (grad_adam, (params, opt_state, x)),
    }
    if arch in ("topk", "batchtopk"):
        pre = jax.jit(lambda p, x: nnx.merge(graphdef, p, buffers).hidden_pre(x))(params, x)
        act = lambda pre: nnx.merge(graphdef, params, buffers).activation(pre)  # noqa: E731
        parts["top-k + scatter"] = (act, (pre,))
        k = int(args.k) if arch == "topk" else int(args.k * args.batch)
        shape = pre.shape if arch == "topk" else (pre.size,)
        parts["top-k alone"] = (lambda pre: jax.lax.top_k(pre.reshape(shape), k), (pre,))
    run, *_ = jaxlm_runner(cfg, _batches(d_in, args.batch), dtype)
    runs = {"whole step": run}
    for part, (f, fargs) in parts.items():
        runs[part] = _repeat(jax.jit(f), fargs)
    times: dict[str, list[float]] = {part: [] for part in runs}
    for r in runs.values():  # compile
        r(1)
    for _ in range(args.rounds):  # interleaved, as the impls are
        for part, r in runs.items():
            times[part].append(_time(r, args.steps)[0])
    out = []
    for part in [*parts, "whole step"]:
        rec = {"impl": "jaxlm", "part": part, "device": device, "architecture": arch,
               "d_in": d_in, "d_sae": d_sae, "batch": args.batch, "dtype": dtype,
               "step_ms": round(statistics.median(times[part]) * 1e3, 3)}  # fmt: skip
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def _repeat(f: Callable, fargs: tuple) -> Callable[[int], float]:
    """run(k): k calls of f on the same arguments, then one sync (breakdown's parts)."""

    def run(k: int) -> float:
        for _ in range(k):
            r = f(*fargs)
        jax.block_until_ready(r)
        return 0.0

    return run


def ratios(lines: list[dict]) -> dict[str, float]:
    """{"ARCH D_INxD_SAE DTYPE": jaxlm / saelens vectors per second} where both ran."""
    by_key: dict[str, dict[str, float]] = {}
    for r in lines:
        if r.get("vectors_per_s"):
            key = f"{r['architecture']} {r['d_in']}x{r['d_sae']} {r['dtype']}"
            by_key.setdefault(key, {})[r["impl"]] = r["vectors_per_s"]
    return {
        key: round(v["jaxlm"] / v["saelens"], 3)
        for key, v in by_key.items()
        if "jaxlm" in v and "saelens" in v
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--architectures", default="standard,topk")
    p.add_argument("--shapes", default="256x4096,768x12288", help="D_INxD_SAE,...")
    p.add_argument("--batch", type=int, default=1024, help="activation rows per step")
    p.add_argument("--dtypes", default="float32", help="float32,bfloat16: activation batches")
    p.add_argument("--k", type=int, default=100, help="topk's k (batchtopk: per row on average)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--fp32-matmul", choices=tuple(FP32_MATMUL), default="default",
                   help="float32 matmuls: each library's default, or both alike")  # fmt: skip
    p.add_argument("--breakdown", action="store_true", help="time jaxlm's parts instead")
    p.add_argument(
        "--dead",
        type=int,
        default=0,
        help="latents dead from the first step (TopK: AuxK runs on them every step)",
    )
    p.add_argument("--profile", metavar="DIR", help="jax.profiler trace of jaxlm into DIR/...")
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    archs = [a for a in args.architectures.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as e:
        p.error(str(e))
    for name, got, known in (("impl", impls, IMPLS), ("architecture", archs, ARCHITECTURES),
                             ("dtype", dtypes, DTYPES)):  # fmt: skip
        for bad in set(got) - set(known):
            p.error(f"{name} {bad!r}: choose from {', '.join(known)}")
    if args.batch < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--batch, --steps and --rounds must be >= 1")

    accel = jax.default_backend() != "cpu"
    import torch

    if accel and not torch.cuda.is_available():
        p.error("jax sees an accelerator but torch has no CUDA")
    if not accel:
        torch.set_num_threads(os.cpu_count() or 1)
    if args.fp32_matmul != "default":
        jax_precision, torch_precision = FP32_MATMUL[args.fp32_matmul]
        jax.config.update("jax_default_matmul_precision", jax_precision)
        torch.set_float32_matmul_precision(torch_precision)
    device = jax.devices()[0].device_kind
    lines = []
    for arch in archs:
        for d_in, d_sae in shapes:
            for dtype in dtypes:
                if args.breakdown:
                    lines += breakdown(arch, d_in, d_sae, dtype, args, device)
                    continue
                for r in bench_config(arch, d_in, d_sae, dtype, impls, args, accel, device):
                    print(json.dumps(r), flush=True)
                    lines.append(r)
    if args.breakdown:
        return lines
    summary = {"ratios": ratios(lines), "device": device}
    print(json.dumps(summary), flush=True)
    return lines + [summary]


if __name__ == "__main__":
    sys.exit(main() and 0)
