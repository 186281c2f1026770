"""Generate N validated, de-duplicated Arabic stories with an LLM; resumable and concurrent.

Story `index` i always gets prompt `make_prompt(seed, i)` and id `syn-{i:07d}`. Accepted stories
are appended to `--out` (`id, index, text, prompt, words, features, name, setting, model`);
rejected ones to `<out>.rejected.jsonl` (`index, reason, text`), so that their prompt indices are
never used again. A rerun reads both files, rebuilds the de-duplication index from the accepted
stories, and continues with the lowest unused indices (an index in flight when a run was killed
was never written and is simply used again) until `n` stories are accepted. Calls that fail for
good after the client's retries (`jaxlm.llm`) are counted but not recorded, so a rerun retries
their index; a refused key stops the run.

Only the main thread writes (appends are flushed and fsynced per story); worker threads only call
the LLM, at most `concurrency` at a time.

`--out` is a resumable `jaxlm.outputs.Output` (a file): its lock keeps a second run off it, naming
the first, and its identity (`synth_identity`: provider, model, seed, temperature, max_tokens, the
story checks, near_dup and the prompts' hash; not `n`, which a rerun may raise) refuses a resume
with other settings in one line; `--overwrite` starts it (and its rejected file) afresh.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from jaxlm.errors import UserError
from jaxlm.llm import AuthError, LLMClient, LLMError, MalformedResponse, RequestError, make_client
from jaxlm.outputs import Output
from jaxlm.store import JsonlStore, read_jsonl
from jaxlm.synth.prompts import SYSTEM, PromptSpec, make_prompt, template_sha256
from jaxlm.synth.validate import Deduper, StoryChecks, check_story, clean_story


@dataclass(frozen=True)
class SynthConfig:
    """One generation run."""

    n: int  # target number of accepted stories in --out
    out: str
    provider: str = "gemini"  # gemini | openai
    model: str = "gemini-2.5-flash"
    base_url: str | None = None
    concurrency: int = 8
    seed: int = 0
    temperature: float = 1.0
    max_tokens: int = 2048
    checks: StoryChecks = field(default_factory=StoryChecks)
    near_dup: float = 0.7  # estimated Jaccard of 5-gram shingles above which a story is a duplicate
    max_tries_factor: float = 3.0  # give up after n * factor + 100 prompts in one run
    overwrite: bool = False  # start --out afresh instead of resuming it


def rejected_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejected.jsonl")


def _unused_indices(used: set[int]):
    return (i for i in itertools.count() if i not in used)


def _record(spec: PromptSpec, text: str, model: str) -> dict:
    return {
        "id": f"syn-{spec.index:07d}", "index": spec.index, "text": text, "prompt": spec.prompt,
        "words": spec.words, "features": list(spec.features), "name": spec.name,
        "setting": spec.setting, "model": model,
    }  # fmt: skip


class _State:
    """What is on disk, and this run's counters."""

    def __init__(self, cfg: SynthConfig, out: Path):
        self.accepted = list(read_jsonl(out))
        self.rejected = list(read_jsonl(rejected_path(out)))
        self.used = {r["index"] for r in self.accepted} | {r["index"] for r in self.rejected}
        self.dedup = Deduper(threshold=cfg.near_dup)
        for r in self.accepted:
            self.dedup.add(r["text"])
        self.reasons: Counter = Counter()
        self.n_done = len(self.accepted)


def _judge(
    state: _State, cfg: SynthConfig, spec: PromptSpec, fut: Future
) -> tuple[dict | None, dict | None]:
    """(accepted record, rejected record) for one finished call; both None for a lost call."""
    try:
        text = clean_story(fut.result())
    except (AuthError, RequestError):
        raise
    except MalformedResponse:
        state.reasons["malformed"] += 1
        return None, {"index": spec.index, "reason": "malformed", "text": ""}
    except LLMError as e:
        state.reasons[f"llm_error:{type(e).__name__}"] += 1
        return None, None
    reason = check_story(text, spec.words, cfg.checks) or state.dedup.check(text)
    if reason:
        state.reasons[reason] += 1
        return None, {"index": spec.index, "reason": reason, "text": text}
    state.dedup.add(text)
    return _record(spec, text, cfg.model), None


def synth_identity(cfg: SynthConfig) -> dict:
    """The settings the stories depend on (what a resume must keep)."""
    return {"provider": cfg.provider, "model": cfg.model, "seed": cfg.seed,
            "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
            "checks": dataclasses.asdict(cfg.checks), "near_dup": cfg.near_dup,
            "prompts_sha256": template_sha256()}  # fmt: skip


def run(cfg: SynthConfig, client: LLMClient | None = None) -> dict:
    """Generate until `cfg.n` stories are accepted in `cfg.out`; returns the stats."""
    out = Path(cfg.out)
    with Output(out, kind="synthesis", identity=synth_identity(cfg), mode="resume",
                directory=False, overwrite=cfg.overwrite):  # fmt: skip
        if cfg.overwrite:
            rejected_path(out).unlink(missing_ok=True)
        return _run(cfg, client, out)


def _run(cfg: SynthConfig, client: LLMClient | None, out: Path) -> dict:
    state = _State(cfg, out)
    start_done, t0 = state.n_done, time.perf_counter()
    if state.n_done < cfg.n:
        client = client or make_client(cfg.provider, cfg.model, cfg.base_url)
        _generate(cfg, client, state, out)
    stats = {"out": str(out), "target": cfg.n, "accepted_total": state.n_done}
    stats |= {"accepted_this_run": state.n_done - start_done, "rejected": dict(state.reasons)}
    stats |= {"seconds": round(time.perf_counter() - t0, 2)}
    if client is not None:
        stats["llm"] = dict(client.stats)
    return stats


def _generate(cfg: SynthConfig, client: LLMClient, state: _State, out: Path) -> None:
    indices = _unused_indices(state.used)
    budget = int(cfg.n * cfg.max_tries_factor) + 100
    in_flight: dict[Future, PromptSpec] = {}
    bar = tqdm(total=cfg.n, initial=state.n_done, desc="synthesize", unit="story")
    with (
        JsonlStore(out, lock=False) as good,
        JsonlStore(rejected_path(out)) as bad,
        ThreadPoolExecutor(cfg.concurrency) as pool,
    ):
        try:
            while state.n_done < cfg.n:
                while (
                    budget > 0
                    and len(in_flight) < cfg.concurrency
                    and state.n_done + len(in_flight) < cfg.n
                ):
                    spec = make_prompt(cfg.seed, next(indices))
                    budget -= 1
                    fut = pool.submit(
                        client.complete, spec.prompt, system=SYSTEM,
                        temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                    )  # fmt: skip
                    in_flight[fut] = spec
                if not in_flight:
                    raise UserError(
                        f"gave up after {int(cfg.n * cfg.max_tries_factor) + 100} prompts with "
                        f"{state.n_done}/{cfg.n} stories; rejections: {dict(state.reasons)}"
                    )
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    accepted, rejected = _judge(state, cfg, in_flight.pop(fut), fut)
                    if accepted:
                        state.n_done += good.append([accepted])
                        bar.update(1)
                    if rejected:
                        bad.append([rejected])
        except (AuthError, RequestError) as e:
            for fut in in_flight:
                fut.cancel()
            raise UserError(f"{cfg.provider}: {e}") from None
        finally:
            bar.close()
