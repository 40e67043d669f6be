#!/usr/bin/env python3
"""Build the two random-weight benchmark models as HF folders (config.json,
model.safetensors in float32, tokenizer files) so that both PyTorch/HF and llama.cpp's
convert_hf_to_gguf.py can load them.

  <models-dir>/gpt2-124m-random/   GPT2LMHeadModel, default GPT2Config (124M, vocab 50257)
                                   + the real GPT-2 tokenizer (from the repository's data/gpt2-tokenizer/)
  <models-dir>/llama-360m-random/  LlamaForCausalLM shaped like SmolLM2-360M
                                   (hidden 960, ffn 2560, 32 layers, 15 heads, 5 kv heads,
                                   vocab 49152, tied embeddings, rope_theta 1e5)
                                   + a 49152-token BPE trained here on tinyshakespeare

<models-dir> is --models-dir, else $BENCH_MODELS_DIR, else ./bench-models under the
current directory (about 1.9 GB). The inputs are read from the repository's data/, found
relative to this script (<script dir>/../../data).

Weights: HF default init (normal std 0.02, seed 0). From a project checkout:
  python3 scripts/peers/make_bench_models.py [--only gpt2|llama] [--models-dir DIR]

Why the Llama tokenizer is a *byte-fallback* BPE (Llama-2 / SentencePiece style) and
not a GPT-2-style *byte-level* BPE: convert_hf_to_gguf.py identifies byte-level BPE
tokenizers by hashing how they encode a probe string and refuses unknown hashes
("BPE pre-tokenizer was not recognized"), which every freshly trained byte-level BPE
is. A BPE with byte_fallback and a Sequence decoder goes through the converter's
LlamaHfVocab path instead, which has no such check. It still encodes any input
(unknown bytes become <0xNN> tokens). --bytelevel-too additionally writes a byte-level
BPE (also exactly 49152 tokens) to <models-dir>/tokenizers/bytelevel-bpe-49152/ for
code that wants one; converting a model that uses it needs its hash registered.
"""
import argparse
import json
import os
import re
import shutil
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB_LLAMA = 49152
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "data"))  # the repository's data/
TEXT = os.path.join(DATA, "tinyshakespeare.txt")
GPT2_TOK = os.path.join(DATA, "gpt2-tokenizer")
OUT = os.environ.get("BENCH_MODELS_DIR", "bench-models")  # default output, relative to the cwd


def llama_bench_config():
    return LlamaConfig(
        vocab_size=VOCAB_LLAMA, hidden_size=960, intermediate_size=2560,
        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        initializer_range=0.02,
    )


def gpt2_bench_config():
    return GPT2Config()  # 124M: vocab 50257, n_positions 1024, n_embd 768, 12 layers, 12 heads


def finish_config(path):
    """Add top-level rope_theta / torch_dtype (transformers 5 writes only rope_parameters
    and dtype) and GPT-2's n_ctx (transformers 4 wrote it) for older tools and simple loaders."""
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        cfg.setdefault("rope_theta", rp["rope_theta"])
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    if cfg.get("model_type") == "gpt2":
        cfg.setdefault("n_ctx", cfg["n_positions"])  # convert_hf_to_gguf.py reads n_ctx
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def wait_for(paths, minutes):
    deadline = time.time() + 60 * minutes
    while not all(os.path.isfile(p) for p in paths):
        if time.time() > deadline:
            missing = [p for p in paths if not os.path.isfile(p)]
            raise SystemExit(f"gave up waiting for {missing}")
        print("waiting for", [p for p in paths if not os.path.isfile(p)], flush=True)
        time.sleep(30)


def save_model(model, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    finish_config(os.path.join(out_dir, "config.json"))
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)  # saved as 0600


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def build_gpt2(wait_min, models_dir):
    out_dir = os.path.join(models_dir, "gpt2-124m-random")
    src = {n: os.path.join(GPT2_TOK, n) for n in ("encoder.json", "vocab.bpe", "tokenizer.json")}
    wait_for([src["tokenizer.json"]], wait_min)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_bench_config()).eval()
    save_model(model, out_dir)
    # tokenizer: vocab.json/merges.txt are the HF names of OpenAI's encoder.json/vocab.bpe
    shutil.copyfile(src["tokenizer.json"], os.path.join(out_dir, "tokenizer.json"))
    # (the repository ships tokenizer.json only; OpenAI's two files are copied when present)
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if os.path.exists(src[name]):
            shutil.copyfile(src[name], os.path.join(out_dir, hf_name))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 1024,
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    return out_dir


def train_bytefallback_bpe(text_path):
    """Llama-2-style BPE: '▁' marks spaces, <0x00>..<0xFF> byte-fallback tokens.
    No pre-tokenizer split, so merges may span words (as SentencePiece with
    split_by_whitespace=false); this is what lets 1 MB of text reach 49152 tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_LLAMA, min_frequency=0, special_tokens=specials,
                                  show_progress=False)
    tok.train([text_path], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    # The trainer reserved ids 3..258 for the byte tokens by taking them as special
    # tokens; make them ordinary vocabulary entries again (as in Llama-2's tokenizer.json)
    # so that decode(skip_special_tokens=True) keeps them and converters type them BYTE.
    j = json.loads(tok.to_str())
    j["added_tokens"] = [a for a in j["added_tokens"] if not re.fullmatch(r"<0x[0-9A-F]{2}>", a["content"])]
    return Tokenizer.from_str(json.dumps(j))


def train_bytelevel_bpe(text_path):
    """GPT-2-style byte-level BPE. use_regex=False (no GPT-2 word split) because with the
    word split tinyshakespeare only supports ~21.5k tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_LLAMA, min_frequency=0,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([text_path], trainer)
    return tok


def build_llama(wait_min, bytelevel_too, models_dir):
    out_dir = os.path.join(models_dir, "llama-360m-random")
    wait_for([TEXT], wait_min)
    tok = train_bytefallback_bpe(TEXT)
    assert tok.get_vocab_size() == VOCAB_LLAMA, tok.get_vocab_size()
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_bench_config()).eval()
    save_model(model, out_dir)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})

    if bytelevel_too:
        bl = train_bytelevel_bpe(TEXT)
        assert bl.get_vocab_size() == VOCAB_LLAMA, bl.get_vocab_size()
        bl_dir = os.path.join(models_dir, "tokenizers", "bytelevel-bpe-49152")
        os.makedirs(bl_dir, exist_ok=True)
        bl.save(os.path.join(bl_dir, "tokenizer.json"))
        write_json(os.path.join(bl_dir, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "model_max_length": 8192, "clean_up_tokenization_spaces": False,
        })
    return out_dir


def smoke(out_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out_dir)
    text = "To be, or not to be: that is the question. Ünïcödé ☃ 123"
    ids = tok(text)["input_ids"]
    back = tok.decode(ids, skip_special_tokens=True)
    print(f"  {out_dir}: tokenizer {type(tok).__name__}, {len(tok)} tokens; "
          f"{len(ids)} ids, round-trip {'ok' if back == text else repr(back)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["gpt2", "llama"], default=None)
    ap.add_argument("--models-dir", default=OUT,
                    help="output folder (default: $BENCH_MODELS_DIR, else ./bench-models under the current directory)")
    ap.add_argument("--wait-min", type=float, default=20.0, help="wait this long for the data/ inputs")
    ap.add_argument("--bytelevel-too", action="store_true",
                    help="also write <models-dir>/tokenizers/bytelevel-bpe-49152/")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only in (None, "gpt2"):
        smoke(build_gpt2(args.wait_min, args.models_dir))
    if args.only in (None, "llama"):
        smoke(build_llama(args.wait_min, args.bytelevel_too, args.models_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
