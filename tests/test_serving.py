"""Against the room's real server (transformers' app behind helpers/room_server.py) on a free loopback
port, with the stand-in: through our Endpoint, the official `openai` client and plain HTTP."""

import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from types import SimpleNamespace

import openai
import pytest

from helpers import (
    Endpoint,
    EndpointError,
    SamplingPanel,
    generate,
    generate_batch,
    load_pipeline,
    model_path,
    room_load,
    start_local_server,
)
from helpers.room_server import Refused, RoomLayer, check_chat, parse
from helpers.serving import Room, served_name

ROOM_KEY = "room-secret"
ROOM_CAP = 16  # the server's cap: above every budget the tests ask for, but the cap's own test


@pytest.fixture(scope="module")
def empty_hf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("empty-hf-home")


@pytest.fixture(scope="module")
def server(empty_hf_cache):
    """The module's one server, as a fresh machine has it (no Hugging Face cache), with a key and a cap."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HOME", str(empty_hf_cache))
        env.setenv("HF_HUB_CACHE", str(empty_hf_cache / "hub"))
        s = start_local_server(dtype="float32", room=Room(max_new_tokens=ROOM_CAP, api_key=ROOM_KEY))
    yield s
    s.stop()


@pytest.fixture
def endpoint(server):
    return Endpoint(server.url, server.model, api_key=server.api_key)


def test_load_pipeline_returns_the_endpoint_from_the_environment(server, monkeypatch, tiny_mixtral_dir):
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    pipe = load_pipeline()
    assert isinstance(pipe, Endpoint) and pipe.base_url == server.url and pipe.model == server.model
    assert (
        pipe.api_key == ROOM_KEY and pipe.max_new_tokens == ROOM_CAP
    )  # the server's key and cap travel in env()
    monkeypatch.setenv(
        "MIXTRAL_MODEL", str(tiny_mixtral_dir)
    )  # any local model will do: not the stand-in's 2.6 GiB
    local = load_pipeline(model_path())  # a notebook that looks inside a model names it: loaded here
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
    prompts = [
        f"Repeat this word exactly: {word}"
        for word in [
            "apple",
            "river",
            "silicon",
            "violet",
            "thunder",
            "marble",
            "falcon",
            "copper",
            "lantern",
            "meadow",
            "quartz",
            "saffron",
            "harbor",
            "ember",
            "glacier",
            "tulip",
        ]
    ]
    alone = [generate(endpoint, p, max_new_tokens=10, do_sample=False).text for p in prompts]
    together = generate_batch(endpoint, prompts, max_new_tokens=10, do_sample=False)  # 16 concurrent requests
    assert len(together) == 16 and all(a.complete and a.text for a in together)
    assert [a.text for a in together] == alone  # each answer is its own prompt's, as when sent alone


def test_samples_of_one_prompt_over_the_endpoint(endpoint):
    answers = generate_batch(endpoint, ["Tell me a joke."] * 3, max_new_tokens=8, seed=0)
    assert len(answers) == 3 and all(a.complete and a.text for a in answers)


# ---------------------------------------------------------------- failures: clear, quick, no hang


def test_unreachable_server(free_port):
    started = time.perf_counter()
    with pytest.raises(EndpointError, match="cannot reach .* is the server running"):
        generate(Endpoint(f"http://127.0.0.1:{free_port}/v1", "m"), "Hi", max_new_tokens=3)
    assert time.perf_counter() - started < 10


def test_wrong_url(server):
    with pytest.raises(EndpointError, match="no chat endpoint .* ends in /v1"):
        generate(
            Endpoint(server.url.replace("/v1", "/v2"), server.model, server.api_key), "Hi", max_new_tokens=3
        )


def test_unknown_model(server):
    with pytest.raises(EndpointError, match="does not serve model 'nobody/unknown'"):
        generate(Endpoint(server.url, "nobody/unknown", server.api_key), "Hi", max_new_tokens=3)


@pytest.fixture
def free_port():
    from helpers.serving import free_port as pick

    return pick()


@pytest.fixture
def stub(free_port):
    """A loopback HTTP server that refuses every key (401), accepts and never answers, or cuts its stream."""
    behaviour = {"mode": "401"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            if behaviour["mode"] == "hang":
                time.sleep(5)
                return
            if behaviour["mode"] == "cut":
                return self.cut()
            body = json.dumps(
                {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            )
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def cut(self):  # a streamed answer whose last chunk never comes
            self.rfile.read(int(self.headers["content-length"]))
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for word in ("The", " sea", " is"):
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                data = f"data: {json.dumps(chunk)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.close_connection = True

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


def test_stream_cut_mid_answer_keeps_the_partial_text(stub):
    url, behaviour = stub
    behaviour["mode"] = "cut"  # three chunks, then the connection closes mid-answer, as when a server dies
    arrived = []
    answer = generate(
        Endpoint(url, "m"),
        "Write a long poem about the sea.",
        max_new_tokens=200,
        do_sample=False,
        on_text=arrived.append,
    )
    assert (
        not answer.complete
        and "stream was cut after 3 chunks" in answer.note
        and "INCOMPLETE" in answer.stats()
    )
    assert answer.text == arrived[-1].strip() == "The sea is" and answer.new_tokens == len(arrived) == 3


def test_a_rooms_cap_cuts_long_requests_and_says_so(server, monkeypatch):
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MIXTRAL_MAX_NEW_TOKENS", "5")  # the notebooks' cap, below the server's
    capped = load_pipeline()
    answer = generate(capped, "Tell me a long story.", max_new_tokens=40, do_sample=False)
    assert answer.new_tokens <= 5 and answer.settings["capped_at"] == 5
    assert "capped at 5 new tokens (MIXTRAL_MAX_NEW_TOKENS)" in answer.stats()
    assert generate(capped, "Hi", max_new_tokens=3, do_sample=False).settings["capped_at"] is None
    monkeypatch.setenv("MIXTRAL_MAX_NEW_TOKENS", "lots")
    with pytest.raises(ValueError, match="MIXTRAL_MAX_NEW_TOKENS='lots'.*whole number >= 1"):
        load_pipeline()


def test_room_load_measures_each_room_size(endpoint, server):
    rows = room_load(endpoint, users=(1, 3), max_new_tokens=4, server=server)
    queued = room_load(endpoint, users=(3,), max_new_tokens=4, one_at_a_time=True, server=server)
    assert [r["users"] for r in rows + queued] == [1, 3, 3] and all(r["complete"] for r in rows + queued)
    for r in rows + queued:
        assert r["tokens"] <= 4 * r["users"] and r["tokens_per_s"] == pytest.approx(
            r["tokens"] / r["seconds"]
        )
        assert 0 < r["first_token_mean_s"] <= r["first_token_max_s"] <= r["answer_max_s"] <= r["seconds"]
        assert 0 < r["cpu_s"] and r["tokens_per_cpu_s"] == pytest.approx(r["tokens"] / r["cpu_s"])
    # queued, the last user's first token waits for the two whole answers before it: later than one alone's
    assert queued[0]["first_token_max_s"] > rows[0]["answer_max_s"]
    assert 500 < server.peak_mib() < 20_000  # the server's peak memory, read from /proc
    assert server.cpu_s() > sum(r["cpu_s"] for r in rows + queued)  # its CPU seconds so far, from /proc
    with pytest.raises(TypeError, match="give the LocalServer behind the endpoint"):
        room_load(endpoint, users=(1,), server=server.url)


STARTER = """import sys, time
from helpers import start_local_server
server = start_local_server(sys.argv[1], dtype="float32", batching=False)
print(server.process.pid, flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_server_exits_with_the_process_that_started_it(hub_mixtral_dir):
    """A kernel killed outright (no atexit) leaves no server behind: the server watches its parent."""
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(hub_mixtral_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # a tiny model, served one request at a time
    pid = None
    try:
        line = starter.stdout.readline()
        assert line.strip().isdigit(), (
            f"the starter did not start a server:\n{starter.communicate()[1][-3000:]}"
        )
        pid = int(line)
        assert running(pid)
        starter.kill()  # SIGKILL: its atexit never runs
        starter.wait()
        killed = time.perf_counter()
        while running(pid) and time.perf_counter() - killed < 10:
            time.sleep(0.1)
        assert not running(pid), "the server outlived the process that started it by 10 s"
    finally:
        starter.kill()
        if pid and running(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["some/hub-model", "--name", "mixtral-standin"],
            "a hub model is served under its hub id: --name some/hub-model",
        ),
        (
            ["some/hub-model", "--name", "some/hub-model", "--parent-pid", "0"],
            "--parent-pid 0: give the process id",
        ),
    ],
)
def test_the_server_command_line_says_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_the_server_command_line_reads_its_options():
    args = parse(
        [
            "some/hub-model",
            "--name",
            "some/hub-model",
            "--one-at-a-time",
            "--parent-pid",
            "42",
            "--max-new-tokens",
            "64",
        ]
    )
    assert args.one_at_a_time and args.parent_pid == 42 and args.max_new_tokens == 64 and args.cb_blocks == 64
    assert not parse(["some/hub-model", "--name", "some/hub-model"]).one_at_a_time  # batching unless asked


# ---------------------------------------------------------------- clients we did not write: openai, plain HTTP


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=120)


HI = [{"role": "user", "content": "Hi"}]


def test_the_model_list_names_the_served_model_without_a_hub_cache(server, client, empty_hf_cache):
    assert server.model == "mixtral-standin"
    assert [m.id for m in client.models.list()] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    assert list(empty_hf_cache.iterdir()) == []  # the server never needed a Hugging Face cache


def test_openai_client_chats_by_the_short_name_streamed_and_not(server, client):
    reply = client.chat.completions.create(model=server.model, messages=HI, max_tokens=6, temperature=0)
    text = reply.choices[0].message.content
    assert text and 1 <= reply.usage.completion_tokens <= 6
    assert reply.model.split("@")[0] == server.model and os.sep not in reply.model  # no facilitator's folder
    chunks = list(
        client.chat.completions.create(
            model=server.model, messages=HI, max_tokens=6, temperature=0, stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    )  # greedy: the same text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            dict(max_tokens=-5),
            openai.BadRequestError,
            r"max_tokens=-5 is not allowed: use a whole number from 1 to 8192",
        ),
        (
            dict(max_tokens=10**6),
            openai.BadRequestError,
            r"max_tokens=1000000 is not allowed: .* \(the model's context\)",
        ),
        (dict(max_completion_tokens=0), openai.BadRequestError, r"max_completion_tokens=0 is not allowed"),
        (
            dict(temperature=2.5),
            openai.BadRequestError,
            r"temperature=2.5 is not allowed: use a number from 0 to 2",
        ),
        (dict(temperature=-0.1), openai.BadRequestError, r"temperature=-0.1 is not allowed"),
        (dict(top_p=0), openai.BadRequestError, r"top_p=0 is not allowed: use a number in \(0, 1\]"),
        (dict(top_p=1.5), openai.BadRequestError, r"top_p=1.5 is not allowed"),
        (dict(messages=[]), openai.BadRequestError, r"messages=\[\] is not allowed: send a non-empty list"),
        (
            dict(model="gpt-4o"),
            openai.NotFoundError,
            r"model 'gpt-4o' is not served here: this server serves 'mixtral-",
        ),
    ],
    ids=lambda v: str(v)[:24] if isinstance(v, dict) else None,
)
def test_bad_requests_are_refused_with_what_to_send(server, client, change, error, message):
    request = dict(dict(model=server.model, messages=HI, max_tokens=4), **change)
    with pytest.raises(error, match=message) as refused:
        client.chat.completions.create(**request)
    assert refused.value.param == next(iter(change))  # the field at fault, as OpenAI names it


def test_the_key_is_required(server):
    with pytest.raises(openai.AuthenticationError, match="needs its API key"):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()


def test_the_server_cuts_a_request_over_the_rooms_cap(server, client):
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
        max_tokens=100,
        temperature=0,
    )
    assert reply.usage.completion_tokens == ROOM_CAP and reply.choices[0].finish_reason == "length"


def test_plain_http(server):
    """What curl sees: the model list, a chat, the key, bad JSON, and no other route (none reaches transformers)."""
    address = urllib.parse.urlsplit(server.url)

    def call(method, path, body=None, key=server.api_key):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        connection.request(
            method,
            path,
            body=data,
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {key}"} if key else {}),
            },
        )
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, response.msg, json.loads(payload)

    chat = {"model": server.model, "messages": HI, "max_tokens": 3}
    status, _, models = call("GET", "/v1/models")
    assert (
        status == 200 and [m["id"] for m in models["data"]] == [server.model] and models["object"] == "list"
    )
    status, _, reply = call("POST", "/v1/chat/completions", chat)
    assert status == 200 and reply["choices"][0]["message"]["content"]
    status, headers, refused = call("GET", "/v1/models", key=None)
    assert (
        status == 401
        and headers["WWW-Authenticate"] == "Bearer"
        and refused["error"]["code"] == "invalid_api_key"
    )
    assert call("GET", "/health", key=None)[:1] == (200,)  # the readiness check needs no key
    status, _, refused = call("POST", "/v1/chat/completions", b'{"model": "mixtral-standin", "messages": [')
    assert status == 400 and "not valid JSON" in refused["error"]["message"]
    for method, path in [
        ("POST", "/reset"),
        ("POST", "/load_model"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/chat/completions"),
    ]:
        status, _, refused = call(method, path, {"model": "/etc"} if method == "POST" else None)
        assert (
            status == 404
            and "answers GET /v1/models, POST /v1/chat/completions and GET /health"
            in (refused["error"]["message"])
        ), path
    assert call("POST", "/v1/chat/completions", chat)[0] == 200  # /reset never reached the model


# ---------------------------------------------------------------- the layer and the names, without a server


def test_check_chat_cuts_to_the_cap_as_the_notebooks_do():
    cut = check_chat({"messages": HI, "max_tokens": 500, "max_completion_tokens": 300}, "m", 8192, cap=64)
    assert cut["max_tokens"] == cut["max_completion_tokens"] == 64 and cut["model"] == "m"
    assert check_chat({"messages": HI}, "m", 8192, cap=64)["max_tokens"] == 64  # the cap is the default
    assert check_chat({"messages": HI, "max_tokens": 5}, "m", 8192, cap=64)["max_tokens"] == 5
    assert "max_tokens" not in check_chat({"messages": HI}, "m", 8192)  # no cap: transformers' own default


@pytest.mark.parametrize(
    "change, param",
    [
        (dict(max_tokens=True), "max_tokens"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(n=2), "n"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(stream="yes"), "stream"),
        (dict(generation_config='{"max_new_tokens": 99999}'), "generation_config"),
        (dict(messages=[{"content": "Hi"}]), "messages"),
        (dict(messages=[{"role": "user", "content": [{"text": "Hi"}]}]), "messages"),
    ],
)
def test_check_chat_refuses_what_transformers_would_take(change, param):
    with pytest.raises(Refused) as refused:
        check_chat(dict({"messages": HI}, **change), "m", 8192)
    assert (
        refused.value.status == 400 and refused.value.param == param and f"{param}" in refused.value.message
    )


def test_the_layer_without_a_key_passes_the_checked_request_on():
    from starlette.testclient import TestClient

    seen = []

    async def transformers_app(scope, receive, send):  # stands in for transformers' app
        body = (await receive())["body"]
        seen.append((scope["path"], dict(scope["headers"]).get(b"content-length"), body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"from transformers"})

    client = TestClient(RoomLayer(transformers_app, "mixtral-standin", 8192, cap=8))
    assert (
        client.get("/v1/models").json()["data"][0]["id"] == "mixtral-standin"
    )  # answered by the layer, no key
    assert (
        client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 100}).text
        == "from transformers"
    )
    path, length, body = seen[-1]
    assert path == "/v1/chat/completions"
    assert json.loads(body) == {"messages": HI, "max_tokens": 8, "model": "mixtral-standin"}  # cut to the cap
    assert int(length) == len(body)
    assert client.get("/health").text == "from transformers" and client.post("/reset").status_code == 404


def test_served_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_NOTEBOOKS_CACHE", str(tmp_path))
    (tmp_path / "standin-v1").mkdir()
    assert served_name(str(tmp_path / "standin-v1")) == "mixtral-standin"
    assert (
        served_name("mistralai/Mixtral-8x22B-Instruct-v0.1") == "mistralai/Mixtral-8x22B-Instruct-v0.1"
    )  # a hub id
    (tmp_path / "Mixtral-8x22B-Instruct-v0.1").mkdir()  # a download of it answers by its hub id, as on vLLM
    assert (
        served_name(str(tmp_path / "Mixtral-8x22B-Instruct-v0.1")) == "mistralai/Mixtral-8x22B-Instruct-v0.1"
    )
    (tmp_path / "my model@2").mkdir()
    assert served_name(str(tmp_path / "my model@2")) == "my-model-2"


def test_make_serve_says_what_to_give_the_room():
    from workshop.room import lan_addresses, room_message

    room = SimpleNamespace(
        model="mixtral-standin",
        url="http://127.0.0.1:8000/v1",
        log="serve.log",
        api_key=None,
        max_new_tokens=256,
    )
    text = room_message(room, "0.0.0.0", 8000, [("wlan0", "192.168.1.23")])
    assert "    http://192.168.1.23:8000/v1   (wlan0)" in text and "can use the model, without a key" in text
    for line in (
        "export MIXTRAL_ENDPOINT=http://192.168.1.23:8000/v1",
        "export MIXTRAL_ENDPOINT_MODEL=mixtral-standin",
        "export MIXTRAL_MAX_NEW_TOKENS=256",
        "curl http://192.168.1.23:8000/v1/models",
    ):
        assert line in text
    assert "MIXTRAL_API_KEY=<a secret>" in text and "firewall" in text and "HOST=<its address>" in text
    keyed = room_message(SimpleNamespace(**dict(vars(room), api_key="s3cret")), "192.168.1.23", 8000, [])
    assert "use the model with the key" in keyed and "export MIXTRAL_API_KEY=s3cret" in keyed
    assert "for this machine only" in room_message(room, "127.0.0.1", 8000, [])
    assert all(not address.startswith("127.") for _, address in lan_addresses())
