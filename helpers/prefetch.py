"""Fetch an expert cache's experts before they are needed (Eliseev and Mazur, 2023): while layer l computes,
the experts layer l + 1 is guessed to use are copied into its slots, on a background thread. The guess is
layer l + 1's router applied one layer early (`next_layer_guesses`, which `moe.NextLayerGuess` records too),
or a recorded run's own choices, the perfect guess. 11_offloading measures it."""

from __future__ import annotations

from .data import whole_number
from .offload import layer_caches


def next_layer_guesses(model, on_guess) -> list:
    """Speculative prefetch's guess (after Eliseev and Mazur, 2023), hooked into `model`: before layer l's experts
    (at its post-attention norm), layer l+1's norm and router applied to the residual stream there. Calls
    `on_guess(l, guess, tokens per sequence)` for l = 0 .. L-2 in every forward, where `guess()` computes the
    logits [T, E] (only for a caller that wants them); returns the hooks."""
    import torch.nn.functional as F

    layers = model.model.layers

    def hook_for(i):
        def hook(_module, inputs):
            def guess():
                state = inputs[0].reshape(-1, inputs[0].shape[-1])
                norm = layers[i + 1].post_attention_layernorm.forward(
                    state
                )  # forward(): not layer i+1's own hook
                return F.linear(norm, layers[i + 1].mlp.gate.weight)

            on_guess(i, guess, inputs[0].shape[1])

        return hook

    return [
        layers[i].post_attention_layernorm.register_forward_pre_hook(hook_for(i))
        for i in range(len(layers) - 1)
    ]


class InLine:
    """An executor that runs each job at once, in the calling thread: `Prefetch(threads=0)`."""

    def submit(self, job, *args):
        from concurrent.futures import Future

        done = Future()
        done.set_result(job(*args))
        return done

    def shutdown(self):
        pass


class Prefetch:
    """`with Prefetch(model): generate(...)`: while layer l computes, fetch the experts layer l + 1 will be guessed
    to use into its cache's slots, on a background thread (Eliseev and Mazur, 2023), in decode steps. The guess
    (`NextLayerGuess`'s): layer l + 1's norm and router applied to the residual stream before layer l's experts,
    its `most` best experts. Or `trace`, a RouterTrace of the same generation (same prompt, seed and settings):
    its true experts, the perfect guess no live cache has, the yardstick. `threads=0` makes the same copies in line,
    when the guess is made: what the thread costs or saves, apart. Needs an expert cache (`fit=Fit.expert_cache(C)`).
    Taught in 11_offloading."""

    def __init__(self, model, most: int = 2, trace=None, threads: int = 1):
        caches = layer_caches(model)
        if not caches:
            raise ValueError(
                "Prefetch needs a model with an expert cache: load_pipeline(..., fit=Fit.expert_cache(C))"
            )
        whole_number("threads", threads, 0, " (0: the copies in line; 1: on a background thread)", maximum=1)
        self.model, self.caches, self.most, self.trace, self.threads, self._hooks = (
            model,
            caches,
            most,
            trace,
            threads,
            [],
        )

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        layers, self.call = (
            self.model.model.layers,
            -1,
        )  # the forward call within the generation, 0: its prompt pass
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if self.threads else InLine()
        stream = (
            torch.cuda.Stream() if self.model.device.type == "cuda" else None
        )  # copies beside the compute

        def fetch_ahead(i, guess, tokens):
            if i == 0:
                self.call = 0 if tokens > 1 else self.call + 1  # a prompt pass starts a generation
            if tokens > 1:
                return  # decode steps only
            if self.trace is not None:
                calls = self.trace.calls
                chosen = calls[self.call][i + 1][0].flatten().tolist() if self.call < len(calls) else []
            else:
                chosen = guess().topk(self.most, dim=-1).indices.flatten().tolist()
            self.caches[i + 1].prefetch(layers[i + 1].mlp.experts, dict.fromkeys(chosen), self.pool, stream)

        self._hooks = next_layer_guesses(self.model, fetch_ahead)
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for cache in self.caches:
            cache.settle()
        self.pool.shutdown()
