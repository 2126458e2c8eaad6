"""The sampling panel: sliders for the knobs, Generate / Stop, text streamed as it is written.

Layout apart from logic: `SamplingPanel` builds the controls, `generate()` (a method, also
what the Generate button calls) does the work on one worker thread, and `stop()` asks it to
end at the next token. Unit tests drive it by setting values and calling the handlers."""
from __future__ import annotations

import html
import threading
import time
import weakref

from .generation import BLOG_SAMPLING, context_left, pad_id, validate_sampling, validate_seed
from .speed import TokenClock

_PANELS: "weakref.WeakSet[SamplingPanel]" = weakref.WeakSet()  # to stop old panels when a cell re-runs


class _PanelStreamer(TokenClock):
    """A TokenClock (the time of each new token from `model.generate`) that also shows the decoded
    text so far in the panel."""

    def __init__(self, panel, tokenizer):
        super().__init__()
        self.panel, self.tokenizer, self.ids = panel, tokenizer, []

    @property
    def first_token_at(self):
        return self.times[0] if self.times else None

    def put(self, value):
        if super().put(value):
            self.ids.extend(value.reshape(-1).tolist())
            self.panel.output.value = self.tokenizer.decode(self.ids, skip_special_tokens=True)


class SamplingPanel:
    """Sliders for temperature, top_k, top_p and max_new_tokens, a do_sample toggle, a seed, an
    editable prompt, Generate and Stop; the answer streams in; earlier runs stay below."""

    def __init__(self, pipe, prompt: str, max_new_tokens: int = 128, seed: int = 0, history: int = 4, **knobs):
        import ipywidgets as w

        for old in list(_PANELS):  # a re-run cell replaces its panel: end the old one's work
            if old.pipe is pipe:
                old.close()
        _PANELS.add(self)
        self.pipe, self.history_size, self.runs = pipe, history, []
        self._thread, self._stop = None, threading.Event()
        settings = dict(BLOG_SAMPLING, **knobs)
        slider = dict(continuous_update=False, style={"description_width": "125px"}, layout=w.Layout(width="440px"))
        self.prompt = w.Textarea(value=prompt, description="prompt", rows=3, layout=w.Layout(width="95%"))
        self.temperature = w.FloatSlider(value=settings["temperature"], min=0.0, max=2.0, step=0.05,
                                         description="temperature", readout_format=".2f", **slider)
        self.top_k = w.IntSlider(value=settings["top_k"], min=0, max=200, description="top_k", **slider)
        self.top_p = w.FloatSlider(value=settings["top_p"], min=0.0, max=1.0, step=0.01,
                                   description="top_p", readout_format=".2f", **slider)
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=1024, description="max_new_tokens", **slider)
        self.do_sample = w.Checkbox(value=settings["do_sample"], description="do_sample (off = greedy)")
        self.seed = w.IntText(value=seed, description="seed", layout=w.Layout(width="200px"))
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.message = w.HTML(value="")
        self.output = w.Textarea(value="", placeholder="the answer streams in here",
                                 layout=w.Layout(width="95%", height="220px"))
        self.output.add_class("sampling-panel-output")
        self.stats = w.HTML(value="")
        self.history = w.GridBox(layout=w.Layout(grid_template_columns="1fr 1fr", width="95%"))
        self.generate_button.on_click(self.generate)
        self.stop_button.on_click(self.stop)
        knobs_box = w.VBox([self.temperature, self.top_k, self.top_p, self.max_new_tokens])
        side = w.VBox([self.do_sample, self.seed, w.HBox([self.generate_button, self.stop_button])])
        self.ui = w.VBox([self.prompt, w.HBox([knobs_box, side]), self.message, self.output, self.stats,
                          w.HTML("<b>Earlier runs</b>"), self.history])
        self.ui.add_class("sampling-panel")

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def settings(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens.value, do_sample=self.do_sample.value,
                    temperature=self.temperature.value, top_k=self.top_k.value, top_p=self.top_p.value)

    def generate(self, _button=None) -> bool:
        """Start a generation with the current settings; False (and a message) if it cannot."""
        from .prompts import chat_ids

        if self.running:
            return False  # one at a time: the button is disabled, a stray click is ignored
        from .prompts import as_messages
        from .serving import Endpoint
        try:
            if isinstance(self.pipe, Endpoint):  # a served model: its server counts the tokens
                ids, context = as_messages(self.prompt.value), None
            else:
                ids = chat_ids(self.pipe.tokenizer, self.prompt.value)
                context = getattr(self.pipe.model.config, "max_position_embeddings", None)
            kwargs = validate_sampling(context_left=context_left(len(ids), context), **self.settings())
            validate_seed(self.seed.value)
        except ValueError as exc:
            self.message.value = f"<span style='color:#b00'>&#9888; {html.escape(str(exc))}</span>"
            return False
        self.message.value = ""
        self.output.value = ""
        self.stats.value = "<i>generating...</i>"
        self._stop.clear()
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._work, args=(ids, kwargs, self.seed.value), daemon=True)
        self._thread.start()
        return True

    def _work_served(self, kwargs, seed):
        from .prompts import as_messages
        started, error, text, note, first, ignored, complete = time.perf_counter(), None, "", "", None, [], True

        def show(so_far):
            self.output.value = so_far
        try:
            text, chunks, complete, note, ignored, first = self.pipe.stream(
                as_messages(self.prompt.value), dict(kwargs, seed=seed), on_text=show, should_stop=self._stop.is_set)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            error, chunks = str(exc), 0
        if not complete:
            error = f"INCOMPLETE: {note}; the text above is what arrived"
        self._finish(chunks, first, started, dict(kwargs, ignored_by_server=ignored) if ignored else kwargs, seed,
                     error, complete=complete)

    def _work(self, ids, kwargs, seed):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from .serving import Endpoint
        if isinstance(self.pipe, Endpoint):
            return self._work_served(kwargs, seed)

        stop = self._stop

        class StopPressed(StoppingCriteria):
            def __call__(self, input_ids, scores, **_):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        model, tokenizer = self.pipe.model, self.pipe.tokenizer
        streamer = _PanelStreamer(self, tokenizer)
        started = time.perf_counter()
        error = None
        try:
            torch.manual_seed(seed)
            input_ids = torch.tensor([ids], device=model.device)
            pad = pad_id(tokenizer)
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([StopPressed()]), **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never as a traceback
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finish(len(streamer.ids), streamer.first_token_at, started, kwargs, seed, error)

    def _finish(self, n, first_token_at, started, kwargs, seed, error, complete=True):
        """Stats line and history for a run of `n` tokens (or served chunks), whatever its ending."""
        ended = time.perf_counter()
        ttft = (first_token_at - started) if first_token_at else float("nan")
        rate = (n - 1) / (ended - first_token_at) if n > 1 else float("nan")
        knobs = ", ".join(f"{k}={v}" for k, v in kwargs.items()) + f", seed={seed}"
        ending = "stopped" if self._stop.is_set() else ("incomplete" if not complete else ("failed" if error else "done"))
        stats = (f"{ending}: {n} tokens · time to first token {ttft:.2f} s · {rate:.1f} tok/s after it · {knobs}")
        if error:
            self.message.value = f"<span style='color:#b00'>&#9888; {html.escape(error)}</span>"
        self.stats.value = html.escape(stats)
        self.runs.append({"text": self.output.value, "stats": stats, "tokens": n, "ttft_s": ttft,
                          "tokens_per_s": rate, "settings": dict(kwargs, seed=seed), "ending": ending})
        self.runs = self.runs[-self.history_size:]
        self._show_history()
        self.generate_button.disabled, self.stop_button.disabled = False, True

    def _show_history(self):
        import ipywidgets as w
        cards = []
        for i, run in enumerate(reversed(self.runs)):
            text = html.escape(run["text"][:1500])
            cards.append(w.HTML(f"<div style='border:1px solid #ccc;padding:4px;margin:2px'>"
                                f"<small>{'latest' if i == 0 else f'{i} run(s) before'} · {html.escape(run['stats'])}</small>"
                                f"<pre style='white-space:pre-wrap;font-size:85%'>{text}</pre></div>"))
        self.history.children = cards

    def stop(self, _button=None) -> None:
        """Ask the running generation to end after the current token."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running generation has ended (tests, scripts); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def close(self) -> None:
        """Stop any generation, wait for its thread, and close the widgets."""
        self.stop()
        self.wait(timeout=30)
        self.ui.close()


def distribution_explorer(pipe, prompt: str, answer_prefix: str = "", show: int = 15):
    """Sliders for temperature, top_k and top_p over a plot of the next-token distribution,
    redrawn when a slider is released (continuous_update=False)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from .generation import draw_distribution, next_token_distribution

    slider = dict(continuous_update=False, style={"description_width": "90px"})
    temperature = w.FloatSlider(value=BLOG_SAMPLING["temperature"], min=0.05, max=2.0, step=0.05,
                                description="temperature", **slider)
    top_k = w.IntSlider(value=BLOG_SAMPLING["top_k"], min=0, max=50, description="top_k (0=off)", **slider)
    top_p = w.FloatSlider(value=BLOG_SAMPLING["top_p"], min=0.05, max=1.0, step=0.01, description="top_p", **slider)

    def redraw(temperature, top_k, top_p):
        stages = next_token_distribution(pipe, prompt, temperature, top_k, top_p, show=show, answer_prefix=answer_prefix)
        draw_distribution(stages, f"Next token after: …{answer_prefix[-40:]!r}")
        plt.show()

    out = w.interactive_output(redraw, {"temperature": temperature, "top_k": top_k, "top_p": top_p})
    return w.VBox([w.HBox([temperature, top_k, top_p]), out])
