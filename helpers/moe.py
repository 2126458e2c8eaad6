"""Inside the MoE: record the router's choices during generation, and the knobs around it.

Shapes: T = tokens, L = layers, E = experts, K = experts per token (top-k).
The routing is read from the model itself (forward hooks on each layer's router), never
re-implemented for display."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from .answers import decode_rate
from .backends import LocalModel, as_backend
from .data import whole_number
from .generation import generate, generate_batch
from .prefetch import next_layer_guesses
from .prompts import chat_ids, turn_starts
from .readings import shown_token


def routers(model) -> list:
    """Each decoder layer's router module (MixtralTopKRouter), in layer order."""
    found = [layer.mlp.gate for layer in model.model.layers]
    if not all(hasattr(r, "top_k") and hasattr(r, "weight") for r in found):
        raise TypeError(f"{type(model).__name__} has no Mixtral-style routers (layer.mlp.gate)")
    return found


@dataclass
class RouterTrace:
    """Top-k experts and their weights for every token at every layer, recorded by hooks, and what they show.

    Use as a context manager around `generate()` (batch 1): the prefill call records the prompt's
    tokens, each decode step with the KV cache records one more token. `trace_generation` does so and
    adds the answer, the tokens and where the chat's parts start. Taught in 07_inside_the_moe."""

    model: object
    calls: list = field(
        default_factory=list
    )  # per forward call: L x (indices [t, K], weights [t, K], logits [t, E])
    answer: object = None  # set by trace_generation: the Answer,
    tokens: list = field(default_factory=list)  # the token string of each traced position,
    marks: dict = field(default_factory=dict)  # and {part of the chat: its first row}
    _hooks: list = field(default_factory=list)

    def __enter__(self):
        self.calls.clear()
        layers = routers(self.model)

        def record(layer_index):
            def hook(_module, _inputs, outputs):
                logits, weights, indices = outputs  # [t, E], [t, K], [t, K]
                if layer_index == 0:
                    self.calls.append([None] * len(layers))
                self.calls[-1][layer_index] = (
                    indices.detach().cpu(),
                    weights.detach().float().cpu(),
                    logits.detach().float().cpu(),
                )

            return hook

        self._hooks = [r.register_forward_hook(record(i)) for i, r in enumerate(layers)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _stack(self, part: int):
        import torch

        per_call = [torch.stack([layer[part] for layer in call], dim=1) for call in self.calls]  # [t, L, .]
        return torch.cat(per_call) if per_call else torch.empty(0)

    experts = property(lambda self: self._stack(0), doc="[T, L, K] expert indices, best first.")
    weights = property(
        lambda self: self._stack(1), doc="[T, L, K] the renormalised routing weights (sum 1 over K)."
    )
    logits = property(lambda self: self._stack(2), doc="[T, L, E] raw router logits.")
    num_experts = property(lambda self: self.calls[0][0][2].shape[-1], doc="E, from the first call's logits.")

    def load(self):
        """[L, E] share of routing slots each expert received per layer (rows sum to 1)."""
        import torch

        experts = self.experts  # [T, L, K] -> one-hot [T, L, K, E] -> [L, E]
        return torch.nn.functional.one_hot(experts, self.num_experts).float().mean((0, 2))

    def stickiness(self):
        """[L] how often consecutive tokens keep the same first-choice expert, per layer."""
        first = self.experts[:, :, 0]  # [T, L]
        return (first[1:] == first[:-1]).float().mean(0)

    def chance_stickiness(self):
        """[L] the same rate if tokens picked experts independently with this trace's loads."""
        return (self.load() ** 2).sum(-1)

    def busiest_expert(self, batch: int) -> float:
        """`busiest_expert` on this trace's routing."""
        return busiest_expert(self.experts, batch, self.num_experts)

    def chance_busiest_expert(self, batch: int) -> float:
        """`busiest_expert` on uniformly random routing of the same shape: each token and layer K distinct
        experts drawn at random (a fixed seed)."""
        import torch

        (T, L, K), E = self.experts.shape, self.num_experts
        draws = torch.rand(T, L, E, generator=torch.Generator().manual_seed(0))
        return busiest_expert(draws.topk(K, dim=-1).indices, batch, E)

    def draw(self, title: str, ax=None):
        """Heatmap: tokens (rows) x layers (columns), coloured by each token's first-choice expert, a line
        and a label where each part of the chat begins (`marks`)."""
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        first, E = self.experts[:, :, 0].numpy(), self.num_experts  # [T, L]
        if ax is None:
            _, ax = plt.subplots(figsize=(9, 0.18 * len(first) + 1))
        cmap = ListedColormap(plt.get_cmap("tab10").colors[:E])
        image = ax.imshow(first, aspect="auto", cmap=cmap, vmin=-0.5, vmax=E - 0.5, interpolation="nearest")
        if self.tokens:
            ax.set_yticks(range(len(self.tokens)), [shown_token(t) for t in self.tokens], fontsize=7)
        ax.set(xlabel="layer", ylabel="token", title=title)
        ax.figure.colorbar(image, ax=ax, ticks=range(E), label="first-choice expert")
        for name, row in self.marks.items():
            ax.axhline(row - 0.5, color="black", linewidth=1.5)
            style = dict(ha="right", va="top", fontsize=8, backgroundcolor="white")
            ax.text(first.shape[1] - 0.5, row - 0.3, f" {name} ", **style)
        return ax


@dataclass
class NextLayerGuess:
    """Speculative prefetch's guess (after Eliseev and Mazur, 2023): as layer l's experts start, take the residual
    stream after layer l's attention, apply layer l+1's norm and router to it; its top experts are the guess for
    layer l+1, made a layer early, in time to fetch them while layer l computes. Use beside RouterTrace, as a
    context manager around `generate()` (batch 1): per forward call, L - 1 entries of [t, `most`] guessed
    experts, best first. Taught in 11_offloading."""

    model: object
    most: int = 4
    calls: list = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __enter__(self):
        self.calls.clear()
        layers = routers(self.model)  # refuses a model without Mixtral-style routers

        def record(i, guess, _tokens):
            if i == 0:
                self.calls.append([None] * (len(layers) - 1))
            logits = guess()
            self.calls[-1][i] = logits.topk(min(self.most, logits.shape[-1]), dim=-1).indices.cpu()

        self._hooks = next_layer_guesses(self.model, record)
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def prefetch_recall(pairs, counts=(2, 3, 4)) -> dict:
    """{G: [L - 1] recall per layer from the second on}: over the decode steps of each (NextLayerGuess,
    RouterTrace) pair from the same generation, the share of a token's true top-k experts among the first G
    guessed a layer before. The prompt pass is left out: a cache prefetches for the tokens it decodes.
    Taught in 11_offloading."""
    import torch

    found, total = 0, 0
    for guess, trace in pairs:
        if len(guess.calls) != len(trace.calls):
            raise ValueError(
                f"{len(guess.calls)} guessed calls against {len(trace.calls)} traced: record both around one generate()"
            )
        guessed = torch.cat([torch.stack(call, dim=1) for call in guess.calls[1:]])  # [T, L-1, most]
        truth = torch.cat(
            [torch.stack([i for i, _, _ in call[1:]], dim=1) for call in trace.calls[1:]]
        )  # [T, L-1, K]
        found = found + torch.stack(
            [(guessed[..., :g, None] == truth[..., None, :]).any(-2).float().sum((0, 2)) for g in counts]
        )  # [G, L-1]
        total += truth.shape[0] * truth.shape[2]
    return {g: found[i] / total for i, g in enumerate(counts)}


def experts_read_per_step(pipe, prompts: list, max_new_tokens: int = 24, seed: int = 0):
    """Answer `prompts` as one batch (generate_batch) with the routers traced: [S, L], the distinct
    experts each layer read at each decode step, the union over the batch's tokens (prompt pass left out).
    Taught in 08_performance."""
    with RouterTrace(as_backend(pipe).model) as trace:
        generate_batch(pipe, prompts, max_new_tokens=max_new_tokens, seed=seed)
    return step_unions(trace)


def step_unions(trace):
    """[S, L] distinct experts per layer in each decode call of a trace (every call after the first)."""
    import torch

    return torch.tensor(
        [[len(set(indices.flatten().tolist())) for indices, _, _ in call] for call in trace.calls[1:]]
    )


def trace_generation(pipe, prompt, max_new_tokens: int = 32, seed: int = 0, **knobs) -> RouterTrace:
    """Generate with the router traced: the trace, with the answer, the token string of every traced
    position and where the chat's parts start. Taught in 07_inside_the_moe."""
    ids = chat_ids(pipe.tokenizer, prompt)
    with RouterTrace(pipe.model) as trace:
        trace.answer = generate(pipe, prompt, max_new_tokens=max_new_tokens, seed=seed, **knobs)
    # each position's routing belongs to the token fed in there: the prompt, then every new
    # token except the last (which is never fed back)
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids + trace.answer.token_ids)
    trace.tokens = tokens[: trace.experts.shape[0]]
    if isinstance(prompt, str):
        trace.marks = turn_starts(pipe.tokenizer, prompt)
    return trace


def busiest_expert(experts, batch: int, num_experts: int, draws: int = 200, seed: int = 0) -> float:
    """How much more work the busiest expert gets than the mean one when `batch` tokens are decoded together:
    from a [T, L, K] trace, `draws` batches of `batch` distinct tokens drawn at random (a fixed seed), in each
    layer the most tokens any expert received over the mean (batch x K / E); the average over draws and layers.
    1.0 is a perfectly even load. With expert parallelism, where an expert's time grows with its tokens (a prompt
    pass, large batches), the GPU holding the busiest expert sets the pace. 08_performance calls it
    through `RouterTrace.busiest_expert`."""
    import torch

    T, L, K = experts.shape
    whole_number("batch", batch, 1, f" (at most the {T} tokens traced)", maximum=T)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(T, generator=generator)[:batch] for _ in range(draws)])  # [draws, B]
    chosen = torch.nn.functional.one_hot(experts[picks], num_experts).sum((1, 3))  # [draws, L, E]
    return (chosen.max(-1).values.float() / (batch * K / num_experts)).mean().item()


def route_topk_then_softmax(logits, k: int):
    """Mistral's reference moe.py: keep the top-k logits, softmax over just those. -> (weights, indices)
    Taught in 07_inside_the_moe."""
    import torch

    top, idx = torch.topk(logits, k, dim=-1)  # [T, K]
    return torch.softmax(top.float(), dim=-1), idx


def route_softmax_topk_renorm(logits, k: int):
    """transformers: softmax over all experts, keep the top-k, renormalise to sum 1.
    Taught in 07_inside_the_moe."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top, idx = torch.topk(probs, k, dim=-1)  # [T, K]
    return top / top.sum(-1, keepdim=True), idx


@contextmanager
def experts_per_token(model, k: int):
    """`with experts_per_token(model, 4): ...` runs the block with each token visiting `k` experts
    (Mixtral was trained with 2), then restores what the model had, even if the block fails.
    Taught in 07_inside_the_moe."""
    whole_number(
        "experts per token", k, 1, " (the model was trained with 2)", maximum=routers(model)[0].num_experts
    )
    old = routers(model)[0].top_k
    _set_top_k(model, k)
    try:
        yield model
    finally:
        _set_top_k(model, old)


def _set_top_k(model, k: int) -> None:
    model.config.num_experts_per_tok = k
    for layer in model.model.layers:
        layer.mlp.top_k = layer.mlp.gate.top_k = k


def cost_experiment(
    hidden: int = 512,
    intermediate: int = 1536,
    layers: int = 4,
    experts: int = 8,
    top_k: int = 2,
    new_tokens: int = 32,
) -> list[dict]:
    """Decode speed and weight memory of three random models on this machine (seeded: the same weights each
    run): the MoE, a dense model as big as the MoE in total, and a dense model as big as what the MoE uses per
    token. Taught in 07_inside_the_moe."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=1024,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    models = {
        f"MoE ({experts} experts, top-{top_k})": MixtralForCausalLM(
            MixtralConfig(
                intermediate_size=intermediate, num_local_experts=experts, num_experts_per_tok=top_k, **common
            )
        ),
        "dense, MoE's total size": LlamaForCausalLM(
            LlamaConfig(intermediate_size=experts * intermediate, **common)
        ),
        "dense, MoE's active size": LlamaForCausalLM(
            LlamaConfig(intermediate_size=top_k * intermediate, **common)
        ),
    }
    prompt = torch.randint(0, 1024, (16,)).tolist()
    greedy = dict(do_sample=False, max_new_tokens=5 + new_tokens, min_new_tokens=5 + new_tokens)
    rows = []
    for name, model in models.items():
        answer = LocalModel(model=model.eval()).run([prompt], greedy)[
            0
        ]  # decode speed after 1 + 4 warm-up tokens
        rows.append(
            {
                "model": name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "weights_MiB": sum(p.nbytes for p in model.parameters()) / 2**20,
                "tokens_per_s": decode_rate(answer.token_times, warmup=4),
            }
        )
    return rows


def draw_loads(loads: dict, title: str):
    """One heatmap per task: layers x experts, the share of routing slots each expert took.
    Taught in 07_inside_the_moe."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 4), sharey=True)
    for ax, (name, load) in zip(axes, loads.items()):
        image = ax.imshow(
            load.numpy(),
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=float(max(l.max() for l in loads.values())),
        )
        ax.set_title(name)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="share of routing slots")
    fig.suptitle(title)
    return fig
