"""Against a real `transformers serve` on a free loopback port, with the stand-in."""
import http.server
import json
import os
import signal
import threading
import time

import pytest

from helpers import (Endpoint, EndpointError, SamplingPanel, generate, generate_batch, generate_many, load_pipeline,
                     room_load, start_local_server)


@pytest.fixture(scope="module")
def server():
    s = start_local_server(dtype="float32")
    yield s
    s.stop()


@pytest.fixture
def endpoint(server):
    return Endpoint(server.url, server.model)


def test_load_pipeline_returns_the_endpoint_from_the_environment(server, monkeypatch, tiny_mixtral_dir):
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    pipe = load_pipeline()
    assert isinstance(pipe, Endpoint) and pipe.base_url == server.url and pipe.model == server.model
    monkeypatch.setenv("MIXTRAL_MODEL", str(tiny_mixtral_dir))  # any local model will do: not the stand-in's 2.6 GiB
    local = load_pipeline(local=True)  # notebooks that look inside a model
    assert not isinstance(local, Endpoint) and local.model.config.hidden_size == 32


def test_non_streaming_call_and_knob_mapping(endpoint):
    answer = generate(endpoint, "Tell me some jokes about semiconductors.", max_new_tokens=12, seed=0)
    assert answer.complete and answer.text and 1 <= answer.new_tokens <= 12
    assert answer.settings["ignored_by_server"] == ["top_k"]  # transformers serve refuses top_k
    assert "ignored by the server: top_k" in answer.stats()
    greedy = [generate(endpoint, "Hi", max_new_tokens=8, do_sample=False).text for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_request_mapping():
    e = Endpoint("http://127.0.0.1:9/v1", "m")
    body, ignored = e.request(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert body == {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 3, "extra_body": {"top_k": 20}}
    assert ignored == []
    assert e.request(max_new_tokens=5, do_sample=False)[0] == {"max_tokens": 5, "temperature": 0.0}
    e.refused = {"top_k", "seed"}
    body, ignored = e.request(max_new_tokens=5, top_k=20, seed=1)
    assert "extra_body" not in body and "seed" not in body and sorted(ignored) == ["seed", "top_k"]


def test_streaming_into_the_panel(endpoint):
    panel = SamplingPanel(endpoint, "Hi", max_new_tokens=16)
    try:
        assert panel.generate() and panel.wait(120)
        assert panel.output.value and "tok/s" in panel.stats.value and panel.runs[-1]["ending"] == "done"
    finally:
        panel.close()


def test_sixteen_concurrent_requests_all_complete_unmixed(endpoint):
    prompts = [f"Repeat this word exactly: {word}" for word in
               ["apple", "river", "silicon", "violet", "thunder", "marble", "falcon", "copper",
                "lantern", "meadow", "quartz", "saffron", "harbor", "ember", "glacier", "tulip"]]
    alone = [generate(endpoint, p, max_new_tokens=10, do_sample=False).text for p in prompts]
    together = generate_batch(endpoint, prompts, max_new_tokens=10, do_sample=False)  # 16 concurrent requests
    assert len(together) == 16 and all(a.complete and a.text for a in together)
    assert [a.text for a in together] == alone  # each answer is its own prompt's, as when sent alone


def test_generate_many_over_the_endpoint(endpoint):
    texts = generate_many(endpoint, "Tell me a joke.", samples=3, max_new_tokens=8, seed=0)
    assert len(texts) == 3 and all(texts)


# ---------------------------------------------------------------- failures: clear, quick, no hang


def test_unreachable_server(free_port):
    started = time.perf_counter()
    with pytest.raises(EndpointError, match="cannot reach .* is the server running"):
        generate(Endpoint(f"http://127.0.0.1:{free_port}/v1", "m"), "Hi", max_new_tokens=3)
    assert time.perf_counter() - started < 10


def test_wrong_url(server):
    with pytest.raises(EndpointError, match="no chat endpoint .* ends in /v1"):
        generate(Endpoint(server.url.replace("/v1", "/v2"), server.model), "Hi", max_new_tokens=3)


def test_unknown_model(server):
    with pytest.raises(EndpointError, match="does not serve model 'nobody/unknown'"):
        generate(Endpoint(server.url, "nobody/unknown"), "Hi", max_new_tokens=3)


@pytest.fixture
def free_port():
    from helpers.serving import free_port as pick
    return pick()


@pytest.fixture
def stub(free_port):
    """A loopback HTTP server that refuses every key (401), or accepts and never answers."""
    behaviour = {"mode": "401"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            if behaviour["mode"] == "hang":
                time.sleep(5)
                return
            body = json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{free_port}/v1", behaviour
    httpd.shutdown()


def test_wrong_key(stub):
    url, _ = stub
    with pytest.raises(EndpointError, match="refused the API key: set MIXTRAL_API_KEY"):
        generate(Endpoint(url, "m", api_key="wrong"), "Hi", max_new_tokens=3)


def test_timeout(stub):
    url, behaviour = stub
    behaviour["mode"] = "hang"
    started = time.perf_counter()
    with pytest.raises(EndpointError, match="no answer .* within 1 s"):
        generate(Endpoint(url, "m", timeout=1), "Hi", max_new_tokens=3)
    assert time.perf_counter() - started < 5


def test_failure_shows_in_the_panel(free_port):
    panel = SamplingPanel(Endpoint(f"http://127.0.0.1:{free_port}/v1", "m"), "Hi", max_new_tokens=3)
    try:
        panel.generate()
        panel.wait(20)
        assert "cannot reach" in panel.message.value and panel.runs[-1]["ending"] == "failed"
    finally:
        panel.close()


def test_stream_cut_mid_answer_keeps_the_partial_text():
    own = start_local_server(dtype="float32")  # a server of its own, to stop mid-stream
    try:
        endpoint = Endpoint(own.url, own.model)
        arrived = []

        def on_text(text):
            arrived.append(text)
            if len(arrived) == 3:
                os.killpg(own.process.pid, signal.SIGKILL)  # the server dies mid-answer
        answer = generate(endpoint, "Write a long poem about the sea.", max_new_tokens=200, do_sample=False,
                          on_text=on_text)
        assert not answer.complete and "stream was cut" in answer.note and "INCOMPLETE" in answer.stats()
        assert answer.text == arrived[-1].strip() and answer.new_tokens >= 3 and answer.text
    finally:
        own.stop()


def test_a_rooms_cap_cuts_long_requests_and_says_so(server, monkeypatch):
    monkeypatch.setenv("MIXTRAL_ENDPOINT", server.url)
    monkeypatch.setenv("MIXTRAL_ENDPOINT_MODEL", server.model)
    monkeypatch.setenv("MIXTRAL_MAX_NEW_TOKENS", "5")
    capped = load_pipeline()
    answer = generate(capped, "Tell me a long story.", max_new_tokens=40, do_sample=False)
    assert answer.new_tokens <= 5 and answer.settings["capped_at"] == 5
    assert "capped at 5 new tokens (MIXTRAL_MAX_NEW_TOKENS)" in answer.stats()
    assert generate(capped, "Hi", max_new_tokens=3, do_sample=False).settings["capped_at"] is None
    monkeypatch.setenv("MIXTRAL_MAX_NEW_TOKENS", "lots")
    with pytest.raises(ValueError, match="MIXTRAL_MAX_NEW_TOKENS='lots'.*whole number >= 1"):
        load_pipeline()


def test_room_load_measures_each_room_size(endpoint, server):
    rows = room_load(endpoint, users=(1, 3), max_new_tokens=4)
    assert [r["users"] for r in rows] == [1, 3] and all(r["complete"] for r in rows)
    for r in rows:
        assert r["tokens"] <= 4 * r["users"] and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert 0 < r["first_token_mean_s"] <= r["first_token_max_s"] <= r["answer_max_s"] <= r["seconds"]
    assert 500 < server.peak_mib() < 20_000  # the server's peak memory, read from /proc
