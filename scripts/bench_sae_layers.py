"""Time per SAE: every layer's SAE from one forward pass (`sae train --layers all`) against one
run per layer (`--layer N`, eight times), and the activation store against the model's forward.

On the demo's model and SAE settings (ts-1m: 8 layers, F = 256 -> 1024 latents; rows of 128
tokens, 32 contexts a forward, 8 forwards a fill, batches of 1024 rows; configs/demo/sae.yaml)
over a demo corpus built here (or `--model DIR --data DIR`), with fewer training tokens than the
demo's 600K. Parts, each timed in interleaved rounds (A B A B ...) so that noisy neighbours hit
the impls alike; a JSON line per round and impl, then one per impl with the medians:

* `train`: `sae.train.train` end to end, `one-pass` (`model.layers` all) against `separate` (one
  run per layer, the same tokens each): `total_s` (model load, compile, training, the
  final saves) and `loop_s` (the training loop from the first metrics flush to the last, compile
  excluded), each also per SAE.
* `store`: tokens of model input per second through the activation store (`next(store)` until
  whole fills are served, synced), for every layer (`store-all`) and the last one alone
  (`store-last`), next to `forward`: `model.mlp_activations` up to the last layer, jitted, on
  one store batch of tokens already on the device.
* `loop`: does the SAE step wait on the store? The every-layer step (`sae.train.make_layers_step`)
  fed by the store (`store+steps`, with the next fill read ahead; `store+steps(no-read-ahead)`),
  against the same steps on one fixed batch (`steps`) and the store alone (`store`);
  `host_in_store_s` is the host's time inside `next(store)`. With no overlap at all, store+steps
  = steps + store; with full overlap, max(steps, store).
* `step`: the every-layer step as built (`unrolled`: the one-layer step per layer in one
  program), as `vmapped` stacked states, and as one jitted one-layer step `per-layer` call by call.
* `host`: the host's own time in each `next(store)` with the device idle (each result waited for
  before the next call), with and without read-ahead: `boundary_ms` for the call that starts a
  fill (what an accelerator whose queue has run dry waits for), `other_ms` for the others.

`--layers` picks the layers of the store, loop, step and host parts (default: all).

    python scripts/bench_sae_layers.py --rounds 3 --training-tokens 131072
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flax import nnx  # noqa: E402

from jaxlm.checkpoint import load_model  # noqa: E402
from jaxlm.sharding import make_mesh, use_mesh  # noqa: E402
from jaxlm.train.metrics_log import read_metrics  # noqa: E402
from sae.activations import ActivationStore  # noqa: E402
from sae.base import SAE_RULES, Buffer  # noqa: E402
from sae.registry import create  # noqa: E402
from sae.train import (  # noqa: E402
    init_stats,
    load_config,
    make_layers_step,
    make_optimizer,
    make_train_step,
    train,
)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def build_demo(work: Path, stories: int) -> tuple[Path, Path]:
    """A demo corpus, tokenizer (vocab 2000), data (rows of 128) and a random ts-1m, as the demo
    builds them (`jaxlm pipeline demo`), in `work`; reused when there."""
    model, data = work / "model", work / "data"
    if (model / "params").is_dir() and (data / "metadata.json").is_file():
        return model, data
    cli = [sys.executable, "-m", "jaxlm.cli"]
    steps = [
        ["data", "demo-corpus", "--style", "translated", "--n", str(stories), "--seed", "0",
         "--out", str(work / "corpus.jsonl")],
        ["tokenizer", "train", "--input", str(work / "corpus.jsonl"), "--vocab-size", "2000",
         "--out", str(work / "tok")],
        ["data", "prepare", "--input", str(work / "corpus.jsonl"), "--tokenizer",
         str(work / "tok"), "--seq-len", "128", "--out", str(data), "--overwrite"],
        ["init", "--preset", "ts-1m", "--vocab-size", "2000", "--tokenizer", str(work / "tok"),
         "--out", str(model)],
    ]  # fmt: skip
    for args in steps:
        subprocess.run([*cli, *args], check=True, cwd=REPO, capture_output=True)
    return model, data


def rounds(impls: dict[str, Callable[[], dict]], n: int, part: str) -> dict[str, list[dict]]:
    """Run the impls in interleaved rounds; a JSON line per run."""
    runs: dict[str, list[dict]] = {k: [] for k in impls}
    for r in range(n):
        for name, fn in impls.items():
            row = fn()
            runs[name].append(row)
            emit({"part": part, "impl": name, "round": r, **row})
    return runs


def medians(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {f"median_{k}": statistics.median(r[k] for r in runs) for k in keys}


# --- train: one pass against one run per layer -----------------------------------------------


def sae_config(model: Path, data: Path, tokens: int, model_section: dict):
    return load_config(
        REPO / "configs/demo/sae.yaml",
        [{"model": {"path": str(model), **model_section},
          "data": {"sources": [{"path": str(data)}], "training_tokens": tokens},
          "log": {"every": 8, "progress": False, "plot": False, "tensorboard": False},
          "checkpoint": {"every": 10**9, "async_save": False}}],
    )  # fmt: skip


def loop_seconds(metrics: Path) -> tuple[float, int]:
    """(seconds from the first metrics flush to the last, steps in between): compile excluded.
    A flush writes the rows of the steps since the last one with one time, the flush's."""
    flushes: dict[float, int] = {}
    for r in read_metrics(metrics):
        if "loss" in r:
            flushes[r["time"]] = max(r["step"], flushes.get(r["time"], 0))
    (t0, s0), (t1, s1) = min(flushes.items()), max(flushes.items())
    return t1 - t0, s1 - s0


def bench_train(model: Path, data: Path, tokens: int, n_rounds: int) -> None:
    n_layers = load_model(model)[0].cfg.n_layers

    def one_pass() -> dict:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train(sae_config(model, data, tokens, {"layers": "all"}), d)
            total = time.perf_counter() - t0
            loop, steps = loop_seconds(Path(d) / "layer-0" / "metrics.jsonl")
        return {"total_s": total, "loop_s": loop, "loop_steps": steps,
                "per_sae_total_s": total / n_layers, "per_sae_loop_s": loop / n_layers}  # fmt: skip

    def separate() -> dict:
        total = loop = 0.0
        with tempfile.TemporaryDirectory() as d:
            for layer in range(n_layers):
                t0 = time.perf_counter()
                train(sae_config(model, data, tokens, {"layer": layer}), Path(d) / str(layer))
                total += time.perf_counter() - t0
                s, steps = loop_seconds(Path(d) / str(layer) / "metrics.jsonl")
                loop += s
        return {"total_s": total, "loop_s": loop, "loop_steps": steps,
                "per_sae_total_s": total / n_layers, "per_sae_loop_s": loop / n_layers}  # fmt: skip

    runs = rounds({"one-pass": one_pass, "separate": separate}, n_rounds, "train")
    for name, rs in runs.items():
        emit({"part": "train", "impl": name, "saes": n_layers, "tokens": tokens, **medians(rs)})
    one, sep = (statistics.median(r["total_s"] for r in runs[k]) for k in ("one-pass", "separate"))
    emit({"part": "train", "separate_over_one_pass_total": sep / one})


# --- the store, the forward, and whether the step waits ---------------------------------------


@dataclasses.dataclass
class Setup:
    model: object
    mesh: object
    cfg: object  # the demo's SAETrainConfig
    sources: list
    layers: tuple[int, ...]

    def store(self, layers, prefetch: bool | None = None) -> ActivationStore:
        """The store `sae.train` makes (`prefetch` None: read ahead on accelerators only)."""
        d = self.cfg.data
        return ActivationStore(self.model, layers, self.sources, context_size=d.context_size,
                               store_batch_size_prompts=d.store_batch_size_prompts,
                               n_batches_in_buffer=d.n_batches_in_buffer,
                               train_batch_size_tokens=d.train_batch_size_tokens,
                               seed=self.cfg.seed, mesh=self.mesh, prefetch=prefetch)  # fmt: skip

    def sae_states(self, n: int):
        """(graphdef, tx, SAE, n states) as `sae.train` initialises them (one device)."""
        sae_cfg = self.cfg.sae.with_d_in(self.model.cfg.d_ff)
        tx, _ = make_optimizer(self.cfg.optim, self.cfg.steps)
        states = []
        for _ in range(n):
            sae = create(sae_cfg, seed=self.cfg.seed)
            graphdef, params, buffers = nnx.split(sae, nnx.Param, Buffer)
            params = jax.tree.map(jnp.array, params)
            states.append((params, buffers, tx.init(params), init_stats(sae_cfg.n_latents)))
        return graphdef, tx, sae, states


def bench_store(s: Setup, fills: int, n_rounds: int) -> None:
    d = s.cfg.data
    stores = {"store-all": s.store(s.layers), "store-last": s.store(s.layers[-1])}
    shape = (d.store_batch_size_prompts, stores["store-all"].context_size)  # one forward's [B, T]
    tokens_bt = jnp.asarray(np.random.RandomState(0).randint(0, s.model.cfg.vocab_size, shape))
    graphdef, params = nnx.split(s.model, nnx.Param)
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p).mlp_activations(t, s.layers))
    jax.block_until_ready(fwd(params, tokens_bt))  # compile
    per_fill = {k: None for k in stores}
    for k, st in stores.items():  # compile, and count a fill's batches
        jax.block_until_ready(next(st))
        n = 1
        while not st.refill_due:
            jax.block_until_ready(next(st))
            n += 1
        per_fill[k] = n

    def forward() -> dict:
        n = d.n_batches_in_buffer * fills
        t0 = time.perf_counter()
        for _ in range(n):
            out = fwd(params, tokens_bt)
        jax.block_until_ready(out)
        sec = time.perf_counter() - t0
        return {"tokens_per_s": n * tokens_bt.size / sec, "seconds": sec}

    def store(name: str) -> Callable[[], dict]:
        def run() -> dict:
            st, n = stores[name], per_fill[name] * fills
            t0 = time.perf_counter()
            outs = [next(st) for _ in range(n)]
            jax.block_until_ready(outs)
            sec = time.perf_counter() - t0
            return {"tokens_per_s": n * st.batch / sec, "seconds": sec}

        return run

    impls = {"forward": forward, **{k: store(k) for k in stores}}
    with use_mesh(s.mesh, SAE_RULES):
        runs = rounds(impls, n_rounds, "store")
    for name, rs in runs.items():
        emit({"part": "store", "impl": name, "layers": len(s.layers) if name != "store-last" else 1,
              "fills": fills, **medians(rs)})  # fmt: skip


def bench_loop(s: Setup, fills: int, n_rounds: int) -> None:
    """The every-layer SAE step fed by the store, against its parts alone."""
    graphdef, tx, sae, states = s.sae_states(len(s.layers))
    step = jax.jit(make_layers_step(graphdef, tx, sae, s.cfg, len(states)), donate_argnums=(0,))
    scale = jnp.ones((len(s.layers),), jnp.float32)
    stores = {"read-ahead": s.store(s.layers, prefetch=True),
              "no-read-ahead": s.store(s.layers, prefetch=False)}  # fmt: skip
    st = stores["read-ahead"]
    x = next(st)
    held = {"states": tuple(states)}
    held["states"], _ = step(held["states"], x, jnp.int32(0), scale)  # compile
    n = 1
    while not st.refill_due:
        next(st)
        n += 1
    for _ in range(n):
        next(stores["no-read-ahead"])
    n *= fills  # whole fills, starting at a fill boundary each round

    def steps_only() -> dict:
        t0 = time.perf_counter()
        for i in range(n):
            held["states"], m = step(held["states"], x, jnp.int32(i), scale)
        jax.block_until_ready((held["states"], m))
        return {"seconds": time.perf_counter() - t0}

    def store_only() -> dict:
        t0 = time.perf_counter()
        outs = [next(st) for _ in range(n)]
        jax.block_until_ready(outs)
        return {"seconds": time.perf_counter() - t0}

    def both(name: str) -> Callable[[], dict]:
        def run() -> dict:
            t0, host = time.perf_counter(), 0.0
            for i in range(n):
                h0 = time.perf_counter()
                xb = next(stores[name])
                host += time.perf_counter() - h0
                held["states"], m = step(held["states"], xb, jnp.int32(i), scale)
            jax.block_until_ready((held["states"], m))
            return {"seconds": time.perf_counter() - t0, "host_in_store_s": host}

        return run

    impls = {"steps": steps_only, "store": store_only, "store+steps": both("read-ahead"),
             "store+steps(no-read-ahead)": both("no-read-ahead")}  # fmt: skip
    with use_mesh(s.mesh, SAE_RULES):
        runs = rounds(impls, n_rounds, "loop")
    med = {k: statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    for name, rs in runs.items():
        emit({"part": "loop", "impl": name, "steps": n, **medians(rs)})
    both = med["store+steps"]
    emit({"part": "loop", "store+steps_over_sum": both / (med["steps"] + med["store"]),
          "store+steps_over_max": both / max(med["steps"], med["store"])})  # fmt: skip


def bench_host(s: Setup, fills: int, n_rounds: int) -> None:
    """The host's own work in each `next(store)` (the device idle: every earlier result is
    waited for first): what an accelerator whose queue has run dry waits for. The call that
    starts a fill (`boundary_ms`) against the others (`other_ms`, mean), per fill in all."""
    stores = {"read-ahead": s.store(s.layers, prefetch=True),
              "no-read-ahead": s.store(s.layers, prefetch=False)}  # fmt: skip
    for st in stores.values():
        while True:  # compile; start each round at a fill boundary
            jax.block_until_ready(next(st))
            if st.refill_due:
                break

    def host(name: str) -> Callable[[], dict]:
        def run() -> dict:
            st, calls, boundary = stores[name], [], []
            for _ in range(fills):
                while True:
                    due = st.refill_due
                    t0 = time.perf_counter()
                    out = next(st)
                    (boundary if due else calls).append(time.perf_counter() - t0)
                    jax.block_until_ready(out)
                    if st.refill_due:
                        break
            total = sum(calls) + sum(boundary)
            return {"boundary_ms": 1e3 * statistics.median(boundary),
                    "other_ms": 1e3 * statistics.mean(calls),
                    "per_fill_ms": 1e3 * total / fills}  # fmt: skip

        return run

    with use_mesh(s.mesh, SAE_RULES):
        runs = rounds({k: host(k) for k in stores}, n_rounds, "host")
    for name, rs in runs.items():
        emit({"part": "host", "impl": name, "fills": fills, **medians(rs)})


def bench_step(s: Setup, steps: int, n_rounds: int) -> None:
    """The every-layer step: unrolled (as trained), vmapped over stacked states, or per layer."""
    L = len(s.layers)
    graphdef, tx, sae, states = s.sae_states(L)
    st = s.store(s.layers)
    x_lnf = next(st)
    scale = jnp.ones((L,), jnp.float32)
    unrolled = jax.jit(make_layers_step(graphdef, tx, sae, s.cfg, L), donate_argnums=(0,))
    one = make_train_step(graphdef, tx, sae, s.cfg)
    vmapped = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, 0)), donate_argnums=(0, 1, 2, 3))
    single = jax.jit(one, donate_argnums=(0, 1, 2, 3))
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
    held = {
        "unrolled": tuple(copy(states)),
        "vmapped": jax.tree.map(lambda *a: jnp.stack(a), *copy(states)),
        "per-layer": [copy(t) for t in states],
    }

    def run_unrolled(i):
        held["unrolled"], m = unrolled(held["unrolled"], x_lnf, jnp.int32(i), scale)
        return m

    def run_vmapped(i):
        *new, m = vmapped(*held["vmapped"], x_lnf, jnp.int32(i), scale)
        held["vmapped"] = tuple(new)
        return m

    def run_per_layer(i):
        ms = []
        for j in range(L):
            *new, m = single(*held["per-layer"][j], x_lnf[j], jnp.int32(i), scale[j])
            held["per-layer"][j] = tuple(new)
            ms.append(m)
        return ms

    fns = {"unrolled": run_unrolled, "vmapped": run_vmapped, "per-layer": run_per_layer}
    loss_l = {"unrolled": lambda m: [x["loss"] for x in m], "vmapped": lambda m: m["loss"],
              "per-layer": lambda m: [x["loss"] for x in m]}  # fmt: skip

    def timed(fn) -> Callable[[], dict]:
        def run() -> dict:
            t0 = time.perf_counter()
            for i in range(steps):
                m = fn(i)
            jax.block_until_ready((m, held))
            sec = time.perf_counter() - t0
            return {"seconds_per_step": sec / steps, "seconds_per_sae_step": sec / steps / L}

        return run

    for fn in fns.values():  # compile
        jax.block_until_ready(fn(0))
    with use_mesh(s.mesh, SAE_RULES):
        runs = rounds({k: timed(f) for k, f in fns.items()}, n_rounds, "step")
    # all did the same steps on the same batch: the same losses (vmapped: within rounding)
    losses = {k: np.asarray(loss_l[k](f(steps)), np.float64) for k, f in fns.items()}
    for name, rs in runs.items():
        emit({"part": "step", "impl": name, "saes": L, "batch": int(x_lnf.shape[1]), **medians(rs),
              "last_losses": [round(float(v), 6) for v in losses[name]]})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a jaxlm model dir (default: a random ts-1m built here)")
    ap.add_argument("--data", help="a prepared DATADIR of its tokenizer (default: built here)")
    ap.add_argument("--workdir", default="/tmp/bench_sae_layers", help="where the demo is built")
    ap.add_argument("--stories", type=int, default=3000, help="demo corpus size")
    ap.add_argument("--parts", default="train,store,loop,step,host")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--training-tokens", type=int, default=131072, help="per SAE, train part")
    ap.add_argument("--fills", type=int, default=3, help="store fills timed per round")
    ap.add_argument("--steps", type=int, default=20, help="steps timed per round, step part")
    ap.add_argument("--layers", help="store, loop, step, host parts: N,N,... (default: all)")
    args = ap.parse_args(argv)
    if args.model and args.data:
        model_dir, data = Path(args.model), Path(args.data)
    else:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        model_dir, data = build_demo(Path(args.workdir), args.stories)
    parts = set(args.parts.split(","))
    emit({"part": "setup", "model": str(model_dir), "data": str(data),
          "devices": [str(d) for d in jax.devices()], "parts": sorted(parts)})  # fmt: skip
    if "train" in parts:
        bench_train(model_dir, data, args.training_tokens, args.rounds)
    cfg = sae_config(model_dir, data, args.training_tokens, {})
    mesh = make_mesh(cfg.mesh.shape)
    model, _ = load_model(model_dir, mesh=mesh, rules=SAE_RULES)
    every = tuple(range(model.cfg.n_layers))
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else every
    s = Setup(model, mesh, cfg, [(str(data), 1.0)], layers)
    if "store" in parts:
        bench_store(s, args.fills, args.rounds)
    if "loop" in parts:
        bench_loop(s, args.fills, args.rounds)
    if "step" in parts:
        bench_step(s, args.steps, args.rounds)
    if "host" in parts:
        bench_host(s, args.fills, args.rounds)


if __name__ == "__main__":
    main()
