"""The facts every other file shares, and nothing else: the blog's tasks, knobs and published
answers; the known models and GPUs; bytes per dtype; the environment variables; and the one
rule for whole numbers. The bottom layer: it imports nothing from helpers."""

from __future__ import annotations

GiB = 2**30
GB = 1e9

# ---------------------------------------------------------------- environment variables, all of them
MODEL_ENV = "MIXTRAL_MODEL"  # a hub id or a local folder; unset: the stand-in
DTYPE_ENV = "MIXTRAL_DTYPE"  # float32 | bfloat16 | float16 | auto
QUANT_KERNEL_ENV = "MIXTRAL_QUANT_KERNEL"  # torch | ours: int8 and int4's kernel, else measured at load
CACHE_ENV = "MIXTRAL_NOTEBOOKS_CACHE"  # where the stand-in and tokenizers are kept
ENDPOINT_ENV = "MIXTRAL_ENDPOINT"  # an OpenAI-compatible server, e.g. http://gpu-node:8000/v1
API_KEY_ENV = "MIXTRAL_API_KEY"
ENDPOINT_MODEL_ENV = "MIXTRAL_ENDPOINT_MODEL"  # the model name that server serves
MAX_TOKENS_ENV = "MIXTRAL_MAX_NEW_TOKENS"  # a room's cap on new tokens per served answer

# ---------------------------------------------------------------- the blog: prompts, knobs, answers
BLOG_TEMPLATE = "[INST] {prompt} [/INST]"

# Henry Wadsworth Longfellow's translation of Inferno I, 1-3 (1867; public domain).
LONGFELLOW = (
    "Midway upon the journey of our life I found myself within a forest dark, "
    "For the straightforward pathway had been lost."
)
# The blog's published answer (published output of Mixtral 8x22B, ROCm blog, May 2024).
BLOG_TRANSLATION = (
    "In the middle of the journey of our life, I found myself in a dark wood, for the straight way was lost."
)

# The four tasks of the blog, with their exact prompts and token budgets; the translation's references (05).
TASKS = {
    "poem": dict(
        max_new_tokens=512,
        prompt=("Write a poem about artificial intelligence becoming conscious in the style of Shakespeare."),
    ),
    "code": dict(
        max_new_tokens=512,
        prompt=(
            "Create a python function that when given two strings word1 and word2 it returns the minimum "
            "number of operations required to convert word1 to word2. Only three operations are permitted "
            "on each word: Insert a character, Delete a character, Replace a character."
        ),
    ),
    "jokes": dict(max_new_tokens=128, prompt="Tell me some jokes about semiconductors."),
    "translation": dict(
        max_new_tokens=128,
        prompt=(
            "Please translate the following sentence into English: Nel mezzo del cammin di nostra vita, "
            "mi ritrovai per una selva oscura, ché la diritta via era smarrita."
        ),
        reference=LONGFELLOW,
        blog_answer=BLOG_TRANSLATION,
    ),
}

# The blog samples every task with the same four knobs.
BLOG_SAMPLING = dict(
    do_sample=True,  # False = greedy: always the most likely next token
    temperature=0.8,  # divides the logits: 1.0 = no change, < 1.0 = sharper (less random)
    top_k=20,  # sample only among the 20 most likely tokens (0 = no limit)
    top_p=0.95,  # ...and only within the smallest set holding 95% of the probability
)

# ---------------------------------------------------------------- models, tokenizers, GPUs, bytes
# From the published config.json of each model on the Hugging Face Hub.
KNOWN_MODELS = {
    "mistralai/Mixtral-8x22B-Instruct-v0.1": dict(
        vocab_size=32768,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=65536,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.001,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
        bos_token_id=1,
        eos_token_id=2,
    ),
}

# The mistral-common tokenizer file that is the reference for each Mixtral, keyed by vocab size.
REFERENCE_TOKENIZERS = {
    32768: "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral 8x22B
    32000: "tokenizer.model.v1",  # Mixtral 8x7B
}

# Memory (GiB, as sold) and peak memory bandwidth (TB/s) per device, from the vendors' datasheets:
# AMD Instinct MI300X and MI250X data sheets (MI250X: one OAM = two GCDs; each GCD is one
# torch device with 64 GiB and half the 3.2 TB/s), NVIDIA A100 80GB SXM, H100 SXM, H200 SXM.
# peer_link_gbs: the GPU-to-GPU links of an 8-GPU node, GB/s each GPU sends (and receives) at once over all
# its links. MI300X: AMD CDNA 3 white paper, "7 x16 AMD Infinity Fabric links" at 32 Gbps per lane ->
# 7 x 16 x 32 / 8 = 448 GB/s each way (its "P2P ring peak aggregate I/O bandwidth 896 GB/s" counts both ways).
# H100 SXM: NVIDIA's Hopper architecture in-depth post (2022-03-22), 18 NVLink 4 links at 25 GB/s each way
# = 450 GB/s (the "900 GB/s" counts both ways).
GPU_TYPES = {
    "MI300X": dict(memory_gib=192, bandwidth_tbs=5.3, peer_link_gbs=448),
    "MI250X": dict(memory_gib=64, bandwidth_tbs=1.6, unit="GCD"),  # per GCD (torch device), two per card
    "MI250": dict(memory_gib=64, bandwidth_tbs=1.6, unit="GCD"),  # per GCD (torch device), two per card
    "H200": dict(memory_gib=141, bandwidth_tbs=4.8),
    "H100": dict(memory_gib=80, bandwidth_tbs=3.35, peer_link_gbs=450),
    "A100": dict(memory_gib=80, bandwidth_tbs=2.0),
    # One-GPU machines (11_offloading): AMD's specifications give the bus and memory speed; bandwidth =
    # 384 bits x 20 Gbps / 8 (RX 7900 XTX, 24 GB GDDR6) and 384 bits x 18 Gbps / 8 (Radeon PRO W7900, 48 GB).
    "RX 7900 XTX": dict(memory_gib=24, bandwidth_tbs=0.96),
    "W7900": dict(memory_gib=48, bandwidth_tbs=0.864),
}

# The link between a GPU and the host's RAM, per direction: PCI-SIG's transfer rate per lane (PCIe 4.0:
# 16 GT/s, PCIe 5.0: 32 GT/s), 16 lanes, 128b/130b encoding in both -> GT/s x 16 x 128/130 / 8 GB/s.
LINK_GTS = {"PCIe 4.0 x16": 16, "PCIe 5.0 x16": 32}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
RESERVED = 0.10  # share of each memory kept for the runtime, activations and fragmentation: the one margin


def whole_number(name: str, value, minimum: int = 0, hint: str = "", maximum: int | None = None):
    """`value` if it is a whole number from `minimum` (to `maximum`), not a bool or a str; else a
    ValueError that names the input, the value, and what to use."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{name}={value!r} is not allowed: use a whole number {allowed}{hint}")
    return value
