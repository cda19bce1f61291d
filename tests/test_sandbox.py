"""The sandbox generated programs run in (gptkit/evaluate/sandbox.py): every hostile program is
one failed sample within its limits, and the machine is left as it was."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gptkit.evaluate.sandbox import SANDBOX_UID, Limits, confined, run_program

LIMITS = Limits(time_s=4, memory_mb=512, output_bytes=1 << 20)


def sandbox_processes() -> list[int]:
    """Live processes of the sandbox's user ids (zombies are dead: init reaps them)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        if SANDBOX_UID <= uid < SANDBOX_UID + 1000 and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(p))
    return pids


def test_a_correct_program_passes_and_a_wrong_one_fails() -> None:
    assert run_program("assert sum([1, 2]) == 3\nprint('ok')", LIMITS).passed
    bad = run_program("def f():\n    return 1\nassert f() == 2, 'wrong'\n", LIMITS)
    assert not bad.passed and bad.status == "failed" and "AssertionError: wrong" in bad.output


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "fork loop": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "10 GB allocation": "x = bytearray(10 * 2**30)\n",
    "megabytes of output": "while True:\n    print('x' * 10_000)\n",
    "a child that leaves the group": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\ntime.sleep(600)\n"
    ),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_programs_are_one_failed_sample(name: str) -> None:
    start = time.monotonic()
    outcome = run_program(HOSTILE[name], LIMITS)
    assert not outcome.passed and time.monotonic() - start < LIMITS.time_s + 5, outcome
    deadline = time.monotonic() + 20
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []  # nothing it started outlives it


def test_its_folder_is_its_own_and_the_users_files_are_out_of_reach(tmp_path: Path) -> None:
    if not confined():
        pytest.skip("without root the sandbox runs as the user, with its rights (documented)")
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own")
    secret.chmod(0o600)
    target = tmp_path / "written-by-sandbox"
    read = run_program(f"print(open({str(secret)!r}).read())", LIMITS)
    write = run_program(f"open({str(target)!r}, 'w').write('x')", LIMITS)
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)", LIMITS)
    local = run_program("open('scratch.txt', 'w').write('fine')\nprint(open('scratch.txt').read())", LIMITS)
    assert not read.passed and "PermissionError" in read.output and "the user's own" not in read.output
    assert not write.passed and not target.exists()
    assert not net.passed and "unreachable" in net.output  # no interfaces at all: no network
    assert local.passed and "fine" in local.output  # its own folder is writable
