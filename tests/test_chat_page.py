"""The chat page (gptkit/serve/static/chat.html, chat.js) in headless Chromium against a real
`gptkit serve`: long conversations, settings, stop, regenerate, edit, conversations kept across
reloads, Markdown rendered safely, the API key, and errors that keep the typed text."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gptkit.tokenizer import load_tokenizer

from .test_serve import KEY, Server, _chromium, chat_run  # noqa: F401 -- chat_run is a fixture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        _chromium() is None, reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
    ),
]
selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

DESKTOP, PHONE = (1280, 860), (390, 844)
LONG = 200_000  # max_tokens of a reply that must still be running when the test acts on it


@pytest.fixture(scope="module")
def chat_server(chat_run: Path) -> Iterator[Server]:  # noqa: F811
    s = Server(chat_run, "--max-tokens-cap", "400")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rambling_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model that rambles: trained on Shakespeare with its line breaks made spaces, it
    almost never writes the newline that ends a turn of the plain chat template."""
    from gptkit.config import load_config
    from gptkit.data import prepare
    from gptkit.training.train import train

    from .conftest import SHAKESPEARE, tiny_overrides

    tmp = tmp_path_factory.mktemp("rambling")
    (tmp / "text.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000].replace("\n", " ") + "\n")
    prepare([str(tmp / "text.txt")], tmp / "data", "char", progress=False)
    cfg = load_config(None, tiny_overrides(**{"train.max_steps": 60, "train.lr": 1e-2}))
    cfg.data.dir = str(tmp / "data")
    train(cfg, tmp / "run", progress=False, quiet=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def base_server(rambling_run: Path) -> Iterator[Server]:
    """The rambling base model, one sample at a time: long replies to stop, and a queue that one
    request fills. The caps allow replies that last a minute or more on any machine (a 2-layer
    model decodes thousands of tokens a second: 4000 could end before a slow browser had asked)."""
    s = Server(rambling_run, "--max-tokens-cap", str(LONG), "--queue-limit", "1", "--max-request-work", str(LONG))
    yield s
    s.stop()


@pytest.fixture
def browser() -> Iterator[Callable[..., Any]]:
    """A factory of headless Chromium windows (closed after the test), with the network log on."""
    drivers = []

    def make(size: tuple[int, int] = DESKTOP) -> Any:
        binary, driver_path = _chromium()  # type: ignore[misc]
        opts = webdriver.ChromeOptions()
        opts.binary_location = binary
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}"):  # fmt: skip
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        if size[0] < 500:  # below headless Chromium's smallest window: a phone's screen, emulated
            metrics = {"width": size[0], "height": size[1], "pixelRatio": 2, "touch": True}
            opts.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
        d = webdriver.Chrome(service=Service(driver_path), options=opts)
        drivers.append(d)
        return d

    yield make
    for d in drivers:
        d.quit()


# --- what a person does, and what the page shows ---


def wait(driver: Any, cond: Callable[[Any], Any], timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond)


def idle(driver: Any) -> bool:
    return driver.find_element(By.ID, "stop").get_attribute("hidden") is not None


def messages(driver: Any) -> list[tuple[str, str]]:
    """(role, text) of every bubble in the conversation, read in one go (the page redraws)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#log .msg')].map(d => "
        "[d.classList[1], (d.querySelector('.body') || d).innerText.trim()])"
    )
    return [tuple(r) for r in rows]


def say(driver: Any, text: str, wait_done: bool = True) -> None:
    box = driver.find_element(By.ID, "msg")
    box.send_keys(text)
    before = len(driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant, #log .msg.error"))
    box.send_keys(Keys.ENTER)
    if wait_done:
        wait(driver, lambda d: idle(d) and len(d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant, #log .msg.error")) > before)


def open_page(driver: Any, server: Server) -> None:
    driver.get(server.url + "/")
    connected(driver)


def reload(driver: Any) -> None:
    driver.refresh()
    connected(driver)


def connected(driver: Any) -> None:
    """Wait until the page has asked the server for its model (and redrawn), or for the key."""
    wait(driver, lambda d: "context" in d.find_element(By.ID, "model").get_attribute("textContent")
         or d.find_element(By.ID, "keybox").get_attribute("hidden") is None)  # fmt: skip


def set_settings(driver: Any, **values: Any) -> None:
    if driver.find_element(By.ID, "settings").get_attribute("hidden") is not None:
        driver.find_element(By.ID, "toggle-settings").click()
    for name, value in values.items():
        el = driver.find_element(By.ID, name)
        el.clear()
        el.send_keys(str(value))
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", el)


def chat_requests(driver: Any) -> list[dict]:
    """The bodies of the POSTs to /v1/chat/completions the browser sent, read from its own
    network log (Chrome DevTools protocol), oldest first."""
    bodies = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            req = msg["params"]["request"]
            if req["url"].endswith("/v1/chat/completions") and req["method"] == "POST":
                bodies.append(json.loads(req["postData"]))
    return bodies


def health(server: Server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        return json.loads(r.read())


# --- the tests ---


def test_a_conversation_longer_than_the_context_keeps_going(browser: Callable, chat_server: Server) -> None:
    d = browser()
    open_page(d, chat_server)
    set_settings(d, max_tokens=12, temperature=0.8)
    turns = ["Count to three", "And then?", "Say more", "Once again", "Last one"]
    for t in turns:
        say(d, t)
    shown = messages(d)
    assert [r for r, _ in shown] == ["user", "assistant"] * len(turns), shown
    assert sum(len(t) for _, t in shown) > 32  # the model's context: 32 tokens of characters
    note = d.find_element(By.CSS_SELECTOR, "#log .note").text
    assert "left out" in note and "32 tokens" in note
    sent = chat_requests(d)
    assert len(sent) == len(turns) and all(b["truncate"] == "oldest_turns" for b in sent)
    assert len(sent[-1]["messages"]) == 2 * len(turns) - 1  # the page sends it all; the server fits it


def test_settings_change_the_request_and_everything_survives_a_reload(browser: Callable, chat_server: Server) -> None:
    d = browser()
    open_page(d, chat_server)
    set_settings(d, system="Be brief.", temperature=0.3, top_p=0.9, max_tokens=7, seed=42)
    say(d, "Hi")
    body = chat_requests(d)[-1]
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"], body["stream"]) == (0.3, 0.9, 7, 42, True)
    first = messages(d)
    stats = d.find_element(By.CSS_SELECTOR, "#log .msg.assistant .stats").text
    assert "tokens" in stats and "tok/s" in stats and "first token" in stats and "ms" in stats, stats

    # Regenerate with the same seed: the same reply, asked for again.
    d.find_element(By.CSS_SELECTOR, "#log .msg.assistant .regenerate").click()
    wait(d, lambda d: len(messages(d)) == 2 and idle(d))
    assert messages(d) == first and len(chat_requests(d)) == 1

    # Reload: the settings, the conversation and its list are all still there.
    reload(d)
    wait(d, lambda d: len(messages(d)) == 2)
    assert messages(d) == first
    fields = ("system", "temperature", "top_p", "max_tokens", "seed")
    assert [d.find_element(By.ID, f).get_attribute("value") for f in fields] == ["Be brief.", "0.3", "0.9", "7", "42"]
    assert [li.text.replace("×", "").strip() for li in d.find_elements(By.CSS_SELECTOR, "#chats li")] == ["Hi"]

    # Edit the user turn and send it again: the later turns go, a new reply comes.
    d.find_element(By.CSS_SELECTOR, "#log .msg.user .edit").click()
    box = d.find_element(By.CSS_SELECTOR, "#log .edit-box")
    box.clear()
    box.send_keys("Hello")
    d.find_element(By.CSS_SELECTOR, "#log .save-edit").click()
    wait(d, lambda d: idle(d) and len(messages(d)) == 2 and messages(d)[0] == ("user", "Hello"))
    assert chat_requests(d)[-1]["messages"][-1] == {"role": "user", "content": "Hello"}

    # A new chat, then back to the first one.
    d.find_element(By.ID, "new-chat").click()
    assert messages(d) == []
    say(d, "Second chat")
    titles = [li.text.replace("×", "").strip() for li in d.find_elements(By.CSS_SELECTOR, "#chats li")]
    assert titles == ["Second chat", "Hello"]
    d.find_elements(By.CSS_SELECTOR, "#chats li button.open")[1].click()
    assert messages(d)[0] == ("user", "Hello")


def test_stop_aborts_the_reply_and_the_server_frees_it(browser: Callable, base_server: Server) -> None:
    d = browser()
    open_page(d, base_server)
    # A low temperature: the rambling model's one rare newline (which ends a plain-template turn)
    # stays out of reach, and the reply runs until it is stopped.
    set_settings(d, max_tokens=LONG, temperature=0.3)
    say(d, "ROMEO:", wait_done=False)
    wait(d, lambda d: len(d.find_element(By.CSS_SELECTOR, "#log .msg.assistant .body").text) > 20)
    assert health(base_server)["active_samples"] == 1
    d.find_element(By.ID, "msg").send_keys(Keys.ESCAPE)  # Esc stops, as the Stop button does
    wait(d, idle, timeout=10)
    stopped = time.monotonic()
    while health(base_server)["active_samples"] and time.monotonic() - stopped < 5:
        time.sleep(0.02)
    assert health(base_server)["active_samples"] == 0  # the request's slot is free again
    tokens = health(base_server)["tokens"]
    time.sleep(0.5)
    assert health(base_server)["tokens"] == tokens < LONG  # and nothing decodes on for it
    stats = d.find_element(By.CSS_SELECTOR, "#log .msg.assistant .stats").text
    assert "stopped" in stats
    assert messages(d)[-1][0] == "assistant" and len(messages(d)[-1][1]) > 20  # the partial reply is kept


XSS = (
    '<img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> then '
    "[a link](javascript:window.__xss=3)"
)  # a Markdown link to a script: kept as a link, without it
MARKDOWN = "Here is a list:\n\n- one\n- **two**\n\n```python\nprint('hi')\n```\n\n" + XSS


def test_replies_render_as_markdown_and_html_in_them_stays_text(browser: Callable, chat_server: Server, tmp_path: Path) -> None:
    d = browser()
    open_page(d, chat_server)
    # A reply containing Markdown and HTML, as the model could write it (this tiny model can't:
    # the stored conversation goes through the same renderer as a streamed reply).
    stored = {"c1": {"id": "c1", "title": "Formatting", "updated": 1, "messages": [
        {"role": "user", "content": "Show me <b>formatting</b>"},
        {"role": "assistant", "content": MARKDOWN, "stats": {"tokens": 42, "tps": 123.4, "ttft_ms": 56}}]}}  # fmt: skip
    d.execute_script("localStorage.setItem('gptkit.chats', arguments[0]); localStorage.setItem('gptkit.current', '\"c1\"')",
                     json.dumps(stored))  # fmt: skip
    reload(d)
    wait(d, lambda d: len(messages(d)) == 2)
    reply = d.find_element(By.CSS_SELECTOR, "#log .msg.assistant .body")
    assert [li.text for li in reply.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
    assert reply.find_element(By.TAG_NAME, "strong").text == "two"
    assert reply.find_element(By.CSS_SELECTOR, "pre code").text.strip() == "print('hi')"
    # HTML in the reply is shown as the text it is: no element made, no script run.
    assert '<img src=x onerror="window.__xss=1">' in reply.text and "<script>window.__xss=2</script>" in reply.text
    assert not d.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log b")
    assert "<b>formatting</b>" in messages(d)[0][1]  # the user's turn is text too
    link = reply.find_element(By.CSS_SELECTOR, "a")
    assert not (link.get_attribute("href") or "").startswith("javascript:")
    link.click()
    assert d.execute_script("return window.__xss") is None
    copy = reply.find_element(By.CSS_SELECTOR, "pre .copy")
    copy.click()
    wait(d, lambda d: copy.text == "Copied", timeout=5)
    assert "42 tokens · 123.4 tok/s · first token 56 ms" == d.find_element(By.CSS_SELECTOR, "#log .msg.assistant .stats").text
    # A real reply after it, then how it looks on a desktop and on a phone.
    set_settings(d, max_tokens=20, seed=1, system="You are a helpful assistant.")
    say(d, "Thanks!")
    assert messages(d)[-1][0] == "assistant" and d.execute_script("return window.__xss") is None
    d.find_element(By.ID, "toggle-settings").click()  # settings folded away again
    d.save_screenshot(str(tmp_path / "chat-desktop.png"))
    phone = browser(PHONE)
    open_page(phone, chat_server)
    phone.execute_script("localStorage.setItem('gptkit.chats', arguments[0]); localStorage.setItem('gptkit.current', '\"c1\"')",
                         d.execute_script("return localStorage.getItem('gptkit.chats')"))  # fmt: skip
    reload(phone)
    wait(phone, lambda p: len(messages(p)) == 4)
    assert phone.execute_script("return innerWidth") == PHONE[0]
    width = phone.execute_script("return document.documentElement.scrollWidth")
    assert width <= PHONE[0]  # nothing wider than the phone: no sideways scrolling
    assert not phone.find_element(By.ID, "sidebar").is_displayed()  # the list folds away ...
    phone.find_element(By.ID, "toggle-chats").click()
    assert phone.find_element(By.ID, "sidebar").is_displayed()  # ... opens from the menu ...
    phone.find_element(By.ID, "close-chats").click()
    assert not phone.find_element(By.ID, "sidebar").is_displayed()  # ... and closes again
    phone.save_screenshot(str(tmp_path / "chat-phone.png"))
    for name in ("chat-desktop.png", "chat-phone.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    print(f"screenshots: {tmp_path}")


def test_the_api_key_is_asked_for_once_and_a_401_is_explained(browser: Callable, chat_run: Path) -> None:  # noqa: F811
    server = Server(chat_run, "--api-key", KEY)
    try:
        d = browser()
        open_page(d, server)
        why = d.find_element(By.ID, "key-why")
        assert why.is_displayed() and "asks for an API key" in why.text
        d.find_element(By.ID, "key").send_keys("wrong-key\n")
        wait(d, lambda d: "refused" in d.find_element(By.ID, "key-why").text)
        d.find_element(By.ID, "key").send_keys(KEY + "\n")
        wait(d, lambda d: not d.find_element(By.ID, "keybox").is_displayed())
        assert chat_server_name(d) == chat_run.name
        say(d, "Hello")
        assert messages(d)[-1][0] == "assistant"
        reload(d)  # remembered: not asked again
        wait(d, lambda d: chat_server_name(d) == chat_run.name)
        assert not d.find_element(By.ID, "keybox").is_displayed()
        # The key stops working (another server, another key): the 401 is explained in words.
        d.execute_script("localStorage.setItem('gptkit.key', '\"stale\"')")
        say(d, "Still there?")
        error = messages(d)[-1]
        assert error[0] == "error" and "401" in error[1] and "API key" in error[1]
        assert d.find_element(By.ID, "msg").get_attribute("value") == "Still there?"
        assert d.find_element(By.ID, "keybox").is_displayed()
    finally:
        server.stop()


def chat_server_name(d: Any) -> str:
    return d.find_element(By.ID, "model").text.split(" · ")[0]


def test_errors_show_in_the_conversation_and_keep_the_typed_text(browser: Callable, chat_server: Server,
                                                                 base_server: Server, chat_run: Path) -> None:  # noqa: F811  # fmt: skip
    d = browser()
    # 400: more tokens than the server allows.
    open_page(d, chat_server)
    set_settings(d, max_tokens=5000)
    say(d, "Hello there")
    role, text = messages(d)[-1]
    assert role == "error" and "400" in text and "at most 400" in text, text
    assert d.find_element(By.ID, "msg").get_attribute("value") == "Hello there"
    assert ("user", "Hello there") not in messages(d)  # not left in the conversation as if sent

    # 429: the queue is full (another client holds the server's one place).
    held = threading.Event()
    release = threading.Event()

    failure: list[BaseException] = []

    # A completion that cannot end before it is released: it ends at end-of-text only, and
    # greedy decoding with end-of-text banned (logit_bias -100) never writes it.
    eot = load_tokenizer(base_server.run / "tokenizer").eot_id
    hold_request = {"model": base_server.name, "prompt": "x", "max_tokens": LONG, "stream": True,
                    "temperature": 0, "logit_bias": {str(eot): -100}}  # fmt: skip

    def hold() -> None:
        body = json.dumps(hold_request).encode()
        req = urllib.request.Request(base_server.url + "/v1/completions", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.readline()
                deadline = time.monotonic() + 30
                while health(base_server)["active_samples"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)  # admitted: the one place is taken
                held.set()
                release.wait(30)
        except BaseException as e:  # shown by the assertion below: why the place was never held
            failure.append(e)
            raise

    d2 = browser()  # the browser first: its start-up is not spent while the place is held
    open_page(d2, base_server)
    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(60), f"the holding completion never took the place: {failure!r}"
        say(d2, "Anyone home?")
        assert health(base_server)["active_samples"] == 1  # the place was still taken when it asked
        role, text = messages(d2)[-1]
        assert role == "error" and "429" in text and "busy" in text, text
        assert d2.find_element(By.ID, "msg").get_attribute("value") == "Anyone home?"
    finally:
        release.set()
        t.join()

    # The server goes away.
    gone = Server(chat_run)
    d3 = browser()
    open_page(d3, gone)
    gone.stop()
    say(d3, "Are you there?")
    role, text = messages(d3)[-1]
    assert role == "error" and "Cannot reach the server" in text, text
    assert d3.find_element(By.ID, "msg").get_attribute("value") == "Are you there?"
