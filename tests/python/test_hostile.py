"""Hostile input (the first classes of the hostile-input issue), run by ./run-tests.

Each crafted input gets one `error:` line and a non-zero exit, or works, within a time limit
and under an address-space limit far below what the crafted sizes would allocate: no panic,
no abort, no hang.

- config.json files that describe a model larger than the weights beside them;
- safetensors files with thousands of tensors (each header is parsed once);
- llama2.c vocabularies too small for byte fallback, or for their control tokens;
- training flags out of range, and NaN/infinite optimizer settings.
"""
import json
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import sys

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
QUILL = str(ROOT / "target" / "release" / "quill")
FIXTURES = ROOT / "tests" / "fixtures"
# far below the gigabytes the crafted sizes ask for, well above what the real models need
ADDRESS_LIMIT = 4 << 30


def run(*args, timeout=30):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    return subprocess.run([QUILL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)


def refused(r, *words):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, r.stderr
    assert "panicked" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 50_000_000), ("intermediate_size", 10**12), ("num_hidden_layers", 10**12),
    ("num_hidden_layers", 10**6), ("hidden_size", 2**40), ("max_position_embeddings", 10**15),
])
def test_config_that_overstates_the_model_is_refused_before_allocating(tmp_path, field, value):
    for name in ["llama-tiny", "gpt2-tiny"]:
        d = tmp_path / name
        shutil.copytree(FIXTURES / name, d)
        cfg = json.loads((d / "config.json").read_text())
        key = {"vocab_size": "vocab_size", "intermediate_size": "n_inner", "num_hidden_layers": "n_layer",
               "hidden_size": "n_embd", "max_position_embeddings": "n_positions"}[field] \
            if name.startswith("gpt2") else field
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        r = run("logits", "--model", d, "--ids", "1,2,3")
        if field == "max_position_embeddings" and name == "llama-tiny":
            # no weight depends on it (rotary positions): it loads, and allocates for the
            # three positions used, not for 10^15
            assert r.returncode == 0, r.stderr
        else:
            refused(r)
        shutil.rmtree(d)


def test_thousands_of_tensors_load_in_linear_time(tmp_path):
    """A header parsed once per file: 9,000 extra tensors beside the real ones load well
    inside the time limit (parsed once per lookup they took more than 30 s)."""
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "many"
    shutil.copytree(FIXTURES / "llama-tiny", d)
    st = load_file(str(d / "model.safetensors"))
    for i in range(9000):
        st[f"extra.{i}.weight"] = np.zeros(4, np.float32)
    save_file(st, str(d / "model.safetensors"))
    r = run("logits", "--model", d, "--ids", "1,2,3", timeout=30)
    assert r.returncode == 0, r.stderr


def llama2c_model(path, vocab, dim=8, hidden=16, layers=1, heads=2, seq=16):
    rng = np.random.default_rng(0)
    n = (vocab * dim + layers * dim + 4 * layers * dim * dim + layers * dim
         + 3 * layers * hidden * dim + dim + 2 * seq * (dim // heads) // 2)
    w = (rng.standard_normal(n) * 0.1).astype(np.float32)
    path.write_bytes(struct.pack("<7i", dim, hidden, layers, heads, heads, vocab, seq) + w.tobytes())


def llama2c_tokenizer(path, pieces):
    out = struct.pack("<i", max(len(p) for p in pieces))
    for i, p in enumerate(pieces):
        b = p.encode()
        out += struct.pack("<fi", -float(i), len(b)) + b
    path.write_bytes(out)


def test_small_llama2c_vocabularies(tmp_path):
    # ten tokens: the byte-fallback ids of "é" (and most bytes) lie outside the vocabulary
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n", " ", "h", "e", "l", "o", " h", "he"]
    llama2c_model(tmp_path / "m.bin", len(pieces))
    llama2c_tokenizer(tmp_path / "t.bin", pieces)
    for cmd in (["generate", "--prompt", "héllo wörld", "--max-new-tokens", "5"],
                ["score", "--text", "héllo ☃"]):
        r = run(*cmd, "--model", tmp_path / "m.bin", "--tokenizer", tmp_path / "t.bin")
        assert r.returncode == 0 and "panicked" not in r.stderr, r.stderr
    # fewer than its three control tokens
    llama2c_model(tmp_path / "m2.bin", 2)
    llama2c_tokenizer(tmp_path / "t2.bin", ["<unk>", "\n<s>\n"])
    refused(run("generate", "--prompt", "hi", "--model", tmp_path / "m2.bin", "--tokenizer", tmp_path / "t2.bin"),
            "too few")


@pytest.mark.parametrize("flags,words", [
    (["--width", "1000000000"], ["--width"]),
    (["--context", "1000000000000"], ["context"]),
    (["--layers", "0"], ["--layers"]),
    (["--heads", "100000"], ["--heads"]),
    (["--weight-decay", "NaN"], ["--weight-decay"]),
    (["--weight-decay=-1"], ["--weight-decay"]),
    (["--grad-clip", "inf"], ["--grad-clip"]),
    (["--lr", "NaN"], ["--lr"]),
    (["--arch", "llama", "--width", "4096", "--heads", "32", "--layers", "4000"], ["parameters"]),
    (["--arch", "llama", "--batch", "65536", "--context", "1048576"], ["beyond"]),
])
def test_training_flags_out_of_range(tmp_path, flags, words):
    r = run("train", "--steps", "1", "--out", tmp_path / "run", *flags)
    refused(r, *words)
    # nothing half-written is left as a model
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("count", ["1000000000", "18446744073709551615"])
def test_huge_max_new_tokens_stop_at_the_context(count):
    # once aborted (a buffer sized by the flag) or panicked (capacity overflow): generation
    # now stops at the model's context, within the address limit
    d = FIXTURES / "stories260K"
    r = run("generate", "--model", d / "stories260K.bin", "--tokenizer", d / "tok512.bin",
            "--prompt", "Once", "--max-new-tokens", count, timeout=120)
    assert r.returncode == 0 and "panicked" not in r.stderr, r.stderr
    assert r.stdout.strip(), "no text"


def path_tricks(tmp_path, inside):
    """Names a file index may hold that lead outside its folder or to no regular file."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    fifo = inside / "fifo.bin"
    if not fifo.exists():
        import os
        os.mkfifo(fifo)
    link = inside / "link.bin"
    if not link.exists():
        link.symlink_to(outside / "x.bin")
    (outside / "x.bin").write_bytes(b"\0" * 64)
    return ["../outside/x.bin", str(outside / "x.bin"), "/etc/passwd", "fifo.bin", "link.bin", "", "sub/../../outside/x.bin"]


def test_shard_index_paths_stay_inside_the_model_folder(tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "llama-tiny", d)
    from safetensors.numpy import load_file
    names = list(load_file(str(d / "model.safetensors")))
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run("logits", "--model", d, "--ids", "1,2").returncode == 0
    for trick in path_tricks(tmp_path, d):
        index["weight_map"][names[0]] = trick
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        refused(run("logits", "--model", d, "--ids", "1,2", timeout=20))


def test_prepared_shard_paths_stay_inside_the_data_folder(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, a small corpus for shards\n" * 200)
    data = tmp_path / "data"
    r = subprocess.run([QUILL, "prepare", "--input", text, "--tokenizer", "char", "--out", data],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    meta = json.loads((data / "meta.json").read_text())
    for trick in path_tricks(tmp_path, data):
        m = json.loads(json.dumps(meta))
        m["train"]["shards"][0] = trick
        (data / "meta.json").write_text(json.dumps(m))
        refused(run("train", "--data", data, "--steps", "1", "--out", tmp_path / "run", "--overwrite",
                    timeout=20))


@pytest.mark.parametrize("change,words", [
    ({"rope_theta": 1e-300, "rope_parameters": {"rope_theta": 1e-300, "rope_type": "default"}}, ["rope_theta"]),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 0}}, ["factor"]),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": -2}}, ["factor"]),
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8, "low_freq_factor": 2,
                          "high_freq_factor": 2, "original_max_position_embeddings": 64}}, ["high_freq_factor"]),
    ({"model_type": "mistral", "sliding_window": 0}, ["sliding_window"]),
    ({"eos_token_id": 4294967401}, ["eos_token_id"]),
    ({"eos_token_id": [2, "x"]}, ["eos_token_id"]),
    ({"bos_token_id": -1}, ["bos_token_id"]),
])
def test_nonsense_configuration_is_refused_with_the_field_named(tmp_path, change, words):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama-tiny", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    refused(run("logits", "--model", d, "--ids", "1,2"), *words)


@pytest.mark.parametrize("change,words", [
    ({"temperature": "hot"}, ["temperature"]), ({"top_p": 2}, ["top_p"]),
    ({"top_k": -3}, ["top_k"]), ({"eos_token_id": 4294967401}, ["eos_token_id"]),
    ({"do_sample": "yes"}, ["do_sample"]),
])
def test_nonsense_generation_config_is_refused(tmp_path, change, words):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama-tiny", d)
    (d / "generation_config.json").write_text(json.dumps(change))
    (d / "tokenizer.json").write_text(json.dumps(byte_vocab(256)))
    refused(run("generate", "--model", d, "--prompt", "ab", "--max-new-tokens", "3"), *words)


def byte_vocab(n):
    from gguf_write import bytes_to_unicode
    alphabet = bytes_to_unicode()
    return {"version": "1.0", "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {alphabet[b]: b for b in range(n)}, "merges": []}}


def test_nan_weights_are_an_error_not_endless_token_zero(tmp_path):
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama-tiny", d)
    (d / "tokenizer.json").write_text(json.dumps(byte_vocab(256)))
    st = load_file(str(d / "model.safetensors"))
    for k in st:
        st[k][...] = np.nan
    save_file(st, str(d / "model.safetensors"))
    refused(run("generate", "--model", d, "--prompt", "ab", "--max-new-tokens", "3"), "NaN")
    refused(run("logits", "--model", d, "--ids", "1,2"), "NaN")


RUNAWAY_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{% set a = 'x' * 100000000 %}{{ a ~ a ~ a }}",
    "{% for i in range(1000) %}{{ 'y' * 100000 }}{% endfor %}{{ messages }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
]


def template_model(tmp_path, template):
    d = tmp_path / "t"
    if not d.exists():
        shutil.copytree(FIXTURES / "llama-tiny", d)
        (d / "tokenizer.json").write_text(json.dumps(byte_vocab(256)))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return d


@pytest.mark.parametrize("template", RUNAWAY_TEMPLATES)
def test_runaway_chat_templates_stop_with_one_error_line(tmp_path, template):
    d = template_model(tmp_path, template)
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    r = subprocess.run([QUILL, "chat", "--model", d, "--max-new-tokens", "2"], input="hi\n", capture_output=True,
                       text=True, timeout=30, preexec_fn=limit)
    refused(r, "chat template")


def test_runaway_templates_do_not_stall_the_server(tmp_path):
    """Two runaway-template requests at once: each gets a 400, and /health answers within a
    second the whole time."""
    import threading
    import time
    import urllib.request
    from test_server import start
    d = template_model(tmp_path, RUNAWAY_TEMPLATES[0])
    proc, addr, _ = start(d, tmp_path / "s.log")
    try:
        codes = []

        def chat():
            req = urllib.request.Request(f"http://{addr}/v1/chat/completions", method="POST",
                                         data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=60)
                codes.append(200)
            except urllib.error.HTTPError as e:
                codes.append(e.code)

        threads = [threading.Thread(target=chat) for _ in range(2)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            t0 = time.time()
            with urllib.request.urlopen(f"http://{addr}/health", timeout=5) as r:
                assert r.status == 200
            assert time.time() - t0 < 1.0
            time.sleep(0.05)
        assert codes == [400, 400], codes
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_llama2c_header_with_a_huge_context_allocates_only_what_is_used(tmp_path):
    """seq_len 10^6 in a 16 MB checkpoint (its RoPE tables make the file that long): every
    command runs under the 4 GB address limit, its KV cache sized by the tokens it uses."""
    llama2c_model(tmp_path / "m.bin", 10, seq=1_000_000)
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n", " ", "h", "e", "l", "o", " h", "he"]
    llama2c_tokenizer(tmp_path / "t.bin", pieces)
    m, t = tmp_path / "m.bin", tmp_path / "t.bin"
    for args in (["logits", "--model", m, "--ids", "1,4,5"],
                 ["generate", "--model", m, "--tokenizer", t, "--prompt", "he", "--max-new-tokens", "3"],
                 ["score", "--model", m, "--tokenizer", t, "--text", "hello"]):
        r = run(*args)
        assert r.returncode == 0 and "panicked" not in r.stderr, (args[0], r.stderr)
