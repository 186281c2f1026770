"""The pipeline's configuration: one typed, frozen dataclass per part of the method.

`configs/pipeline/demo.yaml` runs the whole method on the built-in corpus in minutes on a CPU;
`configs/pipeline/sweep-tiny.yaml` two presets end to end; `configs/paper/full.yaml` the paper's
setting (2.2M translated stories, seven presets, 20K native ones, an LLM judge, SAEs on ts-33m).
YAML only overrides these defaults; unknown keys are refused (jaxlm.overlay).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from jaxlm import overlay
from jaxlm.config import PRESETS
from jaxlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class CorpusSection:
    """Where the stories come from: the built-in generator, or files."""

    kind: Literal["demo", "files"] = "demo"
    # demo: generated stories in the two styles (jaxlm/data/demo_corpus.py)
    n_translated: int = 20000  # pretraining stories (translated style)
    native_fraction: float = 0.01  # the paper's 1% of native data for continual pre-training
    eval_stories: int = 600  # held-out stories per style, for the per-source evaluations
    seed: int = 0
    # translated-style sets' chance of an English name per character (else an Arabic one): a
    # causal check (ablating SAE features) needs a pretrained English-name rate inside (0, 1);
    # at 1.0 the rate sits at its ceiling of ~1, where an ablation cannot be seen to move it
    english_name_share: float = 1.0
    # files: translated Arabic stories (or English ones to translate first), native ones
    translated: str | None = None  # Arabic stories from translation (JSONL --field, txt, csv)
    english: str | None = None  # English stories: translated first (the `translate` stage)
    native: str | None = None  # native Arabic stories; None with synthesize.enabled: generated
    field: str = "text"  # JSONL field / CSV column of the story text


@dataclasses.dataclass(frozen=True)
class TranslateSection:
    """Step 1 (only when corpus.english is given): NLLB / M2M100, sharded and resumable."""

    model: str = "facebook/nllb-200-3.3B"
    src: str = "eng_Latn"
    tgt: str = "arb_Arab"
    backend: Literal["transformers", "ctranslate2"] = "transformers"
    batch_size: int = 64
    device: str = "auto"
    where: Literal["local", "gpu"] = "gpu"  # for --plan: where the stage runs


@dataclasses.dataclass(frozen=True)
class SynthesizeSection:
    """Step 3a: native stories from an LLM (when corpus.native is not given)."""

    enabled: bool = False
    n: int = 20000
    provider: Literal["gemini", "openai"] = "gemini"
    model: str = "gemini-2.5-flash"
    base_url: str | None = None
    concurrency: int = 8
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Tokenizer and packed shards."""

    vocab_size: int = 2000  # the paper's is 32000
    seq_len: int = 128
    val_fraction: float = 0.02


@dataclasses.dataclass(frozen=True)
class ModelsSection:
    """Step 2 and 3b: pretraining on translated stories, continual pre-training on native ones,
    for each preset; a control run (the same CPT budget on held-out translated-style stories) and
    a replay variant when asked for."""

    presets: tuple[str, ...] = ("ts-1m",)
    pretrain_config: str = "configs/demo/pretrain.yaml"
    pretrain_set: tuple[str, ...] = ()  # extra --set overrides, e.g. "steps=300"
    cpt_config: str = "configs/demo/cpt.yaml"
    cpt_set: tuple[str, ...] = ()
    control: bool = True  # CPT's budget on translated-style stories: what CPT alone explains
    replay: float = 0.0  # > 0: also CPT with this share of translated rows mixed in
    where: Literal["local", "tpu"] = "local"  # tpu: training runs on the `tpu` section's slice


@dataclasses.dataclass(frozen=True)
class SamplesSection:
    """Stories sampled from every model, and their translation-artifact metrics."""

    n: int = 48
    max_new_tokens: int = 160
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 0
    names: tuple[str, ...] = ()  # english=FILE[#COL], arabic=FILE[#COL]; (): the demo's lists
    english_top: int | None = None  # only the first K entries of each English list


@dataclasses.dataclass(frozen=True)
class JudgeSection:
    """Step 4: completions of held-out native story beginnings, graded by an LLM."""

    enabled: bool = False
    provider: Literal["gemini", "openai"] = "gemini"
    model: str = "gemini-2.5-flash"
    base_url: str | None = None
    n: int = 50  # stories per model
    repeat: int = 1  # grade each completion this many times (2: the judge's agreement)
    temperature: float = 0.0
    concurrency: int = 8


@dataclasses.dataclass(frozen=True)
class SAESection:
    """Step 5: SAEs on MLP activations, their evaluation, and the analyses."""

    enabled: bool = True
    presets: tuple[str, ...] = ()  # the presets whose models get SAEs; (): all
    layers: tuple[int, ...] = (-1,)  # MLP layers; -1: the last
    config: str = "configs/demo/sae.yaml"
    set: tuple[str, ...] = ()  # extra --set overrides of the SAE training config
    ablation_features: int = 8  # the top English-name features ablated (and as many random)
    # instead: per layer, the fewest top features carrying this share of the layer's positive
    # English-name part (`sae.analysis.attribution.coverage_features`); None: ablation_features
    ablation_coverage: float | None = None
    dashboards: int = 8  # dashboards of the top attributed features


@dataclasses.dataclass(frozen=True)
class PlanSection:
    """What `--plan` estimates with; every figure names its source (measured, compiled, or an
    assumption written here)."""

    accelerator: str = "v5e-8"  # the TPU slice (or GPU) that trains, for --plan
    accelerator_hourly_usd: float = 9.6  # v5e-8 on demand (8 x $1.20/chip-hour, us-west4, 2026)
    mfu: float = 0.35  # assumed model-FLOPs utilisation of the train step on that slice
    peak_tflops: float = 1576.0  # the slice's bf16 peak (8 x 197 TFLOP/s for v5e)
    gpu_hourly_usd: float = 3.0  # one H100 for translation
    translate_sentences_per_s: float = 60.0  # NLLB-3.3B, bf16, batch 64, one H100 (assumed)
    sentences_per_story: float = 9.0  # TinyStories: about 9 sentences a story
    llm_input_usd_per_mtok: float = 0.30  # the LLM's prices per million tokens
    llm_output_usd_per_mtok: float = 2.50
    synth_tokens_out: int = 700  # per synthesized story (prompt ~250 tokens in)
    judge_tokens_out: int = 400  # per grade (prompt ~700 tokens in)
    synth_rejection: float = 0.15  # share of generated stories the checks reject (assumed)


# the tpu section's fields without which no slice can be driven, and a hint for each
_TPU_REQUIRED = {
    "name": "the TPU VM name",
    "zone": "e.g. us-west4-a",
    "repo": "a git URL the workers can clone",
    "runs": "gs://BUCKET/PREFIX",
}


@dataclasses.dataclass(frozen=True)
class TpuSection:
    """Where training runs with `models.where: tpu`: a Cloud TPU slice driven by the tpu/ scripts
    (tpu/babysit.py creates it when missing, sets it up at `commit`, runs the train command and
    reruns it after a preemption). Workdirs and the prepared data live under `runs` (gs://),
    which setup mounts read-write at `runs_dir` on every worker; the finished workdir is copied
    back to RUN/models/LABEL. See jaxlm/pipeline/on_tpu.py."""

    name: str | None = None  # the TPU VM (and queued-resource) name; required
    zone: str | None = None  # e.g. us-west4-a (v5e); required
    project: str | None = None  # None: gcloud's core/project
    accelerator: str | None = None  # v5litepod-8 (alias v5e-8), v4-32...; None: plan.accelerator
    runtime_version: str | None = None  # None: the generation's (tpu/gcloud.py)
    spot: bool = False  # spot capacity: cheap, preemptible (babysit recreates and resumes)
    reserved: bool = False  # the project's reservation
    queued: bool = False  # a queued resource instead of a plain TPU VM
    repo: str | None = None  # git URL the workers clone; required
    commit: str | None = None  # None: this checkout's HEAD (push it to `repo` first)
    dir: str = "~/jaxlm"  # the checkout (and its venv) on each worker
    runs: str | None = None  # gs://BUCKET/PREFIX for workdirs and data; required
    runs_dir: str = "/tmp/jaxlm-runs"  # where setup mounts `runs` on the workers (gcsfuse)
    prefix: str | None = None  # this run's folder under `runs`; None: the workdir's name
    log_dir: str | None = None  # workers' logs (gs:// or a local dir); None: RUNS/PREFIX/tpu-logs
    env: tuple[str, ...] = ()  # KEY=VALUE exported on the workers (JAX_COMPILATION_CACHE_DIR=...)
    max_restarts: int = 50  # babysit gives up after this many reruns of one stage
    poll_s: float = 60.0  # seconds between babysit's describe polls
    delete_when_done: bool = True  # delete the slice once no TPU stage is left to run
    dry_run: bool = False  # print the TPU stages' commands, run nothing (as --dry-run)

    def check(self) -> None:
        """One line naming the field when the section cannot drive a slice."""
        for field, hint in _TPU_REQUIRED.items():
            if not getattr(self, field):
                raise UserError(f"tpu.{field} is required with models.where=tpu ({hint})")
        if not str(self.runs).startswith("gs://"):
            raise UserError(f"tpu.runs={self.runs}: expected gs://BUCKET/PREFIX")
        if self.spot and self.reserved:
            raise UserError("tpu.spot and tpu.reserved are mutually exclusive: pick one")
        if not self.runs_dir.startswith("/"):
            raise UserError(f"tpu.runs_dir={self.runs_dir}: an absolute path on the workers")
        if self.prefix is not None and (not self.prefix or self.prefix.startswith("/")):
            raise UserError(f"tpu.prefix={self.prefix!r}: a folder name under tpu.runs")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole method: what `jaxlm pipeline` runs, stage by stage."""

    name: str = "demo"
    workdir: str = "runs/demo"  # --workdir overrides it
    corpus: CorpusSection = CorpusSection()
    translate: TranslateSection = TranslateSection()
    synthesize: SynthesizeSection = SynthesizeSection()
    data: DataSection = DataSection()
    models: ModelsSection = ModelsSection()
    samples: SamplesSection = SamplesSection()
    judge: JudgeSection = JudgeSection()
    sae: SAESection = SAESection()
    export: bool = True  # Hugging Face exports of every model
    plan: PlanSection = PlanSection()
    tpu: TpuSection = TpuSection()

    def __post_init__(self) -> None:
        bad = [p for p in (*self.models.presets, *self.sae.presets) if p not in PRESETS]
        if bad:
            raise UserError(f"unknown preset {bad[0]!r}; choose from {', '.join(PRESETS)}")
        if not self.models.presets:
            raise UserError("models.presets is empty")
        c = self.corpus
        if c.kind == "files" and not (c.translated or c.english):
            raise UserError("corpus.kind=files needs corpus.translated or corpus.english")
        if c.kind == "files" and not (c.native or self.synthesize.enabled):
            raise UserError("corpus.kind=files needs corpus.native or synthesize.enabled")
        if not 0 < c.native_fraction < 1:
            raise UserError(f"corpus.native_fraction={c.native_fraction} must be in (0, 1)")
        if not 0 <= c.english_name_share <= 1:
            raise UserError(f"corpus.english_name_share={c.english_name_share} must be in [0, 1]")
        if c.kind == "files" and c.english_name_share != 1:
            raise UserError("corpus.english_name_share applies to corpus.kind=demo only (the "
                            "generator's names); leave it at 1.0 with files")  # fmt: skip
        if (cov := self.sae.ablation_coverage) is not None and not 0 < cov <= 1:
            raise UserError(f"sae.ablation_coverage={cov} must be in (0, 1]")
        if not 0 <= self.models.replay < 1:
            raise UserError(f"models.replay={self.models.replay} must be in [0, 1)")
        if self.judge.repeat < 1 or self.judge.n < 1 or self.samples.n < 1:
            raise UserError("judge.repeat, judge.n and samples.n must be >= 1")
        if self.models.where == "tpu":
            self.tpu.check()

    @property
    def sae_presets(self) -> tuple[str, ...]:
        return self.sae.presets or self.models.presets


def load(path: str | Path | None, overrides: list[dict] | None = None) -> PipelineConfig:
    return overlay.load(PipelineConfig, path, overrides)


def resolve(path: str, config_file: str | Path | None) -> Path:
    """A path named in a pipeline config: as given when it exists from here, else relative to
    the repository the config lives in (so `configs/demo/sae.yaml` works from anywhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    if config_file is not None:
        for root in Path(config_file).resolve().parents:
            if (root / p).exists():
                return (root / p).resolve()
    return (Path(__file__).resolve().parents[2] / p).resolve()
