"""A tiny random Mixtral in the layout the Hugging Face Hub ships mistralai/Mixtral-8x22B-Instruct-v0.1:
the hub's config.json with tiny dimensions, bf16 weights under the original per-expert names
(`block_sparse_moe.experts.E.w1/w2/w3`) in several `model-0000X-of-0000N.safetensors` shards with
their `model.safetensors.index.json`, a generation_config.json, and the tokenizer files a hub folder
holds (tokenizer.json, tokenizer_config.json with its chat template, special_tokens_map.json).

Nothing here goes through transformers' `save_pretrained`: the weights are written with safetensors,
the JSON by hand, so the loaders meet the hub's layout, not transformers 5's own (fused experts, one file).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# The published 8x22B-Instruct config (helpers.data.KNOWN_MODELS holds its numbers) with tiny dimensions.
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)
SHARD_BYTES = 600_000  # the hub cuts its shards at 5 GB; at this size the tiny model's layers straddle shards

# The hub's v3 chat template (Mixtral-8x22B-Instruct-v0.1, Mistral-7B-Instruct-v0.3) without its tool-use
# branches: roles alternate after an optional system message, which joins the last user turn;
# `[INST] ` + content + `[/INST]`, no space before [/INST]; an answer is " " + content + </s>.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)


def hub_config() -> dict:
    """config.json as the hub has it for 8x22B-Instruct (its keys, torch_dtype and rope_theta at the top level)."""
    from helpers.data import KNOWN_MODELS

    published = dict(KNOWN_MODELS["mistralai/Mixtral-8x22B-Instruct-v0.1"])
    return dict(
        architectures=["MixtralForCausalLM"],
        attention_dropout=0.0,
        hidden_act="silu",
        initializer_range=0.02,
        model_type="mixtral",
        output_router_logits=False,
        torch_dtype="bfloat16",
        transformers_version="4.38.0",
        use_cache=True,
        **dict(published, **TINY),
    )


def hub_tensors(config: dict, seed: int = 0) -> dict:
    """Random bf16 weights under the hub's names, in the model's order (the order its shards are filled in)."""
    g = torch.Generator().manual_seed(seed)
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = D // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * config["initializer_range"]).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": normal(V, D)}
    for n in range(config["num_hidden_layers"]):
        layer = f"model.layers.{n}."
        tensors[layer + "input_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
        for name, rows in (("q_proj", D), ("k_proj", kv), ("v_proj", kv)):
            tensors[f"{layer}self_attn.{name}.weight"] = normal(rows, D)
        tensors[layer + "self_attn.o_proj.weight"] = normal(D, D)
        tensors[layer + "post_attention_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
        tensors[layer + "block_sparse_moe.gate.weight"] = normal(config["num_local_experts"], D)
        for e in range(config["num_local_experts"]):
            expert = f"{layer}block_sparse_moe.experts.{e}."
            tensors.update(
                {
                    expert + "w1.weight": normal(I, D),
                    expert + "w2.weight": normal(D, I),
                    expert + "w3.weight": normal(I, D),
                }
            )
    tensors["model.norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    # A trained model's next-token distribution is peaked; at initializer_range a random lm_head gives logits so flat
    # that every temperature samples alike, and 04_jokes's claim (lower temperature, more repetition) would not hold.
    # Rows of standard deviation 3 peak it as training does: on the jokes prompt, 48 tokens, 3 samples, distinct-2
    # came out 0.41 (float32) and 0.60 (bf16) at temperature 0.2 against 0.86 at 1.3; at std 1 bf16's were 0.94
    # against 0.99, a margin too thin to trust (a measurement of 2026-12-03, not a test: 04 asserts the order).
    tensors["lm_head.weight"] = (normal(V, D).float() * (3 / config["initializer_range"])).to(torch.bfloat16)
    return tensors


def write_shards(folder: Path, tensors: dict, shard_bytes: int = SHARD_BYTES) -> dict:
    """The tensors in order, cut into shards of at most `shard_bytes` (a larger tensor alone), named as
    the hub names them, with model.safetensors.index.json. Returns the index."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


def write_tokenizer(folder: Path) -> None:
    """The hub's tokenizer files, from the fast tokenizer the project rebuilds offline from mistral-common's v3 file."""
    from helpers.readings import hub_fast_tokenizer

    fast = hub_fast_tokenizer()
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(i): dict(
            content=t.content,
            lstrip=t.lstrip,
            normalized=t.normalized,
            rstrip=t.rstrip,
            single_word=t.single_word,
            special=t.special,
        )
        for i, t in sorted(fast.added_tokens_decoder.items())
    }
    config = dict(
        add_bos_token=True,
        add_eos_token=False,
        added_tokens_decoder=added,
        bos_token="<s>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        eos_token="</s>",
        legacy=False,
        model_max_length=1000000000000000019884624838656,
        pad_token=None,
        sp_model_kwargs={},
        spaces_between_special_tokens=False,
        tokenizer_class="LlamaTokenizer",
        unk_token="<unk>",
        use_default_system_prompt=False,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(
        json.dumps(dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), indent=2)
    )


def build_hub_folder(folder: Path, seed: int = 0) -> Path:
    """Fill `folder` as `hf download mistralai/Mixtral-8x22B-Instruct-v0.1` would, at tiny size."""
    folder.mkdir(parents=True, exist_ok=True)
    config = hub_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(
            dict(_from_model_config=True, bos_token_id=1, eos_token_id=2, transformers_version="4.38.0"),
            indent=2,
        )
    )
    write_shards(folder, hub_tensors(config, seed))
    write_tokenizer(folder)
    return folder


def stored_tensors(folder: Path) -> dict:
    """Every tensor of the folder's shards, by the name its index gives it, as stored."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def as_transformers_names(stored: dict, experts: int) -> dict:
    """The hub's tensors under transformers 5's Mixtral names: `block_sparse_moe` becomes `mlp`, and each
    layer's experts are stacked, gate (w1) above up (w3): gate_up_proj [E, 2I, D], down_proj (w2) [E, D, I]."""
    out = {}
    for name, t in stored.items():
        if ".experts." not in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer in sorted({n.split(".")[2] for n in stored if ".experts." in n}, key=int):
        expert = f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{{}}.weight".format
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([stored[expert(e, "w1")], stored[expert(e, "w3")]]) for e in range(experts)]
        )
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [stored[expert(e, "w2")] for e in range(experts)]
        )
    return out
