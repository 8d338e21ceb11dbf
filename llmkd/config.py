"""Recipe schema: every setting llmkd reads, its type, its default and what it means, in one place.

A recipe is a YAML file of these sections (all optional; omitted keys take the defaults below):

    name: smollm2-cpu  # every output under runs/<name>/ unless its path is set
    fast_paths: true
    model:        {name, revision, trust_remote_code, teacher_dtype, quant, double_quant, hqq_group_size, ...}
    data:         {source, exemplar_seed}
    transfer_set: {out, split, start, count, response, shots, top_k, max_new_tokens, ...}
    lora:         {r, alpha, dropout, target_modules}
    train:        {epochs, batch_size, grad_accum, optimizer, lr, ..., loss: {alpha, temperature, ...}}
    eval:         {split, start, limit, shots, batch_size, max_new_tokens, fidelity_*, backend}
    sweep:        {quants, point_overrides, baseline: {name, overrides, point_overrides}}

Validation is strict and up front: an unknown key, a wrong type or an out-of-range value is a
one-line `LlmkdError` naming the file and the dotted key. Command-line overrides use the same dotted
keys (`train.lr=1e-4`) and are parsed as YAML scalars, then coerced to the field's type. Numbers
such as `5e-8`, which YAML 1.1 reads as strings, are accepted for float fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmkd.data import sources
from llmkd.errors import LlmkdError



class Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


Quant = Literal["nf4", "fp4", "int8", "hqq2", "hqq3", "hqq4", "hqq8",
                "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-q8_0"]
Rendering = Literal["llmkd", "bare", "notes", "plain_chat", "plain_text"]  # llmkd/data/prompts.py: RENDERINGS


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    """Teacher and student base: a Hugging Face id, a local folder, or `smollm2-135m-instruct` (the embedded default)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for a Hugging Face id."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the checkpoint."""
    chat_template: Optional[str] = None
    """A Jinja chat template (the text, or a file holding it) for a tokenizer that has none, or to replace its
    own: your own data is rendered by the chat template."""
    teacher_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Teacher weights' dtype. auto: bfloat16 on a GPU; on CPU bfloat16 where a matmul probe finds it faster than float32, else float32."""
    quant: Quant = "nf4"
    """The student's quantizer: bitsandbytes nf4, fp4 (4-bit) or int8 (LLM.int8), HQQ at 2/3/4/8 bits, or llama.cpp's
    GGUF blocks gguf-q4_0/q4_1/q5_0/q5_1/q8_0 (to export --to gguf) (llmkd/quantize.py)."""
    double_quant: bool = True
    """Quantise the quantisation constants too (QLoRA's double quantisation; nf4 and fp4)."""
    hqq_group_size: int = Field(64, gt=0, multiple_of=8)
    """Weights sharing one scale and zero (quant: hqq*); a multiple of 8 (HQQ's packing)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype the 4-bit student computes in; auto as for teacher_dtype."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """dtype the packed 4-bit weights are stored in. train.sharding fsdp or zero3 needs a floating-point one (bfloat16 on GPUs)."""


class DataConfig(Section):
    source: str = "gsm8k"
    """gsm8k (the copy shipped inside llmkd), a local JSON Lines / JSON / CSV / Parquet file or a datasets
    save_to_disk folder, or hub:NAME (a hub dataset; hub:openai/gsm8k is GSM8K's). llmkd/data/sources.py."""
    format: Literal["auto", "messages", "prompt_completion", "prompt"] = "auto"
    """How a row is written: messages ({role, content} turns), prompt + completion, or prompt alone;
    auto: from the columns. Not for gsm8k."""
    columns: dict[Literal["messages", "prompt", "completion"], str] = {}
    """Your column names for llmkd's, e.g. {prompt: question, completion: answer}."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the rows held out for evaluation, chosen by a hash of each row's content (rows appended
    later do not move them). Not for gsm8k, whose test split is the held-out one."""
    eval_source: Optional[str] = None
    """A second file (or folder, or hub:NAME) of held-out rows, instead of eval_fraction's share."""
    on_bad_row: Literal["error", "skip"] = "error"
    """error: a bad row (missing column, empty prompt, unknown role, no assistant turn for gold responses,
    a response of max_length tokens or more) stops the build before the teacher runs, naming the row;
    skip: it is left out and counted in the manifest and the summary."""
    max_length: Optional[int] = Field(None, gt=1)
    """Most tokens of prompt + response: a prompt is cut from the left to fit, a response never is."""
    hub_config: Optional[str] = None
    """Config (subset) of a hub:NAME dataset."""
    hub_split: str = "train"
    """Split of a hub:NAME dataset (or of a save_to_disk folder holding several)."""
    revision: Optional[str] = None
    """Revision of a hub:NAME dataset."""
    exemplar_seed: int = 1234
    """Seed that picks the k-shot exemplars from GSM8K's train split (the same for every question)."""

    @field_validator("source", "eval_source")
    @classmethod
    def _legacy_source(cls, value):
        # Before any data, `local` and `hub` named GSM8K's two copies; they still do.
        return sources.LEGACY_SOURCES.get(value, value) if value is not None else value

    @property
    def is_gsm8k(self) -> bool:
        return sources.gsm8k_copy(self.source) is not None

    @model_validator(mode="after")
    def _gsm8k_is_its_own_format(self):
        if self.is_gsm8k:
            set_keys = [k for k in ("format", "columns", "eval_source", "max_length") if k in self.model_fields_set
                        and getattr(self, k) not in (None, {}, "auto")]
            if set_keys:
                raise ValueError(f"{set_keys[0]} is for your own data; GSM8K (source {self.source}) has its own "
                                 "format and test split")
        return self


class TransferSetConfig(Section):
    out: Optional[str] = None
    """Folder the transfer set is written to (shards + manifest.json); null: runs/<name>/transfer_set. The shipped recipes keep theirs in transfer_sets/."""
    split: Literal["train", "test"] = "train"
    """GSM8K split the prompts come from. The test split is refused unless --allow-eval-split is given."""
    start: int = Field(0, ge=0)
    """Index of the first question."""
    count: Optional[int] = Field(1000, gt=0)
    """Number of questions (null: to the end of the split)."""
    response: Literal["teacher", "gold"] = "teacher"
    """teacher: the teacher's own generation; gold: the dataset's solution, teacher-forced."""
    shots: int = Field(0, ge=0)
    """Exemplars in each transfer-set prompt."""
    renderings: list[Rendering] = Field(["llmkd"], min_length=1)
    """How the examples are written (llmkd/data/prompts.py RENDERINGS), taken in turn: example i gets
    renderings[i % n]. More than llmkd's own format trains on varied text (0-shot only)."""
    top_k: int = Field(32, gt=0)
    """Teacher logprobs kept per token; the rest of the mass is one tail bucket."""
    encoding: Literal["compact", "fp16"] = "compact"
    """How the targets are stored (llmkd/topk_encoding.py). compact: ids in the vocabulary's bit width and
    one byte per probability, 3K + 2 B per token; fp16: int32 ids and fp16 log-probs, 6K + 2 B (the exact
    format of sets built before it, with top_k 64)."""
    max_new_tokens: int = Field(256, gt=0)
    """Longest teacher generation (response: teacher)."""
    do_sample: bool = False
    """Sample the teacher's responses instead of greedy decoding."""
    sampling_temperature: float = Field(1.0, gt=0)
    """Temperature of the teacher's sampling when do_sample is true (not the loss temperature)."""
    seed: int = 0
    """Seed for sampled responses."""
    batch_size: int = Field(16, gt=0)
    """Questions generated together."""
    shard_size: int = Field(256, gt=0)
    """Examples per shard; a shard is the unit of resume."""

    @model_validator(mode="after")
    def _renderings_are_zero_shot(self):
        if self.shots > 0 and list(self.renderings) != ["llmkd"]:
            raise ValueError(f"renderings {self.renderings} are 0-shot renderings; k-shot prompts (shots "
                             f"{self.shots}) are llmkd's format only")
        return self


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input path (peft's lora_dropout); kept as set, never disabled behind your back."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Linear layers that get adapters."""
    init: Literal["default", "activations"] = "default"
    """default: peft's (A random, B zero: the adapter starts as a no-op). activations: before KD, each decoder
    layer's LoRA is fitted to the 16-bit layer's outputs on transfer-set tokens, layer by layer (llmkd/lora_init.py)."""
    init_tokens: int = Field(16384, gt=0)
    """Calibration tokens for init: activations (the transfer set's first examples, in 256-token blocks)."""
    init_steps: int = Field(64, ge=0)
    """Adam steps per decoder layer (init: activations)."""
    init_lr: float = Field(3e-3, gt=0)
    """Adam's learning rate for init: activations."""
    init_batch: int = Field(4, gt=0)
    """256-token blocks per step (init: activations)."""
    init_text: Optional[str] = None
    """A UTF-8 text file whose first tokens make up half of init_tokens (init: activations), the transfer set the
    other half: text like what the model meets besides the task, so that the init's fit holds there too."""

    @model_validator(mode="after")
    def _init_text_needs_activations(self):
        if self.init_text is not None and self.init != "activations":
            raise ValueError(f"init_text {self.init_text!r} calibrates init: activations, but init is {self.init!r}")
        return self


class LossConfig(Section):
    alpha: float = Field(0.0, ge=0, le=1)
    """Weight of the hard-label cross-entropy: loss = alpha*CE + (1-alpha)*T^2*divergence."""
    temperature: float = Field(1.0, gt=0)
    """Distillation temperature T applied to teacher and student (not the sampling temperature)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv", "cakld", "dkd"] = "forward_kl"
    """forward_kl = KL(teacher||student); reverse_kl = KL(student||teacher); jsd = generalized JSD; tv = total
    variation; cakld = BitDistiller's confidence-aware mix of reverse and forward KL; dkd = decoupled KD (llmkd/losses.py)."""
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    """Teacher weight in the JSD mixture (divergence: jsd)."""
    cakld_gamma: Optional[float] = Field(None, ge=0, le=1)
    """Reverse-KL weight of cakld; null: the teacher's mean probability of the response tokens in the transfer set."""
    dkd_alpha: float = Field(1.0, ge=0)
    """Weight of the target-class term (TCKD) of dkd."""
    dkd_beta: float = Field(1.0, ge=0)
    """Weight of the non-target-class term (NCKD) of dkd."""


class OnPolicyConfig(Section):
    rounds: int = Field(0, ge=0)
    """On-policy rounds (GKD-style, llmkd/on_policy.py), spread evenly over the steps from step 0; 0: off."""
    questions: int = Field(32, gt=0)
    """Transfer-set prompts the student answers per round (its examples, drawn at random)."""
    fraction: float = Field(0.5, ge=0, le=1)
    """GKD's lambda: the chance that an optimizer step takes its whole batch from the newest round."""
    do_sample: bool = True
    """Sample the student's responses (GKD); false: greedy."""
    temperature: float = Field(1.0, gt=0)
    """The student's sampling temperature."""
    max_new_tokens: int = Field(192, gt=0)
    """Longest student response."""
    batch_size: int = Field(16, gt=0)
    """Prompts generated (and scored by the teacher) together."""


class TrainConfig(Section):
    out: Optional[str] = None
    """Folder for checkpoints, logs and the final adapter; null: runs/<name>/train."""
    epochs: int = Field(1, gt=0)
    """Passes over the transfer set."""
    max_steps: Optional[int] = Field(None, gt=0)
    """Stop after this many optimizer steps (null: epochs decide)."""
    batch_size: int = Field(4, gt=0)
    """Examples per micro-batch, per process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step. Effective batch = batch_size * grad_accum * processes."""
    group_by_length: bool = True
    """Batch examples of similar length (sorted within windows of 16 steps' examples, those batches then shuffled): less padding."""
    optimizer: Literal["sgd", "adamw"] = "adamw"
    """sgd (with momentum, the reference study) or adamw."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum (optimizer: sgd)."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay on the LoRA weights."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(5, ge=0)
    """Optimizer steps of linear warmup from 0 to lr."""
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip the gradient norm to this (null: no clipping)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """accelerate's mixed precision; bf16 on GPUs that support it."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML reads an unquoted `no` as false
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (large models)."""
    sharding: Literal["none", "fsdp", "zero3"] = "none"
    """none: every process holds the whole student (DDP under a multi-process launch). fsdp / zero3: llmkd shards
    the student itself over the launched processes, with torch FSDP2 or DeepSpeed ZeRO-3 (llmkd/sharding.py;
    zero3 needs `pip install 'llmkd[zero3]'`); needs model.quant nf4 or fp4 with a floating-point
    model.quant_storage; norms and embeddings stay in the compute dtype (no fp32 upcast)."""
    checkpoint_every: int = Field(20, gt=0)
    """Optimizer steps between checkpoints."""
    seed: int = Field(0, ge=0)
    """Seeds LoRA initialisation, dropout and data order."""
    loss: LossConfig = LossConfig()
    """The distillation objective."""
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Rounds in which the student answers and the teacher scores (off by default)."""


class EvalConfig(Section):
    split: Literal["train", "test"] = "test"
    """GSM8K split scored for accuracy."""
    start: int = Field(0, ge=0)
    """Index of the first question scored."""
    limit: Optional[int] = Field(None, gt=0)
    """Questions scored (null: the whole split from start)."""
    shots: list[int] = [0, 8]
    """Exemplar counts `llmkd run` evaluates; `llmkd eval --shots` picks one."""
    batch_size: int = Field(16, gt=0)
    """Questions generated together."""
    max_new_tokens: int = Field(256, gt=0)
    """Longest answer generated."""
    fidelity_start: int = Field(1000, ge=0)
    """First test question of the held-out fidelity set (teacher-forced gold solutions)."""
    fidelity_count: int = Field(100, gt=0)
    """Questions in the held-out fidelity set."""
    fidelity_renderings: list[Rendering] = Field(["llmkd", "plain_chat"], min_length=1)
    """Renderings the fidelity is measured in (llmkd/data/prompts.py RENDERINGS): llmkd's training format,
    and plain_chat (the bare question, GSM8K's answer as shipped with its calculator notes): other text."""
    backend: Literal["llmkd", "lm-eval"] = "llmkd"
    """llmkd's own batched generation, or lm-eval's gsm8k harness with the same prompts."""
    tasks: list[str] = []
    """lm-eval tasks run for every model evaluated, side by side in the report with paired tests: lm-eval
    task names (gsm8k, arc_easy, ...; their data from the hub) or paths of task YAMLs of your own
    (llmkd/lm_eval_tasks.py). Greedy, eval.max_new_tokens, llmkd's BOS rule and chat template."""
    task_limit: Optional[int] = Field(None, gt=0)
    """Documents scored per eval.tasks task (null: all)."""

    @model_validator(mode="after")
    def _shots_non_negative(self):
        if any(s < 0 for s in self.shots):
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        return self


# `llmkd export --to merged`: the quantizer's scales trained after merging (llmkd/merge.py). Settings of
# the export command, not of a recipe: one export of a run may try several.
RECOVERY_STEPS = 64  # optimizer steps of the scales' training, at the recipe's batch size
# Adam's steps are in weight units: 1e-5 is ~0.1% a step of a GGUF block scale or an HQQ group scale
# (about max|w| / 8, ~1e-2); bitsandbytes' block absmax is max|w| itself (rates: benchmarks/results.md).
RECOVERY_LR = {"scales": 1e-5, "absmax": 3e-4}
ABSMAX_QUANTS = ("nf4", "fp4")  # bitsandbytes 4-bit students: their merge recovers each block's absmax
# Transfer-set tokens whose layer inputs choose the merged weights' codes (GPTQ's error feedback on the
# quantizer's grid); 0 rounds each merged weight to its nearest codes.
MERGE_CALIBRATION_TOKENS = 8192


def recovery_lr(quant: str) -> float:
    """`--to merged`'s default recovery learning rate for a student of `quant`."""
    return RECOVERY_LR["absmax" if quant in ABSMAX_QUANTS else "scales"]


def recovered_parameters(quant: str) -> str:
    """What `--to merged`'s recovery trains in a student of `quant`, in words."""
    if quant.startswith("gguf-"):
        return "block scales"
    return "block absmax" if quant in ABSMAX_QUANTS else "group scales and zeros"


# What a sweep point may change: how its student is quantised and trained, never what it is compared on.
POINT_SECTIONS = ("lora.", "train.")
POINT_MODEL_KEYS = ("model.double_quant", "model.hqq_group_size", "model.compute_dtype", "model.quant_storage")


def _point_keys(where: str, items: Sequence[str]) -> None:
    for item in items:
        key = item.partition("=")[0]
        if not (key.startswith(POINT_SECTIONS) or key in POINT_MODEL_KEYS):
            raise ValueError(f"{where}: {key!r} is not a setting a point may change (lora.*, train.*, "
                             f"{', '.join(POINT_MODEL_KEYS)}); points share the teacher, data and evaluation")


class BaselineConfig(Section):
    name: str = Field("plain-kd", pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Names the baseline's column in sweep.md and its points' run folders (runs/<name>-<quant>-<baseline>/);
    a sweep trains no baseline unless its recipe has a sweep.baseline section."""
    overrides: list[str] = []
    """Dotted `key=value` settings that turn the recipe's method into the baseline, e.g. `lora.init=default`."""
    point_overrides: dict[Quant, list[str]] = {}
    """Per point, applied after `overrides` (in place of sweep.point_overrides), e.g. `int8: [train.lr=2.5e-4]`."""

    @model_validator(mode="after")
    def _keys(self):
        _point_keys("overrides", self.overrides)
        for quant, items in self.point_overrides.items():
            _point_keys(f"point_overrides.{quant}", items)
        return self


class SweepConfig(Section):
    quants: list[Quant] = Field(list(get_args(Quant)), min_length=1)
    """The points of `llmkd sweep`, one per student quantizer (`--quant` overrides)."""
    point_overrides: dict[Quant, list[str]] = {}
    """Per point, dotted `key=value` overrides of how its student is quantised and trained (lora.*,
    train.*, model.double_quant, hqq_group_size, compute_dtype, quant_storage), e.g. `int8: [train.lr=2.5e-4]`."""
    baseline: Optional[BaselineConfig] = None
    """A second student at every point, trained with these overrides on the same transfer set and scored
    against the same base, so that sweep.md shows what the recipe's method adds at each bit width."""

    @model_validator(mode="after")
    def _point_keys(self):
        for quant, items in self.point_overrides.items():
            _point_keys(quant, items)
        return self


class Recipe(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Names the run folder: every output goes under runs/<name>/ (transfer_set, train, eval, report) unless its path is set."""
    fast_paths: bool = True
    """Speed-ups that give the same numbers: the shared prompt prefix's KV computed once (generation,
    teacher targets, fidelity) and, on CPU, 4-bit and HQQ weights dequantized once. false: the plain library calls."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    transfer_set: TransferSetConfig = TransferSetConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()

    @property
    def layout(self) -> "RunLayout":
        return RunLayout.of(self)

    def flat(self) -> dict[str, Any]:
        """Every leaf setting by its dotted key ("train.loss.alpha": 0.0)."""
        def walk(d: dict, prefix: str) -> dict:
            out = {}
            for k, v in d.items():
                out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
            return out

        return walk(self.model_dump(), "")


@dataclass(frozen=True)
class RunLayout:
    """Where each output of a recipe goes: the one place these paths are derived."""

    run: Path  # runs/<name>
    transfer_set: Path  # transfer_set.out, or runs/<name>/transfer_set
    train: Path  # train.out, or runs/<name>/train
    eval: Path  # runs/<name>/eval
    report: Path  # runs/<name>/report
    sweep: Path  # runs/<name>/sweep (llmkd sweep; each point is its own recipe <name>-<quant>)

    @classmethod
    def of(cls, recipe: Recipe) -> "RunLayout":
        run = Path("runs") / recipe.name
        return cls(
            run=run,
            transfer_set=Path(recipe.transfer_set.out or run / "transfer_set"),
            train=Path(recipe.train.out or run / "train"),
            eval=run / "eval",
            report=run / "report",
            sweep=run / "sweep",
        )

    # Inside train/ (the trainer's and the checkpoint module's files).
    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.train / "adapter"

    @property
    def metrics(self) -> Path:
        return self.train / "metrics.jsonl"

    @property
    def train_summary(self) -> Path:
        return self.train / "summary.json"

    @property
    def tensorboard(self) -> Path:
        return self.train / "tensorboard"

    @property
    def lora_init(self) -> Path:
        return self.train / "lora_init.json"  # lora.init: activations, written before the first step

    @property
    def on_policy(self) -> Path:
        return self.train / "on_policy"  # train.on_policy: one shard and one record per round


def eval_cell(eval_dir: Path, tag: str, shots: int) -> Path:
    """The folder of one model x shot count in an evaluation folder (samples.jsonl, summary.json)."""
    return Path(eval_dir) / f"{tag}-{shots}shot"


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; `path=None` gives the defaults (plus overrides)."""
    source = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LlmkdError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise LlmkdError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
        if raw is None:
            raise LlmkdError(f"{path}: empty recipe; write at least `name:` and the sections you change "
                             "(`llmkd recipe --keys` lists them), or leave out the recipe for the defaults")
        if not isinstance(raw, dict):
            raise LlmkdError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, Recipe)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise LlmkdError(f"{source}: {describe(e)}") from None
    if not recipe.data.is_gsm8k:
        for key in GSM8K_ONLY:
            section, _, name = key.partition(".")
            if name in (raw.get(section) or {}):
                raise LlmkdError(f"{source}: {key} is a GSM8K setting; with data.source {recipe.data.source} the "
                                 "examples are your rows as written, evaluated 0-shot (drop the key)")
    return recipe


# Keys that shape GSM8K's prompts and evaluation: a recipe on other data that sets one is refused.
GSM8K_ONLY = ("transfer_set.shots", "transfer_set.renderings", "eval.shots", "eval.fidelity_renderings",
              "eval.fidelity_start", "eval.backend", "data.exemplar_seed")


def recipe_from_cli(items: Sequence[str], extra_overrides: Sequence[str] = ()) -> Recipe:
    """`RECIPE [key=value ...]` or only `key=value` items (the built-in defaults), as commands take them."""
    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    bad = [x for x in items if "=" not in x]
    if bad:
        raise LlmkdError(f"expected key=value overrides after the recipe, got {bad[0]!r}")
    return load_recipe(path, [*items, *extra_overrides])


def apply_override(raw: dict, item: str, schema: type[BaseModel]) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LlmkdError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
    parts = key.split(".")
    node, model = raw, schema
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if model else None
        if field is None:
            raise LlmkdError(f"override {key}: unknown key {'.'.join(parts[: i + 1])!r}")
        if i == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(text) if text != "" else None
            except yaml.YAMLError:
                node[part] = text
            return
        sub = section_of(field.annotation)
        if sub is None:
            raise LlmkdError(f"override {key}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
        if node.get(part) is None:  # an optional section left out (sweep.baseline): its defaults
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise LlmkdError(f"override {key}: {'.'.join(parts[: i + 1])!r} is not a mapping in the recipe")
        model = sub


def section_of(annotation) -> type[BaseModel] | None:
    """The section a field holds, optional or not (`BaselineConfig` for `Optional[BaselineConfig]`)."""
    for ann in (annotation, *get_args(annotation)):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
    return None


def describe(error: ValidationError) -> str:
    """All problems of a validation, one line: `train.lr: Input should be a valid number (got 'x')`."""
    problems = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key")
        else:
            problems.append(f"{loc}: {err['msg']} (got {err['input']!r})")
    return "; ".join(problems)


def field_docs(schema: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field: the reference `llmkd recipe --keys` prints."""
    rows = []
    for name, field in schema.model_fields.items():
        sub = section_of(field.annotation)
        if sub is not None:
            rows += field_docs(sub, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", field.description or "", field.default))
    return rows
