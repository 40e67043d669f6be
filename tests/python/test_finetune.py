"""`quill finetune`, run by ./run-tests.

The numbers of a packed, prompt-masked batch (loss and every gradient) are checked against
`transformers` in crates/quill/tests/packed.rs. Here: what the command learns (the token ids
and the learned mask of conversations and prompt/completion pairs, against `transformers`'
own chat-template rendering and tokenizer on SmolLM2), that a run learns and resumes exactly,
and that bad input gets one clear error line.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gguf import QUILL, ROOT, quill, smollm2  # noqa: E402
from test_hostile import refused  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Translate to French: The cat is sleeping on the bed."},
     {"role": "assistant", "content": "Le chat dort sur le lit."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?  "},
     {"role": "assistant", "content": " Rome, of course!\n"}],
]
PAIRS = [("English: Good morning.\nFrench:", " Bonjour."), ("Q: 2+2?\nA:", " 4")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def preview(model, data, n, *flags):
    r = quill("finetune", "--model", model, "--data", data, "--out", data.parent / "unused", "--preview", n, *flags)
    return [json.loads(line) for line in r.stdout.splitlines()]


def as_ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_learned_tokens_are_the_assistant_turns_as_transformers_renders_them(tmp_path):
    path = smollm2()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    got = preview(path, data, len(CONVERSATIONS))
    assert len(got) == len(CONVERSATIONS)
    for msgs, g in zip(CONVERSATIONS, got):
        # the whole conversation: transformers' rendering and tokenization
        want_ids = as_ids(tok.apply_chat_template(msgs, tokenize=True))
        assert g["ids"] == want_ids
        # learned: each assistant turn, from after the generation prompt through its
        # end-of-turn token (the newline after it is the template's, not the model's)
        learn = [False] * len(want_ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = as_ids(tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True))
            through = tok.apply_chat_template(msgs[:i + 1], tokenize=False).rstrip()
            end = len(tok(through, add_special_tokens=False)["input_ids"])
            assert want_ids[:len(before)] == before
            for k in range(len(before), end):
                learn[k] = True
            assert tok.convert_ids_to_tokens(want_ids[end - 1]) == "<|im_end|>"
        assert g["learn"] == learn
        assert g["text"].count("⟦") == sum(m["role"] == "assistant" for m in msgs)
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    for (p, c), g in zip(PAIRS, preview(path, data, len(PAIRS))):
        ids_p = tok(p)["input_ids"]
        ids_c = tok(c, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert g["ids"] == ids_p + ids_c
        assert g["learn"] == [False] * len(ids_p) + [True] * len(ids_c)
    # .tsv pairs written as plain text by --pair-template: the prompt up to {target} (its
    # trailing space moved to the completion), then the target and the end token learned
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("Good morning.\tBonjour.\n  The cat sleeps. \t Le chat dort.\n")
    got = preview(path, tsv, 2, "--pair-template", "English: {source}\\nFrench: {target}")
    for (src, tgt), g in zip([("Good morning.", "Bonjour."), ("The cat sleeps.", "Le chat dort.")], got):
        ids_p = tok(f"English: {src}\nFrench:")["input_ids"]
        ids_c = tok(" " + tgt, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert g["ids"] == ids_p + ids_c
        assert g["learn"] == [False] * len(ids_p) + [True] * len(ids_c)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama trained here by quill (byte-level BPE), with a ChatML template."""
    d = tmp_path_factory.mktemp("ft")
    corpus = d / "c.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:50000])
    model = d / "tiny"
    quill("train", "--arch", "llama", "--data", corpus, "--out", model, "--tokenizer", "bpe:400", "--steps", "20",
          "--eval-interval", "20", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--width", "64",
          "--context", "128", "--batch", "4", "--quiet")
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML}))
    # a task a tiny model can learn: say a word back, twice
    words = ["king", "rose", "night", "sword", "crown", "heart", "storm", "queen", "blood", "grace"]
    records = [{"messages": [{"role": "user", "content": f"Echo {w} {v}"},
                             {"role": "assistant", "content": f"{w} {v} {w} {v}"}]}
               for w in words for v in words[:6]]
    data = write_jsonl(d / "echo.jsonl", records)
    return {"dir": d, "model": model, "data": data, "words": words}


def metrics(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: m[k] for k in ("step", "tokens", "train_loss", "val_loss", "val_bpb", "lr", "grad_norm")}
            for m in lines]


def test_a_run_learns_the_responses_and_resumes_exactly(tiny, tmp_path):
    common = ["--model", tiny["model"], "--data", tiny["data"], "--steps", "60", "--eval-interval", "20",
              "--batch", "4", "--context", "64", "--lr", "1e-2", "--quiet", "--threads", "2"]
    whole = tmp_path / "whole"
    r = quill("finetune", *common, "--out", whole)
    assert "training records in" in r.stderr and "validation records" in r.stderr
    m = metrics(whole)
    assert [x["step"] for x in m] == [20, 40, 60]
    # it learns: the held-out answers get much likelier
    assert m[-1]["val_loss"] < 0.5 * m[0]["val_loss"], m
    # the output is a model folder that chats through the base's template
    cfg = json.loads((whole / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML
    r = quill("generate", "--model", whole, "--chat", "--prompt", "Echo rose king", "--max-new-tokens", "12",
              "--temperature", "0")
    # the answer has the task's form (words of the list), not Shakespeare
    assert set(r.stdout.split("<|im_")[0].split()[:4]) <= set(tiny["words"]), r.stdout
    # stopped after 25 steps, then resumed: the same numbers and the same weights
    part = tmp_path / "part"
    r = quill("finetune", *common, "--out", part, "--stop-after", "25")
    assert "quill finetune --resume" in r.stderr
    quill("finetune", "--resume", "--out", part, "--quiet")
    assert metrics(part) == m
    assert (part / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_bad_records_and_flags_get_one_clear_line(tiny, tmp_path):
    model, out = tiny["model"], tmp_path / "o"

    def ft(data, *flags):
        return subprocess.run([QUILL, "finetune", "--model", model, "--data", data, "--out", out, "--steps", "1", "--overwrite",
                               "--quiet", *map(str, flags)], capture_output=True, text=True, timeout=120)

    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    cases = [
        ([good, {"question": "x", "answer": "y"}], ["line 2", "expected"]),
        ([good, good, "not an object"], ["line 3"]),
        ([good, {"prompt": "x"}], ["line 2", "completion"]),
        ([good, {"messages": [{"role": "user", "content": "only a question"}]}], ["line 2", "assistant"]),
        ([good, {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}], ["line 2", "content"]),
        ([good, {"prompt": 5, "completion": "x"}], ["line 2", "string"]),
        ([], ["no records"]),
    ]
    for records, words in cases:
        p = tmp_path / "bad.jsonl"
        p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
        refused(ft(p), str(p), *words)
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(good) + "\n{\"messages\": [\n")
    refused(ft(p), "line 2", "JSON")
    refused(ft(tmp_path / "missing.jsonl"), "missing.jsonl")
    # every record longer than the window: refused; some: left out with a warning, and it trains
    long = {"prompt": "word " * 200, "completion": " end"}
    p = write_jsonl(tmp_path / "long.jsonl", [long, long])
    refused(ft(p, "--context", "96"), "no training record fits")
    p = write_jsonl(tmp_path / "some.jsonl", [long] + [good] * 5)
    r = ft(p, "--context", "96", "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert re.search(r"warning: 1 training record\(s\) are longer than the 96-token window.*line 1", r.stderr)
    # conversations need a chat template
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (bare / f).write_bytes((model / f).read_bytes())
    p = write_jsonl(tmp_path / "chat.jsonl", [good])
    r = subprocess.run([QUILL, "finetune", "--model", bare, "--data", p, "--out", out, "--quiet", "--overwrite"],
                       capture_output=True, text=True, timeout=60)
    refused(r, "line 1", "chat template")
    for flags, words in [(["--epochs", "0"], ["--epochs"]), (["--val-fraction", "1.5"], ["--val-fraction"]),
                         (["--context", "0"], ["--context"]), (["--context", "100000"], ["--context"]),
                         (["--lr", "nan"], ["--lr"]), (["--batch", "0"], ["batch"])]:
        refused(ft(p, *flags), *words)
    r = subprocess.run([QUILL, "finetune", "--resume", "--out", tmp_path / "nothing"], capture_output=True,
                       text=True, timeout=60)
    refused(r, "nothing to resume")


def test_lora_adapters_load_in_peft_merge_and_resume_exactly(tiny, tmp_path):
    """A LoRA run on the tiny model: its adapter (PEFT's format) loads in `peft` to the
    logits quill computes with --adapter; `quill merge` writes a folder that quill and
    `transformers` run to the same logits; a stopped and resumed run ends identical."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    common = ["--model", tiny["model"], "--data", tiny["data"], "--steps", "16", "--eval-interval", "8",
              "--batch", "4", "--context", "64", "--lr", "1e-2", "--quiet", "--lora-rank", "4",
              "--lora-targets", "q,v,o,gate,down", "--lora-dropout", "0.1"]
    out = tmp_path / "lora"
    r = quill("finetune", *common, "--out", out)
    assert "LoRA: rank 4, alpha 8" in r.stderr and "trainable parameters" in r.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    m = metrics(out)
    assert m[-1]["val_loss"] < m[0]["val_loss"]
    ids = [5, 17, 99, 3, 250, 42, 7, 300, 11]
    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([ids])).logits[0].numpy()
    got = np.array(json.loads(quill("logits", "--model", tiny["model"], "--adapter", out,
                                    "--ids", ",".join(map(str, ids))).stdout)["logits"])
    plain = np.array(json.loads(quill("logits", "--model", tiny["model"], "--ids", ",".join(map(str, ids))).stdout)["logits"])
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    assert np.abs(plain - want).max() > 1e-2, "the adapter changed nothing"
    merged = tmp_path / "merged"
    quill("merge", "--model", tiny["model"], "--adapter", out, "--out", merged)
    got = np.array(json.loads(quill("logits", "--model", merged, "--ids", ",".join(map(str, ids))).stdout)["logits"])
    assert np.abs(got - want).max() < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(hf(torch.tensor([ids])).logits[0].numpy() - want).max() < 1e-4
    # --adapter in the other commands
    r = quill("generate", "--model", tiny["model"], "--adapter", out, "--chat", "--prompt", "Echo rose king",
              "--max-new-tokens", "8", "--temperature", "0")
    assert r.stdout.strip()
    quill("score", "--model", tiny["model"], "--adapter", out, "--text", "king rose")
    quill("explain", "--model", tiny["model"], "--adapter", out, "--prompt", "king", "--steps", "2")
    # stopped, then resumed: the same numbers and the same adapter
    part = tmp_path / "part"
    quill("finetune", *common, "--out", part, "--stop-after", "5")
    quill("finetune", "--resume", "--out", part, "--quiet")
    assert metrics(part) == m
    assert (part / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_lora_plus_scales_the_first_update_of_b_alone(tiny, tmp_path):
    """LoRA+ (`--lora-plus R`): B learns at R × the rate of A. B starts at zero, so the
    first step's gradient of A is zero and Adam's first update of B is lr · g / (|g| + eps):
    after one step A is untouched and B is exactly R times plain LoRA's B."""
    from safetensors.numpy import load_file
    import numpy as np
    common = ["--model", tiny["model"], "--data", tiny["data"], "--steps", "1", "--batch", "2", "--context", "64",
              "--lr", "1e-3", "--quiet", "--lora-rank", "4"]
    quill("finetune", *common, "--out", tmp_path / "plain")
    r = quill("finetune", *common, "--lora-plus", "8", "--out", tmp_path / "plus")
    assert "LoRA+ ratio 8" in r.stderr
    plain, plus = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "plus"))
    assert plain.keys() == plus.keys()
    for name, b in plain.items():
        if ".lora_A." in name:
            assert np.array_equal(plus[name], b), name
        else:
            assert np.abs(b).max() > 1e-4, name
            np.testing.assert_allclose(plus[name], 8 * b, rtol=1e-5, atol=1e-9, err_msg=name)
    assert json.loads((tmp_path / "plus" / "finetune.json").read_text())["lora"]["plus_ratio"] == 8


def test_bad_lora_settings_and_adapters_get_one_clear_line(tiny, tmp_path):
    from safetensors.numpy import save_file
    import numpy as np
    model, data = tiny["model"], tiny["data"]

    def ft(*flags):
        return subprocess.run([QUILL, "finetune", "--model", model, "--data", data, "--out", tmp_path / "o",
                               "--steps", "1", "--overwrite", "--quiet", *map(str, flags)],
                              capture_output=True, text=True, timeout=120)

    refused(ft("--lora-rank", "0"), "rank 0")
    refused(ft("--lora-rank", "100000"), "rank 100000", "1 to")
    refused(ft("--lora-rank", "4", "--lora-targets", "q,attn"), "attn")
    refused(ft("--lora-rank", "4", "--lora-alpha=-1"), "alpha")
    refused(ft("--lora-rank", "4", "--lora-alpha", "nan"), "alpha")
    refused(ft("--lora-rank", "4", "--lora-dropout", "1"), "dropout")
    refused(ft("--lora-rank", "4", "--lora-plus", "0"), "LoRA+")
    refused(ft("--lora-rank", "4", "--lora-plus", "inf"), "LoRA+")
    # an adapter made for another base: its shapes do not fit
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    save_file({f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_{ab}.weight":
               np.zeros((2, 99) if ab == "A" else (64, 2), np.float32) for l in range(2) for ab in "AB"},
              str(bad / "adapter_model.safetensors"))
    r = subprocess.run([QUILL, "logits", "--model", model, "--adapter", bad, "--ids", "1,2"],
                       capture_output=True, text=True, timeout=60)
    refused(r, "another base")
    r = subprocess.run([QUILL, "generate", "--model", model, "--adapter", tmp_path, "--prompt", "x"],
                       capture_output=True, text=True, timeout=60)
    refused(r, "not a LoRA adapter folder")


def test_bleu_and_chrf_match_sacrebleu(tmp_path):
    """`quill eval score` against the `sacrebleu` package (its default BLEU: 13a tokens,
    exponential smoothing; chrF: character 6-grams, beta 2) on French references and
    hypotheses damaged in many ways: words dropped, swapped, repeated, punctuation and
    digits moved, HTML entities, empty lines, and corpora of one sentence."""
    import random
    import sacrebleu
    refs = [line.split("\t")[1] for line in (ROOT / "data" / "translation" / "dev.tsv").read_text().splitlines()]
    rng = random.Random(3)

    def damage(s):
        w = s.split()
        for _ in range(rng.randint(0, 3)):
            k = rng.randint(0, 5)
            if k == 0 and w:
                w.pop(rng.randrange(len(w)))
            elif k == 1 and len(w) > 1:
                i = rng.randrange(len(w) - 1)
                w[i], w[i + 1] = w[i + 1], w[i]
            elif k == 2 and w:
                w.insert(rng.randrange(len(w) + 1), rng.choice(w))
            elif k == 3:
                w.append(rng.choice([".", ",", "1,000", "3.5", "12-3", "&amp;", "l'eau", "«", "»", "!?"]))
            elif k == 4 and w:
                i = rng.randrange(len(w))
                w[i] = w[i].upper()
        return " ".join(w)

    cases = [
        [damage(r) for r in refs],
        [r for r in refs],
        [damage(r) if i % 3 else "" for i, r in enumerate(refs)],
        [damage(refs[0])],
        ["Je"],
        ["xyz"],
    ]
    for hyps in cases:
        rs = refs[:len(hyps)]
        (tmp_path / "h.txt").write_text("".join(h + "\n" for h in hyps))
        (tmp_path / "r.txt").write_text("".join(r + "\n" for r in rs))
        got = json.loads(quill("eval", "score", "--hyps", tmp_path / "h.txt", "--refs", tmp_path / "r.txt",
                               "--json").stdout)
        bleu = sacrebleu.corpus_bleu(hyps, [rs])
        chrf = sacrebleu.corpus_chrf(hyps, [rs])
        assert abs(got["bleu"] - bleu.score) < 1e-9, (hyps[:2], got["bleu"], bleu.score)
        assert abs(got["chrf"] - chrf.score) < 1e-9, (hyps[:2], got["chrf"], chrf.score)
        assert (got["hyp_len"], got["ref_len"]) == (bleu.sys_len, bleu.ref_len)
    (tmp_path / "h.txt").write_text("un\ndeux\n")
    (tmp_path / "r.txt").write_text("one\n")
    r = subprocess.run([QUILL, "eval", "score", "--hyps", tmp_path / "h.txt", "--refs", tmp_path / "r.txt"],
                       capture_output=True, text=True, timeout=60)
    refused(r, "lines")


def squad_normalize(s):
    """SQuAD v1.1's official answer normalisation (evaluate-v1.1.py), as its script defines it."""
    import string
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(pred, truth):
    from collections import Counter
    p, t = squad_normalize(pred).split(), squad_normalize(truth).split()
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def test_eval_commands_run_a_model_and_score_as_defined(tiny, tmp_path):
    """`quill eval translate` and `quill eval qa` on the tiny model: their scores equal
    `quill eval score` (BLEU, chrF; tested against sacrebleu above) and SQuAD's exact match
    and F1 (computed here as SQuAD's script defines them) on the replies they wrote."""
    import sacrebleu
    pairs = [("Echo king rose", "king rose king rose"), ("Echo the night", "The night, the night."),
             ("Echo a storm", "a storm a storm"), ("Echo crown", "Crown!")]
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
    out = tmp_path / "replies.txt"
    got = json.loads(quill("eval", "translate", "--model", tiny["model"], "--data", data, "--instruction", "",
                           "--max-new-tokens", "12", "--out", out, "--json").stdout)
    hyps = out.read_text().splitlines()
    assert len(hyps) == len(pairs) and got["sentences"] == len(pairs)
    refs = [a for _, a in pairs]
    assert abs(got["bleu"] - sacrebleu.corpus_bleu(hyps, [refs]).score) < 1e-9
    assert abs(got["chrf"] - sacrebleu.corpus_chrf(hyps, [refs]).score) < 1e-9
    # --pair-template asks with plain text: the same replies as prompt/completion records
    # holding that text
    quill("eval", "translate", "--model", tiny["model"], "--data", data, "--pair-template", "Say: {source}\\n=> {target}",
          "--max-new-tokens", "12", "--out", tmp_path / "templated.txt", "--json")
    records = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Say: {q}\n=>", "completion": f" {a}"} for q, a in pairs])
    quill("eval", "translate", "--model", tiny["model"], "--data", records, "--max-new-tokens", "12",
          "--out", tmp_path / "plain.txt", "--json")
    assert (tmp_path / "templated.txt").read_text() == (tmp_path / "plain.txt").read_text()
    # each reply is the first line of what `quill generate` writes after the same text,
    # greedy (where the reply stops once its first line is whole) and with --beams (beam
    # search itself is checked against transformers in test_interop.py)
    for name, flags in [("greedy", ["--temperature", "0"]), ("beams", ["--beams", "3"])]:
        quill("eval", "translate", "--model", tiny["model"], "--data", data, "--pair-template", "Say: {source}\\n=> {target}",
              "--max-new-tokens", "12", *flags[2 if name == "greedy" else 0:], "--out", tmp_path / f"{name}.txt", "--json")
        for (q, _), reply in zip(pairs, (tmp_path / f"{name}.txt").read_text().splitlines()):
            text = quill("generate", "--model", tiny["model"], "--prompt", f"Say: {q}\n=>", *flags,
                         "--max-new-tokens", "12").stdout[len(f"Say: {q}\n=>"):]
            assert reply == (text.strip().splitlines() or [""])[0].strip(), (name, q, reply, text)
    refused(subprocess.run([QUILL, "eval", "translate", "--model", tiny["model"], "--data", data, "--pair-template",
                            "{target} after {source}"], capture_output=True, text=True, timeout=60),
            "{source} and then {target}")
    got = json.loads(quill("eval", "qa", "--model", tiny["model"], "--data", data, "--max-new-tokens", "12",
                           "--out", out, "--json").stdout)
    hyps = out.read_text().splitlines()
    em = 100 * sum(squad_normalize(h) == squad_normalize(r) for h, r in zip(hyps, refs)) / len(refs)
    f1 = 100 * sum(squad_f1(h, r) for h, r in zip(hyps, refs)) / len(refs)
    assert abs(got["exact_match"] - em) < 1e-9 and abs(got["f1"] - f1) < 1e-9


def test_answer_scores_follow_squads_definitions(tmp_path):
    """Exact match and F1 on answers that differ in case, punctuation, articles (also
    inside other punctuation), order, repetition and accents, through `quill eval qa`'s
    scorer: a folder model is not needed, so the scorer is reached through a file of replies."""
    cases = [("Paris.", "Paris"), ("The capital is Paris", "Paris"), ("the the Paris", "Paris"),
             ("«the» Paris", "Paris"), ("Buenos  Aires", "buenos aires"), ("Aires Buenos", "Buenos Aires"),
             ("Washington, D.C.", "Washington D.C."), ("Brasília", "Brasilia"), ("an apple a day", "apple day"),
             ("", "Lima"), ("Lima Lima", "Lima"), ("Sucre!", "sucre")]
    hyp, ref = tmp_path / "h.txt", tmp_path / "r.txt"
    hyp.write_text("".join(h + "\n" for h, _ in cases))
    ref.write_text("".join(r + "\n" for _, r in cases))
    got = json.loads(quill("eval", "score", "--hyps", hyp, "--refs", ref, "--json").stdout)
    em = 100 * sum(squad_normalize(h) == squad_normalize(r) for h, r in cases) / len(cases)
    f1 = 100 * sum(squad_f1(h, r) for h, r in cases) / len(cases)
    assert abs(got["exact_match"] - em) < 1e-9, (got, em)
    assert abs(got["f1"] - f1) < 1e-9, (got, f1)


def test_lora_on_a_gguf_base_keeps_it_quantized(tmp_path):
    """LoRA on SmolLM2's Q4_1 GGUF: the base stays quantized while training and sampling
    (peak memory below what its weights alone take in f32), and the adapter, run beside the
    quantized weights, gives the logits of `transformers` + `peft` on the dequantized GGUF
    within the quantized kernels' bound."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from test_gguf import QUANT_BOUND, quill_logits
    path = smollm2()
    records = [{"messages": [{"role": "user", "content": f"Translate to French: I see {w}."},
                             {"role": "assistant", "content": f"Je vois {f}."}]}
               for w, f in [("a cat", "un chat"), ("a dog", "un chien"), ("the sea", "la mer"),
                            ("a house", "une maison"), ("the sun", "le soleil"), ("a tree", "un arbre")]]
    data = write_jsonl(tmp_path / "fr.jsonl", records)
    out = tmp_path / "lora"
    # peak memory of the finetune process alone: measured by a fresh parent
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", probe, str(QUILL), "finetune", "--model", str(path), "--data", str(data),
                        "--out", str(out), "--lora-rank", "8", "--steps", "3", "--eval-interval", "3",
                        "--batch", "2", "--context", "64", "--lr", "1e-3", "--quiet", "--sample-tokens", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1]) * 1024
    f32_weights = 134_515_008 * 4
    assert peak < f32_weights, f"peak RSS {peak / 2**20:.0f} MiB"
    ids = [1, 504, 3458, 30, 1159, 253, 2726, 28, 314, 1064]
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0].numpy()
        want = PeftModel.from_pretrained(base, str(out)).eval()(torch.tensor([ids])).logits[0].numpy()
    got = quill_logits(path, ids, "--adapter", str(out))
    err = float(np.abs(got - want).max())
    assert err < QUANT_BOUND * np.abs(want).max(), err
    assert np.abs(plain - want).max() > 10 * err, "the adapter changed nothing"
