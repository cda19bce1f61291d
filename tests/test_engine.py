"""The continuous-batching engine: requests that join a running batch at any step, with their own
sampling settings, get the tokens they get alone; long samples slide past the context as
generate_ids does; memory stays bounded under rounds of concurrent streams."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from gptkit.inference import native
from gptkit.inference.engine import Engine, Job
from gptkit.inference.generate import SamplingParams, generate_ids, seeded_generator
from gptkit.inference.qlinear import swap_linears
from gptkit.loader import load_model
from gptkit.model import KVCache

from .conftest import DEVICE
from .test_serve import Server

pytestmark = pytest.mark.cuda

SETTINGS = [
    SamplingParams(max_new_tokens=70, temperature=0.9, top_k=5, seed=1, stop_at_eot=False),  # slides past 32
    SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.8, repetition_penalty=1.3, seed=2, stop_at_eot=False),
    SamplingParams(max_new_tokens=40, temperature=0.0, stop_at_eot=False),
    SamplingParams(max_new_tokens=25, temperature=1.2, frequency_penalty=0.5, seed=3, stop_at_eot=False),
    SamplingParams(max_new_tokens=90, temperature=0.0, stop_at_eot=False),  # greedy, three context slides
]


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], join_after: int) -> list[list[int]]:
    """Submit the first job, then the others once it has generated join_after tokens; each job's
    generated token ids."""
    finished = threading.Semaphore(0)
    jobs = [Job(i, p, s, set(), [], lambda job, d, end: end and finished.release(), logprobs=0)
            for i, (p, s) in enumerate(zip(prompts, params))]  # fmt: skip
    engine.submit(jobs[:1])
    deadline = time.monotonic() + 60
    while len(jobs[0].token_logprobs) < join_after and time.monotonic() < deadline:
        time.sleep(0.001)
    engine.submit(jobs[1:])
    for _ in jobs:
        assert finished.acquire(timeout=120)
    for job in jobs:
        assert not job.error, job.error
    return [[e.token for e in job.token_logprobs] for job in jobs]


@pytest.mark.parametrize("static, chunk, int8", [(False, 256, False), (True, 256, False), (False, 3, False),
                                                (False, 256, True)], ids=["pool", "static", "chunked", "int8"])  # fmt: skip
def test_requests_joining_at_any_step_get_their_solo_tokens(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, static: bool, chunk: int, int8: bool
) -> None:
    """static: every step at the pool's full width through a StaticDecoder (`serve --cuda-graph`;
    a CUDA graph on CUDA, eager here); chunk 3: prompts prefilled 3 positions per step, between
    the others' decode steps; int8: a quantized model, whose rows the native step quantizes one
    at a time (eager batched int8 quantizes the batch with one scale: the tokens would differ)
    -- the same tokens."""
    # Every new cache starts as NaN, as reused memory may: no result may depend on a position
    # that was never written (a masked one still enters the attention product with weight 0).
    allocate = KVCache.empty.__func__

    def poisoned(cls, *args: object, zeroed: bool = False) -> KVCache:  # noqa: ANN001
        cache = allocate(cls, *args, zeroed=zeroed)
        if not zeroed:  # asked for zeros (the pool): zeros; otherwise what reused memory may hold
            cache.k.fill_(float("nan"))
            cache.v.fill_(float("nan"))
        return cache

    monkeypatch.setattr(KVCache, "empty", classmethod(poisoned))
    model, tok, cfg = load_model(trained_run, DEVICE)
    assert cfg.model.block_size == 32
    if int8:
        if DEVICE.type != "cpu":
            pytest.skip("int8 layers are for CPU decoding")
        swap_linears(model, True, "int8")
        if native.decoder(model) is None:
            pytest.skip("int8 rows decode alone only in the native step (on the CPU, GPTKIT_NATIVE=1)")
    prompts = [tok.encode(t) for t in ("ROMEO:", "JULIET: O", "KING", "First Citizen:\nWe", "What")]
    engine = Engine(model, tok, max_batch=8, queue_limit=16, static=static, prefill_chunk=chunk)
    solo = [_run(engine, [p], [s], 0)[0] for p, s in zip(prompts, SETTINGS)]
    assert [len(t) for t in solo] == [s.max_new_tokens for s in SETTINGS]
    for join_after in (3, 17, 40):  # others join mid-way, and after the first has slid past the context
        assert _run(engine, prompts, SETTINGS, join_after) == solo, join_after
    # Every sample equals the one sampling core's own (generate_ids, as `gptkit generate`), seeded
    # ones with their seed's generator.
    for i, s in enumerate(SETTINGS):
        ids = torch.tensor([prompts[i]], device=DEVICE)
        want = [int(t) for t in generate_ids(model, ids, s, seeded_generator(s.seed, DEVICE))]
        assert solo[i] == want, i
    assert engine.active == 0 and not engine.rows_live  # every slot given back
    assert (engine.decoder is not None) == static
    # a row decoding alone went through the native step (gptkit.inference.native) on the CPU
    assert (engine.fast is not None) == (DEVICE.type == "cpu" and native.extension() is not None)


def test_memory_stays_bounded_over_rounds_of_64_streams(trained_run: Path) -> None:
    """3 rounds of 64 concurrent streaming requests through a real server (8 slots, the rest
    queued): every stream completes, and the server's resident memory does not grow with the
    rounds (the KV pool is allocated once)."""
    server = Server(trained_run, "--max-batch", "8", "--queue-limit", "64")
    proc = psutil.Process(server.proc.pid)

    def stream(i: int, out: list) -> None:
        body = {"model": server.name, "prompt": "ROMEO:", "max_tokens": 20 + i % 30, "seed": i, "stream": True}
        req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=300) as r:
            out.append(r.read().decode().endswith("data: [DONE]\n\n"))

    try:
        rss = []
        for _ in range(3):
            done: list[bool] = []
            threads = [threading.Thread(target=stream, args=(i, done)) for i in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(done) == 64 and all(done)
            rss.append(proc.memory_info().rss)
        health = server.request("GET", "/health", key=None)[1]
    finally:
        server.stop()
    assert health["active_samples"] == 0 and health["mean_batch"] > 4
    assert rss[2] - rss[0] < 32 * 2**20, [r / 2**20 for r in rss]  # MiB: no growth per round


def test_the_next_turn_reuses_the_last_ones_keys_and_values(trained_run: Path) -> None:
    """A prompt that begins with a finished sample's prompt and reply (the next turn of a chat)
    copies those positions from the prefix cache, computes only the rest, and samples what an
    engine without the cache samples."""
    model, tok, _ = load_model(trained_run, DEVICE)
    cached = Engine(model, tok, max_batch=4, queue_limit=8)
    plain = Engine(model, tok, max_batch=4, queue_limit=8, prefix_cache_tokens=0)
    assert cached.prefixes is not None and plain.prefixes is None
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eot=False)
    first = tok.encode("ROMEO: Ay")
    reply = _run(cached, [first], [greedy], 0)[0]
    assert cached.prefixes.hits == 0 and cached.prefill_tokens == len(first)
    turn = first + reply + tok.encode(" and")  # 21 tokens, inside the 32-token context
    held = len(first) + len(reply) - 1  # the reply's last token was never fed back: not cached
    seeded = SamplingParams(max_new_tokens=8, temperature=0.9, seed=5, stop_at_eot=False)
    # The next turn computes what is new; the same prompt again, only its last token (whose
    # logits are the distribution of what comes next).
    for params, computed in ((greedy, len(turn) - held), (seeded, 1)):
        before = cached.prefill_tokens
        assert _run(cached, [turn], [params], 0)[0] == _run(plain, [turn], [params], 0)[0]
        assert cached.prefill_tokens - before == computed
    assert cached.prefixes.hits == 2 and cached.prefixes.reused == held + len(turn) - 1


def test_prefix_cache_keeps_the_longest_and_stays_bounded() -> None:
    from gptkit.inference.engine import PrefixCache

    kv = lambda n: (torch.zeros(1, 1, 1, n, 2), torch.zeros(1, 1, 1, n, 2))  # noqa: E731
    c = PrefixCache(max_tokens=20)
    c.add([1, 2, 3], *kv(3))  # too short to be worth it
    assert not c.entries
    c.add([1, 2, 3, 4, 5], *kv(5))
    c.add([1, 2, 3, 4, 5, 6, 7], *kv(7))  # extends it: held once, as the longer one
    assert list(c.entries) == [(1, 2, 3, 4, 5, 6, 7)] and c.tokens == 7
    c.add([1, 2, 3, 4], *kv(4))  # inside it already
    assert c.tokens == 7
    assert c.longest([1, 2, 3, 4, 5, 6, 9, 9])[1] == 6 and c.longest([9, 1, 2, 3, 4])[1] == 0
    c.add([8] * 10, *kv(10))
    c.add([7] * 10, *kv(10))  # over 20 positions: the least recently used goes
    assert c.tokens <= 20 and (7,) * 10 in c.entries and (1, 2, 3, 4, 5, 6, 7) not in c.entries


def test_a_long_prompt_is_prefilled_between_the_others_decode_steps(trained_run: Path) -> None:
    """With prefill_chunk 4, a 30-token prompt arriving while another row decodes takes 8 engine
    steps to prefill, and the running row gets a token at each of them: it does not stall."""
    model, tok, _ = load_model(trained_run, DEVICE)
    engine = Engine(model, tok, max_batch=4, queue_limit=8, prefill_chunk=4, prefix_cache_tokens=0)
    runner = Job(0, tok.encode("ROMEO:"), SamplingParams(max_new_tokens=60, temperature=0.0, stop_at_eot=False),
                 set(), [], lambda *a: None, logprobs=0)  # fmt: skip
    long = tok.encode("First Citizen: Before we proceed any further")[:30]
    assert len(long) == 30
    at_first_token: list[int] = []
    done = threading.Event()

    def emit(job: Job, delta: str, end: bool) -> None:
        if not at_first_token:
            at_first_token.append(len(runner.token_logprobs))
        if end:
            done.set()

    newcomer = Job(1, long, SamplingParams(max_new_tokens=2, temperature=0.0, stop_at_eot=False), set(), [], emit)
    engine.submit([runner])
    while len(runner.token_logprobs) < 5:
        time.sleep(0.001)
    before = len(runner.token_logprobs)
    engine.submit([newcomer])
    assert done.wait(60)
    assert at_first_token[0] - before >= 7  # one token of the runner per chunk of the newcomer's prompt
    engine.close()
