#!/usr/bin/env python3
"""Hugging Face transformers vs shardline on the same CPU and the same weights.

Writes a random-weight bf16 checkpoint with the shape of a config (so both
engines read identical weights), times transformers' greedy `generate` with a
fixed number of new tokens (bf16 and f32 compute), then runs
`shardline bench` on that checkpoint, and prints one table with the ratio.

    python3 benches/hf_peer.py --config configs/models/qwen2.5-0.5b.json \
        --shardline target/release/shardline

Needs torch and transformers (pip); the default output folder is reused.
"""
import argparse
import json
import os
import subprocess
import time

import torch
from transformers import AutoConfig, Qwen2ForCausalLM


def make_checkpoint(config_path, out, seed):
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def time_generate(model, prompt, new_tokens):
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def hf_speeds(out, dtype, prompt_len, decode_tokens, repeats):
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    time_generate(model, prompt, 2)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        one = time_generate(model, prompt, 1)
        many = time_generate(model, prompt, decode_tokens + 1)
        prefill.append(prompt_len / one)
        decode.append(decode_tokens / (many - one))
    return sorted(prefill)[len(prefill) // 2], sorted(decode)[len(decode) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--shardline", default="target/release/shardline")
    p.add_argument("--out", default=None, help="checkpoint folder (default /tmp/shardline-peer-<config name>)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    name = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or f"/tmp/shardline-peer-{name}"
    make_checkpoint(args.config, out, seed=0)

    rows = []
    for label, dtype in [("transformers bf16", torch.bfloat16), ("transformers f32", torch.float32)]:
        prefill, decode = hf_speeds(out, dtype, args.prompt_len, args.decode_tokens, args.repeats)
        rows.append((f"{label} (torch {torch.__version__}, {torch.get_num_threads()} threads)", prefill, decode))
    ours = json.loads(subprocess.run(
        [args.shardline, "bench", "--model", out, "--prompt-len", str(args.prompt_len),
         "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats), "--json"],
        check=True, capture_output=True, text=True).stdout)
    rows.append(("shardline (cpu backend, bf16 weights)", ours["prefill_tokens_per_s"], ours["decode_tokens_per_s"]))

    best_hf_prefill = max(r[1] for r in rows[:-1])
    best_hf_decode = max(r[2] for r in rows[:-1])
    print(f"{name}: {args.prompt_len}-token prompt, {args.decode_tokens} decoded tokens, batch 1, median of {args.repeats}")
    print(f"{'engine':<58} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for label, prefill, decode in rows:
        print(f"{label:<58} {prefill:>14.1f} {decode:>13.2f}")
    print(f"shardline / best transformers: prefill {ours['prefill_tokens_per_s'] / best_hf_prefill:.2f}x, "
          f"decode {ours['decode_tokens_per_s'] / best_hf_decode:.2f}x; shardline decode at "
          f"{100 * ours['decode_fraction_of_limit']:.0f}% of the {ours['decode_bandwidth_limit_tokens_per_s']:.1f} tok/s "
          f"bandwidth limit ({ours['memory_bandwidth_gb_per_s']:.1f} GB/s measured)")


if __name__ == "__main__":
    main()
