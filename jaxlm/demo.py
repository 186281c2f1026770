"""The whole method on the built-in demo corpus, stage by stage, each skipped once done.

    corpus -> tokenizer -> shards -> pretrain (translated style) -> continual pre-training
    (native stories, 1% of the corpus) -> samples + what changed -> SAEs on both models' MLP
    activations -> token set enrichment analysis (TSEA) + feature dashboards -> Hugging Face exports

The corpus is generated (jaxlm.data.demo_corpus), so the "translation artifacts" are known
exactly: transliterated English names and English dialogue order. The samples stage counts them
in stories sampled from both models, the measurable claim of Boughorbel et al. (2024) at toy scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from jaxlm.errors import UserError
from jaxlm.train_cli import PREEMPTED_EXIT

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    n_translated: int = 20000  # pretraining stories (translated style)
    native_fraction: float = 0.01  # the paper's 1% of native data for continual pre-training
    vocab_size: int = 2000
    seq_len: int = 128
    pretrain_config: str = str(REPO / "configs/demo/pretrain.yaml")
    cpt_config: str = str(REPO / "configs/demo/cpt.yaml")
    n_samples: int = 48  # stories sampled from each model
    max_new_tokens: int = 160
    sae_config: str = str(REPO / "configs/demo/sae.yaml")
    sae_layer: int = -1  # the MLP layer the SAEs read; -1: the last
    seed: int = 0


class Demo:
    def __init__(self, workdir: str | Path, cfg: DemoConfig = DemoConfig(), log=print):
        self.w = Path(workdir).resolve()
        self.cfg = cfg
        self.log = log
        (self.w / ".stages").mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, fn: Callable[[], dict]) -> dict:
        marker = self.w / ".stages" / f"{name}.json"
        if marker.exists():
            result = json.loads(marker.read_text())
            self.log(f"[{name}] done already: {_brief(result)}")
            return result
        t0 = time.time()
        self.log(f"[{name}] running ...")
        result = fn()
        result["seconds"] = round(time.time() - t0, 1)
        marker.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        self.log(f"[{name}] {_brief(result)}")
        return result

    def settings(self) -> dict:
        """The settings the stages' results depend on; a config file counts by its contents, so
        an edited YAML is a change and the same YAML in another checkout is not."""
        s = dataclasses.asdict(self.cfg)
        for k in [k for k in s if k.endswith("_config")]:
            try:
                s[k] = "sha256:" + hashlib.sha256(Path(s[k]).read_bytes()).hexdigest()
            except OSError as e:
                raise UserError(f"{k.replace('_', '-')}: cannot read {s[k]}: {e.strerror}") from e
        return s

    def check_settings(self) -> None:
        """Finished stages are skipped, so a rerun with other settings would report the old
        results as its own: refuse it, naming what changed, and leave the workdir as it is."""
        path = self.w / ".stages" / "settings.json"
        now = self.settings()
        if path.exists():
            try:
                was = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(
                    f"{path}: unreadable ({e}); delete it to accept this run's settings"
                ) from e
            changed = [k for k in now if k in was and was[k] != now[k]]
            if changed:
                what = ", ".join(
                    f"{k} (the file's contents)" if k.endswith("_config") else
                    f"{k} {was[k]!r} -> {now[k]!r}" for k in changed
                )  # fmt: skip
                raise UserError(f"{self.w} was made with other settings: {what} (recorded in "
                                f"{path}); run it as before, or use another --workdir")  # fmt: skip
            if set(now) <= set(was):
                return
        path.write_text(json.dumps(now, indent=2) + "\n")

    def run(self) -> dict:
        self.check_settings()
        stages = [
            ("corpus", self.corpus), ("tokenizer", self.tokenizer), ("shards", self.shards),
            ("pretrain", self.pretrain), ("cpt", self.cpt), ("samples", self.samples),
            ("sae", self.sae), ("tsea", self.tsea), ("export", self.export),
        ]  # fmt: skip
        results = {name: self.stage(name, fn) for name, fn in stages}
        return results

    # --- stages ---------------------------------------------------------------------------------

    def _cli(self, *args: str, prog: str = "jaxlm") -> None:
        """Run a jaxlm (or jaxlm-sae) command with its output in logs/, so the console shows one
        line a stage. jaxlm-sae runs in a child process, so each SAE training starts with a fresh
        XLA runtime and gives its memory back when it ends."""
        import contextlib
        import subprocess
        import sys

        log_path = self.w / "logs" / f"{prog}-{args[0]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            if prog == "jaxlm":
                from jaxlm.cli import main

                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    code = main(list(args))
            else:
                cmd = [sys.executable, "-m", "sae.cli", *args]
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code == PREEMPTED_EXIT:  # the stage is not done; a rerun resumes it
            raise UserError(f"{prog} {args[0]} stopped by SIGTERM after saving; rerun to resume")
        if code != 0:
            last = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"{prog} {' '.join(args[:2])} failed: {last[0]} (log: {log_path})")

    def corpus(self) -> dict:
        n_native = max(1, round(self.cfg.n_translated * self.cfg.native_fraction))
        for style, n, seed in (("translated", self.cfg.n_translated, self.cfg.seed),
                               ("native", n_native, self.cfg.seed + 1)):  # fmt: skip
            self._cli("data", "demo-corpus", "--style", style, "--n", str(n), "--seed", str(seed),
                      "--out", str(self.w / f"corpus/{style}.jsonl"))  # fmt: skip
        return {"translated": self.cfg.n_translated, "native": n_native}

    def tokenizer(self) -> dict:
        self._cli("tokenizer", "train", "--input", str(self.w / "corpus/translated.jsonl"),
                  "--input", str(self.w / "corpus/native.jsonl"), "--vocab-size",
                  str(self.cfg.vocab_size), "--out", str(self.w / "tokenizer"))  # fmt: skip
        return {"vocab_size": self.cfg.vocab_size, "dir": str(self.w / "tokenizer")}

    def shards(self) -> dict:
        out = {}
        for style in ("translated", "native"):
            d = self.w / f"data/{style}"
            self._cli("data", "prepare", "--input", str(self.w / f"corpus/{style}.jsonl"),
                      "--tokenizer", str(self.w / "tokenizer"), "--seq-len", str(self.cfg.seq_len),
                      "--out", str(d), "--overwrite", "--val-fraction", "0.02")  # fmt: skip
            meta = json.loads((d / "metadata.json").read_text())
            out[style] = {"tokens": meta["tokens"], "stories": meta["stories"]}
        return out

    def _train(self, name: str, config: str, data: str, *extra: str) -> dict:
        from jaxlm.metrics_log import read_metrics

        self._cli("train", "--config", config, "--workdir", str(self.w / name), "--data",
                  str(self.w / f"data/{data}"), "--set", "log.progress=false", *extra)  # fmt: skip
        rows = read_metrics(self.w / name / "metrics.jsonl")
        train = {r["step"]: r["loss"] for r in rows if "loss" in r}
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        first, last = train[min(train)], train[max(train)]
        return {"steps": max(train), "first_loss": round(first, 3), "last_loss": round(last, 3),
                "eval_loss": round(evals[-1], 3) if evals else None,
                "workdir": str(self.w / name), "plot": str(self.w / name / "loss.png")}  # fmt: skip

    def pretrain(self) -> dict:
        return self._train("pretrain", self.cfg.pretrain_config, "translated")

    def cpt(self) -> dict:
        return self._train("cpt", self.cfg.cpt_config, "native",
                           "--init-from", str(self.w / "pretrain"))  # fmt: skip

    def samples(self) -> dict:
        from jaxlm.checkpoint import load_model
        from jaxlm.generate import SamplingConfig, generate
        from jaxlm.tokenizer import Tokenizer

        tok = Tokenizer.load(self.w / "tokenizer")
        out = {}
        for name in ("pretrain", "cpt"):
            model, _ = load_model(self.w / name)
            rows = generate(
                model,
                [[tok.eos_id]] * self.cfg.n_samples,
                max_new_tokens=self.cfg.max_new_tokens,
                sampling=SamplingConfig(temperature=0.8, top_k=50),
                seed=self.cfg.seed,
                eos_id=tok.eos_id,
            )
            stories = [tok.decode([t for t in r if t != tok.eos_id]) for r in rows]
            path = self.w / f"samples/{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                "".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in stories)
            )
            out[name] = {**artifact_stats(stories), "file": str(path)}
        return out

    def _layer(self) -> int:
        from jaxlm.checkpoint import read_meta

        return self.cfg.sae_layer % read_meta(self.w / "pretrain")[0].n_layers  # config only

    def sae(self) -> dict:
        """One SAE per model, same layer, same activations stream (translated and native 1:1)."""
        from jaxlm.metrics_log import read_metrics

        layer = self._layer()
        out: dict = {"layer": layer}
        for name in ("pretrain", "cpt"):
            d = self.w / f"sae/{name}"
            self._cli("train", "--model", str(self.w / name), "--layer", str(layer),
                      "--data", f"{self.w / 'data/translated'}:1",
                      "--data", f"{self.w / 'data/native'}:1", "--config", self.cfg.sae_config,
                      "--set", "log.progress=false", "--out", str(d), prog="jaxlm-sae")  # fmt: skip
            last = [r for r in read_metrics(d / "metrics.jsonl") if "l0" in r][-1]
            keys = ("explained_variance", "l0", "dead_features")
            out[name] = {k: round(last[k], 3) for k in keys if k in last} | {"dir": str(d)}
        return out

    def tsea(self) -> dict:
        """Which SAE features promote English names, Arabic names and each dialogue style, before
        and after continual pre-training; dashboards of the top English-name features."""
        d = self.w / "tsea"
        tok = str(self.w / "tokenizer")
        w = self.w
        self._cli("tsea-compare", "--before", str(w / "pretrain"), str(w / "sae/pretrain"),
                  "--after", str(w / "cpt"), str(w / "sae/cpt"), "--demo-sets",
                  "--tokenizer", tok, "--out", str(d), prog="jaxlm-sae")  # fmt: skip
        cmp = json.loads((d / "tsea_compare.json").read_text())
        out: dict = {}
        for name, s in cmp["sets"].items():
            b, a = s["before"], s["after"]
            out[name] = {"before": b.get("n_promoting_above_null"),
                         "after": a.get("n_promoting_above_null")}  # fmt: skip
        for name in ("pretrain", "cpt"):
            key = "before" if name == "pretrain" else "after"
            best = cmp["sets"]["english_names"][key]["top_features"]
            top = [f["feature"] for f in best if f["direction"] == "promotes"][:8]
            if top:
                self._cli("dashboard", "--model", str(self.w / name), "--sae",
                          str(self.w / f"sae/{name}"), "--data", str(self.w / "data/translated"),
                          "--tokenizer", tok, "--features", ",".join(map(str, top)),
                          "--rows", "256", "--out", str(d / f"dashboards-{name}"),
                          prog="jaxlm-sae")  # fmt: skip
        out["plot"] = str(d / "tsea_compare.png")
        out["report"] = str(d / "tsea_compare.json")
        return out

    def export(self) -> dict:
        out = {}
        for name in ("pretrain", "cpt"):
            hf = self.w / f"hf/{name}"
            self._cli("export-hf", "--checkpoint", str(self.w / name), "--out", str(hf),
                      "--tokenizer", str(self.w / "tokenizer"))  # fmt: skip
            out[name] = str(hf)
        return out


_WORD = re.compile(r"[\u0621-\u064A\u0671-\u06D3]+")


def artifact_stats(stories: list[str]) -> dict:
    """Translation artifacts in stories: which name set they use and how dialogue is introduced."""
    from jaxlm.data.demo_corpus import ARABIC_NAMES, ENGLISH_NAMES_AR

    english = {n for n, _ in ENGLISH_NAMES_AR}
    arabic = {n for n, _ in ARABIC_NAMES}
    n_en = n_ar = 0
    for s in stories:
        for w in _WORD.findall(s):
            n_en += w in english
            n_ar += w in arabic
    names = n_en + n_ar
    arabic_quotes = sum(s.count("«") for s in stories)
    english_quotes = sum(s.count('"') for s in stories) // 2
    quotes = arabic_quotes + english_quotes
    return {
        "stories": len(stories),
        "english_name_share": round(n_en / names, 3) if names else None,
        "english_names": n_en,
        "arabic_names": n_ar,
        "english_dialogue_share": round(english_quotes / quotes, 3) if quotes else None,
    }


def _brief(result: dict) -> str:
    keep = {k: v for k, v in result.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in result.items() if isinstance(v, dict)}
    parts = [f"{k}={v}" for k, v in keep.items()]
    for k, v in nested.items():
        inner = ", ".join(f"{ik}={iv}" for ik, iv in v.items() if ik not in ("file",))
        parts.append(f"{k}: {inner}")
    return "; ".join(parts)
