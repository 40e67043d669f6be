#!/usr/bin/env python3
"""Measure this machine's practical peaks with PyTorch on the CPU.

(a) fp32 GEMM GFLOP/s: torch.mm on square n x n matrices, n in --sizes, best time of
    >= --reps calls and >= --min-time seconds per size; the peak is the best size
(b) bf16 GEMM GFLOP/s: same with bfloat16 inputs (oneDNN/MKL bf16 path, AVX512-BF16)
(a') the same at n=2048 with 1 thread; threads x that = "peak_est" (an estimate of the
    uncontended multi-thread peak, useful when other processes share the cores)
(c) memory bandwidth GB/s: dst.copy_(src) of a --copy-mib (default 1024 MiB) fp32 tensor,
    counting read + write bytes (2 x size; write-allocate traffic is NOT counted),
    with 1 thread and with --threads threads.

GFLOP/s = 2*n^3 / time / 1e9.  Results are printed and, with --json PATH, written as
JSON, which train_bench.py reads to compute MFU (it looks for ./bench-results/peak.json,
or $RESULTS_DIR/peak.json, by default).  Nothing is written without --json.

  python3 scripts/peers/peak.py --json bench-results/peak.json
"""
import argparse
import json
import os
import platform
import time

import torch


def best_time(fn, reps, min_time=0.0):
    fn()  # warm-up (allocations, oneDNN primitive creation)
    best = float("inf")
    t_start = time.perf_counter()
    i = 0
    while i < reps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best


def gemm_peak(dtype, sizes, reps, min_time, threads=None):
    out = {}
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for n in sizes:
            out[n] = gemm_one(dtype, n, reps, min_time)
    finally:
        torch.set_num_threads(old)
    return out


def gemm_one(dtype, n, reps, min_time):
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    r = reps if n <= 2048 else max(2, reps // 2)
    t = best_time(lambda: torch.mm(a, b, out=c), r, min_time)
    del a, b, c
    return 2.0 * n ** 3 / t / 1e9


def copy_bw(mib, threads, reps):
    n = mib * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.zeros(n, dtype=torch.float32)  # both pages touched before timing
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = best_time(lambda: dst.copy_(src), reps)
    finally:
        torch.set_num_threads(old)
    del src, dst
    return 2.0 * n * 4 / t / 1e9


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--min-time", type=float, default=1.5,
                    help="keep repeating each GEMM size for at least this many seconds (best time wins; "
                         "helps on a shared, busy machine)")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--json", default=None,
                    help="write results here (relative paths are relative to the current directory; "
                         "train_bench.py reads bench-results/peak.json by default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load_before = loadavg()
    fp32 = gemm_peak(torch.float32, args.sizes, args.reps, args.min_time)
    bf16 = gemm_peak(torch.bfloat16, args.sizes, args.reps, args.min_time)
    # single-thread GEMM: x threads gives an estimate of the uncontended peak when other
    # processes share the cores (a busy core makes the N-thread figure collapse)
    fp32_1 = gemm_peak(torch.float32, [2048], args.reps, args.min_time, threads=1)[2048]
    bf16_1 = gemm_peak(torch.bfloat16, [2048], args.reps, args.min_time, threads=1)[2048]
    bw1 = copy_bw(args.copy_mib, 1, 5)
    bwN = copy_bw(args.copy_mib, args.threads, 5)
    res = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "fp32_gemm_gflops": {str(k): round(v, 1) for k, v in fp32.items()},
        "bf16_gemm_gflops": {str(k): round(v, 1) for k, v in bf16.items()},
        "fp32_peak_gflops": round(max(fp32.values()), 1),
        "bf16_peak_gflops": round(max(bf16.values()), 1),
        "fp32_gemm_gflops_1thread_n2048": round(fp32_1, 1),
        "bf16_gemm_gflops_1thread_n2048": round(bf16_1, 1),
        "fp32_peak_est_gflops": round(args.threads * fp32_1, 1),
        "bf16_peak_est_gflops": round(args.threads * bf16_1, 1),
        "contention_suspected": bool(max(fp32.values()) < 0.8 * args.threads * fp32_1),
        "copy_mib": args.copy_mib,
        "copy_bw_gbs_1thread": round(bw1, 2),
        f"copy_bw_gbs_{args.threads}threads": round(bwN, 2),
    }
    print(f"torch {res['torch']} ({res['cpu_capability']}), {args.threads} threads, load {load_before}")
    print("fp32 GEMM GFLOP/s: " + "  ".join(f"n={k}: {v:.1f}" for k, v in fp32.items())
          + f"   -> peak {res['fp32_peak_gflops']}")
    print("bf16 GEMM GFLOP/s: " + "  ".join(f"n={k}: {v:.1f}" for k, v in bf16.items())
          + f"   -> peak {res['bf16_peak_gflops']}")
    print(f"1-thread GEMM n=2048: fp32 {fp32_1:.1f}, bf16 {bf16_1:.1f} GFLOP/s -> x{args.threads} estimate "
          f"fp32 {res['fp32_peak_est_gflops']}, bf16 {res['bf16_peak_est_gflops']}"
          + ("   (multi-thread peak < 80% of it: cores probably shared)" if res["contention_suspected"] else ""))
    print(f"copy bandwidth ({args.copy_mib} MiB, read+write): 1 thread {bw1:.2f} GB/s, "
          f"{args.threads} threads {bwN:.2f} GB/s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
