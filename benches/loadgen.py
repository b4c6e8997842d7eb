#!/usr/bin/env python3
"""Load generator for `shardline serve`: TTFT, inter-token latency and output
tokens/s at several concurrency levels, plus the engine's own time per step
(from /metrics: scheduling, batching, detokenizing, stop checks, events;
the model forward and sampling are reported apart).

    target/release/shardline serve --model models/tiny-chat --port 8000 &
    python3 benches/loadgen.py --url http://127.0.0.1:8000 --model tiny-chat

Each request streams a chat answer of exactly --max-tokens tokens
(ignore_eos), cycling through tiny-chat's reference questions.
"""
import argparse
import asyncio
import json
import os
import statistics
import time
import urllib.request

from openai import AsyncOpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics(url):
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


async def one(client, model, question, max_tokens):
    start = time.perf_counter()
    stamps = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return ttft, itl


async def level(client, args, questions, concurrency):
    n = max(args.requests, concurrency)
    queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(questions[i % len(questions)])
    results = []

    async def worker():
        while not queue.empty():
            results.append(await one(client, args.model, queue.get_nowait(), args.max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    itls = sorted(x for r in results for x in r[1])
    return {
        "concurrency": concurrency,
        "requests": n,
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "itl_p50_ms": 1e3 * statistics.median(itls),
        "itl_p99_ms": 1e3 * itls[min(len(itls) - 1, int(0.99 * len(itls)))],
        "output_tokens_per_s": n * args.max_tokens / wall,
    }


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny-chat")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    cases = json.load(open(os.path.join(ROOT, "tests/fixtures/tiny-chat/reference.json")))["greedy_chat"]
    questions = [c["question"] for c in cases]
    client = AsyncOpenAI(base_url=f"{args.url}/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"), max_retries=0)
    print(f"{'conc':>4} {'reqs':>5} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} {'out tok/s':>10} "
          f"{'batch':>6} {'engine µs/step':>15} {'sampling µs/step':>17} {'forward ms/step':>16}")
    for c in [int(x) for x in args.concurrency.split(",")]:
        before = metrics(args.url)
        r = await level(client, args, questions, c)
        after = metrics(args.url)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        steps = max(d["shardline_engine_steps_total"], 1)
        print(f"{c:>4} {r['requests']:>5} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>6.1f}ms {r['itl_p50_ms']:>6.2f}ms "
              f"{r['itl_p99_ms']:>6.2f}ms {r['output_tokens_per_s']:>10.1f} "
              f"{d['shardline_engine_scheduled_seqs_total'] / steps:>6.1f} "
              f"{1e6 * d['shardline_engine_overhead_seconds_total'] / steps:>15.1f} "
              f"{1e6 * d['shardline_engine_sampling_seconds_total'] / steps:>17.1f} "
              f"{1e3 * d['shardline_engine_forward_seconds_total'] / steps:>16.2f}")


if __name__ == "__main__":
    asyncio.run(main())
