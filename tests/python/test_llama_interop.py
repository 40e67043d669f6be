"""The Llama family (Llama, Mistral, Qwen2) against Hugging Face `transformers`, run by ./run-tests.

- `quill logits` on folders written by transformers with shapes and settings quill's own
  tests never use (other widths and head counts, one kv head, explicit head_dim, rope_theta
  500000, llama3 RoPE scaling, attention biases, a sliding window shorter than the sequence,
  tied and untied heads, bf16/f16 and sharded weights) matches transformers' logits within 1e-4.
- A model trained with `quill train --arch llama` loads in transformers with the same logits,
  and `quill generate --temperature 0` writes what transformers' greedy `generate` writes.
- `quill chat` renders real chat templates (ChatML/Qwen2, Llama 3, Mistral, Zephyr, one with
  namespace/tojson/string methods) exactly as transformers' `apply_chat_template`.
"""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

ROOT = Path(__file__).resolve().parents[2]
QUILL = os.environ.get("QUILL_BIN", str(ROOT / "target" / "release" / "quill"))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"

torch.manual_seed(0)

CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def quill(*args, check=True, input=None):
    r = subprocess.run([QUILL, *map(str, args)], capture_output=True, text=True, input=input)
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
    """Norm weights and biases away from 1 and 0; matrices with unit-scale outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)


def make(kind, **kw):
    cfg_cls, model_cls = CLASSES[kind]
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    randomize(model)
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

SHAPES = [
    ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=100,
                   num_hidden_layers=2, vocab_size=97, max_position_embeddings=64, rope_theta=500000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=False)),
    ("llama", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64,
                   num_hidden_layers=3, vocab_size=130, max_position_embeddings=48, tie_word_embeddings=True,
                   attention_bias=True)),
    ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                   num_hidden_layers=2, vocab_size=61, max_position_embeddings=64, rope_parameters=LLAMA3_ROPE)),
    ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                   intermediate_size=80, num_hidden_layers=2, vocab_size=50, max_position_embeddings=40)),
    ("mistral", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72,
                     num_hidden_layers=2, vocab_size=77, max_position_embeddings=40, sliding_window=7)),
    ("qwen2", dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=7, intermediate_size=90,
                   num_hidden_layers=2, vocab_size=150, max_position_embeddings=32, rope_theta=1000000.0,
                   tie_word_embeddings=True)),
    ("qwen2", dict(hidden_size=32, num_attention_heads=8, num_key_value_heads=2, intermediate_size=40,
                   num_hidden_layers=1, vocab_size=300, max_position_embeddings=24, tie_word_embeddings=False)),
]


@pytest.mark.parametrize("kind,shape", SHAPES, ids=lambda x: x if isinstance(x, str) else
                         "-".join(str(x[k]) for k in ("num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "hidden_size")))
def test_logits_match_transformers_on_unseen_shapes(kind, shape, tmp_path):
    model = make(kind, **shape)
    model.save_pretrained(tmp_path)
    t = shape["max_position_embeddings"]
    ids = torch.randint(0, shape["vocab_size"], (t,)).tolist()
    want = hf_logits(model, ids)
    got = quill_logits(tmp_path, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_sharded_weights(dtype, tmp_path):
    model = make("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 num_hidden_layers=3, vocab_size=200, max_position_embeddings=32)
    model.to(dtype).save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 200, (32,)).tolist()
    # the reference: the same rounded weights, computed in float32 (loaded afresh: .to(dtype)
    # would also have rounded the RoPE frequencies, which are not weights)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    want = hf_logits(ref, ids)
    got = quill_logits(tmp_path, ids)
    assert (got - want).abs().max().item() < 1e-4


def train_llama(tmp_path, context=64):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:60000])
    out = tmp_path / "m"
    quill("train", "--arch", "llama", "--data", corpus, "--out", out, "--tokenizer", "bpe:400", "--steps", "30",
          "--eval-interval", "30", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--width", "64",
          "--context", str(context), "--batch", "4", "--quiet")
    return out


def test_trained_llama_loads_in_transformers_and_generates_the_same(tmp_path):
    out = train_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2
    ids = torch.randint(0, model.config.vocab_size, (64,)).tolist()
    assert (quill_logits(out, ids) - hf_logits(model, ids)).abs().max().item() < 1e-4

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = "ROMEO: my lord"
    pids = tok.encode(prompt).ids
    with torch.no_grad():
        gen = model.generate(torch.tensor([pids]), max_new_tokens=20, do_sample=False,
                             attention_mask=torch.ones(1, len(pids), dtype=torch.long))
    want = prompt + tok.decode(gen[0, len(pids):].tolist())
    got = quill("generate", "--model", out, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20").stdout
    assert got == want + "\n"


TEMPLATES = {
    "chatml": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    "namespace": "{%- set ns = namespace(sys='') -%}\n{%- for m in messages -%}\n  {%- if m.role == 'system' -%}{%- set ns.sys = m.content.strip() -%}{%- endif -%}\n{%- endfor -%}\n{{ bos_token }}{% if ns.sys %}<<SYS>>{{ ns.sys }}<</SYS>>\n{% endif %}\n{%- for m in messages if m.role != 'system' -%}\n{{ m.role | upper }}: {{ m.content | tojson }}\n{% endfor -%}\n{%- if add_generation_prompt %}ASSISTANT:{% endif -%}",
}


def with_template(model_dir, template):
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|endoftext|>", "special": True}, "chat_template": template}))


def hf_render(model_dir, template, messages):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompts(stderr):
    return [json.loads(l)["prompt"] for l in stderr.splitlines() if l.startswith('{"prompt"')]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return train_llama(tmp_path_factory.mktemp("chat"), context=256)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_templates_render_as_transformers_renders_them(name, chat_model):
    template = TEMPLATES[name]
    with_template(chat_model, template)
    user = "  What is a \"transformer\"? Say it in\tone line, naïvely 🦀.  "
    system = None if name == "mistral" else "Be brief."
    args = ["chat", "--model", chat_model, "--show-prompt", "--max-new-tokens", "4", "--temperature", "0"]
    if system:
        args += ["--system", system]
    r = quill(*args, input=user + "\n")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    assert prompts(r.stderr) == [hf_render(chat_model, template, msgs)]
    # `generate --chat` reads the same prompt
    g = quill("generate", "--model", chat_model, "--chat", "--prompt", user, "--temperature", "0",
              "--max-new-tokens", "4", *(["--system", system] if system else []))
    assert g.stdout.strip("\n") == r.stdout.strip("\n")


def test_chat_keeps_history_resets_and_drops_old_turns(chat_model):
    with_template(chat_model, TEMPLATES["chatml"])
    r = quill("chat", "--model", chat_model, "--show-prompt", "--max-new-tokens", "3", "--temperature", "0",
              input="first question\nsecond question\n/reset\nthird question\n")
    p = prompts(r.stderr)
    assert len(p) == 3
    # turn 2 sees turn 1 and its reply; after /reset the conversation starts over
    assert p[1].startswith(p[0]) and "first question" in p[1] and "second question" in p[1]
    assert "(conversation cleared)" in r.stderr
    assert "first question" not in p[2] and "third question" in p[2]
    # the context is 256 tokens: long turns push the oldest out, with a notice
    long = " ".join(["words words words"] * 10)
    r = quill("chat", "--model", chat_model, "--show-prompt", "--max-new-tokens", "8", "--temperature", "0",
              input=f"one {long}\ntwo {long}\nthree {long}\nfour {long}\nfive {long}\n")
    assert "dropped the" in r.stderr, r.stderr
    assert "one words" not in prompts(r.stderr)[-1]
    # a message that cannot fit at all is an error when scripted
    r = quill("chat", "--model", chat_model, input=("x " * 800) + "\n", check=False)
    assert r.returncode != 0 and "does not fit the context" in r.stderr


def test_chat_errors_are_one_clear_line(chat_model, tmp_path):
    with_template(chat_model, TEMPLATES["mistral"])
    r = quill("chat", "--model", chat_model, "--system", "no system role here", input="hi\n", check=False)
    assert r.returncode != 0 and "Conversation roles must alternate" in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    (chat_model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    r = quill("chat", "--model", chat_model, input="hi\n", check=False)
    assert r.returncode != 0 and "does not parse" in r.stderr
    (chat_model / "tokenizer_config.json").write_text("{}")
    r = quill("chat", "--model", chat_model, input="hi\n", check=False)
    assert r.returncode != 0 and "no chat template" in r.stderr


def test_explain_surprisal_and_attention_match_transformers(tmp_path):
    """`quill explain --json`: the prompt's log-probabilities and an attention map, against
    transformers' log-softmax and `output_attentions` (eager attention) on the same folder."""
    out = train_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    prompt = "ROMEO: my lord, the night is long"
    r = json.loads(quill("explain", "--model", out, "--prompt", prompt, "--steps", "3", "--top", "5",
                         "--temperature", "0", "--attention", "1:2", "--json").stdout)
    ids = [t["id"] for t in r["prompt"]]
    with torch.no_grad():
        o = model(torch.tensor([ids]), output_attentions=True)
    logp = torch.log_softmax(o.logits[0].double(), -1)
    for i in range(1, len(ids)):
        assert abs(r["prompt"][i]["logprob"] - logp[i - 1, ids[i]].item()) < 1e-4
    want = o.attentions[1][0, 2].double()
    got = torch.tensor(r["attention"]["weights"], dtype=torch.float64)
    assert (got - want).abs().max().item() < 1e-5
    # greedy steps: the drawn token is the top candidate, and the probabilities are a softmax
    for st in r["steps"]:
        assert st["chosen"] == st["candidates"][0]["id"] and st["kept_count"] == 1
        total = sum(c["prob"] for c in st["candidates"]) + math.exp(st["rest_logsumexp"] - st["logsumexp"])
        assert abs(total - 1) < 1e-4
