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

openai = pytest.importorskip("openai")

KEY = "test-key-123"


class Server:
    def __init__(self, run: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptkit", "serve", str(run), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # printed once the server listens
        m = re.search(r"at (http://\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = m.group(1)
        self.name = run.name

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
    from gptkit.finetune import finetune, finetune_config
    from gptkit.tasks import write_tasks

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
    assert after["rows"] - before["rows"] == 16 and after["batches"] - before["batches"] < 16  # some shared a batch
    c = server.client()
    for i in (0, 7, 13):
        solo = c.completions.create(model=server.name, prompt=prompts[i], max_tokens=24, seed=i).choices[0].text
        assert solo == results[i]


def test_disconnect_stops_generation(server: Server) -> None:
    import socket

    before = server.request("GET", "/health")[1]["tokens"]
    host, port = server.url[len("http://") :].split(":")
    body = json.dumps({"model": server.name, "prompt": "a", "max_tokens": 200, "stream": True, "temperature": 1.0,
                       "stop": ["\u0000"]}).encode()  # fmt: skip
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    s.recv(200)
    s.close()
    for _ in range(100):
        health = server.request("GET", "/health")[1]
        if health["active_samples"] == 0:
            break
        time.sleep(0.05)
    assert health["active_samples"] == 0
    assert health["tokens"] - before < 200  # it stopped early (a finished sample would also stop at <|endoftext|>)


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


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_chat_page_in_headless_chromium(server: Server) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()  # type: ignore[misc]
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "msg").send_keys("Count it\n")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log > div[data-done='1']"))
        reply = driver.find_elements(By.CSS_SELECTOR, "#log > div")[-1]
        assert reply.get_attribute("class") == "assistant", reply.text
        assert reply.text.startswith("bot: ") and len(reply.text) > len("bot: ")
        assert "you: Count it" in driver.find_element(By.ID, "log").text
    finally:
        driver.quit()
