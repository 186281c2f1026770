"""Data benchmarks, one JSON line per measurement on stdout.

1. preparation: N demo stories (JSONL) -> `jaxlm data prepare` (all cores): stories/s, peak RSS.
2. loading, shuffle on: `make_loader` as configured for training, and in the same run two peers,
   plain random reads with array_record's reader and a naive Grain map+batch pipeline.

    python scripts/bench_data.py --n 1000000 --workdir /tmp/bench_data
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import numpy as np


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _write_demo(args_tuple) -> str:
    from jaxlm.data.demo_corpus import story

    path, style, start, stop, seed = args_tuple
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, stop):
            f.write(json.dumps({"text": story(style, i, seed)}, ensure_ascii=False) + "\n")
    return path


def make_corpus(work: Path, n: int, parts: int) -> list[str]:
    t = time.time()
    step = -(-n // parts)
    jobs = [
        (str(work / f"demo-{k}.jsonl"), "native", k * step, min(n, (k + 1) * step), 0)
        for k in range(parts)
    ]
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        paths = pool.map(_write_demo, jobs)
    emit(bench="demo_corpus", stories=n, seconds=round(time.time() - t, 1))
    return paths


def _prepare_job(paths, tokdir, datadir, seq_len, result_file) -> None:
    from jaxlm.data.prepare import prepare

    t = time.time()
    meta = prepare(paths, datadir, tokenizer_dir=tokdir, seq_len=seq_len, overwrite=True)
    dt = time.time() - t
    kib = 1024  # ru_maxrss is in KiB on Linux
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib
    out = dict(
        bench="prepare",
        stories=meta["stories"],
        tokens=meta["tokens"],
        seconds=round(dt, 1),
        stories_per_s=round(meta["stories"] / dt),
        tokens_per_s=round(meta["tokens"] / dt),
        peak_rss_main_mb=round(self_rss / 2**20),
        peak_rss_worker_mb=round(child_rss / 2**20),
        workers=os.cpu_count(),
        rows=meta["splits"]["train"]["rows"],
    )
    Path(result_file).write_text(json.dumps(out))


def run_prepare(paths, tokdir, datadir, seq_len) -> None:
    """In a fresh process, so its peak RSS is the preparation's alone."""
    result = Path(datadir).with_suffix(".result.json")
    proc = mp.get_context("spawn").Process(
        target=_prepare_job, args=(paths, str(tokdir), str(datadir), seq_len, str(result))
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"prepare failed with exit code {proc.exitcode}")
    emit(**json.loads(result.read_text()))


def _throughput(batches, seconds: float, warmup: int = 5) -> tuple[float, int]:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n_tok, n, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n_tok += next(it).size
        n += 1
    return n_tok / (time.perf_counter() - t0), n


def bench_loader(datadir: Path, batch_size: int, seconds: float, workers: list[int]) -> None:
    from jaxlm.data.pipeline import make_loader

    for w in workers:
        loader = make_loader(
            [(str(datadir), 1.0)],
            split="train",
            batch_size=batch_size,
            seed=0,
            worker_count=w,
            shuffle=True,
        )
        tps, n = _throughput((b["tokens"] for b in loader), seconds)
        emit(
            bench="loader",
            impl="jaxlm make_loader",
            worker_count=w,
            batch_size=batch_size,
            row_len=loader.seq_len + 1,
            shuffle=True,
            tokens_per_s=round(tps),
            batches=n,
        )


def bench_peers(datadir: Path, batch_size: int, seconds: float) -> None:
    import grain
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordReader

    from jaxlm.data.pipeline import read_metadata

    meta = read_metadata(datadir)
    shard = str(datadir / meta["splits"]["train"]["shards"][0])
    reader = ArrayRecordReader(shard, "readahead_buffer_size:0")
    n_rows = reader.num_records()
    rng = np.random.default_rng(0)

    def plain():
        while True:
            idx = rng.integers(0, n_rows, batch_size)
            rows = [np.frombuffer(reader.read([int(i)])[0], np.int32) for i in idx]
            yield np.stack(rows)

    tps, n = _throughput(plain(), seconds)
    emit(
        bench="loader",
        impl="plain ArrayRecordReader random reads (one shard)",
        batch_size=batch_size,
        shuffle=True,
        tokens_per_s=round(tps),
        batches=n,
    )

    paths = [str(datadir / s) for s in meta["splits"]["train"]["shards"]]
    ds = grain.MapDataset.source(ArrayRecordDataSource(paths)).shuffle(seed=0).repeat()
    ds = ds.map(lambda r: np.frombuffer(r, np.int32)).batch(batch_size, drop_remainder=True)
    tps, n = _throughput(iter(ds), seconds)
    emit(
        bench="loader",
        impl="naive grain map+batch",
        batch_size=batch_size,
        shuffle=True,
        tokens_per_s=round(tps),
        batches=n,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="demo stories to prepare")
    p.add_argument("--workdir", default="/tmp/jaxlm_bench_data")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--tok-sample", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64, help="per-process batch")
    p.add_argument("--seconds", type=float, default=10.0, help="per loader measurement")
    p.add_argument("--workers", default="0,2", help="loader worker_count values to measure")
    p.add_argument("--skip-prepare", action="store_true", help="reuse workdir's DATADIR")
    args = p.parse_args()

    from jaxlm import tokenizer
    from jaxlm.data.demo_corpus import generate

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tokdir, datadir = work / "tok", work / "data"
    if not args.skip_prepare:
        paths = make_corpus(work, args.n, parts=8)
        t = time.time()
        tokenizer.train(generate("native", args.tok_sample, 1), tokdir, vocab_size=args.vocab_size)
        emit(bench="tokenizer_train", stories=args.tok_sample, seconds=round(time.time() - t, 1))
        run_prepare(paths, tokdir, datadir, args.seq_len)
    bench_loader(datadir, args.batch_size, args.seconds, [int(w) for w in args.workers.split(",")])
    bench_peers(datadir, args.batch_size, args.seconds)


if __name__ == "__main__":
    main()
