"""Writes small seed corpora for the fuzz targets into fuzz/corpus/<target>/ from the test
fixtures and a few hand-made files (run from the repository root; needs `tokenizers` and a
built `target/release/quill`). The fuzzers grow the corpora from there."""

import json
import os
import struct
import subprocess
import tempfile

from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, normalizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
TEXT = "Once upon a time there was a cat. The cat sat on the mat, and it was happy.\n" * 20


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def tokenizers_seeds():
    t = Tokenizer(models.BPE(unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    put("tokenizer", "bytelevel_bpe.json", t.to_str())
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    put("tokenizer", "spm_bpe.json", t.to_str())
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([TEXT], trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    put("tokenizer", "wordpiece.json", t.to_str())
    chars = sorted(set(TEXT))
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "a.txt"), "w").write(TEXT)
        subprocess.run([os.path.join(ROOT, "target/release/quill"), "prepare", "--input",
                        os.path.join(d, "a.txt"), "--tokenizer", "char", "--out",
                        os.path.join(d, "p"), "--val-fraction", "0.2"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p = os.path.join(d, "p")
        put("tokenizer", "char.json", open(os.path.join(p, "tokenizer.json"), "rb").read())
        meta = json.load(open(os.path.join(p, "meta.json")))
        shard = open(os.path.join(p, meta["train"]["shards"][0]), "rb").read()
        for part, n in (("train", len(shard)), ("val", 0)):
            pass
        meta["train"]["shards"] = ["s.bin"]
        meta["val"]["shards"] = ["s.bin"]
        count = struct.unpack("<Q", shard[16:24])[0]
        meta["train"]["tokens"] = meta["val"]["tokens"] = count
        put("prepared", "char", json.dumps(meta).encode() + b"\0" + shard)
        assert len(chars) > 0


def llama2c_seeds():
    dim, hidden, layers, heads, kv, vocab, seq = 8, 16, 1, 2, 1, 16, 8
    hd = dim // heads
    n = (vocab * dim + layers * (dim + dim * dim + 2 * kv * hd * dim + dim * dim + dim + 3 * hidden * dim)
         + dim + seq * hd)
    body = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)
    body += struct.pack(f"<{n}f", *[((i * 37) % 17 - 8) / 40 for i in range(n)])
    put("llama2c_model", "tiny.bin", body)
    put("llama2c_model", "unshared.bin", struct.pack("<7i", dim, hidden, layers, heads, kv, -vocab, seq)
        + body[28:] + struct.pack(f"<{vocab * dim}f", *([0.01] * (vocab * dim))))
    tok = open(os.path.join(ROOT, "tests/fixtures/stories260K/tok512.bin"), "rb").read()
    put("llama2c_tokenizer", "tok512", struct.pack("<H", 512) + tok)
    pieces = [b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in b" abcdeo"] + [b"\xe2\x96\x81a", b"ab"]
    small = struct.pack("<i", 4) + b"".join(struct.pack("<fi", -i, len(p)) + p for i, p in enumerate(pieces))
    put("llama2c_tokenizer", "small", struct.pack("<H", len(pieces)) + small)


def json_seeds():
    for m in ("gpt2-tiny", "llama-tiny", "qwen2-tiny"):
        put("generation_config", m, open(os.path.join(ROOT, "tests/fixtures", m, "generation_config.json"), "rb").read())
    put("generation_config", "full", json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
                                                  "min_p": 0.05, "max_new_tokens": 64, "repetition_penalty": 1.1,
                                                  "eos_token_id": [2, 7], "bos_token_id": 1}))
    names = json.loads(open(os.path.join(ROOT, "tests/fixtures/llama-tiny/model.safetensors"), "rb").read()[8:][:struct.unpack("<Q", open(os.path.join(ROOT, "tests/fixtures/llama-tiny/model.safetensors"), "rb").read(8))[0]])
    wm = {k: "a.safetensors" for k in names if k != "__metadata__"}
    put("index", "real", json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    put("index", "two", json.dumps({"weight_map": {"x": "a.safetensors", "y": "../a.safetensors"}}))
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    llama2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
              "message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
              "message['content'] + '\\n<</SYS>>\\n\\n' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
              "{% endif %}{% endfor %}")
    loops = "{% for i in range(10) %}{% for m in messages|reverse %}{{ m.content|upper ~ loop.index }}{% endfor %}{% endfor %}{{ raise_exception('x') if messages|length > 9 }}"
    for i, t in enumerate((chatml, llama2, loops)):
        put("chat_template", f"t{i}", t)


if __name__ == "__main__":
    tokenizers_seeds()
    llama2c_seeds()
    json_seeds()
