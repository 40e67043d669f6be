"""Tokenization speed of tiktoken's GPT-2 encoding on a text file, for BENCHMARKS.md.
The encoding is built offline from OpenAI's original files (encoder.json, vocab.bpe).

usage: python3 scripts/tiktoken_speed.py FILE ENCODER_JSON VOCAB_BPE [--threads N]
"""
import sys
import time

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

path, enc_json, vocab_bpe = sys.argv[1:4]
threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, enc_json)
enc = tiktoken.Encoding(
    "gpt2-offline",
    pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    mergeable_ranks=ranks,
    special_tokens={"<|endoftext|>": 50256},
)
def docs_of(lines):
    """documents of ~256 KB, as quill cuts its pieces"""
    docs, cur, size = [], [], 0
    for l in lines:
        cur.append(l)
        size += len(l)
        if size >= 256 << 10:
            docs.append("".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("".join(cur))
    return docs


# stream the file in ~64 MB batches so memory stays bounded (token lists are counted, not kept)
n = 0
total_bytes = 0
secs = 0.0
with open(path, encoding="utf-8") as f:
    while True:
        lines = f.readlines(64 << 20)
        if not lines:
            break
        docs = docs_of(lines)
        total_bytes += sum(len(d.encode()) for d in docs)
        t0 = time.perf_counter()
        n += sum(len(x) for x in enc.encode_ordinary_batch(docs, num_threads=threads))
        secs += time.perf_counter() - t0
mb = total_bytes / 1e6
print(f"tiktoken {tiktoken.__version__} threads={threads}: {mb:.1f} MB, {n} tokens in {secs:.2f}s (encoding only) = {mb / secs:.2f} MB/s")
