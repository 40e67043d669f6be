"""Interoperability with Hugging Face `transformers` (PyTorch), run by ./run-tests.

- `quill logits` on GPT-2 folders written by transformers, of shapes quill's own tests never
  use, matches transformers' logits within 1e-4 (max abs).
- A folder written by `quill train --init` loads in transformers.AutoModelForCausalLM and gives
  the logits `quill logits` gives; its tokenizer.json loads in the `tokenizers` library and
  encodes text the way quill does.
"""
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[2]
QUILL = os.environ.get("QUILL_BIN", str(ROOT / "target" / "release" / "quill"))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"

torch.manual_seed(0)


def quill(*args, check=True):
    r = subprocess.run([QUILL, *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"quill {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r


def quill_logits(model_dir, ids):
    out = quill("logits", "--model", model_dir, "--ids", ",".join(map(str, ids)))
    return torch.tensor(json.loads(out.stdout)["logits"], dtype=torch.float64)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def randomize(model):
    """Non-trivial weights: norms and biases away from 1 and 0, logits of std ~2."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "ln" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if "wte" not in name and "wpe" not in name else 0.3)


SHAPES = [
    dict(n_embd=48, n_head=3, n_layer=3, n_positions=40, vocab_size=97),
    dict(n_embd=40, n_head=5, n_layer=1, n_positions=17, vocab_size=301, n_inner=72),
    dict(n_embd=64, n_head=1, n_layer=2, n_positions=32, vocab_size=50, tie_word_embeddings=False),
    dict(n_embd=32, n_head=8, n_layer=4, n_positions=64, vocab_size=1000, scale_attn_by_inverse_layer_idx=True,
         layer_norm_epsilon=1e-3),
    dict(n_embd=24, n_head=2, n_layer=2, n_positions=20, vocab_size=33, activation_function="gelu_pytorch_tanh"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(s[k]) for k in ("n_layer", "n_head", "n_embd", "vocab_size")))
def test_logits_match_transformers_on_unseen_shapes(shape, tmp_path):
    cfg = GPT2Config(**shape)
    model = GPT2LMHeadModel(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (cfg.n_positions,)).tolist()
    want = hf_logits(model, ids)
    got = quill_logits(tmp_path, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load(dtype, tmp_path):
    # 40 wide: the Conv1D matrices' 120, 160 and 40 outputs are no multiple of the 16 rows that
    # opening turns at a time
    cfg = GPT2Config(n_embd=40, n_head=4, n_layer=2, n_positions=24, vocab_size=64)
    model = GPT2LMHeadModel(cfg).eval()
    randomize(model)
    model.to(dtype).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (24,)).tolist()
    # the reference: the same rounded weights, computed in float32
    want = hf_logits(model.float(), ids)
    got = quill_logits(tmp_path, ids)
    assert (got - want).abs().max().item() < 1e-4


def test_init_then_transformers_loads_the_same_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:40000])
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    small = ["--layers", "2", "--heads", "2", "--width", "32", "--context", "32", "--batch", "4", "--quiet"]
    quill("train", "--data", corpus, "--out", base, "--steps", "20", "--eval-interval", "20", *small)
    quill("train", "--init", base, "--data", corpus, "--out", tuned, "--steps", "10", "--eval-interval", "5",
          "--batch", "4", "--quiet")
    model = AutoModelForCausalLM.from_pretrained(tuned).eval()
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    ids = torch.randint(0, model.config.vocab_size, (32,)).tolist()
    want = hf_logits(model, ids)
    got = quill_logits(tuned, ids)
    assert (got - want).abs().max().item() < 1e-4
    # the fine-tuned weights differ from the base ones (training happened)
    assert (quill_logits(base, ids) - got).abs().max().item() > 1e-3

    # the character tokenizer loads in HF `tokenizers` and encodes as quill does
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tuned / "tokenizer.json"))
    text = "ROMEO:\nBut, soft! what light?"
    enc = tok.encode(text)
    assert len(enc.ids) == len(text)
    assert tok.decode(enc.ids) == text
    vocab = json.loads((tuned / "tokenizer.json").read_text())["model"]["vocab"]
    assert enc.ids == [vocab[c] for c in text]
    # and quill scores that text from the same ids (one log-prob per predicted character)
    scored = json.loads(quill("score", "--model", tuned, "--text", text, "--json").stdout)
    assert [t["id"] for t in scored["tokens"]] == enc.ids[1:]


def test_transformers_generation_config_defaults_do_not_break_loading(tmp_path):
    # a model saved by transformers with an extra generation_config.json and unused keys
    cfg = GPT2Config(n_embd=16, n_head=2, n_layer=1, n_positions=8, vocab_size=20, summary_type="cls_index")
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path)
    model.generation_config.save_pretrained(tmp_path)
    ids = [1, 2, 3, 4]
    assert (quill_logits(tmp_path, ids) - hf_logits(model, ids)).abs().max().item() < 1e-4


TEXTS = ["Hello world", "ROMEO:\nBut, soft!  what light", "naïve café 🦀🚀 こんにちは", "  spaces\t\ttabs\n\n", "a<|endoftext|>b"]


def test_gpt2_tokenizer_matches_hf_tokenizers():
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(ROOT / "data" / "gpt2-tokenizer" / "tokenizer.json"))
    for text in TEXTS:
        ids = json.loads(quill("tokenize", "--tokenizer", "gpt2", "--text", text).stdout)["ids"]
        assert ids == hf.encode(text).ids, text
        back = quill("detokenize", "--tokenizer", "gpt2", "--ids", ",".join(map(str, ids))).stdout
        assert back == text + "\n"


def test_trained_bpe_loads_in_hf_tokenizers_and_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:60000])
    model = tmp_path / "m"
    quill("train", "--data", corpus, "--out", model, "--tokenizer", "bpe:500", "--steps", "3", "--eval-interval", "3",
          "--layers", "1", "--heads", "2", "--width", "16", "--context", "16", "--batch", "2", "--quiet")
    hf = Tokenizer.from_file(str(model / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(model)
    for text in TEXTS:
        ids = json.loads(quill("tokenize", "--tokenizer", model, "--text", text).stdout)["ids"]
        assert ids == hf.encode(text).ids, text
        assert ids == auto(text)["input_ids"], text
    # the model folder loads and agrees with quill's logits
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = hf.encode("ROMEO: my lord").ids
    assert (quill_logits(model, ids) - hf_logits(m, ids)).abs().max().item() < 1e-4


def make_style_tokenizer(style, corpus, path):
    """A small tokenizer.json with the structure of Llama 3, Qwen2 or SmolLM files
    (their pre-tokenizer patterns, normalizer, special tokens and post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    tok = Tokenizer(models.BPE())
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        pat = llama3 if style == "llama3" else qwen2
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] if style == "llama3"
                    else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


@pytest.mark.parametrize("style", ["llama3", "qwen2", "smollm"])
def test_llama3_qwen2_smollm_style_tokenizers(style, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS.read_text()[:80000])
    path = tmp_path / "tokenizer.json"
    hf = make_style_tokenizer(style, corpus, path)
    specials = {"llama3": "<|begin_of_text|>hi<|eot_id|>", "qwen2": "<|im_start|>user\nhi<|im_end|>",
                "smollm": "<|im_start|>user\nhi<|im_end|>"}[style]
    for text in TEXTS + [specials, "1234567 numbers 3.14159", "Cafe\u0301 ﬁ"]:
        ids = json.loads(quill("tokenize", "--tokenizer", path, "--text", text).stdout)["ids"]
        assert ids == hf.encode(text, add_special_tokens=False).ids, (style, text)
        back = quill("detokenize", "--tokenizer", path, "--ids", ",".join(map(str, ids))).stdout
        assert back == hf.decode(ids, skip_special_tokens=False) + "\n"


def test_greedy_generation_matches_transformers_generate(tmp_path):
    """A GPT-2 folder as transformers writes it, with OpenAI's tokenizer: `quill generate
    --temperature 0` writes the text that transformers' greedy `generate` writes."""
    import shutil
    cfg = GPT2Config(n_embd=48, n_head=4, n_layer=2, n_positions=64)  # GPT-2's vocabulary, eos 50256
    model = GPT2LMHeadModel(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    shutil.copy(ROOT / "data" / "gpt2-tokenizer" / "tokenizer.json", tmp_path / "tokenizer.json")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    prompt = "Hello world, the"
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=50256)
    new = out[0, len(ids):].tolist()
    if 50256 in new:
        new = new[: new.index(50256)]
    want = prompt + tok.decode(new)
    got = quill("generate", "--model", tmp_path, "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "12").stdout
    assert got == want + "\n"


def test_beam_search_matches_transformers_generate(tmp_path):
    """`quill generate --beams K` writes the text of transformers' `generate(num_beams=K,
    do_sample=False)` (length penalty 1, early_stopping false): on a random GPT-2, whose
    beams run to the length limit, and on the same model with the end token's embedding
    turned toward the final norm's bias, so that hypotheses end after 1, 3 and 8 tokens and
    the early-stop rule decides."""
    import shutil
    from tokenizers import Tokenizer
    torch.manual_seed(7)
    cfg = GPT2Config(n_embd=48, n_head=4, n_layer=2, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    randomize(model)
    tok = Tokenizer.from_file(str(ROOT / "data" / "gpt2-tokenizer" / "tokenizer.json"))
    prompts = ["Hello world, the", "Once upon a time", "A"]

    def run(prompt, beams):
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, num_beams=beams,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=50256)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(50256)] if 50256 in new else new
        got = quill("generate", "--model", tmp_path, "--prompt", prompt, "--beams", beams,
                    "--max-new-tokens", "10").stdout
        assert got == prompt + tok.decode(new) + "\n", (prompt, beams)
        return len(new)

    def save():
        model.save_pretrained(tmp_path)
        shutil.copy(ROOT / "data" / "gpt2-tokenizer" / "tokenizer.json", tmp_path / "tokenizer.json")

    save()
    assert [run(p, b) for p in prompts for b in (2, 4)] == [10] * 6
    # beam search is not greedy search here
    assert any(quill("generate", "--model", tmp_path, "--prompt", p, "--beams", "4", "--max-new-tokens", "10").stdout
               != quill("generate", "--model", tmp_path, "--prompt", p, "--temperature", "0",
                        "--max-new-tokens", "10").stdout for p in prompts)
    with torch.no_grad():
        bias = model.transformer.ln_f.bias
        model.transformer.wte.weight[50256] = 9.0 * bias / (bias @ bias)
    save()
    lengths = [run(p, b) for p in prompts for b in (2, 4)]
    assert sorted(set(lengths)) == [1, 3, 8], lengths


def test_eval_stops_a_greedy_reply_at_its_first_line(tmp_path):
    """`quill eval translate` keeps a reply's first line, and greedy decoding stops there
    (what follows cannot change it): its replies equal the first lines of `quill generate
    --temperature 0`'s whole continuations, on a random GPT-2 whose newline token is made
    likely, so that a line ends after a few tokens and generation goes on after it."""
    import shutil
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(n_embd=48, n_head=4, n_layer=2, n_positions=64)).eval()
    randomize(model)
    with torch.no_grad():
        bias = model.transformer.ln_f.bias
        model.transformer.wte.weight[198] = 7.0 * bias / (bias @ bias)  # "\n"
    model.save_pretrained(tmp_path)
    shutil.copy(ROOT / "data" / "gpt2-tokenizer" / "tokenizer.json", tmp_path / "tokenizer.json")
    sources = ["Hello world", "Once upon a time", "A", "The cat is sleeping", "Good morning"]
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{x}\tx\n" for x in sources))
    quill("eval", "translate", "--model", tmp_path, "--data", data, "--pair-template", "{source} => {target}",
          "--max-new-tokens", "16", "--out", tmp_path / "replies.txt", "--json")
    replies = (tmp_path / "replies.txt").read_text().splitlines()
    cut = 0
    for x, reply in zip(sources, replies):
        text = quill("generate", "--model", tmp_path, "--prompt", f"{x} =>", "--temperature", "0",
                     "--max-new-tokens", "16").stdout[len(f"{x} =>"):]
        lines = text.strip().splitlines()
        assert reply == (lines or [""])[0].strip(), (x, reply, text)
        rest = text.lstrip()
        # a whole first line, and tokens generated after it (where eval stopped)
        cut += "\n" in rest and bool(lines[0].strip()) and len(rest) > rest.index("\n") + 1
    assert cut >= 1, "no reply had a whole first line before the token limit"


def test_sharded_checkpoint_loads(tmp_path):
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=3, n_positions=24, vocab_size=300)
    model = GPT2LMHeadModel(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 300, (24,)).tolist()
    assert (quill_logits(tmp_path, ids) - hf_logits(model, ids)).abs().max().item() < 1e-4
