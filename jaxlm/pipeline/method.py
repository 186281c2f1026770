"""The method as stages (jaxlm.pipeline.engine): what `jaxlm pipeline` runs for a config.

    translate? -> corpus -> synthesize? -> tokenizer -> prepare
      -> per preset: pretrain -> cpt (+ control, + replay)
      -> per model: samples (+ artifact metrics), judge?, export
      -> per SAE model: sae (train + evaluation) -> analysis (attribution, dashboards);
         per preset: ablation of the pretrained model's top English-name features, TSEA and
         feature matching before -> after CPT
      -> report

Every stage runs `jaxlm` commands (recorded for the report), so the pipeline does nothing a user
could not do by hand, and a stage's outputs are where the commands put them:

    RUN/corpus/*.jsonl  RUN/tokenizer/  RUN/data/{translated,native,control,eval_*}/
    RUN/models/{pretrain,cpt,control,replay}-PRESET/  RUN/samples/  RUN/judge/  RUN/sae/LABEL/
    RUN/analysis/  RUN/hf/LABEL/  RUN/report/  RUN/results.json

With `models.where: tpu` the training stages run the same train command on a Cloud TPU slice
(jaxlm/pipeline/on_tpu.py: data up, tpu/babysit.py, the workdir back to RUN/models/LABEL); their
fingerprints do not depend on where they run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from jaxlm.errors import UserError
from jaxlm.pipeline.config import CorpusSection, PipelineConfig, resolve
from jaxlm.pipeline.engine import Context, Stage

EVAL = ("eval_native", "eval_translated")  # the per-source evaluation sets, native first


def _sha(path: Path) -> str:
    """A file's content hash: an edited config file is a changed setting, a moved one is not."""
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


class Method:
    """The stages of one config in one run directory."""

    def __init__(self, cfg: PipelineConfig, workdir: Path, config_file: str | Path | None):
        self.cfg, self.w, self.config_file = cfg, workdir, config_file
        self.slice = None  # where training runs when not here (models.where: tpu)
        if cfg.models.where == "tpu":
            from jaxlm.pipeline.on_tpu import Slice

            self.slice = Slice(cfg, workdir)

    # --- paths ---------------------------------------------------------------------------------

    def corpus(self, name: str) -> Path:
        return self.w / "corpus" / f"{name}.jsonl"

    def data(self, name: str) -> Path:
        return self.w / "data" / name

    def model(self, label: str) -> Path:
        return self.w / "models" / label

    def sae_layers(self, label: str) -> list[int]:
        """The configured MLP layers of `label`'s SAEs (-1: the last), deduplicated, in the
        config's order: the first is the one the analyses read."""
        from jaxlm.checkpoint import read_meta

        n_layers = read_meta(self.model(label))[0].n_layers
        return list(dict.fromkeys(x % n_layers for x in self.cfg.sae.layers))

    def sae_dir(self, label: str, layer: int | None = None) -> Path:
        """The SAE of `layer` (default: the analysed one): RUN/sae/LABEL for one layer,
        RUN/sae/LABEL/layer-N when several were trained from one pass (`--layers`)."""
        layers = self.sae_layers(label)
        root = self.w / "sae" / label
        return root if len(layers) == 1 else root / f"layer-{layers[0] if layer is None else layer}"

    def analysis_dir(self, label: str, layer: int | None = None) -> Path:
        """`jaxlm sae attribute`'s output for `layer`'s SAE (default: the analysed one), laid out
        as `sae_dir`: RUN/analysis/LABEL, or RUN/analysis/LABEL/layer-N with several layers."""
        layers = self.sae_layers(label)
        root = self.w / "analysis" / label
        return root if len(layers) == 1 else root / f"layer-{layers[0] if layer is None else layer}"

    def path(self, configured: str) -> Path:
        return resolve(configured, self.config_file)

    # --- the models ----------------------------------------------------------------------------

    def labels(self) -> list[tuple[str, str, str, str | None]]:
        """(label, role, preset, parent) of every model, in training order."""
        out: list[tuple[str, str, str, str | None]] = []
        for p in self.cfg.models.presets:
            out.append((f"pretrain-{p}", "pretrain", p, None))
            out.append((f"cpt-{p}", "cpt", p, f"pretrain-{p}"))
            if self.cfg.models.control:
                out.append((f"control-{p}", "control", p, f"pretrain-{p}"))
            if self.cfg.models.replay:
                out.append((f"replay-{p}", "replay", p, f"pretrain-{p}"))
        return out

    def sae_labels(self) -> list[str]:
        return [lab for lab, _, p, _ in self.labels() if p in self.cfg.sae_presets]

    # --- stages --------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        c = self.cfg
        out = [*self._data_stages()]
        for label, role, preset, parent in self.labels():
            out.append(self._train_stage(label, role, preset, parent))
        for label, *_ in self.labels():
            out.append(self._samples_stage(label))
            if c.judge.enabled:
                out.append(self._judge_stage(label))
        if c.sae.enabled:
            for label in self.sae_labels():
                out.append(self._sae_stage(label))
                out.append(self._analysis_stage(label))
            for p in c.sae_presets:
                out.append(self._ablation_stage(p))
                out.append(self._compare_stage(p))
        if c.export:
            out += [self._export_stage(label) for label, *_ in self.labels()]
        out.append(self._report_stage(out))
        return out

    def _data_stages(self) -> list[Stage]:
        c = self.cfg
        corpus_settings = {"corpus": _corpus_settings(c.corpus)}
        out = []
        if c.corpus.kind == "files" and c.corpus.english:
            out.append(Stage("translate", {"translate": _asdict(c.translate),
                                           "english": _file_identity(self.path(c.corpus.english))},
                             (), self._translate, c.translate.where,
                             "translate the English stories (NLLB)"))  # fmt: skip
        deps = ("translate",) if out else ()
        out.append(
            Stage(
                "corpus",
                corpus_settings,
                deps,
                self._corpus,
                "local",
                "the stories: translated, native, control, held-out evaluation sets",
            )
        )
        tok_deps: tuple[str, ...] = ("corpus",)
        if c.synthesize.enabled and not c.corpus.native:
            out.append(Stage("synthesize", {"synthesize": _asdict(c.synthesize)}, (),
                             self._synthesize, "local", "native stories from an LLM"))  # fmt: skip
            tok_deps = ("corpus", "synthesize")
        out.append(Stage("tokenizer", {"vocab_size": c.data.vocab_size}, tok_deps,
                         self._tokenizer, "local", "SentencePiece BPE"))  # fmt: skip
        out.append(Stage("prepare", {"seq_len": c.data.seq_len, "val": c.data.val_fraction},
                         ("tokenizer", *tok_deps), self._prepare, "local",
                         "clean, tokenise, pack into ArrayRecord shards"))  # fmt: skip
        return out

    def _corpus(self, ctx: Context) -> dict:
        c = self.cfg.corpus
        n_native = max(1, round(c.n_translated * c.native_fraction))
        if c.kind == "demo":
            plan = {"translated": ("translated", c.n_translated, c.seed),
                    "native": ("native", n_native, c.seed + 1),
                    "control": ("translated", n_native, c.seed + 9),  # held out, same budget
                    "eval_translated": ("translated", c.eval_stories, c.seed + 7),
                    "eval_native": ("native", c.eval_stories, c.seed + 8)}  # fmt: skip
            share = ["--english-name-share", str(c.english_name_share)]
            for name, (style, n, seed) in plan.items():
                extra = share if style == "translated" and c.english_name_share != 1.0 else []
                ctx.jaxlm("data", "demo-corpus", "--style", style, "--n", str(n), "--seed",
                          str(seed), "--out", str(self.corpus(name)), *extra)  # fmt: skip
            return {name: {"stories": n} for name, (_, n, _) in plan.items()}
        from jaxlm.pipeline.corpus import split_files

        return split_files(self, ctx)

    def _translate(self, ctx: Context) -> dict:
        t = self.cfg.translate
        out = self.w / "corpus" / "translated.full.jsonl"
        english = self.cfg.corpus.english
        assert english is not None  # a stage only when corpus.english is set (_data_stages)
        ctx.jaxlm("translate", "--input", str(self.path(english)), "--out",
                  str(out), "--model", t.model, "--src", t.src, "--tgt", t.tgt, "--backend",
                  t.backend, "--batch-size", str(t.batch_size), "--device", t.device,
                  overwrite_flag=False)  # fmt: skip
        return {"out": str(out)}

    def _synthesize(self, ctx: Context) -> dict:
        s = self.cfg.synthesize
        out = self.w / "corpus" / "native.full.jsonl"
        args = [
            "synthesize",
            "--n",
            str(s.n),
            "--out",
            str(out),
            "--provider",
            s.provider,
            "--model",
            s.model,
            "--concurrency",
            str(s.concurrency),
            "--seed",
            str(s.seed),
        ]
        if s.base_url:
            args += ["--base-url", s.base_url]
        ctx.jaxlm(*args, overwrite_flag=False)
        return {"out": str(out)}

    def _tokenizer(self, ctx: Context) -> dict:
        ctx.jaxlm("tokenizer", "train", "--input", str(self.corpus("translated")), "--input",
                  str(self.corpus("native")), "--vocab-size", str(self.cfg.data.vocab_size),
                  "--out", str(self.w / "tokenizer"))  # fmt: skip
        return {"vocab_size": self.cfg.data.vocab_size}

    def _prepare(self, ctx: Context) -> dict:
        d = self.cfg.data
        out = {}
        for name in ("translated", "native", "control", *EVAL):
            val = "0.999" if name.startswith("eval_") else str(d.val_fraction)  # all held out
            ctx.jaxlm("data", "prepare", "--input", str(self.corpus(name)), "--tokenizer",
                      str(self.w / "tokenizer"), "--seq-len", str(d.seq_len), "--out",
                      str(self.data(name)), "--val-fraction", val)  # fmt: skip
            meta = json.loads((self.data(name) / "metadata.json").read_text())
            out[name] = {"tokens": meta["tokens"], "stories": meta["stories"]}
        return out

    def _train_stage(self, label: str, role: str, preset: str, parent: str | None) -> Stage:
        m = self.cfg.models
        config = self.path(m.pretrain_config if role == "pretrain" else m.cpt_config)
        sets = m.pretrain_set if role == "pretrain" else m.cpt_set
        settings = {"role": role, "preset": preset, "config": _sha(config), "set": list(sets),
                    "replay": m.replay if role == "replay" else None}  # fmt: skip
        deps = ("prepare",) if parent is None else ("prepare", parent)

        data = {
            "pretrain": ["translated"],
            "cpt": ["native"],
            "control": ["control"],
            "replay": [f"native:{1 - m.replay:g}", f"translated:{m.replay:g}"],
        }[role]

        def args(at: Callable[[Path], str], config_at: str) -> list[str]:
            """The train command's arguments, every run folder path through `at` (str here;
            the slice's mount for a TPU stage)."""
            evals = "[" + ", ".join(f"{{path: {at(self.data(e))}}}" for e in EVAL) + "]"
            out = [
                "train",
                "--config",
                config_at,
                "--workdir",
                at(self.model(label)),
                "--set",
                "log.progress=false",
                "--set",
                f"eval.sources={evals}",
            ]
            for d in data:
                name, _, weight = d.partition(":")
                out += ["--data", f"{at(self.data(name))}" + (f":{weight}" if weight else "")]
            # the preset always (a CPT config's own preset would be wrong for a sweep's others;
            # with --init-from it is checked against the parent's architecture)
            out += ["--preset", preset]
            if parent is not None:
                out += ["--init-from", at(self.model(parent)), "--set", "eval.at_start=true"]
            for s in sets:
                out += ["--set", s]
            return out

        def run(ctx: Context) -> dict:
            if self.slice is None:
                ctx.jaxlm(*args(str, str(config)))
                return _train_summary(self.model(label))
            from jaxlm.pipeline import on_tpu

            inputs = [self.data(d.partition(":")[0]) for d in data] + [self.data(e) for e in EVAL]
            inputs += [self.model(parent)] if parent else []
            on_tpu.train(ctx, self.slice, label, args, config=config, inputs=inputs,
                         out=self.model(label))  # fmt: skip
            return {} if ctx.dry_run else _train_summary(self.model(label))

        what = {"pretrain": "pretraining on translated stories", "cpt": "continual pre-training "
                "on native stories", "control": "the same budget on held-out translated stories",
                "replay": f"CPT with {m.replay:.0%} translated rows"}[role]  # fmt: skip
        where = f", on {self.slice.describe()}" if self.slice else ""
        return Stage(label, settings, deps, run, m.where, f"{preset}: {what}{where}")

    def _name_flags(self) -> list[str]:
        s = self.cfg.samples
        out = [x for spec in s.names for x in ("--names", self._names_spec(spec))]
        if s.english_top is not None:
            out += ["--english-top", str(s.english_top)]
        return out

    def _names_spec(self, spec: str) -> str:
        side, sep, rest = spec.partition("=")
        path, hash_, col = rest.partition("#")
        return f"{side}{sep}{self.path(path)}{hash_}{col}" if sep else spec

    def _samples_stage(self, label: str) -> Stage:
        s = self.cfg.samples

        def run(ctx: Context) -> dict:
            out = self.w / "samples"
            ctx.jaxlm("eval", "artifacts", "--checkpoint", str(self.model(label)),
                      *self._sampling("--seed"), "--out", str(out / f"{label}.artifacts.json"),
                      "--samples-out", str(out / f"{label}.jsonl"),
                      *self._name_flags())  # fmt: skip
            report = json.loads((out / f"{label}.artifacts.json").read_text())
            return {k: _value(report["metrics"].get(k)) for k in
                    ("english_name_rate", "english_dialogue_share", "distinct_2")}  # fmt: skip

        return Stage(f"samples-{label}", {"samples": _asdict(s)}, (label,), run, "local",
                     f"{s.n} stories from {label}, translation-artifact metrics")  # fmt: skip

    def _judge_stage(self, label: str) -> Stage:
        j = self.cfg.judge

        def run(ctx: Context) -> dict:
            d = self.w / "judge"
            inputs, grades = d / f"{label}.inputs.jsonl", d / f"{label}.grades.jsonl"
            ctx.jaxlm(
                "judge",
                "complete",
                "--checkpoint",
                str(self.model(label)),
                "--stories",
                str(self.corpus("eval_native")),
                "--n",
                str(j.n),
                "--out",
                str(inputs),
            )
            args = ["judge", "grade", "--inputs", str(inputs), "--out", str(grades),
                    "--provider", j.provider, "--model", j.model, "--concurrency",
                    str(j.concurrency), "--temperature", str(j.temperature)]  # fmt: skip
            if j.repeat > 1:
                args += ["--repeat", str(j.repeat)]
            if j.base_url:
                args += ["--base-url", j.base_url]
            ctx.jaxlm(*args)
            return {"grades": str(grades)}

        return Stage(f"judge-{label}", {"judge": _asdict(j)}, (label,), run, "local",
                     f"{j.n} completions of {label} graded by {j.model}")  # fmt: skip

    def _sae_stage(self, label: str) -> Stage:
        s = self.cfg.sae
        config = self.path(s.config)

        def run(ctx: Context) -> dict:
            layers = self.sae_layers(label)
            which = (["--layer", str(layers[0])] if len(layers) == 1
                     else ["--layers", ",".join(map(str, sorted(layers)))])  # fmt: skip
            args = ["sae", "train", "--model", str(self.model(label)), *which, "--data",
                    f"{self.data('translated')}:1", "--data", f"{self.data('native')}:1",
                    "--config", str(config), "--set", "log.progress=false", "--out",
                    str(self.w / "sae" / label),
                    *[x for e in EVAL for x in ("--eval-data", str(self.data(e)))]]  # fmt: skip
            for x in s.set:
                args += ["--set", x]
            # the trainer evaluates each SAE (its `eval` section: `jaxlm sae eval`'s defaults) on
            # the held-out evaluation sets the analysis reads, one per style and of equal size, so
            # the pooled score weighs the styles as the SAE was trained (1:1); not on the training
            # sources' validation splits: the native one is 2% of 1% of the corpus (4 rows on
            # the demo). Writes SAE_DIR/eval.json.
            ctx.jaxlm(*args, fresh_process=True)
            per_layer = [{"layer": layer, "dir": str(self.sae_dir(label, layer)),
                          **_sae_cfg(self.sae_dir(label, layer)),
                          **sae_eval_summary(json.loads(
                              (self.sae_dir(label, layer) / "eval.json").read_text()))}
                         for layer in layers]  # fmt: skip
            first = per_layer[0]
            return {**first, "other_layers": per_layer[1:]} if len(layers) > 1 else first

        sae = {**_asdict(s), "config": _sha(config)}
        sae.pop("ablation_features"), sae.pop("ablation_coverage"), sae.pop("dashboards")
        settings = {"sae": sae, "eval_data": list(EVAL)}
        return Stage(
            f"sae-{label}",
            settings,
            (label, "prepare"),
            run,
            "local",
            f"SAE on {label}'s MLP, and its evaluation (CE loss recovered, KL)",
        )

    def _analysis_stage(self, label: str) -> Stage:
        s = self.cfg.sae

        def run(ctx: Context) -> dict:
            layers = self.sae_layers(label)
            # every layer's SAE on the same rows and contexts, from one pass (one forward a
            # batch); with several, attribute writes each into OUT/layer-N (`analysis_dir`)
            saes = [x for layer in layers for x in ("--sae", str(self.sae_dir(label, layer)))]
            ctx.jaxlm("sae", "attribute", "--model", str(self.model(label)), *saes,
                      *self._eval_data(), "--dashboards", "--top", str(s.dashboards),
                      *self._attr_names(), "--out", str(self.w / "analysis" / label),
                      fresh_process=True)  # fmt: skip
            out = attribution_summary(self.analysis_dir(label) / "attribution.json")
            if len(layers) > 1:
                out["all_layers"] = all_layers_summary(
                    {layer: self.analysis_dir(label, layer) / "attribution.json"
                     for layer in sorted(layers)})  # fmt: skip
            return out

        return Stage(
            f"analysis-{label}",
            # arrays: its attribution.npz, which the compare stage reads; an analysis made before
            # attribute saved it runs again
            {"dashboards": s.dashboards, "names": self._names(), "arrays": "attribution.npz"},
            (f"sae-{label}", "prepare"),
            run,
            "local",
            f"which SAE features push {label} toward English names and dialogue",
        )

    def _ablation_stage(self, preset: str) -> Stage:
        s, label = self.cfg.sae, f"pretrain-{preset}"

        def run(ctx: Context) -> dict:
            # every trained layer: its own SAE's top English-name features (by that layer's
            # attribution: the top ablation_features, or those covering ablation_coverage of its
            # positive part), all removed in one forward pass; one layer: that layer's
            from sae.analysis.attribution import coverage_features, saved_mean_parts

            per_layer = {}
            for layer in sorted(self.sae_layers(label)):
                d = self.analysis_dir(label, layer)
                if s.ablation_coverage is not None:
                    ids = coverage_features(saved_mean_parts(d / "attribution.npz"),
                                            s.ablation_coverage)  # fmt: skip
                else:
                    top = attribution_summary(d / "attribution.json")
                    ids = [f["feature"] for f in top["top_english_name_features"]]
                    ids = ids[: s.ablation_features]
                if ids:
                    per_layer[layer] = ids
            if not per_layer:  # SAEs too small or too briefly trained to have such features
                return {"skipped": "no SAE feature pushes toward English names"}
            out = self.w / "analysis" / f"ablation-{label}"
            saes = [x for layer in per_layer for x in ("--sae", str(self.sae_dir(label, layer)))]
            # the samples stage's sampling (its settings are in this stage's fingerprint too)
            common = ["--model", str(self.model(label)), *saes, *self._sampling("--sample-seed"),
                      *self._name_flags(), *self._eval_data()]  # fmt: skip
            # the held-out rows: the name-slot logit difference at attribute's name contexts
            # (both runs), and where the random run's live features are found; random: as many
            # live features at each layer as its top set there (seed 0 + the SAE's index)
            top_flags = [x for ids in per_layer.values()
                         for x in ("--features", ",".join(map(str, ids)))]  # fmt: skip
            counts = ",".join(str(len(ids)) for ids in per_layer.values())
            # the random run reads the top run's unedited stories: the same sampling, so the
            # same stories (sae ablate checks), sampled once
            picks = {
                "top": top_flags,
                "random": [
                    "--random",
                    counts,
                    "--seed",
                    "0",
                    "--baseline-from",
                    str(out / "top.json"),
                ],
            }
            feats = (next(iter(per_layer.values())) if len(per_layer) == 1
                     else {str(layer): ids for layer, ids in per_layer.items()})  # fmt: skip
            for name, pick in picks.items():
                ctx.jaxlm(
                    "sae",
                    "ablate",
                    *common,
                    *pick,
                    "--out",
                    str(out / f"{name}.jsonl"),
                    "--report",
                    str(out / f"{name}.json"),
                    fresh_process=True,
                    overwrite_flag=False,  # ablate rewrites its two files; it has no --overwrite
                )
            return {**ablation_summary(out, feats), "selection": chosen}

        # how the top features are chosen (a fixed number or a share per layer), in the stage's
        # settings and in words; the random control: per layer, as many as the top features there
        pick: dict[str, float]
        if s.ablation_coverage is None:
            pick = {"k": s.ablation_features}
            chosen = f"the top {s.ablation_features} by attribution"
        else:
            pick = {"coverage": s.ablation_coverage}
            chosen = (f"the fewest carrying {s.ablation_coverage:.0%} of the layer's positive "
                      "English-name part")  # fmt: skip
        return Stage(f"ablation-{label}", {**pick, "random": "as many per layer", "samples":
            _asdict(self.cfg.samples), "name_logit_diff": {"data": list(EVAL)},
            "paired": "per story"},
            (f"analysis-{label}",), run, "local",
            f"ablate {label}'s top English-name features vs as many random live ones")  # fmt: skip

    def _compare_stage(self, preset: str) -> Stage:
        before, after = f"pretrain-{preset}", f"cpt-{preset}"

        def run(ctx: Context) -> dict:
            d = self.w / "analysis" / f"compare-{preset}"
            pair = ["--before", str(self.model(before)), str(self.sae_dir(before)),
                    "--after", str(self.model(after)), str(self.sae_dir(after))]  # fmt: skip
            # the attributions the analysis stages computed on the same rows and word lists (the
            # analysed layer's: `analysis_dir`'s default, as `sae_dir`'s), read, not recomputed:
            # tsea-compare reads their firing counts (live features, frequencies), match all
            saved = ["--attribution-before", str(self.analysis_dir(before)),
                     "--attribution-after", str(self.analysis_dir(after))]  # fmt: skip
            ctx.jaxlm("sae", "tsea-compare", *pair, "--demo-sets", *self._eval_data(), *saved,
                      "--out", str(d / "tsea"), fresh_process=True)  # fmt: skip
            ctx.jaxlm("sae", "match", *pair, *self._eval_data(), *self._attr_names(), *saved,
                      "--out", str(d / "match"), fresh_process=True)  # fmt: skip
            return compare_summary(d)

        return Stage(f"compare-{preset}", {"names": self._names()},
                     (f"analysis-{before}", f"analysis-{after}"), run, "local",
                     f"TSEA and feature matching, {before} -> {after}")  # fmt: skip

    def _export_stage(self, label: str) -> Stage:
        def run(ctx: Context) -> dict:
            ctx.jaxlm(
                "export-hf",
                "--checkpoint",
                str(self.model(label)),
                "--out",
                str(self.w / "hf" / label),
                "--tokenizer",
                str(self.w / "tokenizer"),
            )
            return {"dir": str(self.w / "hf" / label)}

        return Stage(f"export-{label}", {}, (label,), run, "local", "Hugging Face export")

    def _report_stage(self, before: list[Stage]) -> Stage:
        def run(ctx: Context) -> dict:
            ctx.jaxlm("report", str(self.w), "--out", str(self.w / "report"))
            return {"page": str(self.w / "report" / "index.html")}

        return Stage(
            "report",
            {},
            tuple(s.name for s in before),
            run,
            "local",
            "the HTML report (report/index.html), report.md, metrics.json",
        )

    # --- shared arguments ----------------------------------------------------------------------

    def _eval_data(self) -> list[str]:
        return [x for e in EVAL for x in ("--data", str(self.data(e)))]

    def _sampling(self, seed_flag: str) -> list[str]:
        """The samples section as sampling flags (`eval artifacts` and `sae ablate` sample alike;
        they name the seed differently)."""
        s = self.cfg.samples
        return ["--n", str(s.n), "--max-new-tokens", str(s.max_new_tokens), "--temperature",
                str(s.temperature), "--top-k", str(s.top_k), seed_flag, str(s.seed)]  # fmt: skip

    def _names(self) -> list[str]:
        return list(self.cfg.samples.names)

    def _attr_names(self) -> list[str]:
        return [x for spec in self.cfg.samples.names for x in ("--names", self._names_spec(spec))]


# --- results of stages, read back from their outputs -------------------------------------------

# the report's names <- `jaxlm sae eval`'s (SAELens') names, pooled over the evaluation sources
SAE_KEYS = {"explained_variance": "explained_variance", "l0": "l0",
            "dead_fraction": "dead_fraction", "dense_fraction": "dense_fraction",
            "ce_loss_recovered": "ce_loss_score", "kl_div": "kl_div_with_sae",
            "clean_loss": "ce_loss_without_sae", "spliced_loss": "ce_loss_with_sae",
            "zero_ablated_loss": "ce_loss_with_ablation"}  # fmt: skip


def sae_eval_summary(ev: dict) -> dict:
    """The report's SAE figures, pooled and per source; CE loss recovered as an estimate with its
    row-bootstrap interval, and `ce_loss_measurable` (False where zero-ablating the MLP does not
    clearly cost the model anything: the score's denominator, `sae.evaluate.ce_score_interval`)."""

    def ours(s: dict) -> dict:
        out = {k: s.get(theirs) for k, theirs in SAE_KEYS.items()}
        if s.get("ce_loss_score_ci95") is not None:
            out["ce_loss_recovered"] = {"value": out["ce_loss_recovered"],
                                        "ci95": s["ce_loss_score_ci95"]}  # fmt: skip
        if "ce_loss_score_measurable" in s:
            out["ce_loss_measurable"] = s["ce_loss_score_measurable"]
            out["ablation_gain_ci95"] = s.get("ablation_gain_ci95")
        return out

    out = ours(ev.get("pooled", {}))
    # eval_native -> native, as the evaluation losses are named
    out["per_source"] = {n.removeprefix("eval_"): ours(s) for n, s in ev.get("sources", {}).items()}
    return out


def _sae_cfg(sae_dir: Path) -> dict:
    """The SAE's architecture and width, from its SAELens cfg.json."""
    from sae.io import CFG, architecture_of, read_cfg

    cfg = read_cfg(sae_dir / CFG)
    return {"architecture": architecture_of(cfg, sae_dir / CFG), "d_sae": cfg.get("d_sae")}


def _asdict(section) -> dict:
    import dataclasses

    return dataclasses.asdict(section)


def _corpus_settings(corpus: CorpusSection) -> dict:
    """The corpus stage's settings: without `english_name_share` at its default 1.0, so that a
    workdir made before the option existed keeps its fingerprint (and is not rerun from scratch);
    its stories are the same."""
    out = _asdict(corpus)
    if out["english_name_share"] == 1.0:
        del out["english_name_share"]
    return out


def _file_identity(path: Path) -> dict:
    from jaxlm.outputs import file_fingerprint

    return file_fingerprint(path)


def _value(metric) -> float | None:
    return metric.get("value") if isinstance(metric, dict) else metric


def _train_summary(workdir: Path) -> dict:
    from jaxlm.train.metrics_log import read_metrics

    rows = read_metrics(workdir / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = [r for r in rows if "eval_loss" in r]
    out = {"steps": max(train), "first_loss": round(train[min(train)], 3),
           "last_loss": round(train[max(train)], 3)}  # fmt: skip
    if evals:
        out["eval_loss"] = round(evals[-1]["eval_loss"], 3)
        for k, v in evals[-1].items():
            if k.startswith("eval_loss/"):
                out[k] = round(v, 3)
    return out


def attribution_summary(path: Path) -> dict:
    """The issue's headline figures from `jaxlm sae attribute`'s JSON."""
    a = json.loads(Path(path).read_text())
    c = a["contrasts"]
    out: dict = {"layer": a.get("layer")}
    for key, name in (("names", "english_name"), ("dialogue", "english_dialogue")):
        if key in c and "balanced" in c[key]:
            out[f"{name}_attribution"] = c[key]["balanced"]["features"]
            out[f"{name}_error_share"] = c[key]["error_share"]
            out[f"{name}_logit_diff"] = c[key]["balanced"]["logit_diff"]
            out[f"{name}_layer_total"] = c[key]["balanced"]["layer_total"]
            if comps := (c[key].get("components") or {}).get("balanced"):
                out[f"{name}_components"] = comps
    top = c.get("names", {}).get("top_features", [])
    out["top_english_name_features"] = [
        {k: f[k] for k in ("feature", "part", "share")} for f in top if f["part"] > 0
    ]
    return out


def all_layers_summary(paths: dict[int, Path]) -> dict:
    """Every trained layer's attribution together: per decision, the features' part summed over
    the layers (each layer's own SAE, the same contexts), the layers' direct parts summed, and the
    error share pooled over layers and contexts (sum |error| / sum (|features| + |error| +
    |bias|), as one layer's is); and each layer's own figures. Decided before measuring the demo's
    layers: the all-layer figures are sums of the per-layer ones, nothing reweighted."""
    per_layer: list[dict] = []
    sums: dict[str, dict] = {}
    for layer, path in paths.items():
        a = json.loads(Path(path).read_text())
        row: dict = {"layer": layer}
        for key, name in (("names", "english_name"), ("dialogue", "english_dialogue")):
            c = a["contrasts"].get(key, {})
            bal, absum = c.get("balanced") or {}, c.get("abs_sums") or {}
            row[f"{name}_attribution"] = bal.get("features")
            row[f"{name}_error_share"] = c.get("error_share")
            row[f"{name}_layer_total"] = bal.get("layer_total")
            acc = sums.setdefault(name, {"features": 0.0, "layer_total": 0.0, "abs": [0.0, 0.0],
                                         "missing": False})  # fmt: skip
            if bal.get("features") is None or not absum:
                acc["missing"] = True
                continue
            acc["features"] += bal["features"]
            acc["layer_total"] += bal["layer_total"]
            acc["abs"][0] += absum["error"]
            acc["abs"][1] += absum["features"] + absum["error"] + absum["bias"]
        per_layer.append(row)
    out: dict = {"layers": list(paths)}
    for name, acc in sums.items():
        ok = not acc["missing"]
        out[f"{name}_attribution"] = round(acc["features"], 6) if ok else None
        out[f"{name}_layer_total"] = round(acc["layer_total"], 6) if ok else None
        out[f"{name}_error_share"] = (round(acc["abs"][0] / acc["abs"][1], 6)
                                      if ok and acc["abs"][1] > 0 else None)  # fmt: skip
    out["per_layer"] = per_layer
    return out


def ablation_summary(d: Path, feats: list[int] | dict[str, list[int]]) -> dict:
    """English-name rate of the pretrained model's samples: unablated, with its top features
    ablated, with as many random live ones ablated (each with its interval), and the paired
    differences; likewise the name-slot logit difference on held-out rows (where the runs
    measured it)."""
    top, rand = (json.loads((d / f).read_text()) for f in ("top.json", "random.json"))
    rate = lambda r, side: r[side]["metrics"].get("english_name_rate")  # noqa: E731
    logit = lambda r, side: (r.get("name_logit_diff") or {}).get(side)  # noqa: E731
    mentions = lambda r, side: {k: r[side]["counts"].get(f"{k}_mentions")  # noqa: E731
                                for k in ("english", "arabic")}  # fmt: skip
    return {
        "features_top": feats,
        "features_random": rand.get("features"),
        "layers": top.get("layers") or [top.get("layer")],
        "english_name_rate_none": rate(top, "baseline"),
        "english_name_rate_top": rate(top, "ablated"),
        "english_name_rate_random": rate(rand, "ablated"),
        "difference_top": top.get("difference", {}).get("english_name_rate"),
        "difference_random": rand.get("difference", {}).get("english_name_rate"),
        "difference_top_vs_random": _top_vs_random(d, top),
        # fewer names of both kinds, or English ones turned Arabic: the rate alone cannot say
        "name_mentions": {
            "stories": top["baseline"].get("stories"),
            "none": mentions(top, "baseline"),
            "top": mentions(top, "ablated"),
            "random": mentions(rand, "ablated"),
        },  # fmt: skip
        "name_logit_diff_none": logit(top, "baseline"),
        "name_logit_diff_top": logit(top, "ablated"),
        "name_logit_diff_random": logit(rand, "ablated"),
        "name_logit_diff_change_top": logit(top, "difference"),
        "name_logit_diff_change_random": logit(rand, "difference"),
        "name_logit_diff_contexts": (top.get("name_logit_diff") or {}).get("contexts"),
    }


def _top_vs_random(d: Path, top: dict) -> dict | None:
    """The top features' English-name rate minus the random ones', story by story (both runs
    sample the same stories: `sae.ablate.paired_runs`, which refuses two that do not),
    bootstrapped as each run's own paired difference is (its resamples and seed); None for runs
    that kept no per-story counts."""
    from sae.ablate import paired_runs

    rows = [[json.loads(x) for x in (d / f).read_text().splitlines() if x.strip()]
            for f in ("top.jsonl", "random.jsonl")]  # fmt: skip
    if not all("counts" in r for rs in rows for r in rs):  # written before rows kept them
        return None
    boot = top["ablated"].get("bootstrap") or {}
    diff = paired_runs(*rows, resamples=boot.get("resamples", 1000), seed=boot.get("seed", 0))
    return diff["english_name_rate"]


def compare_summary(d: Path) -> dict:
    tsea = json.loads((d / "tsea" / "tsea_compare.json").read_text())
    counts = {n: {"before": s["before"].get("n_promoting_above_null"),
                  "after": s["after"].get("n_promoting_above_null")}
              for n, s in tsea["sets"].items()}  # fmt: skip
    match = json.loads((d / "match" / "match.json").read_text())
    keys = ("matched_above_threshold", "lost_before", "new_after", "threshold")
    return {"tsea": counts, "matching": {k: match.get(k) for k in keys}}
