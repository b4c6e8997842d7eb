#!/usr/bin/env python3
"""Hugging Face transformers on the same shapes as `shardline bench`: a
Qwen2 model of a config.json with random bf16 weights on the GPU, prefill
tokens/s (one forward over the prompt) and batch-1 greedy decode tokens/s
(`generate` with a fixed number of new tokens; the prefill's share is taken
out by timing a one-token generate too). Prints one JSON object.

    python3 benches/hf_gpu_peer.py --config configs/models/qwen2.5-7b.json
"""

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with open(args.config) as f:
        config = Qwen2Config(**json.load(f))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(config, torch_dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device="cuda")
    mask = torch.ones_like(prompt)

    def generate(new_tokens):
        model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    prefill, decode = [], []
    with torch.inference_mode():
        model(prompt)
        generate(2)
        for _ in range(args.repeats):
            prefill.append(args.prompt_len / timed(lambda: model(prompt)))
            one = timed(lambda: generate(1))
            many = timed(lambda: generate(args.decode_tokens + 1))
            decode.append(args.decode_tokens / (many - one))
    print(
        json.dumps(
            {
                "peer": f"transformers {__import__('transformers').__version__}",
                "config": args.config,
                "prompt_len": args.prompt_len,
                "prefill_tokens_per_s": statistics.median(prefill),
                "decode_tokens_per_s": statistics.median(decode),
            }
        )
    )


if __name__ == "__main__":
    main()
