#!/usr/bin/env python3
"""Training-throughput baseline: a minimal GPT-2-style model in plain PyTorch on the CPU.

Model: token + learned position embedding, pre-LayerNorm blocks (LN -> causal
self-attention via F.scaled_dot_product_attention(is_causal=True) -> residual,
LN -> Linear(C,4C) -> GELU(tanh) -> Linear(4C,C) -> residual), final LN, LM head tied
to the token embedding. Linear layers and LayerNorms have biases, dropout 0.
Optimizer AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on >=2-D params; foreach
implementation). Data: uniform random token ids (throughput only).

One training step = zero_grad + forward + cross-entropy + backward + optimizer.step.
tokens/s = batch*seq / step time, median over --steps timed steps after --warmup steps.

MFU (model FLOPs utilisation):
    N               = all trainable parameters except the position embedding; the token
                      embedding / LM-head matrix (tied) is counted once, as the LM head.
    flops_per_token = 6*N + 12*L*C*T      (L layers, C embd, T seq; attention term
                                           without the causal 1/2 discount, as in PaLM
                                           and nanoGPT)
    MFU             = flops_per_token * tokens_per_s / peak_flops
peak_flops: the measured GEMM peak from peak.py's JSON (--peak-json, default
$RESULTS_DIR/peak.json with RESULTS_DIR defaulting to ./bench-results under the current
directory; fp32 peak for --dtype fp32, bf16 peak for bf16-autocast), or --peak-gflops.
Without either, MFU is reported as n/a. Also reported:
mfu_vs_peak_est, against threads x the 1-thread GEMM peak (peak.py's *_peak_est_gflops),
which stays meaningful when other processes share the cores.

  python3 scripts/peers/train_bench.py --config char [--out bench-results/train.jsonl]
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {
    # nanoGPT's README recipe for the CPU (batch 12)
    "nano": dict(vocab=65, n_layer=4, n_head=4, n_embd=128, seq=64),
    # nanoGPT's shakespeare-char config
    "char": dict(vocab=65, n_layer=6, n_head=6, n_embd=384, seq=256),
    "gpt2-mini": dict(vocab=50257, n_layer=4, n_head=4, n_embd=256, seq=256),
    # GPT-2 small, 124M
    "gpt2-small": dict(vocab=50257, n_layer=12, n_head=12, n_embd=768, seq=1024),
}


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.n_head = H
        self.ln_1 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, vocab, n_layer, n_head, n_embd, seq):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(seq, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init)
        for n, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if n.endswith("c_proj.weight") or n.endswith("mlp_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def count_params(model):
    total = sum(p.numel() for p in model.parameters())  # tied matrix counted once
    return total, total - model.wpe.weight.numel()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="char")
    ap.add_argument("--batch", type=int, default=None, help="default: 12 (nano), 8 (char), 8 (gpt2-mini), 1 (gpt2-small)")
    ap.add_argument("--seq", type=int, default=None, help="default: the config's block size")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", dest="compile", action="store_true")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.set_defaults(compile=False)
    ap.add_argument("--dtype", choices=["fp32", "bf16-autocast"], default="fp32")
    ap.add_argument("--pad-vocab", action="store_true", help="pad vocab to a multiple of 64 (50257 -> 50304)")
    ap.add_argument("--peak-json", default=os.path.join(os.environ.get("RESULTS_DIR", "bench-results"), "peak.json"),
                    help="peak.py's JSON output (default: $RESULTS_DIR/peak.json, RESULTS_DIR defaulting to "
                         "./bench-results; used only if it exists)")
    ap.add_argument("--peak-gflops", type=float, default=None, help="override the peak used for MFU")
    ap.add_argument("--out", default=None,
                    help="append a JSON record to this .jsonl file (its folder is created if needed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    cfg = dict(CONFIGS[args.config])
    if args.seq:
        cfg["seq"] = args.seq
    if args.pad_vocab:
        cfg["vocab"] = (cfg["vocab"] + 63) // 64 * 64
    B = args.batch or {"gpt2-small": 1, "nano": 12}.get(args.config, 8)
    T = cfg["seq"]
    L, C, V = cfg["n_layer"], cfg["n_embd"], cfg["vocab"]

    model = GPT(**cfg)
    model.train()
    n_total, N = count_params(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    step_model = torch.compile(model) if args.compile else model

    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, V, (args.warmup + args.steps, B, T + 1), generator=gen)

    times, losses = [], []
    t_first = None
    for i in range(args.warmup + args.steps):
        x, y = data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if args.dtype == "bf16-autocast":
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                loss = step_model(x, y)
        else:
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i == 0:
            t_first = dt
        if i >= args.warmup:
            times.append(dt)

    step_s = statistics.median(times)
    tok_s = B * T / step_s
    flops_per_token = 6 * N + 12 * L * C * T

    peak = args.peak_gflops
    peak_src = "--peak-gflops" if peak else None
    peak_est = None
    if os.path.isfile(args.peak_json):
        with open(args.peak_json) as f:
            pk = json.load(f)
        kind = "bf16" if args.dtype == "bf16-autocast" else "fp32"
        if peak is None:
            peak = pk[f"{kind}_peak_gflops"]
            peak_src = f"peak.json {kind} GEMM peak"
        peak_est = pk.get(f"{kind}_peak_est_gflops")
    mfu = flops_per_token * tok_s / (peak * 1e9) if peak else None
    # same, against threads x the 1-thread GEMM peak (robust to shared cores)
    mfu_est = flops_per_token * tok_s / (peak_est * 1e9) if peak_est else None
    load = os.getloadavg()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rec = {
        "bench": "train", "config": args.config, "dtype": args.dtype, "compile": args.compile,
        "threads": args.threads, "batch": B, "seq": T, "vocab": V, "n_layer": L, "n_embd": C,
        "n_head": cfg["n_head"], "params_total": n_total, "params_N": N,
        "flops_per_token": flops_per_token, "steps_timed": len(times), "warmup": args.warmup,
        "first_step_s": round(t_first, 3), "median_step_s": round(step_s, 4),
        "min_step_s": round(min(times), 4), "tokens_per_s": round(tok_s, 1),
        "achieved_gflops": round(flops_per_token * tok_s / 1e9, 2),
        "peak_gflops": peak, "peak_source": peak_src,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_est_gflops": peak_est,
        "mfu_vs_peak_est": round(mfu_est, 4) if mfu_est is not None else None,
        "best_tokens_per_s": round(B * T / min(times), 1),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "max_rss_mib": round(rss_mib), "loadavg": [round(v, 2) for v in load],
        "torch": torch.__version__,
    }
    mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a (no peak)"
    if mfu_est is not None:
        mfu_s += f" (vs {args.threads}x1-thread peak: {100 * mfu_est:.1f}%)"
    print(f"train {args.config} {args.dtype} compile={args.compile} B={B} T={T} V={V} "
          f"N={N / 1e6:.2f}M: {tok_s:.1f} tok/s (median step {step_s * 1000:.0f} ms, "
          f"first {t_first:.2f} s), {rec['achieved_gflops']} GFLOP/s, MFU {mfu_s}, "
          f"loss {losses[0]:.3f}->{losses[-1]:.3f}, rss {rss_mib:.0f} MiB, load {load[0]:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
