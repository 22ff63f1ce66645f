"""Batch-1 greedy decoding of a Llama-style model on CPU: gptkit's PyTorch fallback against
HuggingFace's `LlamaForCausalLM.generate`, beside GPT-2 124M through gptkit's C kernel.

gptkit's C decoding step computes GPT-2's layers; a model with RMSNorm, SwiGLU, RoPE or GQA decodes
through `GPT.forward` (the fallback `gptkit sample` announces). This measures what that costs:

- SmolLM-135M's shape (`smollm-135m`: 30 layers, width 576, 9 query and 3 kv heads, SwiGLU 1536,
  49,152 tokens, tied head), random weights (seeded), prepared as `gptkit.load` prepares it
  (`gptkit.generate.inference.prepare`: fp32 with gptkit's CPU layers, int8, int4), decoded by the
  real `Sampler.token_steps`;
- HF's `LlamaForCausalLM` with the same weights (`gptkit.interop.llama.to_llama_state`), fp32,
  `generate(do_sample=False, use_cache=True)`: the reference, run in turns with gptkit's;
- GPT-2 124M fp32 through gptkit's kernel (as bench/generate_throughput.py), for the kernel's speed
  on a model of about the same size.

The same 32-token prompt (seeded random ids), 256 new tokens. Decode tokens/s = the 255 tokens after
the first over their time. Variants take turns A, B, C, ... for `--rounds` rounds; the table gives
medians and the spread (min-max) over rounds, and each row's ratio against HF's Llama.

    .venv/bin/python bench/variant_decode.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import copy
import os
import statistics

import torch
from generate_throughput import VOCAB, Variant, decoding_arguments, gptkit_run, hf_run, take_turns
from tables import markdown  # bench/tables.py: scripts run from bench/

from gptkit.generate.inference import prepare
from gptkit.interop.llama import llama_config, to_llama_state
from gptkit.model import GPT

SMOLLM_VOCAB = 49152


def hf_llama(model: GPT):  # -> LlamaForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**llama_config(model.config))
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(to_llama_state(model.state_dict(), model.config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def main() -> None:
    parser = decoding_arguments(__doc__.split("\n")[0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    torch.manual_seed(0)
    llama = GPT.from_preset("smollm-135m", SMOLLM_VOCAB).eval()
    prompt = torch.randint(
        0, SMOLLM_VOCAB, (args.prompt,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    hf = hf_llama(llama)
    cpu = torch.device("cpu")
    variants = [Variant("HF LlamaForCausalLM fp32", hf_run(hf, prompt, args.new), 0, 0)]
    for mode in (None, "int8", "int4"):
        ours = prepare(copy.deepcopy(llama), cpu, mode)
        variants.append(
            Variant(f"gptkit {mode or 'fp32'} (PyTorch fallback)", gptkit_run(ours, prompt, args.new), 0, 0)
        )
    gpt2 = prepare(GPT.from_preset("gpt2", VOCAB).eval(), cpu)
    gpt2_prompt = [i % VOCAB for i in prompt]
    variants.append(
        Variant("GPT-2 124M, gptkit fp32 (C kernel)", gptkit_run(gpt2, gpt2_prompt, args.new), 0, 0)
    )

    take_turns(variants, args.rounds, args.new)

    def rates(v: Variant) -> list[float]:
        return [(args.new - 1) / d for d in v.decode]

    reference = statistics.median(rates(variants[0]))
    rows = []
    for v in variants:
        r = rates(v)
        rows.append(
            [
                v.name,
                f"{statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f})",
                f"{statistics.median(v.ttft) * 1000:.0f}",
                f"{statistics.median(r) / reference:.2f}x",
            ]
        )
    print(markdown(["decoding", "tok/s (spread)", "TTFT ms", "vs HF Llama"], rows))
    same = variants[1].tokens == variants[0].tokens
    print(f"gptkit fp32's {args.new} greedy tokens equal HF's: {same}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
