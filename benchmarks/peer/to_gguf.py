"""Write the stand-in (a MixtralForCausalLM in safetensors) as a GGUF file that llama.cpp loads, with PyPI's `gguf`.

    python benchmarks/peer/to_gguf.py --type f32     # -> build/peer/standin-f32.gguf  (2.6 GiB)
    python benchmarks/peer/to_gguf.py --type bf16    # -> build/peer/standin-bf16.gguf (1.3 GiB)

q8_0 and q4_0 are accepted too (gguf's own numpy quantizers); peer_bench.py prefers llama.cpp's llama-quantize for
those, so that llama.cpp's file is exactly what a llama.cpp user would make.

The conventions followed are those of llama.cpp's own convert_hf_to_gguf.py for Mixtral (which llama.cpp files as
architecture "llama" with expert tensors), written out again here in the few lines this one model needs:
- Q and K rows are permuted per head. transformers' rotary embedding rotates the pair (i, i + head_dim/2) of each
  head ("rotate_half"); llama.cpp's llama architecture rotates adjacent pairs (2i, 2i+1). Reordering the rows of
  q_proj/k_proj so that row i + head_dim/2 sits beside row i gives the same attention scores under either layout.
  V and O are untouched. If this step is wrong, the model still runs but its text is garbage: peer_bench.py --check
  catches that.
- Each layer's experts are stacked into three 3-D tensors, expert e at index e (the router's logit e picks it):
  ffn_gate_exps [E, I, D] (w1), ffn_up_exps [E, I, D] (w3), ffn_down_exps [E, D, I] (w2), in numpy's order (gguf
  reverses it into ggml's ne[]). The router is ffn_gate_inp [E, D].
- Tied embeddings: no output.weight is written; llama.cpp then uses token_embd as the output matrix.
- 1-D tensors (norms) and the router stay F32 at every type, as llama.cpp's converter and llama-quantize keep them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
TYPES = {  # --type -> (tensor type for the 2-D weights, file type recorded in the header)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj or k_proj from transformers' half-split rotary layout to llama.cpp's interleaved one: within
    each head, rows [0..h/2) and [h/2..h) become the even and odd rows."""
    out_features, in_features = w.shape
    half = out_features // n_head // 2
    return w.reshape(n_head, 2, half, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def layer_experts(f, i: int, n_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gate, up, down) of layer i, each [E, ...]. Reads either layout: transformers 5's fused 3-D tensors
    (mlp.experts.gate_up_proj [E, 2I, D], gate rows first; mlp.experts.down_proj [E, D, I]) or the per-expert
    block_sparse_moe.experts.N.w1/w3/w2 that the stand-in's file holds."""
    fused = f"model.layers.{i}.mlp.experts.gate_up_proj"
    if fused in set(f.keys()):
        gate_up = f.get_tensor(fused)
        inter = gate_up.shape[1] // 2
        return gate_up[:, :inter], gate_up[:, inter:], f.get_tensor(f"model.layers.{i}.mlp.experts.down_proj")
    p = f"model.layers.{i}.block_sparse_moe.experts"
    return tuple(
        np.stack([f.get_tensor(f"{p}.{e}.{w}.weight") for e in range(n_experts)]) for w in ("w1", "w3", "w2")
    )


def router_name(f, i: int) -> str:
    name = f"model.layers.{i}.mlp.gate.weight"
    return name if name in set(f.keys()) else f"model.layers.{i}.block_sparse_moe.gate.weight"


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, cfg: dict) -> None:
    """The GPT-2-style byte-level BPE of SmolLM2, as llama.cpp reads it: token strings by id, their types (special
    added tokens are CONTROL, so that they are never produced by plain text), and the merges as "a b" strings."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok["added_tokens"]}
    n_vocab = cfg["vocab_size"]
    by_id = {i: s for s, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            special = i in added and added[i]["special"]
            types.append(
                gguf.TokenType.CONTROL
                if special
                else gguf.TokenType.USER_DEFINED
                if i in added
                else gguf.TokenType.NORMAL
            )
        else:  # padding rows of the embedding that no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # llama.cpp's name for this pre-tokenizer (GPT-2's split regex)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg.get("pad_token_id", cfg["eos_token_id"]))
    unk = tok["model"].get("unk_token")
    if unk in vocab:
        w.add_unk_token_id(vocab[unk])
    w.add_add_bos_token(
        False
    )  # transformers' tokenizer for SmolLM2 adds no BOS either: both see the same ids
    if (folder / "chat_template.jinja").is_file():
        w.add_chat_template((folder / "chat_template.jinja").read_text())


def convert(folder: Path, out: Path, type_name: str) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "mixtral", cfg["model_type"]
    assert cfg.get("tie_word_embeddings"), "only tied embeddings are handled (no output.weight is written)"
    qtype, ftype = TYPES[type_name]
    n_layer, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg["rope_theta"]}

    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(f"mixtral stand-in ({folder.name})")
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    add_tokenizer(w, folder, cfg)

    def put(name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim == 1 or name.endswith("ffn_gate_inp.weight") or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        put("token_embd.weight", f.get_tensor("model.embed_tokens.weight"))
        put("output_norm.weight", f.get_tensor("model.norm.weight"))
        for i in range(n_layer):
            p, b = f"model.layers.{i}", f"blk.{i}"
            put(f"{b}.attn_norm.weight", f.get_tensor(f"{p}.input_layernorm.weight"))
            put(f"{b}.attn_q.weight", rope_permute(f.get_tensor(f"{p}.self_attn.q_proj.weight"), n_head))
            put(f"{b}.attn_k.weight", rope_permute(f.get_tensor(f"{p}.self_attn.k_proj.weight"), n_kv))
            put(f"{b}.attn_v.weight", f.get_tensor(f"{p}.self_attn.v_proj.weight"))
            put(f"{b}.attn_output.weight", f.get_tensor(f"{p}.self_attn.o_proj.weight"))
            put(f"{b}.ffn_norm.weight", f.get_tensor(f"{p}.post_attention_layernorm.weight"))
            put(f"{b}.ffn_gate_inp.weight", f.get_tensor(router_name(f, i)))
            gate, up, down = layer_experts(f, i, cfg["num_local_experts"])
            put(f"{b}.ffn_gate_exps.weight", gate)
            put(f"{b}.ffn_up_exps.weight", up)
            put(f"{b}.ffn_down_exps.weight", down)

    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> int:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--type", choices=TYPES, default="f32")
    parser.add_argument("--model", help="the stand-in's folder (default: helpers.ensure_standin())")
    parser.add_argument("--out", help="default: build/peer/standin-TYPE.gguf")
    args = parser.parse_args()
    if args.model:
        folder = Path(args.model)
    else:
        from helpers import ensure_standin

        folder = ensure_standin()
    out = Path(args.out) if args.out else ROOT / "build" / "peer" / f"standin-{args.type}.gguf"
    convert(folder, out, args.type)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
