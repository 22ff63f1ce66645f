"""HuggingFace folders, both ways: export (`GPT2LMHeadModel` or `LlamaForCausalLM`, + tokenizer) and
import. A model with GPT-2's switches is a `GPT2LMHeadModel`, one with Llama's a `LlamaForCausalLM`
(whose mapping is `gptkit.interop.llama`'s); what follows is about GPT-2.

The weight mapping lives here once. gptkit's module names equal HF's (`transformer.h.0.attn.c_attn`, ...);
what differs:
- HF's Conv1D stores (in, out) weights, our nn.Linear (out, in): `c_attn`, `c_proj`, `c_fc` are
  transposed both ways.
- Our embedding has padding rows up to a multiple of `pad_vocab_multiple`: cut on export, zero rows
  added on import.
- `lm_head` is tied to `wte` on both sides: HF files omit it (or repeat `wte`).
- A `bias=False` model exports zero biases (HF GPT-2 always has them; zeros give the same logits).
Old HF files (and the original `gpt2` download) name tensors without `transformer.` and carry the
causal mask as `attn.bias`/`attn.masked_bias` buffers: both are accepted, the buffers ignored.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from torch import Tensor

from gptkit.config import ModelConfig, RunConfig, validate
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.interop import check_plain, gpt2_misfits, require, save_weights, staged_output
from gptkit.interop.llama import (
    LLAMA_ARCHITECTURES,
    from_llama_state,
    llama_config,
    llama_fields,
    to_llama_state,
)
from gptkit.model import GPT, LAYER_NORM_EPS
from gptkit.tokenizer import (
    EOT,
    GPT2_EOT_ID,
    GPT2_RANKS_SHA256,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    _unicode_to_byte,
    gpt2_tokenizer,
)
from gptkit.variants import is_llama

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers in older files
GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
SUPPORTED = (*GPT2_ARCHITECTURES, *LLAMA_ARCHITECTURES)  # what `gptkit import hf` reads
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # tanh-approximate GELU, as ours
MERGES_HEADER = "#version: 0.2\n"


# ------------------------------------------------------------------------------------------ weights


def to_hf_state(model: GPT) -> dict[str, Tensor]:
    """The model's weights as HF `GPT2LMHeadModel` tensors (fp32, contiguous, no shared storage)."""
    c = model.config
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied to wte; HF re-ties it on load
            continue
        if name == "transformer.wte.weight":
            t = t[: c.vocab_size]
        elif name.endswith(CONV1D):
            t = t.t()
        out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()
    if not c.bias:  # zero biases: HF's layers always add one, and zeros add nothing
        for name in list(out):
            if name.endswith(".weight") and name not in ("transformer.wte.weight", "transformer.wpe.weight"):
                width = out[name].shape[-1] if name.endswith(CONV1D) else out[name].shape[0]
                out[name.removesuffix(".weight") + ".bias"] = torch.zeros(width)
    return out


def from_hf_state(state: dict[str, Tensor], config: ModelConfig, source: str) -> dict[str, Tensor]:
    """HF GPT-2 tensors (any of HF's naming eras) -> a state dict for `GPT(config)` (embedding padded)."""
    out: dict[str, Tensor] = {}
    lm_head = None
    for name, t in state.items():
        if name.endswith(IGNORED):
            continue
        if name == "lm_head.weight":
            lm_head = t
            continue
        key = name if name.startswith("transformer.") else f"transformer.{name}"
        out[key] = (t.t() if key.endswith(CONV1D) else t).to(torch.float32).contiguous()
    wte = out.get("transformer.wte.weight")
    if wte is None:
        raise GptkitError(f"{source} has no token embedding (wte.weight); it is not a GPT-2 checkpoint")
    if lm_head is not None and not torch.equal(lm_head.to(torch.float32), wte):
        raise GptkitError(
            f"{source} has an output layer (lm_head) that differs from its token embedding; gptkit's GPT "
            "ties the two, so this checkpoint cannot be imported"
        )
    padded = torch.zeros(config.padded_vocab_size, wte.size(1))
    padded[: wte.size(0)] = wte
    out["transformer.wte.weight"] = out["lm_head.weight"] = padded
    return out


def _load_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a HF folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    single, index, pickle = (
        folder / n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    )
    try:
        if single.is_file() or index.is_file():
            st = require("safetensors.torch", "reading HuggingFace weights")
            if single.is_file():
                return st.load_file(single)
            state: dict[str, Tensor] = {}
            for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(st.load_file(folder / name))
            return state
        if pickle.is_file():
            return torch.load(pickle, map_location="cpu", weights_only=True)
    except GptkitError:
        raise
    except Exception as e:  # safetensors and torch raise many types for damaged files
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise GptkitError(
            f"the weights in {str(folder)!r} are damaged ({first}); download them again"
        ) from None
    raise GptkitError(
        f"{str(folder)!r} has no weights (model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin)"
    )


# ------------------------------------------------------------------------------------------- config


def hf_config(model: GPT, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of the equivalent `LlamaForCausalLM` or `GPT2LMHeadModel`."""
    c = model.config
    if is_llama(c):
        ids = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        head = {"architectures": list(LLAMA_ARCHITECTURES), "model_type": "llama", "torch_dtype": "float32"}
        return {**head, **llama_config(c), **ids, "use_cache": True}
    misfits = gpt2_misfits(c)
    if misfits:
        raise GptkitError(
            f"HuggingFace export writes GPT-2 or Llama models; this one is neither ({', '.join(misfits)} "
            "differ from GPT-2; Llama needs norm rmsnorm, mlp swiglu and position rope)"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # older readers (llama.cpp's converter) read n_ctx
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # tanh-approximate, as ours
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "tie_word_embeddings": True,
    }


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a GPT-2 or Llama folder; anything else (or a GPT-2 our model cannot express) is an
    error (a Llama's limits are checked by `llama_fields`)."""
    if not folder.is_dir():
        raise GptkitError(
            f"{str(folder)!r} is not a folder; pass a HuggingFace model folder (with config.json)"
        )
    path = folder / "config.json"
    if not path.is_file():
        raise GptkitError(f"{str(folder)!r} has no config.json; it is not a HuggingFace model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GptkitError(f"{path} is not valid JSON ({e}); repair or re-download it") from None
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "llama" and (not archs or set(archs) & set(LLAMA_ARCHITECTURES)):
        return cfg
    if model_type != "gpt2" or (archs and not set(archs) & set(GPT2_ARCHITECTURES)):
        found = ", ".join(archs) or "no architecture listed"
        raise GptkitError(
            f"{str(folder)!r} holds a {model_type!r} model ({found}), which gptkit does not support; "
            f"gptkit imports {', '.join(SUPPORTED)} checkpoints"
        )
    n_embd = cfg.get("n_embd", 768)
    checks = [
        (cfg.get("activation_function", "gelu_new") in TANH_GELUS, "activation_function", "gelu_new"),
        (
            abs(cfg.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) < 1e-12,
            "layer_norm_epsilon",
            1e-5,
        ),
        (cfg.get("n_inner") in (None, 4 * n_embd), "n_inner", 4 * n_embd),
        (cfg.get("scale_attn_weights", True), "scale_attn_weights", True),
        (not cfg.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx", False),
        (not cfg.get("add_cross_attention", False), "add_cross_attention", False),
    ]
    bad = [f"{key}={cfg.get(key)!r} (gptkit's GPT has {ours!r})" for ok, key, ours in checks if not ok]
    if bad:
        raise GptkitError(f"{str(folder)!r} is a GPT-2 variant gptkit cannot express: {'; '.join(bad)}")
    return cfg


# ---------------------------------------------------------------------------------------- tokenizer


@functools.cache
def gpt2_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json and merges.txt, derived from the shipped tiktoken ranks (nothing read from
    outside the package): a token's id is its rank, and the merge that made a token is the last step
    of running BPE on its bytes with the merges ranked before it."""
    data = resources.files("gptkit").joinpath("assets/gpt2.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise GptkitError(
            "gptkit/assets/gpt2.tiktoken is damaged or replaced (sha256 mismatch); reinstall gptkit"
        )
    ranks = {
        base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)
    }
    to_unicode = {b: ch for ch, b in _unicode_to_byte().items()}

    def spell(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {spell(token): rank for token, rank in ordered}
    vocab[EOT] = GPT2_EOT_ID
    merges = []
    for token, rank in ordered:
        if len(token) > 1:
            left, right = _last_merge(ranks, token, rank)
            merges.append((spell(left), spell(right)))
    return vocab, merges


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise GptkitError(f"GPT-2 rank {rank} cannot be made by one merge; the ranks file is damaged")
    return parts[0], parts[1]


def gpt2_files() -> tuple[str, str]:
    """The text of vocab.json and merges.txt, byte for byte as OpenAI's encoder.json and vocab.bpe."""
    vocab, merges = gpt2_vocab_merges()
    return json.dumps(vocab), MERGES_HEADER + "".join(f"{a} {b}\n" for a, b in merges)


def hf_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """The HF `tokenizers` object that gives the same ids as `tokenizer` on any text it can encode.

    `char` becomes a WordLevel model over single characters with a concatenating decoder; characters
    outside its vocabulary map to the end-of-text id (HF's unknown token) where gptkit raises.
    """
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab, merges = gpt2_vocab_merges()
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        hf.decoder = decoders.ByteLevel()
    elif isinstance(tokenizer, BPETokenizer | SentencePieceTokenizer):
        return tokenizers.Tokenizer.from_str(tokenizer.describe()["hf_json"])
    elif isinstance(tokenizer, CharTokenizer):
        chars = tokenizer.describe()["chars"]
        vocab = {ch: i for i, ch in enumerate(chars)} | {EOT: tokenizer.eot_id}
        hf = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    else:
        raise GptkitError(f"the {tokenizer.kind} tokenizer has no HuggingFace equivalent in this gptkit")
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return hf


def write_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """tokenizer.json (plus vocab.json and merges.txt for GPT-2's) and the tokenizer's config files."""
    (folder / "tokenizer.json").write_text(hf_tokenizer(tokenizer).to_str(), encoding="utf-8")
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab, merges = gpt2_files()
        (folder / "vocab.json").write_text(vocab, encoding="utf-8")
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
    eos = tokenizer.describe()["eos"] if isinstance(tokenizer, SentencePieceTokenizer) else EOT
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    config = {
        "tokenizer_class": "GPT2Tokenizer"
        if isinstance(tokenizer, GPT2Tokenizer)
        else "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,  # decode gives back exactly the text
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The gptkit tokenizer equal to a HF folder's: GPT-2's, a byte-level BPE, a SentencePiece-style BPE
    (byte fallback, as Llama's), or a character vocabulary."""
    vocab_file, merges_file, json_file = (folder / n for n in ("vocab.json", "merges.txt", "tokenizer.json"))
    gpt2_vocab, gpt2_merges = gpt2_vocab_merges()
    try:
        if vocab_file.is_file() and merges_file.is_file():
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            merges = _merge_pairs(merges_file.read_text(encoding="utf-8").splitlines())
            if vocab == gpt2_vocab and merges == gpt2_merges:
                return gpt2_tokenizer()
        if json_file.is_file():
            text = json_file.read_text(encoding="utf-8")
            model = json.loads(text).get("model") or {}
            kind = model.get("type")
            same_vocab = _without_eot(model.get("vocab") or {}) == _without_eot(gpt2_vocab)
            if kind == "BPE" and same_vocab and _merge_pairs(model.get("merges") or []) == gpt2_merges:
                return gpt2_tokenizer()
            if kind == "WordLevel":
                return _char_tokenizer(model.get("vocab") or {}, folder)
            if kind == "BPE" and model.get("byte_fallback"):  # SentencePiece-style (Llama's)
                return SentencePieceTokenizer(tokenizers.Tokenizer.from_str(text), _eos_token(folder))
            if kind == "BPE":
                return BPETokenizer(tokenizers.Tokenizer.from_str(text))
            raise GptkitError(
                f"{str(folder)!r} has a {kind} tokenizer; gptkit uses GPT-2's, byte-level BPE, "
                "SentencePiece-style BPE (byte fallback) or characters"
            )
    except (ValueError, UnicodeDecodeError) as e:
        raise GptkitError(
            f"the tokenizer files in {str(folder)!r} are damaged ({e}); re-download them"
        ) from None
    if vocab_size == GPT2_EOT_ID + 1:
        notice(f"{folder} has no tokenizer files; assuming GPT-2's tokenizer (its vocabulary size matches)")
        return gpt2_tokenizer()
    raise GptkitError(
        f"{str(folder)!r} has no tokenizer gptkit can use (tokenizer.json, or vocab.json + merges.txt); "
        "add the tokenizer files the model was trained with"
    )


def _eos_token(folder: Path) -> str:
    """The end-of-sequence token tokenizer_config.json names (a string or {"content": ...}); "</s>"."""
    path = folder / "tokenizer_config.json"
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token") if path.is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else "</s>"


def _without_eot(vocab: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in vocab.items() if k != EOT}


def _merge_pairs(lines: list[Any]) -> list[tuple[str, str]]:
    """Merges as pairs, from merges.txt lines or tokenizer.json (either "a b" strings or [a, b] lists)."""
    pairs = []
    for line in lines:
        if isinstance(line, str):
            if line.startswith("#version") or not line:
                continue
            a, _, b = line.partition(" ")
            pairs.append((a, b))
        else:
            pairs.append((line[0], line[1]))
    return pairs


def _char_tokenizer(vocab: dict[str, int], folder: Path) -> CharTokenizer:
    """gptkit's char vocabulary as exported: single characters in sorted order, then end-of-text."""
    chars = "".join(sorted((k for k in vocab if k != EOT), key=vocab.__getitem__))
    if vocab.get(EOT) != len(chars) or any(len(k) != 1 for k in chars) or list(chars) != sorted(chars):
        raise GptkitError(
            f"{str(folder)!r} has a WordLevel tokenizer that is not a gptkit character vocabulary; "
            "gptkit uses GPT-2's, byte-level BPE or characters"
        )
    return CharTokenizer(chars)


# ------------------------------------------------------------------------------------ export/import


def export_hf(model: GPT, tokenizer: Tokenizer, out: str | Path, *, force: bool = False) -> Path:
    """Write a folder that transformers' `from_pretrained` loads as a `GPT2LMHeadModel` (or, for a model
    with Llama's switches, a `LlamaForCausalLM`) and tokenizer."""
    check_plain(model, "HuggingFace")
    st = require("safetensors.torch", "HuggingFace export")
    config = hf_config(model, tokenizer)  # first: a model HF cannot express is refused before writing
    state = to_llama_state(model.state_dict(), model.config) if is_llama(model.config) else to_hf_state(model)
    with staged_output(out, force, folder=True) as tmp:
        st.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        _write_json(tmp / "generation_config.json", generation)
        write_tokenizer(tokenizer, tmp, model.config.block_size)
    return Path(out)


def load_hf(folder: str | Path) -> tuple[GPT, Tokenizer, RunConfig]:
    """A HF GPT-2 or Llama folder as a gptkit model (CPU, eval mode), tokenizer and run config."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    vocab_size = int(cfg.get("vocab_size", GPT2_EOT_ID + 1))
    tokenizer = read_tokenizer(folder, vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise GptkitError(
            f"{folder}/config.json says vocab_size {vocab_size} but its tokenizer has {tokenizer.vocab_size} "
            "ids; gptkit needs the two to agree"
        )
    llama = cfg.get("model_type") == "llama"
    where = f"{folder}/config.json"
    if llama:
        model_fields = llama_fields(cfg, where) | {"vocab_size": vocab_size}
    else:
        model_fields = dict(
            n_layer=cfg.get("n_layer", 12),
            n_head=cfg.get("n_head", 12),
            n_embd=cfg.get("n_embd", 768),
            block_size=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
            vocab_size=vocab_size,
            dropout=cfg.get("resid_pdrop", 0.1),
            bias=True,
        )
    config = validate(RunConfig, {"name": folder.name, "model": model_fields}, where)
    read = from_llama_state if llama else from_hf_state
    state = read(_load_weights(folder), config.model, repr(str(folder)))
    model = GPT(config.model)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        family = "Llama" if llama else "GPT-2"
        raise GptkitError(
            f"the weights in {str(folder)!r} do not fit the {family} its config.json describes (missing: "
            f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes: the first "size mismatch for ..." line names the tensor
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:120])
        raise GptkitError(f"the weights in {str(folder)!r} do not fit its config.json ({detail})") from None
    return model.eval(), tokenizer, config


def _key_mismatch(model: GPT, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - state.keys()), sorted(state.keys() - expected)


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
HUB_FILES = ["*.json", "*.safetensors", "merges.txt"]  # config, weights, tokenizer: nothing else


def hub_folder(source: str | Path) -> Path:
    """A local folder as it is; a hub name (`owner/name`) that is not a local path resolved through
    huggingface_hub: downloaded when online, read from the local cache when offline (HF_HUB_OFFLINE=1)."""
    path = Path(source)
    if path.exists() or not HUB_NAME.fullmatch(str(source)):
        return path
    hub = require("huggingface_hub", "importing a model from the HuggingFace hub")
    errors = require("huggingface_hub.errors", "importing a model from the HuggingFace hub")
    try:
        folder = Path(hub.snapshot_download(str(source), allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # older repositories: pickled weights only
            folder = Path(hub.snapshot_download(str(source), allow_patterns=["pytorch_model.bin"]))
    except errors.LocalEntryNotFoundError:
        raise GptkitError(
            f"{source!r} is neither a local folder nor in the HuggingFace cache, and the hub cannot be "
            "reached (offline); download it once online, or pass a local folder"
        ) from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        first = str(e).splitlines()[0]
        raise GptkitError(f"the hub has no model {source!r} you can read ({first})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptkitError(f"downloading {source!r} from the hub failed ({first}); try again") from None
    return folder


def import_hf(folder: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """A HF GPT-2 or Llama folder (or hub name) -> a gptkit checkpoint (`.pt`, or weights-only
    `.safetensors`) at step 0."""
    folder = hub_folder(folder)
    model, tokenizer, config = load_hf(folder)
    progress = {"step": 0, "tokens": 0, "imported_from": str(Path(folder).resolve())}
    return save_weights(model, tokenizer, config, out, force=force, progress=progress)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
