"""Load test of `gptkit serve`: 32 concurrent streaming requests (chat, or long completions with
--endpoint completions) against a real server,
batched (the default) and one-at-a-time (--max-batch 1), side by side in one run.

    python benchmarks/serve_load.py RUN [--requests 32] [--max-tokens 64] [--repeats 3]

Reports requests/s and generated tokens/s (medians over repeats) for both servers and the
speed-up of batched serving; checks that every stream is well formed (chunks, a finish
reason, then [DONE]). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    args = ap.parse_args()
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
