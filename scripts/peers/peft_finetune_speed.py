#!/usr/bin/env python3
"""PyTorch + `peft` twin of `quill finetune --lora-rank` for a speed comparison: the same
model (a GGUF file dequantized to f32 by `transformers`, or a Hugging Face folder), LoRA of
the same rank and targets, batches of the same shape [B, T], AdamW, the same threads.
Prints the median tokens/s of the steps after warm-up (forward, backward, optimizer step).

    python3 scripts/peers/peft_finetune_speed.py MODEL [--rank 8] [--batch 4] [--context 256]
        [--steps 8] [--threads 2] [--targets q,k,v,o,gate,up,down]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--context", type=int, default=256)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--targets", default="q,k,v,o,gate,up,down")
a = p.parse_args()
torch.set_num_threads(a.threads)
path = Path(a.model)
if path.is_file():
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
else:
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                 target_modules=[f"{t}_proj" for t in a.targets.split(",")])
model = get_peft_model(base, cfg)
model.train()
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
v = base.config.vocab_size
times = []
for step in range(a.steps):
    ids = torch.randint(0, v, (a.batch, a.context), generator=g)
    labels = ids.clone()
    labels[:, : a.context // 2] = -100  # prompts masked, as in fine-tuning
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    print(f"step {step}: loss {loss.item():.4f}, {a.batch * a.context / times[-1]:.1f} tokens/s", flush=True)
warm = times[2:] if len(times) > 3 else times
print(f"peft: median {a.batch * a.context / statistics.median(warm):.1f} tokens/s "
      f"(batch {a.batch} x {a.context}, rank {a.rank}, {a.threads} threads, torch {torch.__version__})")
