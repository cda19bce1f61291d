"""Load tests of `gptkit serve` against real servers, side by side in one run.

Closed loop (the default): 32 concurrent streaming requests (chat, or long completions with
--endpoint completions), batched (the default) against one-at-a-time (--max-batch 1):

    python benchmarks/serve_load.py RUN [--requests 32] [--max-tokens 64] [--repeats 3]

Reports requests/s and generated tokens/s (medians over repeats) and the speed-up of batched
serving; checks that every stream is well formed (chunks, a finish reason, then [DONE]).

Open loop (--open-loop): requests arrive as a Poisson process at each --rates value (requests/s),
with mixed max_tokens (8-256), mixed temperatures (0, 0.7, 1.0) and a shared system prompt,
against a continuous-batching server and a static one (--scheduler static), interleaved:

    python benchmarks/serve_load.py RUN --open-loop [--rates 2 4 8] [--requests 48]

Reports throughput (generated tokens/s over the makespan), p50/p95 time to first token and
p50/p95 time per output token. Each mode ends with one JSON line (the open loop's includes
p95_ttft_ratio and throughput_ratio, continuous / static, at the highest rate).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def start(run: str, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", run, "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    m = re.search(r"at (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise SystemExit("server did not start")
    return proc, m.group(1)


def one(url: str, model: str, i: int, max_tokens: int, out: list, endpoint: str) -> None:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "seed": i, "temperature": 0.8}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": f"Tell me about question number {i}."}]
    else:  # long completions: what a throughput figure needs
        body["prompt"] = ["ROMEO:", "First Citizen:\n", "KING HENRY:", "O"][i % 4]
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    req = urllib.request.Request(url + path, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        events = r.read().decode().split("\n\n")
    ok = events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    ok = ok and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    out.append((ok, len(chunks)))


def load(url: str, model: str, n: int, max_tokens: int, endpoint: str) -> dict[str, float]:
    before = json.loads(urllib.request.urlopen(url + "/health").read())["tokens"]
    results: list = []
    threads = [threading.Thread(target=one, args=(url, model, i, max_tokens, results, endpoint)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    tokens = json.loads(urllib.request.urlopen(url + "/health").read())["tokens"] - before
    return {"seconds": dt, "requests_per_s": n / dt, "tokens_per_s": tokens / dt,
            "well_formed": sum(ok for ok, _ in results), "completed": len(results)}  # fmt: skip


SYSTEM = "System: You are a player in a company of actors. Answer in verse, as the Bard would.\n"


def timed(url: str, model: str, body: dict, out: list, send_at: float) -> None:
    """One streamed completion sent at send_at (perf_counter): (time to first token, time per
    output token after it, tokens, well formed)."""
    time.sleep(max(0.0, send_at - time.perf_counter()))
    req = urllib.request.Request(url + "/v1/completions", json.dumps({"model": model, "stream": True, **body}).encode(),
                                 method="POST")  # fmt: skip
    req.add_header("Content-Type", "application/json")
    t0 = time.perf_counter()
    first, last, tokens, ok = None, t0, 0, False
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                ok = True
            elif line.startswith("data: {"):
                text = json.loads(line[6:])["choices"][0]["text"]
                if text:
                    last = time.perf_counter()
                    first = first or last
                    tokens += 1  # a chunk: one token's text, or a few held back together
    ttft = (first or last) - t0
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else 0.0
    out.append((ttft, tpot, tokens, ok, last))


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0


def open_loop(url: str, model: str, rate: float, n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    bodies, arrivals, t = [], [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
        bodies.append({"prompt": SYSTEM + ["ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:"][i % 4],
                       "max_tokens": rng.randint(8, 256), "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": i})  # fmt: skip
    before = json.loads(urllib.request.urlopen(url + "/health").read())["tokens"]
    out: list = []
    start = time.perf_counter() + 0.2
    threads = [threading.Thread(target=timed, args=(url, model, b, out, start + a)) for b, a in zip(bodies, arrivals)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    makespan = max(o[4] for o in out) - start
    tokens = json.loads(urllib.request.urlopen(url + "/health").read())["tokens"] - before
    ttft, tpot = [o[0] for o in out], [o[1] for o in out if o[2] > 1]
    return {"throughput_tokens_per_s": tokens / makespan, "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "tpot_p50": pct(tpot, 0.5), "tpot_p95": pct(tpot, 0.95), "well_formed": sum(o[3] for o in out) / n}  # fmt: skip


def main_open_loop(args: argparse.Namespace) -> None:
    model = Path(args.run).resolve().name
    servers = {
        "continuous": start(args.run, "--max-batch", "16", "--queue-limit", "256"),
        "static": start(args.run, "--max-batch", "16", "--queue-limit", "256", "--scheduler", "static"),
    }
    results: dict[float, dict[str, list[dict[str, float]]]] = {r: {k: [] for k in servers} for r in args.rates}
    try:
        for repeat in range(args.repeats):
            for rate in args.rates:
                for name, (_, url) in servers.items():  # the same arrivals and requests for both
                    r = open_loop(url, model, rate, args.requests, seed=repeat * 1000 + int(rate * 10))
                    results[rate][name].append(r)
                    print(f"rate {rate}/s {name:10s}: {r['throughput_tokens_per_s']:7.1f} tok/s  TTFT p50 "
                          f"{r['ttft_p50']:6.2f} s p95 {r['ttft_p95']:6.2f} s  TPOT p50 {r['tpot_p50'] * 1000:6.1f} ms "
                          f"p95 {r['tpot_p95'] * 1000:6.1f} ms  well-formed {r['well_formed']:.0%}", flush=True)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
    med = {rate: {name: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for name, runs in per.items()}
           for rate, per in results.items()}  # fmt: skip
    top = max(args.rates)
    report = {
        "requests": args.requests,
        "rates": args.rates,
        "median": {str(rate): per for rate, per in med.items()},
        "p95_ttft_ratio": round(med[top]["continuous"]["ttft_p95"] / med[top]["static"]["ttft_p95"], 3),
        "throughput_ratio": round(
            med[top]["continuous"]["throughput_tokens_per_s"] / med[top]["static"]["throughput_tokens_per_s"], 3
        ),
    }
    print(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    ap.add_argument("--open-loop", action="store_true", help="Poisson arrivals: continuous vs static batching")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    args = ap.parse_args()
    if args.open_loop:
        main_open_loop(args)
        return
    model = Path(args.run).resolve().name
    servers = {"batched": start(args.run, "--max-batch", "32"), "one_at_a_time": start(args.run, "--max-batch", "1")}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in servers}
    try:
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for name, (_, url) in servers.items():
                r = load(url, model, args.requests, args.max_tokens, args.endpoint)
                runs[name].append(r)
                print(f"{name}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} tok/s, "
                      f"{r['well_formed']}/{args.requests} well-formed streams", flush=True)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("requests_per_s", "tokens_per_s")} for k, v in runs.items()}
    report = {
        "endpoint": args.endpoint,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "batched_requests_per_s": round(med["batched"]["requests_per_s"], 3),
        "batched_tokens_per_s": round(med["batched"]["tokens_per_s"], 1),
        "one_at_a_time_requests_per_s": round(med["one_at_a_time"]["requests_per_s"], 3),
        "one_at_a_time_tokens_per_s": round(med["one_at_a_time"]["tokens_per_s"], 1),
        "speedup": round(med["batched"]["tokens_per_s"] / med["one_at_a_time"]["tokens_per_s"], 2),
        "all_well_formed": all(r["well_formed"] == r["completed"] == args.requests for v in runs.values() for r in v),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
