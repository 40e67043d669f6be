#!/usr/bin/env python3
"""Aggregate generation speed of `quill serve` under concurrent streaming requests, against
one request alone (BENCHMARKS.md). Needs a running server:

  quill serve --model DIR --port 8080 &
  python3 scripts/serve_load.py --url http://127.0.0.1:8080/v1 --model NAME [--n 32 --tokens 64]
"""
import argparse
import threading
import time

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8080/v1")
ap.add_argument("--model", required=True)
ap.add_argument("--n", type=int, default=32)
ap.add_argument("--tokens", type=int, default=64)
a = ap.parse_args()
client = OpenAI(base_url=a.url, api_key="none", max_retries=0, timeout=600)


def one(i, out):
    t = time.time()
    n = 0
    for chunk in client.completions.create(model=a.model, prompt=f"Story {i}:", max_tokens=a.tokens,
                                           temperature=1.0, seed=i, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage:
            n = chunk.usage.completion_tokens
    out.append((n, time.time() - t))


alone = []
one(0, alone)
tps1 = alone[0][0] / alone[0][1]
results = []
threads = [threading.Thread(target=one, args=(i, results)) for i in range(a.n)]
t0 = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.time() - t0
total = sum(n for n, _ in results)
print(f"one request alone: {alone[0][0]} tokens in {alone[0][1]:.2f} s = {tps1:.1f} tokens/s")
print(f"{a.n} concurrent streams: {total} tokens in {wall:.2f} s = {total / wall:.1f} tokens/s "
      f"({total / wall / tps1:.1f}x one alone); all {len(results)} completed")
