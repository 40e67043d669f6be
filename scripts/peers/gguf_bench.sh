#!/usr/bin/env bash
# quill against llama.cpp's llama-bench on the same GGUF files, same machine, same threads:
# prompt processing (512 tokens) and decoding (128 tokens from an empty context, as
# llama-bench's tg test does). Prints one markdown table row per file.
#
#   LLAMA_BENCH=/path/to/llama-bench THREADS=2 scripts/peers/gguf_bench.sh FILE.gguf...
#
# llama-bench comes with llama.cpp's source, which ships inside the llama-cpp-python source
# archive on PyPI (vendor/llama.cpp): cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF &&
# cmake --build build --target llama-bench llama-quantize. Build it outside this repository.
# Other types of one file: llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0.
set -euo pipefail
QUILL="${QUILL:-$(dirname "$0")/../../target/release/quill}"
THREADS="${THREADS:-2}"
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary of llama.cpp}"
echo "| file | quill prompt tok/s | llama.cpp pp512 | ratio | quill decode tok/s | llama.cpp tg128 | ratio |"
echo "|---|---|---|---|---|---|---|"
for f in "$@"; do
  qp=$("$QUILL" bench generate --threads "$THREADS" --model "$f" --prompt-len 512 --new 1 --json 2>/dev/null)
  qg=$("$QUILL" bench generate --threads "$THREADS" --model "$f" --prompt-len 1 --new 128 --json 2>/dev/null)
  l=$("$LLAMA_BENCH" -m "$f" -t "$THREADS" -p 512 -n 128 -r 3 -o json 2>/dev/null)
  python3 - "$(basename "$f")" "$qp" "$qg" "$l" <<'PY'
import json, sys
name, qp, qg, l = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
lp = [r["avg_ts"] for r in l if r["n_prompt"] > 0][0]
lg = [r["avg_ts"] for r in l if r["n_gen"] > 0][0]
a, b = qp["prompt_tokens_per_sec"], qg["decode_tokens_per_sec"]
print(f"| {name} | {a:.1f} | {lp:.1f} | {a / lp:.2f} | {b:.1f} | {lg:.1f} | {b / lg:.2f} |")
PY
done
