"""The sampling panel: sliders for the knobs, Generate / Stop, text streamed as it is written.

Layout apart from logic: `SamplingPanel` builds the controls, `generate()` (a method, also
what the Generate button calls) does the work on one worker thread, and `stop()` asks it to
end at the next token. Unit tests drive it by setting values and calling the handlers."""

from __future__ import annotations

import html
import threading
import weakref

from .backends import as_backend
from .data import BLOG_SAMPLING
from .distribution import next_token_distribution
from .generation import sampling, validate_seed
from .prompts import as_messages

_PANELS: "weakref.WeakSet[SamplingPanel]" = weakref.WeakSet()  # to stop old panels when a cell re-runs


class SamplingPanel:
    """Sliders for temperature, top_k, top_p and max_new_tokens, a do_sample toggle, a seed, an
    editable prompt, Generate and Stop; the answer streams in; earlier runs stay below. Taught in 02_poem."""

    def __init__(
        self, pipe, prompt: str, max_new_tokens: int = 128, seed: int = 0, history: int = 4, **knobs
    ):
        import ipywidgets as w

        for old in list(_PANELS):  # a re-run cell replaces its panel: end the old one's work
            if old.pipe is pipe:
                old.close()
        _PANELS.add(self)
        self.pipe, self.backend, self.history_size, self.runs = pipe, as_backend(pipe), history, []
        self._thread, self._stop = None, threading.Event()
        settings = dict(BLOG_SAMPLING, **knobs)
        slider = dict(
            continuous_update=False, style={"description_width": "125px"}, layout=w.Layout(width="440px")
        )
        self.prompt = w.Textarea(value=prompt, description="prompt", rows=3, layout=w.Layout(width="95%"))
        self.temperature = w.FloatSlider(
            value=settings["temperature"],
            min=0.0,
            max=2.0,
            step=0.05,
            description="temperature",
            readout_format=".2f",
            **slider,
        )
        self.top_k = w.IntSlider(value=settings["top_k"], min=0, max=200, description="top_k", **slider)
        self.top_p = w.FloatSlider(
            value=settings["top_p"],
            min=0.0,
            max=1.0,
            step=0.01,
            description="top_p",
            readout_format=".2f",
            **slider,
        )
        self.max_new_tokens = w.IntSlider(
            value=max_new_tokens, min=1, max=1024, description="max_new_tokens", **slider
        )
        self.do_sample = w.Checkbox(value=settings["do_sample"], description="do_sample (off = greedy)")
        self.seed = w.IntText(value=seed, description="seed", layout=w.Layout(width="200px"))
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.message = w.HTML(value="")
        self.output = w.Textarea(
            value="", placeholder="the answer streams in here", layout=w.Layout(width="95%", height="220px")
        )
        self.output.add_class("sampling-panel-output")
        self.stats = w.HTML(value="")
        self.history = w.GridBox(layout=w.Layout(grid_template_columns="1fr 1fr", width="95%"))
        self.generate_button.on_click(self.generate)
        self.stop_button.on_click(self.stop)
        knobs_box = w.VBox([self.temperature, self.top_k, self.top_p, self.max_new_tokens])
        side = w.VBox([self.do_sample, self.seed, w.HBox([self.generate_button, self.stop_button])])
        self.ui = w.VBox(
            [
                self.prompt,
                w.HBox([knobs_box, side]),
                self.message,
                self.output,
                self.stats,
                w.HTML("<b>Earlier runs</b>"),
                self.history,
            ]
        )
        self.ui.add_class("sampling-panel")

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def settings(self) -> dict:
        return dict(
            max_new_tokens=self.max_new_tokens.value,
            do_sample=self.do_sample.value,
            temperature=self.temperature.value,
            top_k=self.top_k.value,
            top_p=self.top_p.value,
        )

    def generate(self, _button=None) -> bool:
        """Start a generation with the current settings; False (and a message) if it cannot."""
        if self.running:
            return False  # one at a time: the button is disabled, a stray click is ignored
        try:
            messages = as_messages(self.prompt.value)
            knobs = self.settings()
            kwargs = sampling(knobs.pop("max_new_tokens"), knobs, self.backend.room(messages))
            validate_seed(self.seed.value)
        except ValueError as exc:
            self.message.value = f"<span style='color:#b00'>&#9888; {html.escape(str(exc))}</span>"
            return False
        self.message.value = ""
        self.output.value = ""
        self.stats.value = "<i>generating...</i>"
        self._stop.clear()
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(
            target=self._work, args=(messages, kwargs, self.seed.value), daemon=True
        )
        self._thread.start()
        return True

    def _work(self, messages, kwargs, seed):
        answer, error = None, None
        try:
            answer = self.backend.answer(
                messages,
                kwargs,
                seed,
                should_stop=self._stop.is_set,
                on_text=lambda text: setattr(self.output, "value", text),
            )
            if not answer.complete:
                error = f"INCOMPLETE: {answer.note}; the text above is what arrived"
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never as a traceback
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finish(answer, kwargs, seed, error)

    def _finish(self, answer, kwargs, seed, error):
        """Stats line and history for a run, whatever its ending."""
        n = answer.new_tokens if answer else 0
        ttft = answer.first_token_s if answer else float("nan")
        rate = answer.tokens_per_second if answer else float("nan")
        settings = (
            dict(kwargs, ignored_by_server=answer.settings["ignored_by_server"])
            if (answer and answer.settings.get("ignored_by_server"))
            else kwargs
        )
        knobs = ", ".join(f"{k}={v}" for k, v in settings.items()) + f", seed={seed}"
        ending = (
            "stopped"
            if self._stop.is_set()
            else "incomplete"
            if answer and not answer.complete
            else "failed"
            if error
            else "done"
        )
        stats = (
            f"{ending}: {n} tokens · time to first token {ttft:.2f} s · {rate:.1f} tok/s after it · {knobs}"
        )
        if error:
            self.message.value = f"<span style='color:#b00'>&#9888; {html.escape(error)}</span>"
        self.stats.value = html.escape(stats)
        self.runs.append(
            {
                "text": self.output.value,
                "stats": stats,
                "tokens": n,
                "ttft_s": ttft,
                "tokens_per_s": rate,
                "settings": dict(settings, seed=seed),
                "ending": ending,
            }
        )
        self.runs = self.runs[-self.history_size :]
        self._show_history()
        self.generate_button.disabled, self.stop_button.disabled = False, True

    def _show_history(self):
        import ipywidgets as w

        cards = []
        for i, run in enumerate(reversed(self.runs)):
            text = html.escape(run["text"][:1500])
            cards.append(
                w.HTML(
                    f"<div style='border:1px solid #ccc;padding:4px;margin:2px'>"
                    f"<small>{'latest' if i == 0 else f'{i} run(s) before'} · {html.escape(run['stats'])}</small>"
                    f"<pre style='white-space:pre-wrap;font-size:85%'>{text}</pre></div>"
                )
            )
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


def distribution_explorer(pipe, prompt: str, answer_prefix: str = "", show: int = 30):
    """Sliders for temperature, top_k and top_p over a plot of the next-token distribution,
    redrawn when a slider is released (continuous_update=False). Taught in 06_sampling_lab."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    slider = dict(continuous_update=False, style={"description_width": "90px"})
    temperature = w.FloatSlider(
        value=BLOG_SAMPLING["temperature"], min=0.05, max=2.0, step=0.05, description="temperature", **slider
    )
    top_k = w.IntSlider(value=BLOG_SAMPLING["top_k"], min=0, max=50, description="top_k (0=off)", **slider)
    top_p = w.FloatSlider(
        value=BLOG_SAMPLING["top_p"], min=0.05, max=1.0, step=0.01, description="top_p", **slider
    )

    def redraw(temperature, top_k, top_p):
        stages = next_token_distribution(
            pipe,
            prompt,
            show=show,
            answer_prefix=answer_prefix,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        stages.draw(f"Next token after: …{answer_prefix[-40:]!r}")
        plt.show()

    out = w.interactive_output(redraw, {"temperature": temperature, "top_k": top_k, "top_p": top_p})
    return w.VBox([w.HBox([temperature, top_k, top_p]), out])
