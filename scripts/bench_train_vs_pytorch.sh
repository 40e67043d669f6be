#!/usr/bin/env bash
# Training speed of quill (f32 and bf16) and of PyTorch (fp32 eager and bf16 autocast) on the
# four `quill bench train` configurations, each pair run back to back on an otherwise idle
# machine (BENCHMARKS.md records the results). PyTorch's side is scripts/peers/train_bench.py
# (or the path given):
#   scripts/bench_train_vs_pytorch.sh [PATH/TO/train_bench.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=${1:-scripts/peers/train_bench.py}
cargo build --release --bin quill
Q=./target/release/quill
$Q bench peak
for cs in "nano 30" "char 10" "gpt2-mini 10" "gpt2-small 4"; do
  set -- $cs
  echo "=== $1"
  python3 "$PEER" --config "$1" --steps "$2" --dtype fp32 2>&1 | grep "tok/s"
  python3 "$PEER" --config "$1" --steps "$2" --dtype bf16-autocast 2>&1 | grep "tok/s"
  $Q bench train --config "$1" --steps "$2" --dtype f32
  $Q bench train --config "$1" --steps "$2" --dtype bf16
done
echo "=== threads (gpt2-small)"
for d in f32 bf16; do
  $Q bench train --config gpt2-small --steps 4 --dtype $d --threads 1 | sed -n 1p
  $Q bench train --config gpt2-small --steps 4 --dtype $d | sed -n 1p
done
