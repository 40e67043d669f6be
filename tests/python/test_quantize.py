"""`quill quantize` against outside references, run by ./run-tests.

- Models of each architecture (GPT-2, Llama, Qwen2: the tiny fixtures and larger random ones
  whose rows are whole 256-number super-blocks, so the K types are used) written in every
  type: the `gguf` package reads the file back, `transformers` loads it
  (`from_pretrained(dir, gguf_file=...)`) to the logits of Quill's dequantized twin within
  1e-4, and the quantized path stays within the stated bound of the twin.
- The 32-number types and f16/bf16 are bit for bit what the `gguf` package's reference
  quantizers make of the same numbers; Q4_K and Q6_K (no reference rounding) are held to an
  error no larger than Q4_1's and Q5_0's on the same tensors.
- The tokenizer travels: a byte-level tokenizer.json, llama2.c's SentencePiece tok512 and
  SmolLM2's own vocabulary give transformers' AutoTokenizer the same ids as before.
- SmolLM2-135M-Instruct requantized: perplexity on held-out text, q8_0 within 0.5% of f16 and
  q4_k_m within 5% and behind both; the q8_0 file still answers Paris.
- Bad requests get one error line and a non-zero exit.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import gguf
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_write import bytes_to_unicode  # noqa: E402
from test_gguf import QUANT_BOUND, quill, quill_logits, smollm2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q6_k"]
# the types the gguf package has reference quantizers for, as GGUF type names
EXACT = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def byte_tokenizer(vocab):
    """A byte-level BPE tokenizer.json: the 256 byte symbols, then merges of pairs."""
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    merges = []
    a = 0
    while len(tokens) < vocab:
        left, right = tokens[a % 256], tokens[(7 * a + 3) % 256]
        if left + right not in tokens:
            tokens.append(left + right)
            merges.append(f"{left} {right}")
        a += 1
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def model_folder(tmp_path, name):
    """A model folder with a tokenizer.json: a fixture, or a random model whose matrices have
    rows of whole 256-number super-blocks (`big-*`)."""
    out = tmp_path / name
    if name.startswith("big-"):
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(0)
        arch = name[4:]
        if arch == "gpt2":
            m = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=256, n_layer=2, n_head=4))
        else:
            cls, c = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
            m = cls(c(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=9,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=(arch == "qwen2")))
        with torch.no_grad():
            for p in m.parameters():  # spread like trained weights, outliers included
                p.copy_(torch.randn_like(p) * 0.05 + (torch.rand_like(p) < 0.01) * torch.randn_like(p) * 0.3)
        m.save_pretrained(out, safe_serialization=True)
        vocab = 320
    else:
        shutil.copytree(FIXTURES / name, out)
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer(vocab)))
    return out


def hf_logits(path, ids):
    config = {}
    r = gguf.GGUFReader(str(path))
    if "gpt2.context_length" in r.fields:
        # transformers reads GPT-2's context_length into n_ctx, leaving n_positions at 1024
        config["n_positions"] = int(r.fields["gpt2.context_length"].contents())
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **config)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def source_tensors(path):
    """The f32 GGUF (written by `quill quantize --type f32`) as {name: array}."""
    r = gguf.GGUFReader(str(path))
    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in r.tensors}


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "big-gpt2", "big-llama", "big-qwen2"])
def test_every_type_loads_in_transformers_to_the_twins_logits(name, tmp_path):
    folder = model_folder(tmp_path, name)
    ids = [5, 17, 200, 3, 99, 42, 7, 8, 150, 1, 64, 255, 0, 31]
    f32 = tmp_path / "f32.gguf"
    quill("quantize", "--model", folder, "--type", "f32", "--out", f32)
    src = source_tensors(f32)
    # the f32 file holds the folder's own logits
    base = quill_logits(folder, ids)
    assert np.abs(quill_logits(f32, ids) - base).max() < 1e-4
    seen = set()
    for t in TYPES:
        path = tmp_path / f"{name}-{t}.gguf"
        quill("quantize", "--model", folder, "--type", t, "--out", path)
        r = gguf.GGUFReader(str(path))
        for tensor in r.tensors:
            tt = tensor.tensor_type.name
            seen.add(tt)
            x = src[tensor.name]
            got = np.asarray(tensor.data).view(np.uint8).ravel()
            if tt in EXACT:
                want = quantize(x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x, tensor.tensor_type)
                assert np.array_equal(got, want.view(np.uint8).ravel()), f"{name} {t}: {tensor.name} ({tt})"
            else:
                # no reference rounding: no worse than the simple format of the same width
                back = dequantize(tensor.data, tensor.tensor_type).reshape(x.shape)
                simple = {"Q4_K": gguf.GGMLQuantizationType.Q4_1, "Q6_K": gguf.GGMLQuantizationType.Q5_0}[tt]
                ref = dequantize(quantize(x, simple), simple).reshape(x.shape)
                ours, theirs = np.mean((back - x) ** 2), np.mean((ref - x) ** 2)
                assert ours <= theirs * (1.05 if tt == "Q4_K" else 0.6), f"{tensor.name} {tt}: {ours} vs {theirs}"
        twin, want = quill_logits(path, ids, "--dequantize"), hf_logits(path, ids)
        err = float(np.abs(twin - want).max())
        assert err < 1e-4, f"{name} {t}: max |Δlogit| against transformers {err}"
        fast = quill_logits(path, ids)
        assert np.abs(fast - twin).max() < QUANT_BOUND * np.abs(twin).max(), f"{name} {t}"
    if name.startswith("big-"):
        assert {"Q4_K", "Q6_K"} <= seen, seen


def test_tokenizers_travel_into_the_gguf(tmp_path):
    """A byte-level tokenizer.json, llama2.c's SentencePiece tok512 and SmolLM2's vocabulary,
    each read back by transformers' AutoTokenizer from the file quill writes."""
    texts = ["Once upon a time, there was a little girl named Lily.", "Hello world", "  two  spaces",
             "new\nline", "Zürich ☃ 日本", "12345 digits", "a"]
    folder = model_folder(tmp_path, "gpt2-tiny")
    stories = FIXTURES / "stories260K"
    cases = [
        (["--model", folder], "byte.gguf"),
        (["--model", stories / "stories260K.bin", "--tokenizer", stories / "tok512.bin"], "spm.gguf"),
        (["--model", smollm2()], "smol.gguf"),
    ]
    for args, out in cases:
        path = tmp_path / out
        quill("quantize", *args, "--type", "q8_0", "--out", path)
        tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out)
        for text in texts:
            got = json.loads(quill("tokenize", "--tokenizer", path, "--text", text).stdout)["ids"]
            assert got == tok(text, add_special_tokens=False)["input_ids"], (out, text)
    # llama2.c's tokenizer (run.c's encoder, through `quill score`) and the GGUF's agree (on
    # text that does not start with a space: there transformers' reading of a SentencePiece
    # GGUF, which quill follows, adds no prefix space while run.c and llama.cpp do)
    for text in ["Once upon a time, there was a little girl named Lily.", "Hello world", "new\nline",
                 "Lily and Ben went to the park. They saw a big dog!", "two  spaces", "Zürich"]:
        ids = {}
        for args in (["--model", stories / "stories260K.bin", "--tokenizer", stories / "tok512.bin"],
                     ["--model", tmp_path / "spm.gguf"]):
            out = json.loads(quill("score", *args, "--text", text, "--json").stdout)
            ids[len(args)] = [t["id"] for t in out["tokens"]]
        assert ids[4] == ids[2], (text, ids)
    # llama2.c's checkpoint: the same logits through the GGUF
    ids = [1, 400, 300, 20, 77, 5, 300]
    path = tmp_path / "stories.gguf"
    quill("quantize", "--model", stories / "stories260K.bin", "--tokenizer", stories / "tok512.bin",
          "--type", "f32", "--out", path)
    assert np.abs(hf_logits(path, ids) - quill_logits(path, ids)).max() < 1e-4
    assert np.abs(quill_logits(path, ids) - np.array(json.loads(quill(
        "logits", "--model", stories / "stories260K.bin", "--ids", ",".join(map(str, ids))).stdout)["logits"])).max() < 1e-5


def test_smollm2_requantized_keeps_its_quality_in_order(tmp_path):
    """Perplexity on held-out text (the end of Tiny Shakespeare, 8 chunks of 512 tokens):
    q8_0 within 0.5% of f16, q4_k_m within 5% and behind both (llama-perplexity's order on the
    same files over 20 chunks is in BENCHMARKS.md). The q4_k_m file's logits match transformers'."""
    text = tmp_path / "heldout.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[-60000:])
    ppl = {}
    ids = [1, 504, 3458, 282, 4649, 314, 2, 28, 339, 6037, 30]
    for t in ["f16", "q8_0", "q4_k_m"]:
        path = tmp_path / f"smol-{t}.gguf"
        quill("quantize", "--model", smollm2(), "--type", t, "--out", path)
        ppl[t] = json.loads(quill("perplexity", "--model", path, "--file", text, "--chunks", 8,
                                  "--json").stdout)["perplexity"]
        if t == "q4_k_m":  # (f16 and q8_0 files are checked on the small models)
            assert np.abs(quill_logits(path, ids, "--dequantize") - hf_logits(path, ids)).max() < 1e-4
    # f16 and q8_0 differ by less than the noise of eight chunks (either may come first);
    # q4_k_m is clearly behind both, as in llama-perplexity's measurements
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.005, ppl
    assert ppl["q4_k_m"] > max(ppl["f16"], ppl["q8_0"]), ppl
    assert ppl["q4_k_m"] / ppl["f16"] - 1 < 0.05, ppl
    # the q8_0 file still answers; requantized from Q4_1 to q4_k_m or q6_k this 135M model no
    # longer does, with quill's files as with llama-quantize's (BENCHMARKS.md)
    out = quill("chat", "--model", tmp_path / "smol-q8_0.gguf", "--temperature", "0",
                "--max-new-tokens", 20, input="What is the capital of France?\n").stdout
    assert "Paris" in out, out


def test_bad_requests_get_one_error_line(tmp_path):
    folder = model_folder(tmp_path, "llama-tiny")
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    cases = [
        ["--model", folder, "--type", "q3_k", "--out", tmp_path / "x.gguf"],
        ["--model", tmp_path / "missing", "--type", "q8_0", "--out", tmp_path / "x.gguf"],
        ["--model", folder, "--type", "q8_0", "--out", tmp_path],
        ["--model", damaged, "--type", "q8_0", "--out", tmp_path / "x.gguf"],
        ["--model", smollm2(), "--tokenizer", folder / "tokenizer.json", "--type", "q8_0", "--out", tmp_path / "x.gguf"],
    ]
    for args in cases:
        r = quill("quantize", *args, check=False)
        assert r.returncode != 0 and "panicked" not in r.stderr, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
    assert not (tmp_path / "x.gguf").exists()
    # a model holding NaN is refused, and no file is left behind
    from safetensors.numpy import load_file, save_file
    st = load_file(str(folder / "model.safetensors"))
    st["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(st, str(folder / "model.safetensors"), metadata={"format": "pt"})
    r = quill("quantize", "--model", folder, "--type", "q8_0", "--out", tmp_path / "nan.gguf", check=False)
    assert r.returncode != 0 and "non-finite" in r.stderr and not (tmp_path / "nan.gguf").exists(), r.stderr


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    """Llama 3.1's RoPE scaling is stored as llama.cpp stores it, a divisor per frequency in
    `rope_freqs.weight` (computed here independently, with the converter's formula), and read
    back: the GGUF's logits over 96 positions equal transformers' on the original folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=500000.0, rope_scaling=rope, rope_parameters=rope)
    m = LlamaForCausalLM(cfg)
    folder = tmp_path / "llama3"
    m.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(json.dumps(byte_tokenizer(300)))
    path = tmp_path / "llama3.gguf"
    quill("quantize", "--model", folder, "--type", "f32", "--out", path)
    r = gguf.GGUFReader(str(path))
    got = [np.asarray(t.data) for t in r.tensors if t.name == "rope_freqs.weight"][0]
    d = 128 // 4
    freqs = 1.0 / (500000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    low_wl, high_wl = 32 / 1.0, 32 / 4.0
    want = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            want.append(1.0)
        elif wl > low_wl:
            want.append(8.0)
        else:
            smooth = (32 / wl - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert np.allclose(got, want, rtol=1e-5), (got, want)
    ids = [(i * 37 + 11) % 300 for i in range(96)]
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(quill_logits(path, ids) - ref).max() < 1e-4
    # quantized, the same scaling: against the dequantized twin
    q = tmp_path / "llama3-q8.gguf"
    quill("quantize", "--model", path, "--type", "q8_0", "--out", q)
    twin = quill_logits(q, ids, "--dequantize")
    assert np.abs(quill_logits(q, ids) - twin).max() < QUANT_BOUND * np.abs(twin).max()
    # factors that follow no Llama 3 band structure are refused with one line
    import shutil as sh
    bad = tmp_path / "bad.gguf"
    sh.copyfile(path, bad)
    raw = bytearray(bad.read_bytes())
    field = [t for t in r.tensors if t.name == "rope_freqs.weight"][0]
    at = field.data_offset
    vals = np.frombuffer(bytes(raw[at:at + 4 * len(want)]), np.float32).copy()
    vals[::2] = 3.0
    raw[at:at + 4 * len(want)] = vals.tobytes()
    bad.write_bytes(bytes(raw))
    res = quill("logits", "--model", bad, "--ids", "1,2", check=False)
    assert res.returncode != 0 and "rope_freqs" in res.stderr and "panicked" not in res.stderr, res.stderr
