"""The server's limits, measured on a live `gptkit serve` process: memory while a client
streams a 50 MB chunked body (stopped at --max-request-bytes), and how long slow-header
connections stay open.

    python benchmarks/serve_limits.py RUN

Ends with one JSON line of the figures."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def main() -> None:
    run = sys.argv[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", run, "--port", "0", "--header-timeout", "2"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    url = re.search(r"at http://(\S+)", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
    host, port = url.split(":")
    try:
        before = rss_mb(proc.pid)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        piece, sent, t0 = b"a" * (1 << 20), 0, time.perf_counter()
        try:
            while sent < 50 << 20:
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass
        status = conn.getresponse().status
        after = rss_mb(proc.pid)
        slow = [socket.create_connection((host, int(port))) for _ in range(20)]
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHo")
        t0 = time.perf_counter()
        for s in slow:
            s.settimeout(30)
            s.recv(10)
        closed_after = time.perf_counter() - t0
        report = {"chunked_status": status, "sent_mb_before_stop": round(sent / 2**20), "rss_mb_before": round(before),
                  "rss_mb_after": round(after), "slow_sockets_closed_after_s": round(closed_after, 1)}  # fmt: skip
        print(json.dumps(report))
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
