"""Multi-turn chat with and without the engine's prefix cache, side by side in one run.

Two `gptkit serve` processes on the same run, one with the prefix cache (the default) and one
with --prefix-cache-tokens 0, get the same conversations turn by turn (interleaved, the order
turned round each turn): a system prompt, then user turns of about 120 tokens, each request
carrying the whole history as a chat client sends it, greedy replies of --max-tokens tokens;
before each turn's request, the same request with max_tokens 1 measures its time to first token.
By default the run is SmolLM2-135M's shape with random weights (context 2048), where prefill
is most of a turn's time to first token on a CPU.

    python benchmarks/prefix_reuse.py [--run RUN] [--turns 6] [--conversations 3] [--max-tokens 16]

Reports time to first token per turn (medians over conversations) for both, the ratio, and the
prompt positions each server computed for the timed requests (its /health prefill_tokens). Ends with one JSON line:
ttft_ratio (cached / plain, median over turns 2..N), prefill_tokens_cached, prefill_tokens_plain,
prefill_saved_share, replies_equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, run_folder
from serve_load import start

TEXT = (ROOT / "gptkit" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/health").read())


def turn(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """One streamed chat request: (seconds to its first token, the reply). The first token is
    the first chunk after the role chunk, text or finish; with max_tokens 1 that is the prompt's
    prefill and one token, whatever the token's text (random weights' tokens are often rows past
    the tokenizer's vocabulary, with no text, so a longer reply's text may all come at its end)."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    t0 = time.perf_counter()
    first, reply = None, []
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if not choices or choices[0].get("delta", {}).get("role"):
                continue
            first = first or time.perf_counter()
            reply.append(choices[0].get("delta", {}).get("content") or "")
    return (first or time.perf_counter()) - t0, "".join(reply)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a run folder (default: SmolLM2-135M's shape, random weights)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--user-chars", type=int, default=400, help="characters of each user turn")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = a.run or str(run_folder("smollm2-135m", Path(tmp)))
        servers = {}
        for name, extra in (("cached", []), ("plain", ["--prefix-cache-tokens", "0"])):
            servers[name] = start(run, "--max-tokens-cap", str(a.max_tokens), *extra)
        model = Path(run).resolve().name
        try:
            for _, url in servers.values():  # warm up: a fresh process's first forward passes are slow
                turn(url, model, [{"role": "user", "content": TEXT[:200]}], a.max_tokens)
            ttft: dict[str, list[list[float]]] = {k: [[] for _ in range(a.turns)] for k in servers}
            equal = True
            computed = dict.fromkeys(servers, 0)  # prompt positions the timed requests computed
            for c in range(a.conversations):
                offset = 5000 + c * 40_000
                system = "You answer as a player in a company of actors would. " + TEXT[offset : offset + 300]
                history = {k: [{"role": "system", "content": system}] for k in servers}
                for t in range(a.turns):
                    user = TEXT[offset + 300 + t * a.user_chars : offset + 300 + (t + 1) * a.user_chars]
                    replies = {}
                    for name in sorted(servers, reverse=t % 2 == 1):
                        history[name].append({"role": "user", "content": user})
                        url = servers[name][1]
                        # Time to first token (max_tokens 1), then the reply itself for the history.
                        before = health(url)["prefill_tokens"]
                        seconds, _ = turn(url, model, history[name], 1)
                        computed[name] += health(url)["prefill_tokens"] - before
                        _, replies[name] = turn(url, model, history[name], a.max_tokens)
                        history[name].append({"role": "assistant", "content": replies[name]})
                        ttft[name][t].append(seconds)
                    equal = equal and replies["cached"] == replies["plain"]
                    print(f"conversation {c + 1} turn {t + 1}: cached {ttft['cached'][t][-1]:.3f} s, "
                          f"plain {ttft['plain'][t][-1]:.3f} s", file=sys.stderr, flush=True)  # fmt: skip
            reused = health(servers["cached"][1])["prefix_tokens_reused"]
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)
    print(f"{'turn':>4} {'cached TTFT s':>14} {'plain TTFT s':>13} {'ratio':>6}")
    ratios = []
    for t in range(a.turns):
        mc, mp = statistics.median(ttft["cached"][t]), statistics.median(ttft["plain"][t])
        print(f"{t + 1:>4} {mc:>14.3f} {mp:>13.3f} {mc / mp:>6.2f}")
        if t > 0:
            ratios.append(mc / mp)
    saved = 1 - computed["cached"] / computed["plain"]
    print(f"prompt positions computed by the timed requests: cached {computed['cached']:,}, plain "
          f"{computed['plain']:,} ({saved:.0%} saved); {reused:,} copied in all; replies equal: {equal}")  # fmt: skip
    print(json.dumps({"ttft_ratio": statistics.median(ratios) if ratios else None,
                      "prefill_tokens_cached": computed["cached"], "prefill_tokens_plain": computed["plain"],
                      "prefill_saved_share": saved, "replies_equal": equal, "turns": a.turns,
                      "conversations": a.conversations}))  # fmt: skip


if __name__ == "__main__":
    main()
