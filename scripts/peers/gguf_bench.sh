#!/usr/bin/env bash
# quill against llama.cpp's llama-bench on the same GGUF files, same machine, same threads:
# prompt processing (512 tokens) and decoding (128 tokens from an empty context, as
# llama-bench's tg test does). Prints one markdown table row per file.
#
#   LLAMA_BENCH=/path/to/llama-bench THREADS=2 ROUNDS=3 scripts/peers/gguf_bench.sh FILE.gguf...
#
# Each of ROUNDS rounds (default 3) runs quill then llama-bench (one repetition) on the file,
# so that both see the same minutes; the table gives each side's fastest round (on a shared
# machine, other work only ever slows a run down), and the ratio of the two.
#
# llama-bench comes with llama.cpp's source, which ships inside the llama-cpp-python source
# archive on PyPI (vendor/llama.cpp): cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF &&
# cmake --build build --target llama-bench llama-quantize. Build it outside this repository.
# Other types of one file: llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0.
set -euo pipefail
QUILL="${QUILL:-$(dirname "$0")/../../target/release/quill}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary of llama.cpp}"
echo "| file | quill prompt tok/s | llama.cpp pp512 | ratio | quill decode tok/s | llama.cpp tg128 | ratio |"
echo "|---|---|---|---|---|---|---|"
for f in "$@"; do
  runs=$(mktemp)
  for _ in $(seq "$ROUNDS"); do
    {
      echo "quill $("$QUILL" bench generate --threads "$THREADS" --model "$f" --prompt-len 512 --new 1 --json 2>/dev/null | tr -d '\n')"
      echo "quill $("$QUILL" bench generate --threads "$THREADS" --model "$f" --prompt-len 1 --new 128 --json 2>/dev/null | tr -d '\n')"
      echo "llama $("$LLAMA_BENCH" -m "$f" -t "$THREADS" -p 512 -n 128 -r 1 -o json 2>/dev/null | tr -d '\n')"
    } >>"$runs"
  done
  python3 - "$(basename "$f")" "$runs" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
qp = qg = lp = lg = 0.0
for line in open(path):
    who, _, body = line.partition(" ")
    r = json.loads(body)
    if who == "quill":
        if r["prompt_len"] > 1:
            qp = max(qp, r["prompt_tokens_per_sec"])
        else:
            qg = max(qg, r["decode_tokens_per_sec"])
    else:
        lp = max(lp, [x["avg_ts"] for x in r if x["n_prompt"] > 0][0])
        lg = max(lg, [x["avg_ts"] for x in r if x["n_gen"] > 0][0])
print(f"| {name} | {qp:.1f} | {lp:.1f} | {qp / lp:.2f} | {qg:.1f} | {lg:.1f} | {qg / lg:.2f} |")
PY
  rm -f "$runs"
done
