#!/usr/bin/env bash
# PyTorch CPU baselines, in sequence, then a compact table.
#   bash scripts/peers/run_all.sh     (from a project checkout, or any directory;
#                                                ~2.5 min on 2 idle cores, longer under load)
# Sibling scripts are found next to this file; outputs go under the current directory.
# Env: PYTHON (default python3), THREADS (default 2), RESULTS_DIR (default ./bench-results,
# relative to the current directory), SKIP_DECODE=1 to skip the HF inference benchmark,
# BENCH_MODELS_DIR (default ./bench-models) for decode_bench.py's models (built in memory
# if absent).
# Records go to $RESULTS_DIR/run-<timestamp>.jsonl and $RESULTS_DIR/peak.json.
# Other processes on the machine distort every number: the load average is recorded
# with each row; compare runs only at similar load.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # this script's folder (read only)
PY=${PYTHON:-python3}
TH=${THREADS:-2}
RES=${RESULTS_DIR:-bench-results}
mkdir -p "$RES"
JSONL="$RES/run-$(date +%Y%m%d-%H%M%S).jsonl"
PEAK="$RES/peak.json"
T0=$(date +%s)

echo "== $(date -u +%FT%TZ)  uptime:$(uptime | sed 's/.*load/ load/')"
$PY "$HERE/peak.py" --threads "$TH" --json "$PEAK"

train() {
  echo "== uptime:$(uptime | sed 's/.*load/ load/')"
  $PY "$HERE/train_bench.py" --threads "$TH" --no-compile --peak-json "$PEAK" --out "$JSONL" "$@"
}
train --config nano       --dtype fp32          --batch 12 --steps 10
train --config char       --dtype fp32          --batch 8 --steps 5
train --config char       --dtype bf16-autocast --batch 8 --steps 5
train --config gpt2-mini  --dtype fp32          --batch 8 --steps 5
train --config gpt2-small --dtype fp32          --batch 1 --steps 3
train --config gpt2-small --dtype bf16-autocast --batch 1 --steps 3

if [ "${SKIP_DECODE:-0}" != 1 ]; then
  echo "== uptime:$(uptime | sed 's/.*load/ load/')"
  $PY "$HERE/decode_bench.py" --threads "$TH" --out "$JSONL" 2> >(grep -v -e 'Loading weights' -e 'deprecated' >&2)
fi

echo "== total $(( $(date +%s) - T0 )) s; records in $JSONL, peak in $PEAK"
$PY - "$JSONL" "$PEAK" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
pk = json.load(open(sys.argv[2]))
print()
print(f"peak ({pk['threads']} threads): fp32 GEMM {pk['fp32_peak_gflops']} GFLOP/s, "
      f"bf16 GEMM {pk['bf16_peak_gflops']} GFLOP/s (1-thread x{pk['threads']}: fp32 {pk['fp32_peak_est_gflops']}, "
      f"bf16 {pk['bf16_peak_est_gflops']}), copy "
      f"{pk['copy_bw_gbs_1thread']} GB/s (1 thr) / {pk['copy_bw_gbs_' + str(pk['threads']) + 'threads']} GB/s, "
      f"load {pk['loadavg_before'][0]:.2f}")
print()
print(f"{'train':12s} {'dtype':14s} {'B':>2s} {'T':>5s} {'V':>6s} {'N(M)':>7s} {'tok/s':>9s} {'best':>9s} "
      f"{'step ms':>9s} {'GFLOP/s':>8s} {'MFU':>6s} {'MFUest':>6s} {'load1':>6s}")
pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"
for r in rows:
    if r["bench"] != "train":
        continue
    print(f"{r['config']:12s} {r['dtype']:14s} {r['batch']:2d} {r['seq']:5d} {r['vocab']:6d} "
          f"{r['params_N'] / 1e6:7.2f} {r['tokens_per_s']:9.1f} {r['best_tokens_per_s']:9.1f} "
          f"{1000 * r['median_step_s']:9.0f} {r['achieved_gflops']:8.1f} {pct(r['mfu']):>6s} "
          f"{pct(r['mfu_vs_peak_est']):>6s} {r['loadavg'][0]:6.2f}")
print("(tok/s: median step; best: fastest step; MFU vs the measured multi-thread GEMM peak, "
      "MFUest vs threads x 1-thread GEMM peak)")
dec = [r for r in rows if r["bench"] == "decode"]
if dec:
    print()
    print(f"{'decode':8s} {'dtype':5s} {'params(M)':>9s} {'pp tok/s':>9s} {'tg tok/s':>9s} {'tg ms/tok':>10s} "
          f"{'best ms':>8s} {'load1':>6s}")
    for r in dec:
        print(f"{r['model']:8s} {r['dtype']:5s} {r['params'] / 1e6:9.1f} {r['pp_tokens_per_s']:9.1f} "
              f"{r['tg_tokens_per_s']:9.2f} {r['tg_median_ms']:10.1f} {r['tg_min_ms']:8.1f} {r['loadavg'][0]:6.2f}")
    print(f"(pp = {dec[0]['prompt']}-token prompt, tg = {dec[0]['new']} greedy tokens after it, batch 1, KV cache)")
EOF
