"""Hyperparameter sweep for `quill train`'s defaults, run on a GPU with PyTorch.

The loss a configuration reaches after a given number of tokens does not depend on the
hardware, so a GPU can try many configurations quickly; `quill bench`-style CPU throughput
then says how many tokens each configuration gets in the default run's time budget. This
script mirrors quill's training exactly: GPT-2 (transformers' GPT2LMHeadModel, no dropout),
GPT-2 init, AdamW (0.9, 0.99, eps 1e-8, decay on matrices only), linear warm-up then cosine
to lr/10, gradient clipping at 1, random training windows, validation on the whole last 10%
of Tiny Shakespeare in consecutive windows.

usage: python3 scripts/sweep_gpu.py CONFIGS.json > results.jsonl
CONFIGS.json: a list of {"width", "layers", "heads", "ctx", "batch", "lr", "tokens", "warmup", "seed"}.
"""
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cfg):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.get("seed", 1337))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    idx = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([idx[c] for c in text], dtype=torch.long)
    n_val = int(len(data) * 0.1)
    train, val = data[: len(data) - n_val].to(dev), data[len(data) - n_val:].to(dev)
    T, B = cfg["ctx"], cfg["batch"]
    mc = GPT2Config(vocab_size=len(chars), n_positions=T, n_embd=cfg["width"], n_layer=cfg["layers"],
                    n_head=cfg["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(mc).to(dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02 / math.sqrt(2 * cfg["layers"]) if name.endswith("c_proj.weight") else 0.02
                p.normal_(0.0, std)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    lr = cfg["lr"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.get("wd", 0.1)},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, cfg.get("beta2", 0.99)), eps=1e-8)
    steps = max(1, cfg["tokens"] // (B * T))
    warm = cfg.get("warmup", 100)
    min_lr = lr * cfg.get("min_lr_ratio", 0.1)

    def lr_at(s):
        if s < warm:
            return lr * (s + 1) / warm
        prog = min(1.0, (s - warm) / max(1, steps - warm))
        return min_lr + 0.5 * (1 + math.cos(math.pi * prog)) * (lr - min_lr)

    def evaluate():
        model.eval()
        tot, cnt = 0.0, 0
        with torch.no_grad():
            n = len(val) - 1
            starts = list(range(0, n, T))
            for i in range(0, len(starts), 64):
                xs, ys = [], []
                for s in starts[i:i + 64]:
                    x = val[s:s + T]
                    y = val[s + 1:s + T + 1]
                    pad = T - len(y)
                    x = torch.cat([x[: len(y)], torch.zeros(pad, dtype=torch.long, device=dev)])
                    y = torch.cat([y, torch.full((pad,), -100, dtype=torch.long, device=dev)])
                    xs.append(x)
                    ys.append(y)
                logits = model(torch.stack(xs)).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         torch.stack(ys).reshape(-1), ignore_index=-100,
                                                         reduction="sum")
                tot += loss.item()
                cnt += int((torch.stack(ys) != -100).sum())
        model.train()
        return tot / cnt

    g = torch.Generator(device="cpu").manual_seed(cfg.get("seed", 1337))
    t0 = time.time()
    curve = []
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(s)
        ix = torch.randint(0, len(train) - T, (B,), generator=g)
        x = torch.stack([train[i:i + T] for i in ix])
        y = torch.stack([train[i + 1:i + T + 1] for i in ix])
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (s + 1) % max(1, steps // 4) == 0 and s + 1 < steps:
            curve.append((s + 1, round(evaluate(), 4)))
    final = evaluate()
    return {**cfg, "steps": steps, "val_loss": round(final, 4), "curve": curve, "secs": round(time.time() - t0, 1)}


if __name__ == "__main__":
    configs = json.load(open(sys.argv[1]))
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    with ProcessPoolExecutor(workers) as ex:
        for r in ex.map(run, configs):
            print(json.dumps(r), flush=True)
