#!/usr/bin/env python3
"""A Qwen2-0.5B-shaped model with random weights, saved in bfloat16 (about 1 GB), with
OpenAI's GPT-2 tokenizer: for measuring how fast `quill generate` starts on a 1 GB bf16
folder (BENCHMARKS.md). Not used by the tests.

  python3 scripts/make_qwen2_05b_random.py OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  bos_token_id=50256, eos_token_id=50256)
model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
shutil.copy(Path(__file__).resolve().parents[1] / "data" / "gpt2-tokenizer" / "tokenizer.json", out / "tokenizer.json")
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters written to {out}")
