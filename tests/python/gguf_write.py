"""Writes a Hugging Face model folder (config.json + model.safetensors) as a GGUF file with the
`gguf` package's writer, laid out as llama.cpp's converter lays it out: its tensor names, its
metadata keys, matrices as [out, in] (GPT-2's Conv1D ones turned around), and the q/k rows of
`llama` heads reordered to adjacent rotary pairs. Matrices are stored in the type asked for
(quantized by the `gguf` package); vectors stay F32. A byte-level vocabulary of the model's
size is stored so that every reader finds a tokenizer.

    python3 tests/python/gguf_write.py MODEL_DIR OUT.gguf [TYPE]
"""
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from safetensors.numpy import load_file

LLAMA_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GPT2_NAMES = {
    "ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def pairs_order(w, heads):
    """Hugging Face's rotate-half rows of each head → llama.cpp's adjacent pairs."""
    rows = w.shape[0]
    hd = rows // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(cfg, st):
    """(gguf name, numpy array [out, in] or [n]) in llama.cpp's naming."""
    arch = cfg["model_type"]
    out = []
    for name, w in st.items():
        if arch == "gpt2":
            n = name.removeprefix("transformer.")
            if n in ("wte.weight", "wpe.weight"):
                out.append(({"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight"}[n], w))
            elif n.startswith("ln_f."):
                out.append(("output_norm." + n.split(".")[-1], w))
            elif n == "lm_head.weight":
                if not cfg.get("tie_word_embeddings", True):
                    out.append(("output.weight", w))
            elif n.startswith("h."):
                _, layer, rest = n.split(".", 2)
                module, kind = rest.rsplit(".", 1)
                if module.startswith("attn.") and module not in GPT2_NAMES:
                    continue  # attention-mask buffers
                if w.ndim == 2:
                    w = w.T  # Conv1D [in, out] -> [out, in]
                out.append((f"blk.{layer}.{GPT2_NAMES[module]}.{kind}", w))
        else:
            if name == "model.embed_tokens.weight":
                out.append(("token_embd.weight", w))
            elif name == "model.norm.weight":
                out.append(("output_norm.weight", w))
            elif name == "lm_head.weight":
                if not cfg.get("tie_word_embeddings", False):
                    out.append(("output.weight", w))
            else:
                _, _, layer, rest = name.split(".", 3)
                if arch == "llama" and rest.startswith("self_attn.q_proj"):
                    w = pairs_order(w, cfg["num_attention_heads"])
                if arch == "llama" and rest.startswith("self_attn.k_proj"):
                    w = pairs_order(w, cfg["num_key_value_heads"])
                out.append((f"blk.{layer}.{LLAMA_NAMES[rest]}", w))
    return out


def write(model_dir, out_path, qtype="F32"):
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    st = load_file(str(model_dir / "model.safetensors"))
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(out_path), arch=arch)
    w.add_name(model_dir.name)
    if arch == "gpt2":
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_block_count(cfg["n_layer"])
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        vocab = cfg["vocab_size"]
    else:
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
        w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        vocab = cfg["vocab_size"]
    # a byte-level vocabulary: the 256 byte symbols, then merged pairs of them
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)][:vocab]
    merges = []
    for i in range(len(tokens), vocab):
        a, b = alphabet[97 + (i % 26)], alphabet[97 + (i // 26) % 26]
        tok = a + b
        while tok in tokens:
            tok += alphabet[48 + i % 10]
        tokens.append(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    qt = T[qtype]
    for name, x in tensors(cfg, st):
        x = np.ascontiguousarray(x.astype(np.float32))
        if x.ndim == 2 and qt != T.F32:
            q = quantize(x, qt)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bytes_to_unicode():
    """GPT-2's printable spelling of the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


if __name__ == "__main__":
    write(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "F32")
