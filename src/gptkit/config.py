"""Typed configuration: pydantic schemas, YAML files, dotted command-line overrides and presets.

Every value is validated before any work starts; errors name the dotted key and, for a typo,
the closest valid key. Configs are data (YAML), never code.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptkit.errors import GptkitError

# Facts the CLI, the API and the config share, declared once here (a torch-free leaf all of them import)
QuantizeMode = Literal["int8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = get_args(QuantizeMode)  # weight-only quantisation for inference
ExportTarget = Literal["hf", "onnx", "gguf", "safetensors"]
EXPORT_TARGETS: tuple[str, ...] = get_args(ExportTarget)
EVAL_DATA_DIR = "data/eval"  # where `gptkit eval` and eval.tasks look for task files
EVAL_BATCH_SIZE = 8  # sequences per forward pass when scoring tasks
EVAL_MAX_NEW_TOKENS = 128  # the longest answer to eval's test questions
MODEL_TOKENIZER = (
    "model:"  # prepare --tokenizer model:PATH: the tokenizer a trained or imported model carries
)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# GPT-2's published shapes, and small shapes that train in minutes on a laptop CPU.
GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}
# The switches every Llama-architecture model sets (RMSNorm, SwiGLU, rotary positions, no biases).
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
# A Llama-style model as small as `tiny`, and the shapes of published Llama-architecture models
# (their config.json), so that `gptkit info` shows what they hold; vocab_size is the model's own.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, mlp_hidden=352),
    "smollm-135m": dict(
        LLAMA,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        mlp_hidden=1536,
        block_size=2048,
        vocab_size=49152,
        tie_embeddings=True,
        rope_theta=10000.0,
    ),
    "tinyllama-1.1b": dict(
        LLAMA,
        n_layer=22,
        n_head=32,
        n_kv_head=4,
        n_embd=2048,
        mlp_hidden=5632,
        block_size=2048,
        vocab_size=32000,
        tie_embeddings=False,
        rope_theta=10000.0,
    ),
}
MODEL_PRESETS: dict[str, dict[str, Any]] = {**GPT2_PRESETS, **LLAMA_PRESETS}
GPT2_VOCAB_SIZE = 50257


class ModelConfig(Section):
    """Shape and switches of the model; `preset` fills in the fields that are not given explicitly.

    The defaults are GPT-2's architecture; the switches give the pieces current open models use
    (Llama's: rmsnorm, swiglu, rope, n_kv_head < n_head, bias false, untied embeddings).
    """

    preset: str | None = Field(None, description="one of " + ", ".join(MODEL_PRESETS))
    n_layer: int = Field(6, ge=1, le=256)
    n_head: int = Field(6, ge=1, le=256)
    n_kv_head: int | None = Field(
        None, ge=1, le=256, description="key/value heads: fewer than n_head is GQA, 1 is MQA; None: n_head"
    )
    n_embd: int = Field(384, ge=1, le=65536)
    block_size: int = Field(256, ge=1, le=1_048_576, description="context length in tokens")
    vocab_size: int | None = Field(None, ge=1, description="None: taken from the data's tokenizer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = Field(True, description="biases in Linear and LayerNorm layers, as in GPT-2")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="normalisation before sublayers")
    norm_eps: float = Field(1e-5, gt=0, lt=1, description="added to the variance in every norm")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="GPT-2's GELU MLP or Llama's gated SwiGLU")
    mlp_hidden: int | None = Field(
        None, ge=1, description="MLP width; None: 4 n_embd (gelu), Llama's 8/3 n_embd up to x256 (swiglu)"
    )
    position: Literal["learned", "rope"] = Field("learned", description="learned embeddings or rotary (RoPE)")
    rope_theta: float = Field(10000.0, gt=1, description="rope: base of the rotation frequencies")
    rope_scaling: Literal["none", "linear"] = Field(
        "none", description="rope: linear divides positions by rope_factor (a longer context than trained)"
    )
    rope_factor: float = Field(1.0, ge=1, description="rope_scaling linear: how much longer")
    rope_original_block_size: int | None = Field(
        None, ge=1, description="rope_scaling linear: the context the model was trained with"
    )
    tie_embeddings: bool = Field(True, description="the output layer reuses the token embedding")
    pad_vocab_multiple: int = Field(64, ge=1, description="embedding rows padded for fast matmuls")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown preset {name!r}{did_you_mean(str(name), MODEL_PRESETS)}")
            data = {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_switches(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads}); each key/value "
                "head serves an equal group of query heads"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope rotates pairs of dimensions: head_dim ({self.head_dim}) must be even")
        if self.rope_scaling == "none" and (self.rope_factor != 1 or self.rope_original_block_size):
            raise ValueError("rope_factor and rope_original_block_size need rope_scaling=linear")
        if self.rope_scaling == "linear":
            if self.position != "rope":
                raise ValueError("rope_scaling=linear needs position=rope")
            if self.rope_original_block_size is None:
                raise ValueError("rope_scaling=linear needs rope_original_block_size (the trained context)")
            reach = int(self.rope_original_block_size * self.rope_factor)
            if self.block_size > reach:
                raise ValueError(
                    f"block_size ({self.block_size}) is past what rope scaling covers "
                    f"(rope_original_block_size {self.rope_original_block_size} x rope_factor "
                    f"{self.rope_factor:g} = {reach}); raise rope_factor or lower block_size"
                )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        """The MLP's width: mlp_hidden, else GPT-2's 4 n_embd, or Llama's rule for SwiGLU (2/3 of
        4 n_embd, so that its three matrices hold what GELU's two do, rounded up to a multiple of 256)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return -(-int(2 * 4 * self.n_embd / 3) // 256) * 256

    def num_params(self, include_position: bool = True) -> int:
        """GPT.num_params from the shape alone (padding rows not counted, a tied head once), so that
        `gptkit info` of a preset or config needs no torch; tests hold it equal to the model's and
        to transformers' for the Llama presets."""
        d, b, h = self.n_embd, int(self.bias), self.hidden
        qkv = d + 2 * self.kv_heads * self.head_dim
        norm = d + d * b if self.norm == "layernorm" else d
        attn = d * qkv + qkv * b + d * d + d * b
        gates = 2 if self.mlp == "swiglu" else 1
        mlp = d * gates * h + gates * h * b + h * d + d * b
        heads = 1 if self.tie_embeddings else 2
        n = self.n_layer * (2 * norm + attn + mlp) + norm + heads * (self.vocab_size or 0) * d
        learned = self.position == "learned"
        return n + self.block_size * d if include_position and learned else n

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise GptkitError("model.vocab_size is not set; set it or take it from the data's tokenizer")
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


class SourceFilter(Section):
    """Which documents of a raw source are kept, and how much of each."""

    min_chars: int = Field(0, ge=0, description="documents shorter than this are dropped")
    max_chars: int | None = Field(None, ge=1, description="documents are cut to this many characters")


class SourceConfig(Section):
    """One source of a streamed mixture: a prepared folder, text/jsonl/parquet files or folders, or
    `hf:NAME[:CONFIG][@SPLIT]`, drawn with probability proportional to its `weight` (in tokens)."""

    path: str = Field(description="prepared folder, file, folder or hf:NAME[:CONFIG][@SPLIT]")
    weight: float = Field(1.0, allow_inf_nan=False, description="share of the tokens, relative")
    text_field: str = Field("text", min_length=1, description="field of .jsonl/.parquet/HF rows")
    filter: SourceFilter = Field(default_factory=SourceFilter)
    epochs: int = Field(1, ge=1, description="passes over the source before it is exhausted")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_weight(self) -> SourceConfig:
        if self.weight <= 0:
            raise ValueError(
                f"source {self.path!r} has weight {self.weight:g}; weights must be > 0 (remove a source "
                "to leave it out)"
            )
        return self


class DataConfig(Section):
    """Where the prepared token shards are (a folder written by `gptkit prepare`), and how to read them;
    or, for instruction tuning, a file of instruction or chat records; or, with `stream`, the sources
    tokenized on the fly and mixed at their weights."""

    path: str = Field("data/default", description="folder with meta.json and token shards")
    sources: list[SourceConfig] | None = Field(None, description="stream: sources and weights (None: path)")
    val_sources: list[SourceConfig] | None = Field(
        None, description="stream: held-out sources for val loss (None: the prepared sources' val splits)"
    )
    stream: bool = Field(False, description="tokenize the sources on the fly instead of reading shards")
    tokenizer: Literal["gpt2", "char", "bpe"] = Field(
        "gpt2", description="stream: tokenizer of raw sources (char/bpe: from a prepared source)"
    )
    shuffle_buffer: int = Field(1000, ge=1, description="stream: documents shuffled together per source")
    pack: Literal["concat", "best_fit"] = Field(
        "concat", description="stream: concatenate documents, or best-fit them into windows uncut"
    )
    when_exhausted: Literal["stop", "renormalise", "restart"] = Field(
        "restart", description="stream: a source past its epochs ends the run, is dropped, or restarts"
    )
    workers: int = Field(1, ge=1, le=512, description="stream: tokenizing processes (1: in this process)")
    sampling: Literal["random", "ordered"] = Field(
        "random", description="random windows, or ordered passes with the shard order reshuffled each epoch"
    )
    instructions: str | None = Field(
        None, description="fine-tuning: Alpaca-style .json/.jsonl or chat .jsonl ({messages}); None: path"
    )
    val_instructions: str | None = Field(None, description="held-out records; None: split off val_fraction")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="records held out when no val file is given")
    template: str = Field("alpaca", description="chat template: alpaca, chat or plain")
    packing: bool = Field(True, description="several examples per sequence (masked apart), else padding")
    too_long: Literal["truncate", "drop"] = Field("truncate", description="examples longer than the context")
    skip_bad: bool = Field(False, description="count and skip malformed records instead of stopping")
    seed: int = Field(0, description="held-out split and example order")

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        if self.sources is not None and not self.sources:
            raise ValueError("sources is empty; list at least one source, or leave it unset to use path")
        if self.sources is not None and not self.stream:
            raise ValueError("sources need stream: true (or prepare them into one folder and set path)")
        if self.val_sources is not None and not self.stream:
            raise ValueError("val_sources need stream: true (a prepared data.path has its own val split)")
        return self

    def stream_sources(self) -> list[SourceConfig]:
        """The sources of a streamed run: `sources`, or `path` as the one source."""
        return self.sources if self.sources is not None else [SourceConfig(path=self.path)]


class LoRAConfig(Section):
    """LoRA adapters (gptkit.finetuning.lora): which layers, what rank."""

    r: int = Field(8, ge=1, description="rank of the change B @ A")
    alpha: float = Field(16.0, gt=0, description="the change is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(
        default_factory=lambda: ["c_attn", "attn.c_proj"],
        description="layers: c_attn, attn.c_proj, c_fc, mlp.c_proj; Llama's q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj; or globs over layer names",
    )
    train_biases: bool = Field(False, description="also train the model's biases")
    train_layernorms: bool = Field(False, description="also train LayerNorm weights and biases")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class FinetuneConfig(Section):
    """What to fine-tune from, and how (`gptkit finetune`); `base` None means pre-training."""

    base: str | None = Field(None, description="run folder, checkpoint or HuggingFace GPT-2 folder")
    method: Literal["full", "lora", "prompt"] = Field("lora", description="what trains")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    prompt_tokens: int = Field(20, ge=1, description="prompt tuning: trainable virtual tokens")
    prompt_init: str | None = Field(None, description="prompt tuning: text whose embeddings start it")

    @model_validator(mode="after")
    def _check_lora_trains_something(self) -> FinetuneConfig:
        lc = self.lora
        if self.method == "lora" and not lc.targets and not (lc.train_biases or lc.train_layernorms):
            raise ValueError(
                "lora.targets is empty, so nothing would train; name layers (c_attn, attn.c_proj, c_fc, "
                "mlp.c_proj), set lora.train_biases=true, or use finetune.method=full"
            )
        return self


class TrainConfig(Section):
    """The optimisation: steps, batch, optimiser, schedule, precision."""

    max_steps: int = Field(1000, ge=1, description="optimiser steps")
    micro_batch_size: int | Literal["auto"] = Field(16, description="sequences per forward pass, or auto")
    tokens_per_step: int | None = Field(
        None,
        ge=1,
        description="tokens per optimiser step; a multiple of micro-batch x block_size (None: one)",
    )
    lr: float = Field(6e-4, gt=0)
    min_lr: float = Field(6e-5, ge=0)
    schedule: Literal["cosine", "constant", "wsd"] = Field(
        "cosine", description="cosine: warm-up then cosine to min_lr; wsd: warm-up, stable, linear decay"
    )
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device multiplies bf16 natively, else fp32"
    )
    compile: bool = Field(False, description="torch.compile the model")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in the backward pass: less memory, about 1/3 more compute"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    seed: int = 1337
    max_bad_steps: int = Field(5, ge=1, description="stop after this many NaN/inf steps in a row")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (a model copy per process) or fsdp (sharded with fully_shard)"
    )
    dist_timeout_minutes: float = Field(
        10.0, gt=0, description="under torchrun: a rank silent this long in a collective ends the job"
    )

    @model_validator(mode="after")
    def _check_lr(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class EvalConfig(Section):
    """Validation loss on fixed batches, and samples from prompts, every N steps."""

    every: int = Field(100, ge=0, description="steps between evaluations; 0 = only at the end")
    batches: int = Field(20, ge=1, description="fixed val batches (the same ones each time)")
    prompts: list[str] = Field(default_factory=lambda: ["\n"], description="prompts to sample from")
    sample_tokens: int = Field(200, ge=0, description="tokens per sample; 0 = no samples")
    temperature: float = Field(0.8, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(200, ge=1)
    tasks: list[Literal["perplexity", "hellaswag", "lambada", "piqa"]] = Field(
        default_factory=list, description="zero-shot tasks (gptkit eval) run at every evaluation; [] = none"
    )
    task_limit: int | None = Field(200, ge=1, description="examples (perplexity: windows) per task; None=all")
    task_data: str = Field(EVAL_DATA_DIR, description="folder of the task files (see gptkit eval)")
    task_batch_size: int = Field(
        EVAL_BATCH_SIZE, ge=1, description="sequences per forward pass when scoring tasks"
    )


class CheckpointConfig(Section):
    """When to save, and how many to keep (the best by val loss is always kept)."""

    every_steps: int = Field(500, ge=0, description="0 = not by steps")
    every_minutes: float = Field(10.0, ge=0, description="at most this much work lost; 0 = not by time")
    keep_last: int = Field(3, ge=1)


class LogConfig(Section):
    """Where metrics go besides metrics.jsonl and the progress bar."""

    every: int = Field(10, ge=1, description="steps between metrics.jsonl lines")
    tensorboard: bool = False
    mlflow: bool = False
    mlflow_tracking_uri: str | None = Field(
        None, description="None: a SQLite store (mlflow.db) in the run folder"
    )
    wandb: bool = Field(False, description="Weights & Biases in offline mode, if installed")


class PrepareConfig(Section):
    """Settings of `gptkit prepare`; saved in the prepared data's meta.json."""

    tokenizer: str = Field(
        "gpt2", description="gpt2, char, bpe, or model:PATH (the tokenizer of a run, checkpoint or HF folder)"
    )
    vocab_size: int | None = Field(None, ge=260, le=4_294_967_295, description="bpe only")
    text_field: str = Field("text", min_length=1, description="field of .jsonl/.parquet/HF rows")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 1337
    workers: int = Field(2, ge=1, le=512)
    shard_tokens: int = Field(100_000_000, ge=1024, description="tokens per shard file at most")
    skip_bad: bool = Field(False, description="count and skip bad documents instead of stopping")

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        if value in ("gpt2", "char", "bpe") or (
            value.startswith(MODEL_TOKENIZER) and value[len(MODEL_TOKENIZER) :]
        ):
            return value
        raise ValueError(
            f"unknown tokenizer {value!r}; use gpt2, char, bpe or model:PATH (a run, checkpoint or HF folder)"
        )

    @model_validator(mode="after")
    def _vocab_only_for_bpe(self) -> PrepareConfig:
        if self.tokenizer == "bpe" and self.vocab_size is None:
            self.__dict__["vocab_size"] = 8192
        if self.tokenizer != "bpe" and self.vocab_size is not None:
            raise ValueError(f"vocab_size applies to the bpe tokenizer only, not to {self.tokenizer!r}")
        return self


class RunConfig(Section):
    """A whole run: the unit saved with every run folder and checkpoint."""

    name: str | None = Field(None, description="run folder name (default: the config file's name)")
    runs_dir: str = Field("runs", description="folder that holds run folders")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


T = TypeVar("T", bound=BaseModel)

# ---------------------------------------------------------------------------------------------
# Loading, overriding, reporting errors


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) section that `loc` points into, for typo suggestions."""
    for part in loc:
        field = schema.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        schema = ann
    return list(schema.model_fields)


def _dotted_fields(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key of a schema as a dotted path: train.lr, finetune.lora.r, ..."""
    out = []
    for name, field in schema.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _dotted_fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _elsewhere(key: str, schema: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """A key that belongs to another section (`lr=3e-4` for `train.lr=3e-4`): name its full key."""
    where = ".".join(str(p) for p in loc)
    found = [
        f for f in _dotted_fields(schema) if f.rsplit(".", 1)[-1] == key and f.rpartition(".")[0] != where
    ]
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


def format_validation_error(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    """One line per problem, each naming the dotted key; joined into a single message."""
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _fields_at(schema, loc[:-1])) or _elsewhere(
                str(loc[-1]), schema, loc[:-1]
            )
            problems.append(f"unknown key {key!r}{hint}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}{shown}")
    return f"invalid config in {source}: " + "; ".join(problems)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings → nested dict; values are parsed as YAML scalars (so 4 is an int)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise GptkitError(f"override {item!r} is not of the form key=value (e.g. model.n_layer=4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GptkitError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `extra` wins. Non-dict values replace whole subtrees."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"config file {str(path)!r} not found; pass a YAML file such as configs/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptkitError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GptkitError(
            f"config file {str(path)!r} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


def validate(schema: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise GptkitError(format_validation_error(e, schema, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type[T] = RunConfig,  # type: ignore[assignment]
) -> T:
    """YAML file (optional) + dotted overrides → validated config of `schema`."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    source = str(path) if path is not None else "overrides"
    return validate(schema, data, source)


def to_yaml(config: BaseModel) -> str:
    """The fully resolved config, as saved with runs and checkpoints."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
