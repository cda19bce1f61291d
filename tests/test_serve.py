"""The server for real: a `gptkit serve` process on a free localhost port, the official
`openai` client, raw HTTP for malformed requests, hypothesis fuzzing and headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import DEVICE

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.cuda

KEY = "test-key-123"


class Server:
    def __init__(self, run: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptkit", "serve", str(run), "--port", "0", "--device", str(DEVICE), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # printed once the server listens
        m = re.search(r"at (http://\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = m.group(1)
        self.name = run.name
        self.run = run

    def request(self, method: str, path: str, body: Any = None, key: str | None = KEY, raw: bytes | None = None,
                timeout: float = 60) -> tuple[int, Any]:  # fmt: skip
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            text, status = e.read().decode(), e.code
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def client(self, key: str = KEY) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Path:
    """The tiny run, briefly fine-tuned so that it has the chat template."""
    from gptkit.finetune.instruct import finetune, finetune_config
    from gptkit.finetune.tasks import write_tasks

    data = write_tasks(tmp_path_factory.mktemp("serve") / "tasks.jsonl", 100)
    out = tmp_path_factory.mktemp("serve") / "chatty"
    sets = ["train.max_steps=5", "train.dtype=float32", "train.tensorboard=false", "train.eval_interval=100"]
    finetune(trained_run, [str(data)], out, finetune_config(None, sets), progress=False, quiet=True)
    return out


@pytest.fixture(scope="module")
def server(chat_run: Path) -> Iterator[Server]:
    s = Server(chat_run, "--api-key", KEY, "--max-tokens-cap", "200")
    yield s
    s.stop()


def test_health_and_models(server: Server) -> None:
    status, body = server.request("GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.name]


def test_completions_with_openai_client(server: Server) -> None:
    c = server.client()
    a = c.completions.create(model=server.name, prompt="ROMEO:", max_tokens=12, seed=7, temperature=1.0)
    b = c.completions.create(model=server.name, prompt="ROMEO:", max_tokens=12, seed=7, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text  # a seed makes a sample repeatable
    assert a.choices[0].finish_reason in ("length", "stop")
    assert 0 < a.usage.completion_tokens <= 12 and a.usage.prompt_tokens == len("ROMEO:")
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_n_choices_and_stop_strings(server: Server) -> None:
    c = server.client()
    r = c.completions.create(model=server.name, prompt="The ", max_tokens=10, n=3, seed=1)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    greedy = c.completions.create(model=server.name, prompt="The ", max_tokens=20, temperature=0).choices[0].text
    stop = greedy[3:5]
    assert stop.strip()
    cut = c.completions.create(model=server.name, prompt="The ", max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def test_chat_and_streaming_agree(server: Server) -> None:
    c = server.client()
    msgs = [{"role": "system", "content": "be"}, {"role": "user", "content": "Count.\n\nab"}]
    full = c.chat.completions.create(model=server.name, messages=msgs, max_tokens=15, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens > 0
    pieces, finish = [], None
    for chunk in c.chat.completions.create(model=server.name, messages=msgs, max_tokens=15, temperature=0, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip() == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_wrong_or_missing_key_is_401(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    status, body = server.request("POST", "/v1/completions", {"model": server.name, "prompt": "a"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/health", key=None)[0] == 200  # only /v1 is guarded


def test_concurrent_streams_are_batched_and_match_solo_samples(server: Server) -> None:
    """16 concurrent streaming requests complete with well-formed streams, are decoded in
    shared batches, and each seeded sample equals the same request sent alone."""
    before = server.request("GET", "/health")[1]
    prompts = [("ab" * (i % 5 + 1)) for i in range(16)]
    results: dict[int, str] = {}

    def one(i: int) -> None:
        body = {"model": server.name, "prompt": prompts[i], "max_tokens": 24, "seed": i, "stream": True}
        req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(), method="POST")
        req.add_header("Authorization", f"Bearer {KEY}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=120) as r:
            events = r.read().decode().split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-2]]
        assert all(e.startswith("data: ") for e in events[:-1])
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        results[i] = "".join(ch["choices"][0]["text"] for ch in chunks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    after = server.request("GET", "/health")[1]
    assert after["rows"] - before["rows"] == 16 and after["scheduler"] == "continuous"
    # decode steps were shared: more than one row in a step, on average
    assert (after["step_rows"] - before["step_rows"]) / (after["steps"] - before["steps"]) > 1.5
    c = server.client()
    for i in (0, 7, 13):
        solo = c.completions.create(model=server.name, prompt=prompts[i], max_tokens=24, seed=i).choices[0].text
        assert solo == results[i]


def abandon(server: Server, body: dict[str, Any]) -> int:
    """Send a request over a raw socket, leave once it is under way (a streamed reply has begun,
    or 0.3 s for a non-streamed one), and return how many tokens the server made before all its
    samples were freed."""
    import socket

    before = server.request("GET", "/health")[1]["tokens"]
    host, port = server.url[len("http://") :].split(":")
    data = json.dumps({"model": server.name, "prompt": "a", "temperature": 1.0, "stop": ["\u0000"], **body}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
    if body.get("stream"):
        s.recv(200)
    else:
        time.sleep(0.3)
    s.close()
    for _ in range(100):
        health = server.request("GET", "/health")[1]
        if health["active_samples"] == 0:
            break
        time.sleep(0.05)
    assert health["active_samples"] == 0
    return health["tokens"] - before


def test_disconnect_stops_generation(server: Server) -> None:
    # It stopped early (a finished sample would also stop at <|endoftext|>).
    assert abandon(server, {"max_tokens": 200, "stream": True}) < 200


BAD_REQUESTS = [
    ("/v1/completions", {"model": "M", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "a", "temperature": 9}, 400, "temperature"),
    ("/v1/completions", {"model": "M", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "M", "prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "a" * 500}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", [1, 2], 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server: Server, path: str, body: Any, status: int, param: str | None) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.name}
    got, reply = server.request("POST", path, body)
    assert got == status, reply
    err = reply["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert param in (err["param"] or "") or param in err["message"]


def test_malformed_json_long_prompt_and_body_limits(server: Server) -> None:
    status, reply = server.request("POST", "/v1/completions", raw=b'{"model": "x", "prompt": ')
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    status, reply = server.request("POST", "/v1/completions", {"model": server.name, "prompt": "ab" * 300})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = server.request(
        "POST", "/v1/completions", {"model": server.name, "prompt": "ab" * 300, "truncate": True, "max_tokens": 3}
    )
    assert status == 200 and reply["usage"]["prompt_tokens"] == 32  # the context of the tiny run
    import http.client

    # A body over the limit is refused from its Content-Length, before it is read.
    host, port = server.url[len("http://") :].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(2 << 20))
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["M", "other"]) | json_values, "prompt": st.text(max_size=40) | json_values,
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                    "content": st.text(max_size=20) | json_values}), max_size=3) | json_values,
        "max_tokens": st.integers(-5, 300) | json_values, "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-1, 2) | json_values, "n": st.integers(-1, 20) | json_values, "stop": json_values,
        "seed": json_values, "stream": st.booleans() | json_values, "top_k": json_values,
    },
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=fields, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_requests_never_500(server: Server, body: dict[str, Any], path: str) -> None:
    if body.get("model") == "M":
        body["model"] = server.name
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 20:
        body["max_tokens"] = 20  # keep it quick
    status, reply = server.request("POST", path, body)
    assert status in (200, 400, 404, 429), (status, reply)
    if status != 200:
        assert reply["error"]["message"]
    assert server.proc.poll() is None


def test_full_queue_answers_429(chat_run: Path) -> None:
    s = Server(chat_run, "--queue-limit", "2", "--max-batch", "1")
    try:
        statuses: list[int] = []

        def one() -> None:
            body = {"model": s.name, "prompt": "a", "max_tokens": 150, "temperature": 1.0, "stop": ["\u0000"]}
            statuses.append(s.request("POST", "/v1/completions", body)[0])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses
        assert set(statuses) <= {200, 429}
    finally:
        s.stop()


def test_bad_serve_arguments(chat_run: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "gptkit", "serve"]
    r = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such run folder" in r.stderr
    r = subprocess.run([*cmd, str(chat_run), "--port", "70000"], capture_output=True, text=True)
    assert r.returncode == 2 and "--port" in r.stderr
    r = subprocess.run([*cmd, str(chat_run), "--cuda-graph", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "--cuda-graph needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


# --- hardening: one client must never hurt another ---


def raw_http(server: Server, data: bytes, read: bool = True, timeout: float = 30) -> bytes:
    import socket

    host, port = server.url[len("http://") :].split(":")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def post_raw(server: Server, path: str, body: bytes, headers: str = "") -> tuple[int, Any]:
    head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n")  # fmt: skip
    reply = raw_http(server, head.encode() + body)
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1] or b"null")


def test_engine_failure_in_one_row_fails_that_row_alone(chat_run: Path) -> None:
    """A row that breaks the batched forward pass (a token id past the vocabulary, which the
    HTTP layer refuses but the engine's Python callers could send) fails alone: its neighbours,
    retried one by one, finish with their text, and the culprit gets an error, not text."""
    from gptkit.inference.engine import Engine, Job
    from gptkit.inference.generate import SamplingParams
    from gptkit.loader import load_model

    model, tok, _ = load_model(chat_run)
    engine = Engine(model, tok, max_batch=8, queue_limit=8)
    done = threading.Event()
    finished: list[Job] = []

    def emit(job: Job, delta: str, end: bool) -> None:
        if end:
            finished.append(job)
            if len(finished) == 4:
                done.set()

    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eot=False)
    prompts = [tok.encode("ROMEO"), tok.encode("JULIET"), [tok.vocab_size + 5], tok.encode("KING")]
    jobs = [Job(i, p, params, set(), [], emit) for i, p in enumerate(prompts)]
    engine.submit(jobs)
    assert done.wait(60)
    assert "generation failed" in jobs[2].error
    assert jobs[2].detok is None or jobs[2].detok.text == ""  # no text presented as the model's
    for j in (jobs[0], jobs[1], jobs[3]):
        assert not j.error and j.detok.finish_reason == "length" and j.detok.completion_tokens == 6
    deadline = time.monotonic() + 10  # the last row's end is emitted just before its slot is freed
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active == 0 and engine.failures == 1


def test_extreme_sampling_values_hurt_no_one(server: Server) -> None:
    """The values that once failed a whole batch, sent together with ordinary requests."""
    base = {"model": server.name, "prompt": "ROMEO:", "max_tokens": 30, "temperature": 1.0, "stop": ["\u0000"]}
    odd = [
        ({"seed": 2**64 + 3}, 200), ({"seed": -(2**63) - 5}, 200), ({"top_p": 1e-100}, 200), ({"temperature": 1e-45}, 200),
        ({"repetition_penalty": 1e-300}, 400), ({"seed": 10**40}, 200),
    ]  # fmt: skip
    results: dict[int, tuple[int, Any]] = {}

    def send(i: int, extra: dict) -> None:
        results[i] = server.request("POST", "/v1/completions", {**base, **extra, "seed": extra.get("seed", i)})

    threads = [threading.Thread(target=send, args=(i, extra)) for i, (extra, _) in enumerate(odd)]
    threads += [threading.Thread(target=send, args=(100 + i, {})) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (extra, want) in enumerate(odd):
        status, body = results[i]
        assert status == want, (extra, body)
        if want == 400:
            assert "repetition_penalty" in body["error"]["message"]
    for i in range(6):
        status, body = results[100 + i]
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
        assert "failed" not in body["choices"][0]["text"] and body["usage"]["completion_tokens"] > 0
    assert server.request("GET", "/health")[1]["failures"] == 0


def test_chunked_body_stops_at_the_limit(server: Server) -> None:
    """No Content-Length: the bytes are counted as they arrive (a 50 MB body once got through)."""
    import http.client

    host, port = server.url[len("http://") :].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.endheaders()
    piece = b'{"model": "x", "prompt": "' + b"a" * 65536
    sent = 0
    try:
        while sent < 3 << 20:  # three times the 1 MiB limit
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: what we want
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_lone_surrogates_are_400_naming_the_place(server: Server) -> None:
    for path, body in [
        ("/v1/completions", b'{"model": "%s", "prompt": "ab\\ud800cd"}'),
        ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "x\\udfff"}]}'),
        ("/v1/completions", b'{"model": "%s", "prompt": "ab", "stop": ["\\ud800"]}'),
    ]:
        status, reply = post_raw(server, path, body % server.name.encode())
        assert status == 400, reply
        assert "surrogate" in reply["error"]["message"] and reply["error"]["param"] in ("prompt", "messages", "stop")


def test_non_streaming_request_stops_when_its_client_goes(chat_run: Path) -> None:
    # 1,000 decoding steps take seconds even for the tiny model: far longer than the client stays
    # (0.3 s) plus the server's disconnect check (every 0.25 s), on an idle machine too.
    s = Server(chat_run, "--api-key", KEY, "--max-tokens-cap", "1000")
    try:
        assert abandon(s, {"n": 4, "max_tokens": 1000}) < 4 * 1000  # freed before its 4,000 tokens
    finally:
        s.stop()


def test_requests_too_large_to_be_fair_are_400(chat_run: Path) -> None:
    s = Server(chat_run, "--queue-limit", "8", "--max-request-work", "500")
    try:
        status, reply = s.request("POST", "/v1/completions", {"model": s.name, "prompt": "a", "n": 9, "max_tokens": 5})
        assert status == 400 and "--queue-limit" in reply["error"]["message"]  # 429 would be retried forever
        status, reply = s.request("POST", "/v1/completions", {"model": s.name, "prompt": "a", "n": 4, "max_tokens": 200})
        assert status == 400 and "--max-request-work" in reply["error"]["message"] and reply["error"]["param"] == "n"
        status, reply = s.request("POST", "/v1/completions", {"model": s.name, "prompt": ["a", "b"], "n": 2, "max_tokens": 100})
        assert status == 200 and len(reply["choices"]) == 4
    finally:
        s.stop()


def test_every_error_has_openai_shape(server: Server) -> None:
    cases = [
        post_raw(server, "/v1/completions", b'{"model": "x", "prompt": "\xff\xfe"}'),  # invalid UTF-8
        post_raw(server, "/v1/completions", b"[" * 5000 + b"]" * 5000),  # nested too deep
        server.request("GET", "/v1/nothing-here"),
        server.request("GET", "/v1/completions"),  # 405
        server.request("GET", "/docs"),
    ]
    for status, reply in cases:
        assert 400 <= status < 500, (status, reply)
        assert isinstance(reply, dict) and set(reply) == {"error"}, reply
        assert reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"
    assert cases[3][0] == 405 and cases[2][0] == 404 and cases[4][0] == 404  # no Swagger page that needs a CDN


def test_openapi_tells_the_truth(server: Server) -> None:
    status, schema = server.request("GET", "/openapi.json")
    assert status == 200
    op = schema["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in op["responses"] and {"400", "401", "404", "413", "429"} <= set(op["responses"])
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer" and op["security"] == [{"bearer": []}]
    # What OpenAI accepts: an integral float where an integer is documented.
    status, reply = server.request("POST", "/v1/completions", {"model": server.name, "prompt": "a", "n": 2.0, "max_tokens": 3.0})
    assert status == 200 and len(reply["choices"]) == 2
    status, reply = server.request("POST", "/v1/completions", {"model": server.name, "prompt": "a", "n": 1.5})
    assert status == 400 and reply["error"]["param"] == "n"


def test_stream_usage_when_asked(server: Server) -> None:
    c = server.client()
    chunks = list(c.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0 and all(ch.usage is None for ch in chunks[:-1])
    chunks = list(c.completions.create(model=server.name, prompt="ab", max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_special_tokens_are_not_completion_text(server: Server, chat_run: Path) -> None:
    from gptkit.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_run / "tokenizer")
    end, user = tok.special_tokens["<|end|>"], tok.special_tokens["<|user|>"]
    base = {"model": server.name, "prompt": "ab", "max_tokens": 4, "temperature": 0}
    status, reply = server.request("POST", "/v1/completions", {**base, "logit_bias": {str(end): 100}})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "stop" and reply["choices"][0]["text"] == ""
    status, reply = server.request("POST", "/v1/completions", {**base, "logit_bias": {str(user): 100}})
    assert reply["choices"][0]["text"] == "" and reply["usage"]["completion_tokens"] == 4
    status, reply = server.request(
        "POST", "/v1/completions", {**base, "logit_bias": {str(user): 100}, "skip_special_tokens": False}
    )
    assert reply["choices"][0]["text"] == "<|user|>" * 4


def test_empty_stop_strings_are_ignored(server: Server) -> None:
    base = {"model": server.name, "prompt": "The ", "max_tokens": 12, "temperature": 0}
    plain = server.request("POST", "/v1/completions", base)[1]["choices"][0]
    for stop in ("", [""], ["", "\u0000"]):
        got = server.request("POST", "/v1/completions", {**base, "stop": stop})[1]["choices"][0]
        assert got["text"] == plain["text"] and got["finish_reason"] == plain["finish_reason"]


def test_slow_and_idle_connections_are_dropped(chat_run: Path) -> None:
    import socket

    s = Server(chat_run, "--header-timeout", "1.5")
    try:
        host, port = s.url[len("http://") :].split(":")
        slow = [socket.create_connection((host, int(port)), timeout=10) for _ in range(10)]
        for i, c in enumerate(slow):
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHo" if i % 2 else b"")  # half a header, or nothing
        status, _ = s.request("GET", "/health", timeout=5)  # ordinary requests still go through
        assert status == 200
        t0 = time.time()
        for c in slow:
            assert c.recv(100) == b""  # closed by the server
        assert time.time() - t0 < 5
        for c in slow:
            c.close()
    finally:
        s.stop()


def test_host_header_is_checked(chat_run: Path, server: Server) -> None:
    get = b"GET /health HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
    assert b" 400 " in raw_http(server, get % b"evil.example:80").split(b"\r\n")[0]  # DNS rebinding
    for ok in (b"localhost", b"127.0.0.1:80", b"[::1]:8000"):
        assert b" 200 " in raw_http(server, get % ok).split(b"\r\n")[0], ok
    s = Server(chat_run, "--allowed-hosts", "my.box")
    try:
        assert b" 200 " in raw_http(s, get % b"my.box:1234").split(b"\r\n")[0]
        assert b" 400 " in raw_http(s, get % b"other.box").split(b"\r\n")[0]
    finally:
        s.stop()


def test_unsupported_fields_are_refused_and_penalties_work(server: Server, chat_run: Path) -> None:
    from collections import Counter

    from gptkit.tokenizer import load_tokenizer

    base = {"model": server.name, "prompt": "The ", "max_tokens": 24, "temperature": 0}
    for field, value in [("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]), ("best_of", 2),
                         ("suffix", "x")]:  # fmt: skip
        status, reply = server.request("POST", "/v1/completions", {**base, field: value})
        assert status == 400 and reply["error"]["param"] == field and "not supported" in reply["error"]["message"]
    for field, value in [("response_format", {"type": "text"}), ("tools", []), ("best_of", 1), ("logit_bias", {})]:
        assert server.request("POST", "/v1/completions", {**base, field: value})[0] == 200
    a = load_tokenizer(chat_run / "tokenizer").encode("a")[0]
    text = server.request("POST", "/v1/completions", {**base, "logit_bias": {str(a): 100}})[1]["choices"][0]["text"]
    assert text == "a" * 24
    plain = server.request("POST", "/v1/completions", base)[1]["choices"][0]["text"]
    penalised = server.request("POST", "/v1/completions", {**base, "frequency_penalty": 2.0})[1]["choices"][0]["text"]
    assert penalised != plain and max(Counter(penalised).values()) <= max(Counter(plain).values())
    status, reply = server.request("POST", "/v1/completions", {**base, "presence_penalty": 3})
    assert status == 400 and reply["error"]["param"] == "presence_penalty"


settings_values = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0, 0.5, 1.0, 1e-45, 2.0, 2.5, -1]), "top_p": st.sampled_from([1.0, 0.5, 1e-100, 0, 1.5]),
    "seed": st.integers(-(2**70), 2**70), "repetition_penalty": st.sampled_from([1.0, 1.3, 1e-300, 0.01, 150.0]),
    "frequency_penalty": st.sampled_from([0.0, 1.0, -2.0, 2.5]), "presence_penalty": st.sampled_from([0.0, 0.5, -3.0]),
    "top_k": st.sampled_from([0, 1, 5, -1]), "stop": st.sampled_from([[""], ["\u0000"], "", ["e", "a"]]),
    "n": st.sampled_from([1, 2, 1.0, 0]), "logit_bias": st.sampled_from([{}, {"3": 5.0}, {"3": 101}, {"x": 1}]),
})  # fmt: skip


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bodies=st.lists(settings_values, min_size=4, max_size=4))
def test_mixed_settings_in_concurrent_requests(server: Server, bodies: list[dict[str, Any]]) -> None:
    """Valid and invalid settings sent at once: each well-formed request gets a well-formed
    answer, and no request's failure reaches another."""
    results: list[tuple[int, Any]] = [(0, None)] * len(bodies)

    def send(i: int) -> None:
        body = {"model": server.name, "prompt": "ROMEO:", "max_tokens": 8, **bodies[i]}
        results[i] = server.request("POST", "/v1/completions", body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body, (status, reply) in zip(bodies, results):
        assert status in (200, 400), (body, reply)
        if status == 200:
            n = int(body.get("n", 1))
            assert len(reply["choices"]) == n and all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
        else:
            assert reply["error"]["param"] and reply["error"]["message"]
    assert server.request("GET", "/health")[1]["failures"] == 0


schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    """Positive generation: the schema promises what is accepted, and states this model's limits
    that depend on token counts (context, queue share) conservatively, so a request beyond them
    may still be served; negative generation would call that a schema-violating acceptance."""
    from schemathesis.generation import GenerationMode

    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE])
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzzer_default_checks(case: Any, server: Server) -> None:
    """schemathesis generates requests from /openapi.json and checks the answers against it
    with its default checks: no 5xx, documented status codes, content types and bodies."""
    if isinstance(case.body, dict):  # keep each generation short (the default would be 200 tokens a sample)
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)  # an integer in JSON schema may come as 183.0
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                case.body[key] = min(value, 4)
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = 4
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}", "Host": "localhost"})


# --- log-probabilities (lm-eval's local-completions scores prompts through these) ---


def _model_logprobs(run: Path, ids: list[int]) -> Any:
    import torch

    from gptkit.loader import load_model

    model, _, _ = load_model(run)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def test_completion_logprobs_score_a_prompt_with_echo(server: Server, chat_run: Path) -> None:
    """echo + max_tokens 0 + logprobs: each prompt token's log-probability under the model given
    the tokens before it (the first has none), as the official client reads it."""
    from gptkit.loader import load_model

    tok = load_model(chat_run)[1]
    client = server.client()
    prompt = "ROMEO: What light"
    reply = client.completions.create(model=server.name, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == prompt and "".join(lp.tokens) == prompt
    ids = tok.encode(prompt)
    expected = _model_logprobs(chat_run, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - float(expected[t - 1, ids[t]])) < 1e-4
        top = lp.top_logprobs[t]
        assert len(top) == 3 and max(top.values()) == pytest.approx(float(expected[t - 1].max()), abs=1e-4)
    assert lp.text_offset == [len(prompt[:i]) for i in range(len(prompt))]
    # Scored from the generation's own prefill (what lm-eval sends: max_tokens 1): the same numbers.
    one = client.completions.create(model=server.name, prompt=prompt, max_tokens=1, echo=True, logprobs=3, temperature=0)
    assert one.choices[0].logprobs.token_logprobs[1 : len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    # Batched scoring of token-id prompts, as lm-eval sends them.
    batch = client.completions.create(model=server.name, prompt=[ids[:5], ids[3:9]], max_tokens=0, echo=True, logprobs=0)
    assert [len(c.logprobs.token_logprobs) for c in batch.choices] == [5, 6]
    assert batch.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:5], abs=1e-5)


def test_generated_tokens_carry_the_logprobs_they_were_drawn_with(server: Server, chat_run: Path) -> None:
    """Greedy: each generated token is the most likely one and its log-probability is the
    model's for it given everything before; the same streamed, chunk by chunk."""
    from gptkit.loader import load_model

    tok = load_model(chat_run)[1]
    client = server.client()
    body = dict(model=server.name, prompt="JULIET:", max_tokens=8, temperature=0, logprobs=2, stop=["\x00"])
    reply = client.completions.create(**body)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == reply.usage.completion_tokens
    ids = tok.encode("JULIET:") + [tok.encode(t)[0] for t in lp.tokens]
    expected = _model_logprobs(chat_run, ids)
    start = len(tok.encode("JULIET:"))
    for k, value in enumerate(lp.token_logprobs):
        assert abs(value - float(expected[start + k - 1].max())) < 1e-4  # greedy: the best token
        assert value == pytest.approx(max(lp.top_logprobs[k].values()), abs=1e-6)
    streamed = list(client.completions.create(**body, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    # 1e-5: the same prompt again reuses its cached keys and values (the prefix cache), and its
    # last position, computed alone, differs from the first request's in the last float bits.
    assert tokens == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs_content_and_stream(server: Server) -> None:
    client = server.client()
    body = dict(model=server.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2)  # fmt: skip
    reply = client.chat.completions.create(**body)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8")) and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)
    plain = client.chat.completions.create(**{**body, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_bad_logprob_requests_are_400(server: Server) -> None:
    cases = [
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "echo": True, "max_tokens": 0, "n": 2, "logprobs": 1}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
    ]  # fmt: skip
    for path, body, param in cases:
        status, reply = server.request("POST", path, {"model": server.name, **body})
        assert status == 400 and reply["error"]["param"] == param, (body, reply)


def test_chat_truncate_oldest_turns_is_the_chat_rule(server: Server, chat_run: Path) -> None:
    """ "truncate": "oldest_turns" fits a conversation that outgrew the context as `gptkit chat`
    does (ChatTemplate.fit: whole exchanges from the oldest, the system message kept) and says
    how many messages it left out, in the response and in every chunk of a stream."""
    from gptkit.loader import load_model
    from gptkit.template import ChatTemplate, Message

    convo = [{"role": "system", "content": "Be kind."}]
    convo += [{"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant"] * 5)]
    convo.append({"role": "user", "content": "and now?"})
    status, body = server.request("POST", "/v1/chat/completions", {"model": server.name, "messages": convo, "max_tokens": 5})
    assert status == 400 and '"oldest_turns"' in body["error"]["message"]
    client = server.client()
    r = client.chat.completions.create(model=server.name, messages=convo, max_tokens=5, extra_body={"truncate": "oldest_turns"})
    model, tok, _ = load_model(chat_run)
    ids, dropped = ChatTemplate(tok).fit([Message(m["role"], m["content"]) for m in convo], model.config.block_size, 5)
    assert r.model_extra["truncated_messages"] == dropped > 0 and dropped % 2 == 0
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model=server.name, messages=convo, max_tokens=5, stream=True,
                                                 extra_body={"truncate": "oldest_turns"}))  # fmt: skip
    assert chunks and all(c.model_extra["truncated_messages"] == dropped for c in chunks)
    # Without an overflow nothing is dropped; completions have no turns to drop.
    short = client.chat.completions.create(model=server.name, messages=convo[-1:], max_tokens=3,
                                           extra_body={"truncate": "oldest_turns"})  # fmt: skip
    assert short.model_extra["truncated_messages"] == 0
    status, body = server.request("POST", "/v1/completions", {"model": server.name, "prompt": "x", "truncate": "oldest_turns"})
    assert status == 400 and body["error"]["param"] == "truncate"
    status, body = server.request("POST", "/v1/chat/completions", {"model": server.name, "messages": convo, "truncate": "newest"})
    assert status == 400 and body["error"]["param"] == "truncate"


def test_models_give_the_context_and_defaults_and_the_page_its_files(server: Server) -> None:
    status, body = server.request("GET", "/v1/models")
    m = body["data"][0]
    assert (m["context_length"], m["max_tokens_cap"]) == (32, 200)
    assert m["defaults"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 200}  # what a request without them gets
    with urllib.request.urlopen(server.url + "/") as r:  # the page and its scripts need no key
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        page = r.read().decode()
    for src in re.findall(r'<script src="([^"]+)"', page):
        with urllib.request.urlopen(f"{server.url}/{src}") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript") and r.read()
    assert len(re.findall(r"<script src=", page)) == 3 and "<script>" not in page  # no inline script: CSP holds
    for bad in ("/static/../serve.py", "/static/vendor/README.md", "/static/chat.html"):
        assert server.request("GET", bad, key=None)[0] == 404
