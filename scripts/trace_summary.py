"""Where a traced train step's GPU time goes, from a jax.profiler Perfetto trace.

Kernels on the GPU streams are summed per step in three classes by name (matmul: cuBLAS, nvjet,
CUTLASS; attention: cuDNN; other: XLA's fusions and copies), then the largest "other" kernels are
listed with the HLO fusion they ran: its shape and the JAX op it came from. That is how the
elementwise passes in the README's H200 breakdown were found.

    python scripts/trace_summary.py TRACE.json.gz --steps 10 --hlo /tmp/hlo/*after_optimizations.txt

`--steps` is how many steps the trace holds (bench_train.py --profile traces --steps of them).
Among several --hlo dumps (one per jitted variant) the one defining most of the trace's kernels is
used. Prints JSON lines: one per class, then one per top kernel.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

CLASSES = (("matmul", re.compile(r"nvjet|gemm|cublas|cutlass", re.I)),
           ("attention", re.compile(r"cudnn|flash|sdpa", re.I)))  # fmt: skip


def kernel_class(name: str) -> str:
    return next((c for c, pattern in CLASSES if pattern.search(name)), "other")


def gpu_kernels(trace_path: str | Path) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of every complete event on a /device:GPU process."""
    path = Path(trace_path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "/device:GPU" in e.get("args", {}).get("name", "")
    }
    return [(e["name"], e["dur"]) for e in events if e.get("ph") == "X" and e["pid"] in gpu_pids]


def hlo_fusions(texts: list[str], kernels: set[str]) -> dict[str, str]:
    """kernel name -> "shape  op_name" from the HLO dump that defines most of `kernels`."""
    best: dict[str, str] = {}
    for text in texts:
        found = {}
        for m in re.finditer(
            r"^\s+%([\w.\-]+) = (.*?) fusion\(.*?op_name=\"([^\"]*)\"", text, re.M
        ):
            found[m[1].replace(".", "_")] = f"{m[2][:80]}  {m[3]}"
        if len(kernels & found.keys()) > len(kernels & best.keys()):
            best = found
    return best


def summarize(trace_path, steps: int, hlo_paths=(), top: int = 25) -> list[dict]:
    kernels = gpu_kernels(trace_path)
    if not kernels:
        raise SystemExit(f"{trace_path}: no kernels on a /device:GPU stream")
    per_class: collections.Counter = collections.Counter()
    per_other: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for name, us in kernels:
        c = kernel_class(name)
        per_class[c] += us
        if c == "other":
            per_other[name] += us
            calls[name] += 1
    fusions = hlo_fusions([Path(p).read_text() for p in hlo_paths], set(per_other))
    ms = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
    rows = [{"class": c, "ms_per_step": ms(per_class[c])} for c in ("matmul", "attention", "other")]
    for name, us in per_other.most_common(top):
        rows.append({"kernel": name, "ms_per_step": ms(us), "calls_per_step": calls[name] / steps,
                     "hlo": fusions.get(name, "")})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a Perfetto trace (.json or .json.gz) from jax.profiler")
    p.add_argument("--steps", type=int, required=True, help="steps the trace holds")
    p.add_argument("--hlo", nargs="*", default=[], help="XLA dumps after optimizations")
    p.add_argument("--top", type=int, default=25, help="how many 'other' kernels to list")
    args = p.parse_args(argv)
    rows = summarize(args.trace, args.steps, args.hlo, args.top)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
