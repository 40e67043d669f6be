"""Training speed of the same GPT-2 in PyTorch (transformers' GPT2LMHeadModel, eager, fp32)
on the CPU, for the side-by-side figure in BENCHMARKS.md.

usage: python3 scripts/torch_train_speed.py --width 96 --layers 4 --heads 2 --ctx 128 --batch 16 --threads 2
Prints the median tokens/s of whole training steps (forward, backward, AdamW) after warm-up.
"""
import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

p = argparse.ArgumentParser()
for k, v in dict(width=96, layers=4, heads=2, ctx=128, batch=16, vocab=65, threads=2, steps=30).items():
    p.add_argument(f"--{k}", type=int, default=v)
p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.ctx, n_embd=a.width, n_layer=a.layers, n_head=a.heads,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=a.attn)
model = GPT2LMHeadModel(cfg)
decay = [q for q in model.parameters() if q.dim() >= 2]
rest = [q for q in model.parameters() if q.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                        lr=5e-3, betas=(0.9, 0.99))
times = []
for step in range(a.steps + 3):
    x = torch.randint(0, a.vocab, (a.batch, a.ctx))
    t0 = time.perf_counter()
    logits = model(x).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, a.vocab), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step >= 3:
        times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"pytorch {torch.__version__} attn={a.attn} threads={a.threads}: {a.batch * a.ctx / med:.0f} tokens/s "
      f"(median step {med * 1e3:.1f} ms, best {a.batch * a.ctx / min(times):.0f} tokens/s)")
