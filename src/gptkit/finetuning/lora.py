"""LoRA (Hu et al., 2021): train a low-rank change B @ A of chosen weight matrices, not the weights.

A `LoRALinear` wraps one of the model's `nn.Linear` layers and adds `scale * B @ A x` to its output,
with A (r x in) random and B (out x r) zero at the start, so training starts from the base model's
exact outputs. Only A and B (and optionally biases and LayerNorms) are trained: a few hundred
thousand parameters instead of millions, and an optimiser state to match.

Several adapters can sit on one layer, each with a weight, at inference (their changes add up);
`merge` folds them into the base weights. Adapters are saved in HuggingFace peft's layout
(`adapter_config.json` + `adapter_model.safetensors`, tensors named
`base_model.model.<module>.lora_A.weight`), which peft loads onto the HF-exported model: our
`nn.Linear` computes x @ W.T, HF's GPT-2 `Conv1D` x @ W, and peft's `fan_in_fan_out` takes care
of that, so A and B are the same tensors on both sides.

Llama's projection names are targets too. `o_proj` and `down_proj` are whole layers (`attn.c_proj`,
`mlp.c_proj`); `q_proj`, `k_proj`, `v_proj` are rows of the fused `attn.c_attn`, `gate_proj` and `up_proj`
rows of `mlp.c_fc`: each gets an adapter pair of its own that changes only its rows, as peft's LoRA
on the separate HF layers would. Such an adapter part is named `adapter:start:stop` (its rows) inside
the layer.

A Llama-architecture model's adapter is saved under HF Llama's names
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `fan_in_fan_out: false`), which
peft loads onto the `LlamaForCausalLM` that `gptkit export hf` writes: a projection's own adapter keeps
its A and B; an adapter on a whole fused layer gives each projection the same A and its own rows of
B, which is the same change. Adapters peft cannot express (rows that are not one projection, two
adapters of one name on one projection) and GPT-2-shaped models keep gptkit's names, with the parts
saved as `<layer>:start:stop` (gptkit loads them back; peft does not).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import LoRAConfig, did_you_mean
from gptkit.errors import GptkitError
from gptkit.variants import is_llama

# The Linear layers of a GPT block, by the suffix of their module name.
TARGETS = {
    "c_attn": "attn.c_attn",  # queries, keys and values
    "attn.c_proj": "attn.c_proj",  # attention output
    "c_fc": "mlp.c_fc",  # MLP up-projection
    "mlp.c_proj": "mlp.c_proj",  # MLP down-projection
}
# Llama's names: (layer, part of its rows: the index among the fused projections)
LLAMA_TARGETS = {
    "q_proj": ("attn.c_attn", 0),
    "k_proj": ("attn.c_attn", 1),
    "v_proj": ("attn.c_attn", 2),
    "o_proj": ("attn.c_proj", None),
    "gate_proj": ("mlp.c_fc", 0),
    "up_proj": ("mlp.c_fc", 1),
    "down_proj": ("mlp.c_proj", None),
}
# Llama's projections inside HF's model.layers.{i}
LLAMA_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
ADAPTER_DIR = "adapter"  # inside a LoRA run's folder: the adapter alone, in peft's layout
GPTKIT_META = "gptkit_adapter.json"  # beside peft's files: what base the adapter was trained on


class LoRALinear(nn.Module):
    """`base(x) + sum over adapters of weight * scale * B @ A dropout(x)`."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.weights: dict[str, float] = {}  # per adapter, at inference (stacking)
        self.dropouts = nn.ModuleDict()

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def add(self, name: str, config: LoRAConfig, rows: tuple[int, int] | None = None) -> None:
        """Adapter `name` on the whole layer, or on output `rows` [start, stop) only (one projection
        of a fused layer), then kept as `name:start:stop`."""
        base = self.base
        if rows is not None:
            name = f"{name}:{rows[0]}:{rows[1]}"
        out = base.out_features if rows is None else rows[1] - rows[0]
        a = torch.empty(config.r, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(out, config.r, device=a.device, dtype=a.dtype))
        self.scales[name] = config.scale
        self.weights[name] = 1.0
        self.dropouts[name] = nn.Dropout(config.dropout)

    def delta(self, name: str) -> Tensor:
        """The adapter's change of the weight matrix (out x in), scaled and weighted."""
        return (self.lora_B[name] @ self.lora_A[name]) * (self.scales[name] * self.weights[name])

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for name in self.lora_A:
            h = self.dropouts[name](x) @ self.lora_A[name].T
            change = (h @ self.lora_B[name].T) * (self.scales[name] * self.weights[name])
            start, stop = self.rows(name)
            out = out + F.pad(change, (start, self.base.out_features - stop))
        return out

    def rows(self, name: str) -> tuple[int, int]:
        """The output rows adapter part `name` changes: all, or those its name ends with."""
        _, *bounds = name.split(":")
        return (int(bounds[0]), int(bounds[1])) if bounds else (0, self.base.out_features)


def parts_of(layer: LoRALinear, name: str) -> list[str]:
    """The keys of adapter `name` in a layer: `name` itself and its row parts `name:start:stop`."""
    return [k for k in layer.lora_A if k.split(":")[0] == name]


def _fused_rows(model: nn.Module, layer: str, part: int) -> tuple[int, int]:
    """Rows [start, stop) of projection `part` in a fused layer: [q; k; v] or [gate; up]."""
    c = model.config  # type: ignore[attr-defined]
    kv = c.kv_heads * c.head_dim
    sizes = [c.n_embd, kv, kv] if layer.endswith("attn.c_attn") else [c.hidden, c.hidden]
    if layer.endswith("mlp.c_fc") and c.mlp != "swiglu":
        raise GptkitError("LoRA targets gate_proj and up_proj need a SwiGLU MLP (model.mlp=swiglu); use c_fc")
    return sum(sizes[:part]), sum(sizes[: part + 1])


def _target_names(model: nn.Module, targets: list[str]) -> list[tuple[str, tuple[int, int] | None]]:
    """(layer name, rows or None for all) of what the targets pick; an error lists the available ones.
    A target is a GPT-2 or Llama layer name, a glob over layer names, or `layer:start:stop`."""
    linears = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear) and n != "lm_head"
    ]
    linears = [n for n in linears if not n.endswith(".base")]
    chosen: list[tuple[str, tuple[int, int] | None]] = []
    for target in targets:
        glob, *bounds = target.split(":")
        part = None
        if glob in LLAMA_TARGETS:
            glob, part = LLAMA_TARGETS[glob]
        pattern = TARGETS.get(glob, glob)
        hits = [n for n in linears if n.endswith("." + pattern) or fnmatch.fnmatch(n, pattern)]
        if not hits:
            kinds = sorted(TARGETS) + sorted(LLAMA_TARGETS)
            raise GptkitError(
                f"LoRA target {target!r} matches no layer{did_you_mean(target, kinds)}; use "
                f"{', '.join(kinds)} or a glob over layer names such as {linears[0]!r}"
            )
        for hit in hits:
            rows = (int(bounds[0]), int(bounds[1])) if bounds else None
            if part is not None:
                rows = _fused_rows(model, hit, part)
            if (hit, rows) not in chosen:
                chosen.append((hit, rows))
    return chosen


def add_lora(model: nn.Module, config: LoRAConfig, name: str = "default") -> list[str]:
    """Wrap the target layers with adapter `name` and freeze everything else (but what the config
    says to train). Returns the wrapped layer names."""
    chosen = _target_names(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer_name, rows in chosen:
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            setattr(parent, child, layer)
        key = name if rows is None else f"{name}:{rows[0]}:{rows[1]}"
        if key in layer.lora_A:
            raise GptkitError(f"layer {layer_name} already has an adapter named {name!r}; pick another name")
        layer.add(name, config, rows)
    for module in model.modules():
        if config.train_layernorms and isinstance(module, nn.LayerNorm | nn.RMSNorm):
            module.requires_grad_(True)
        if config.train_biases and not isinstance(module, LoRALinear):
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
    return list(dict.fromkeys(n for n, _ in chosen))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_adapter_weight(model: nn.Module, name: str, weight: float) -> None:
    """How much of adapter `name` to apply (stacking several at inference)."""
    parts = [(m, k) for m in lora_layers(model).values() for k in parts_of(m, name)]
    if not parts:
        raise GptkitError(f"no adapter named {name!r} is loaded")
    for layer, key in parts:
        layer.weights[key] = weight


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight and unwrap the layers: a plain model again."""
    for layer_name, layer in lora_layers(model).items():
        with torch.no_grad():
            for name in layer.lora_A:
                start, stop = layer.rows(name)
                layer.base.weight[start:stop] += layer.delta(name).to(layer.base.weight.dtype)
        parent_name, _, child = layer_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)


def base_fingerprint(model: nn.Module) -> str:
    """A checksum of the base weights an adapter belongs to (shapes and a sample of values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base.", ".")
        flat = tensor.detach().float().flatten()
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(
    model: nn.Module, out: str | Path, config: LoRAConfig, name: str = "default", base: str = ""
) -> Path:
    """Adapter `name` as a peft folder (loadable by peft) plus gptkit's note of its base."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = _llama_pairs(model, name) if is_llama(model.config) else None  # type: ignore[arg-type]
    if pairs is None:
        pairs = {
            f"{layer_name}{part.removeprefix(name)}": (layer.lora_A[part], layer.lora_B[part])
            for layer_name, layer in lora_layers(model).items()
            for part in parts_of(layer, name)  # part: name or name:start:stop
        }
    if not pairs:
        raise GptkitError(f"the model has no adapter named {name!r} to save")
    tensors: dict[str, Tensor] = {}
    for module, (a, b) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().cpu().clone()  # a copy each
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().cpu().clone()
    llama_names = next(iter(pairs)).startswith("model.layers.")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in pairs}),
        "fan_in_fan_out": not llama_names,  # HF GPT-2's Conv1D keeps (in, out); Llama's Linear (out, in)
        "bias": "none",
        "base_model_name_or_path": base,
        "inference_mode": True,
    }
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=1) + "\n")
    meta = {
        "lora": config.model_dump(),
        "base_fingerprint": base_fingerprint(model),
        "layers": sorted(tensors),
    }
    (out / GPTKIT_META).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _projection_rows(model: nn.Module, layer_name: str, out_features: int) -> dict[str, tuple[int, int]]:
    """HF Llama's projections in gptkit's layer `transformer.h.{i}.<layer>`, each with its rows."""
    ours = layer_name.split(".", 3)[3]
    return {
        proj: (0, out_features) if part is None else _fused_rows(model, layer_name, part)
        for proj, (layer, part) in LLAMA_TARGETS.items()
        if layer == ours
    }


def _llama_pairs(model: nn.Module, name: str) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Adapter `name` as (A, B) of HF Llama's modules (`model.layers.{i}.self_attn.q_proj`, ...), or
    None when peft cannot express it on those modules."""
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for layer_name, layer in lora_layers(model).items():
        projections = _projection_rows(model, layer_name, layer.base.out_features)
        i = layer_name.split(".")[2]
        for part in parts_of(layer, name):
            start, stop = layer.rows(part)
            a, b = layer.lora_A[part], layer.lora_B[part]
            if (start, stop) == (0, layer.base.out_features):  # the whole layer: its rows of B each
                chosen = {proj: (a, b[s:e]) for proj, (s, e) in projections.items()}
            else:
                chosen = {proj: (a, b) for proj, rows in projections.items() if rows == (start, stop)}
            if not chosen:
                return None  # rows that are not one projection
            for proj, pair in chosen.items():
                module = f"model.layers.{i}.{LLAMA_MODULES[proj]}"
                if module in pairs:
                    return None  # two adapter parts on one projection
                pairs[module] = pair
    return pairs


def _gptkit_module(model: nn.Module, module: str) -> str:
    """A module named in an adapter file -> gptkit's layer (with rows for a fused projection): HF
    Llama's `model.layers.{i}.self_attn.q_proj` becomes `transformer.h.{i}.attn.c_attn:0:64`."""
    if not module.startswith("model.layers."):
        return module
    _, _, i, inside = module.split(".", 3)
    proj = inside.rsplit(".", 1)[-1]
    if LLAMA_MODULES.get(proj) != inside:
        raise GptkitError(
            f"adapter layer {module!r} is not a Llama projection; gptkit's Llama layers are "
            f"{', '.join(LLAMA_MODULES.values())}"
        )
    layer, part = LLAMA_TARGETS[proj]
    name = f"transformer.h.{i}.{layer}"
    if part is None:
        return name
    start, stop = _fused_rows(model, name, part)
    return f"{name}:{start}:{stop}"


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, weight: float = 1.0) -> str:
    """Add the adapter saved at `path` (by gptkit, or by peft for GPT-2 or Llama) to `model`; returns
    its name.

    A gptkit adapter is checked against the base it was trained on (its fingerprint); a peft one
    by its tensor shapes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise GptkitError(
            f"{str(path)!r} is not an adapter folder (adapter_config.json and adapter_model.safetensors)"
        )
    peft: dict[str, Any] = json.loads(config_file.read_text())
    if peft.get("peft_type") != "LORA":
        raise GptkitError(
            f"adapter {str(path)!r} is {peft.get('peft_type')}, not LORA; gptkit loads LoRA only"
        )
    meta_file = path / GPTKIT_META
    if meta_file.is_file():
        expected = json.loads(meta_file.read_text())["base_fingerprint"]
        if expected != base_fingerprint(model):
            raise GptkitError(
                f"adapter {str(path)!r} was trained on another base model (checksum {expected} vs "
                f"{base_fingerprint(model)}); load it onto the checkpoint it was trained from"
            )
    tensors = load_file(str(weights_file))
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        layers.setdefault(_gptkit_module(model, module), {})[part.split(".")[0]] = tensor
    r = int(peft["r"])
    config = LoRAConfig(r=r, alpha=float(peft["lora_alpha"]), dropout=0.0, targets=sorted(layers))
    loaded = {n.split(":")[0] for m in lora_layers(model).values() for n in m.lora_A}
    name = name or f"adapter{len(loaded)}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    add_lora(model, config, name)
    for n, p in model.named_parameters():  # loading for inference must not change what trains
        p.requires_grad_(n in trainable)
    for module, parts in layers.items():
        layer_name, *bounds = module.split(":")
        layer = model.get_submodule(layer_name)
        assert isinstance(layer, LoRALinear)
        key = ":".join([name, *bounds])
        for part in ("A", "B"):
            target = getattr(layer, f"lora_{part}")[key]
            if parts[part].shape != target.shape:
                raise GptkitError(
                    f"adapter {str(path)!r}: {module}.lora_{part} has shape {tuple(parts[part].shape)}, the "
                    f"model needs {tuple(target.shape)}; it belongs to a model of another shape"
                )
            with torch.no_grad():
                target.copy_(parts[part])
    set_adapter_weight(model, name, weight)
    return name
