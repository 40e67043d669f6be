#!/usr/bin/env python3
"""Inference-throughput baseline with HF transformers on the CPU.

Models (random weights):
  gpt2   GPT2LMHeadModel, default GPT2Config (124M)
  llama  LlamaForCausalLM shaped like SmolLM2-360M (hidden 960, ffn 2560, 32 layers,
         15 heads, 5 kv heads, vocab 49152, tied embeddings)
By default the weights are loaded from ./bench-models/<folder>/ under the current
directory (--models-dir, or $BENCH_MODELS_DIR; written by make_bench_models.py, so
llama.cpp can be given the very same weights); if the folder is missing the model is
built in memory from the same config (seed 0).

For each model and dtype (fp32, bf16 = all weights and activations in bfloat16):
  prompt processing (pp): one forward over a --prompt-token prompt (batch 1, use_cache=True)
                          tokens/s = prompt / time; best of --pp-reps
  decode (tg):            after that prompt, --new greedy tokens one at a time with the
                          KV cache (batch 1); tokens/s = new / total time
                          (context grows prompt..prompt+new; llama-bench's tg starts
                          from an empty context instead); the fastest single step is
                          also recorded (tg_min_ms: less sensitive to shared cores)
Attention: transformers' default (sdpa). Threads: --threads (default 2).

  python3 scripts/peers/decode_bench.py [--models gpt2] [--out bench-results/decode.jsonl]
"""
import argparse
import inspect
import json
import os
import resource
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2LMHeadModel, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))  # this script's folder (sibling scripts)
MODELS_DIR = os.environ.get("BENCH_MODELS_DIR", "bench-models")  # relative to the current directory
FOLDERS = {"gpt2": "gpt2-124m-random", "llama": "llama-360m-random"}


def build_in_memory(name):
    sys.dont_write_bytecode = True  # no __pycache__ next to the (read-only) scripts
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from make_bench_models import gpt2_bench_config, llama_bench_config
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(gpt2_bench_config())
    return LlamaForCausalLM(llama_bench_config())


def load(name, dtype, models_dir):
    folder = os.path.join(models_dir, FOLDERS[name])
    cls = GPT2LMHeadModel if name == "gpt2" else LlamaForCausalLM
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        model = cls.from_pretrained(folder, dtype=dtype)
        src = os.path.relpath(folder)
    else:
        model = build_in_memory(name).to(dtype)
        src = "in-memory (seed 0)"
    return model.eval(), src


def cache_kw(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def out_cache(out):
    c = getattr(out, "past_key_values", None)
    return c if c is not None else getattr(out, "cache", None)


@torch.inference_mode()
def bench_one(model, prompt_len, n_new, pp_reps, seed=0):
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V, (1, prompt_len), generator=gen)
    kw = cache_kw(model)

    # the prompt's logits at its last position only, as generate() asks for them and as
    # quill's bench computes them (the head over every position would add a third to GPT-2's
    # prompt); older transformers without `logits_to_keep` compute them all
    keep = {"logits_to_keep": 1}
    try:
        model(input_ids=prompt[:, :2], use_cache=True, **keep)
    except TypeError:
        keep = {}
    pp_times = []
    for _ in range(pp_reps):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **keep)
        pp_times.append(time.perf_counter() - t0)
    cache = out_cache(out)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    step_times = []
    t_start = time.perf_counter()
    for _ in range(n_new):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{kw: cache})
        cache = out_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step_times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_start
    return {
        "pp_tokens_per_s": round(prompt_len / min(pp_times), 2),
        "pp_first_s": round(pp_times[0], 3),
        "tg_tokens_per_s": round(n_new / total, 2),
        "tg_median_ms": round(1000 * statistics.median(step_times), 2),
        "tg_min_ms": round(1000 * min(step_times), 2),
        "tg_first_ms": round(1000 * step_times[0], 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(FOLDERS), default=list(FOLDERS))
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--pp-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models-dir", default=MODELS_DIR,
                    help="folder holding make_bench_models.py's output (default: $BENCH_MODELS_DIR, "
                         "else ./bench-models)")
    ap.add_argument("--out", default=None,
                    help="append JSON records to this .jsonl file (its folder is created if needed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    for name in args.models:
        for dt in args.dtypes:
            dtype = torch.float32 if dt == "fp32" else torch.bfloat16
            t0 = time.perf_counter()
            model, src = load(name, dtype, args.models_dir)
            load_s = time.perf_counter() - t0
            n_params = sum(p.numel() for p in model.parameters())
            r = bench_one(model, args.prompt, args.new, args.pp_reps)
            la = os.getloadavg()
            rec = {"bench": "decode", "model": name, "dtype": dt, "threads": args.threads,
                   "params": n_params, "prompt": args.prompt, "new": args.new, "weights": src,
                   "load_s": round(load_s, 2), **r,
                   "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                   "loadavg": [round(v, 2) for v in la], "torch": torch.__version__,
                   "transformers": transformers.__version__}
            print(f"decode {name} {dt} ({n_params / 1e6:.1f}M params, {src}): "
                  f"pp{args.prompt} {r['pp_tokens_per_s']:.1f} tok/s, "
                  f"tg{args.new} {r['tg_tokens_per_s']:.2f} tok/s (median step {r['tg_median_ms']:.1f} ms), "
                  f"load {la[0]:.2f}", flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
