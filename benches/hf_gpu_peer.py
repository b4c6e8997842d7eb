#!/usr/bin/env python3
"""Hugging Face transformers on the same shapes as `shardline bench`: a
Qwen2 model of a config.json with random bf16 weights on the GPU, prefill
tokens/s (one forward over the prompt) and batch-1 greedy decode tokens/s
(`generate` with a fixed number of new tokens; the prefill's share is taken
out by timing a one-token generate too). Prints one JSON object.

With --requests, throughput instead: the same requests as `shardline bench
--requests` (lengths from the same seeded LCG), run through batched
`generate` in batches of --batch, left-padded, each batch generating its
longest output; output tokens/s counts only the tokens each request asked for.
With --time-limit, batches stop being started once that many seconds have
passed, and the figures cover the requests of the batches that ran
("requests_done"), so a slow peer still reports within a fixed time.

    python3 benches/hf_gpu_peer.py --config configs/models/qwen2.5-7b.json
    python3 benches/hf_gpu_peer.py --config configs/models/qwen2.5-7b.json --requests 256
"""

import argparse
import json
import statistics
import time


def lengths(spec):
    """`N` or `MIN-MAX`."""
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


def workload(seed, n, prompts, outputs):
    """(prompt, output) lengths of n requests: shardline's `workload`."""
    state = seed

    def draw(lo, hi):
        nonlocal state
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return lo + (state >> 33) % (hi - lo + 1)

    return [(draw(*prompts), draw(*outputs)) for _ in range(n)]


def timed(fn):
    import torch

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
    parser.add_argument("--requests", type=int, help="throughput over this many requests")
    parser.add_argument("--prompt-lens", default="128-1024")
    parser.add_argument("--output-lens", default="128-1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="requests per generate call")
    parser.add_argument("--time-limit", type=float, help="start no batch after this many seconds of throughput")
    args = parser.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with open(args.config) as f:
        config = Qwen2Config(**json.load(f))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM._from_config(config, torch_dtype=torch.bfloat16).eval()
    if args.requests:
        return throughput(model, config, args)
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


def throughput(model, config, args):
    import torch

    requests = workload(args.seed, args.requests, lengths(args.prompt_lens), lengths(args.output_lens))

    def run(batch):
        longest, new = max(p for p, _ in batch), max(o for _, o in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):
            ids[row, longest - p :] = torch.randint(0, config.vocab_size, (p,), device="cuda")
            mask[row, longest - p :] = 1
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return len(batch) * new

    with torch.inference_mode():
        run([(p, 8) for p, _ in requests[:4]])  # warm-up: the prompts' shapes, few new tokens
        torch.cuda.synchronize()
        start = time.perf_counter()
        done, generated = [], 0
        for i in range(0, len(requests), args.batch):
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                break
            batch = requests[i : i + args.batch]
            generated += run(batch)
            done += batch
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    output_tokens = sum(o for _, o in done)
    print(
        json.dumps(
            {
                "peer": f"transformers {__import__('transformers').__version__}",
                "config": args.config,
                "requests": args.requests,
                "requests_done": len(done),
                "batch": args.batch,
                "prompt_tokens": sum(p for p, _ in done),
                "output_tokens": output_tokens,
                "generated_tokens": generated,
                "seconds": wall,
                "output_tokens_per_s": output_tokens / wall,
            }
        )
    )

if __name__ == "__main__":
    main()
