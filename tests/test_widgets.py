import threading
import time

import pytest
import torch

from helpers import SamplingPanel, generate, load_pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tiny_mixtral_dir):
    return load_pipeline(str(tiny_mixtral_dir), dtype=torch.float32)


@pytest.fixture
def panel(tiny_pipe):
    p = SamplingPanel(tiny_pipe, "Tell me some jokes about semiconductors.", max_new_tokens=12, seed=3)
    yield p
    p.close()


def test_initial_values_are_the_blogs(panel):
    assert (panel.temperature.value, panel.top_k.value, panel.top_p.value, panel.do_sample.value) == (
        0.8,
        20,
        0.95,
        True,
    )
    assert panel.max_new_tokens.value == 12 and panel.seed.value == 3
    assert panel.stop_button.disabled and not panel.generate_button.disabled


def test_generate_streams_text_stats_and_history(panel, tiny_pipe):
    assert panel.generate() is True
    assert panel.wait(timeout=60)
    expected = generate(tiny_pipe, panel.prompt.value, max_new_tokens=12, seed=3)
    assert panel.output.value.strip() == expected.text  # the streamed text is the seeded answer
    assert "time to first token" in panel.stats.value and "tok/s" in panel.stats.value
    assert "temperature=0.8" in panel.stats.value and "seed=3" in panel.stats.value
    assert len(panel.runs) == 1 and panel.runs[0]["tokens"] == expected.new_tokens
    assert len(panel.history.children) == 1
    assert not panel.generate_button.disabled and panel.stop_button.disabled


def test_moving_a_slider_changes_the_next_run(panel):
    panel.do_sample.value = False
    panel.generate()
    panel.wait(60)
    panel.temperature.value = 0.0  # ignored when greedy: no message
    panel.generate()
    panel.wait(60)
    assert panel.message.value == ""
    assert panel.runs[0]["text"] == panel.runs[1]["text"]  # greedy is deterministic
    assert panel.runs[1]["settings"] == {"max_new_tokens": 12, "do_sample": False, "seed": 3}
    assert len(panel.history.children) == 2


@pytest.mark.parametrize(
    "change, knob",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(prompt="  "), "empty"),
        (dict(max_new_tokens=1000), "max_new_tokens"),  # beyond the tiny model's 256-token context
        (dict(seed=-1), "seed=-1"),
        (dict(prompt="word " * 400), "shorten the prompt"),
    ],
)
def test_invalid_settings_show_a_message_not_a_traceback(panel, change, knob):
    for name, value in change.items():
        getattr(panel, name).value = value
    assert panel.generate() is False
    assert knob in panel.message.value and "&#9888;" in panel.message.value
    assert not panel.running and panel.runs == []


@pytest.fixture
def slow_pipe(tiny_pipe, monkeypatch):
    """The tiny model, slowed to about 20 tokens/s so that Stop can land mid-answer."""
    forward = tiny_pipe.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.model, "forward", slow)
    return tiny_pipe


def test_stop_ends_generation_within_a_few_tokens(slow_pipe):
    panel = SamplingPanel(slow_pipe, "Hello", max_new_tokens=200)
    try:
        panel.generate()
        while len(panel.output.value) == 0:
            time.sleep(0.01)
        panel.stop()
        stopped_at = time.perf_counter()
        assert panel.wait(timeout=5)
        assert time.perf_counter() - stopped_at < 0.5  # a few tokens at 0.05 s each
        assert panel.runs[-1]["ending"] == "stopped" and panel.runs[-1]["tokens"] < 200
        assert panel.generate() and panel.wait(60)  # the model is still usable afterwards
    finally:
        panel.close()


def test_a_second_click_while_running_is_ignored(slow_pipe):
    panel = SamplingPanel(slow_pipe, "Hello", max_new_tokens=40)
    try:
        assert panel.generate() is True
        assert panel.generate_button.disabled
        assert panel.generate() is False  # ignored, no second thread
        panel.stop()
        panel.wait(10)
        assert len(panel.runs) == 1
    finally:
        panel.close()


def test_rerunning_the_cell_stops_the_old_panel(slow_pipe):
    before = threading.active_count()
    old = SamplingPanel(slow_pipe, "Hello", max_new_tokens=200)
    old.generate()
    new = SamplingPanel(slow_pipe, "Hello", max_new_tokens=5)  # what re-running the cell does
    try:
        assert not old.running and old.runs[-1]["ending"] == "stopped"
        assert threading.active_count() <= before
    finally:
        new.close()


def test_close_leaves_no_thread(slow_pipe):
    before = threading.active_count()
    panel = SamplingPanel(slow_pipe, "Hello", max_new_tokens=200)
    panel.generate()
    panel.close()
    assert not panel.running and threading.active_count() <= before


def test_errors_during_generation_are_shown(panel, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(panel.pipe.model, "generate", broken)
    panel.generate()
    panel.wait(10)
    assert "out of memory (simulated)" in panel.message.value and panel.runs[-1]["ending"] == "failed"
    assert not panel.generate_button.disabled


def test_the_distribution_explorer_draws_with_its_sliders(standin_tokenizer, monkeypatch):
    """The explorer's redraw runs once as it is built: an error there (a call the helpers no longer take) fails here,
    where in a notebook the widget would only show it inside itself."""
    import matplotlib

    matplotlib.use("Agg")
    from conftest import tiny_llama

    from helpers import distribution, distribution_explorer
    from helpers.backends import LocalModel

    drawn = []
    real = distribution.next_token_distribution
    monkeypatch.setattr(
        "helpers.widgets.next_token_distribution", lambda *a, **k: drawn.append(k) or real(*a, **k)
    )
    box = distribution_explorer(
        LocalModel(model=tiny_llama(), tokenizer=standin_tokenizer), "Tell me a joke.", show=5
    )
    assert drawn and {"temperature", "top_k", "top_p"} <= set(drawn[0]), drawn
    errors = [o for o in box.children[1].outputs if o.get("output_type") == "error"]
    assert not errors, errors
