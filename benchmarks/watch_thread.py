"""Watch one thread from outside: whenever it is not running, what it is blocked in.

    python benchmarks/watch_thread.py PID [--tid TID] --seconds S --out FILE

Polls the thread's /proc state, system call and kernel wait channel as fast as it can (a few microseconds per
poll, on its own core; `--interval-us` sleeps between polls where no core is spare) and writes JSON lines of
stretches in which they stayed the same: ``t_start``/``t_end`` on `time.perf_counter` (CLOCK_MONOTONIC, the
clock of `pipeweaver serve --delivery-trace`), the state (S sleeping, D uninterruptible, R running or runnable),
the system call's number and first argument, and the wait channel.
Stretches in which the thread was running are not written. `bench_service.py --watch-loop` runs it on the
server's event loop thread; `delivery_breakdown.watched_stalls` joins it with the trace's stalls.

Reading another process's /proc/PID/task/TID/syscall needs the same user (or ptrace rights); wchan reads 0 on
kernels that hide it, and then the system call alone names the wait.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _read(fd: int) -> bytes:
    return os.pread(fd, 256, 0)


def watch(pid: int, tid: int, seconds: float, out: Path, interval_s: float = 0.0) -> int:
    """Poll for `seconds` (or until the thread is gone), sleeping `interval_s` between polls (0: none, for a
    core of its own); the number of stretches written."""
    base = f"/proc/{pid}/task/{tid}"
    stat = os.open(f"{base}/stat", os.O_RDONLY)
    syscall = os.open(f"{base}/syscall", os.O_RDONLY)
    wchan = os.open(f"{base}/wchan", os.O_RDONLY)
    rows: list[tuple[float, float, str, str, str]] = []
    current: tuple[str, str, str] | None = None
    since = 0.0
    end = time.perf_counter() + seconds
    try:
        while True:
            now = time.perf_counter()
            if now > end:
                break
            raw = _read(stat)
            state = raw[raw.rindex(b")") + 2 : raw.rindex(b")") + 3].decode()
            if state == "R":
                key = None
            else:
                call = _read(syscall).split()
                # "running" when the thread ran between the two reads; else the number and its first argument
                what = call[0].decode() if call and call[0] == b"running" else " ".join(c.decode() for c in call[:2])
                key = (state, what, _read(wchan).decode(errors="replace"))
            if key != current:
                if current is not None:
                    rows.append((since, now, *current))
                current, since = key, now
            if interval_s:
                time.sleep(interval_s)
    except (FileNotFoundError, ProcessLookupError):  # the thread ended
        pass
    finally:
        if current is not None:
            rows.append((since, time.perf_counter(), *current))
        for fd in (stat, syscall, wchan):
            os.close(fd)
    with open(out, "w") as f:
        for t_start, t_end, state, what, chan in rows:
            f.write(
                json.dumps({"t_start": t_start, "t_end": t_end, "state": state, "syscall": what, "wchan": chan}) + "\n"
            )
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="Record what a thread is blocked in whenever it is not running.")
    parser.add_argument("pid", type=int)
    parser.add_argument("--tid", type=int, help="the thread (default: the process's main thread)")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--interval-us", type=float, default=0.0, help="sleep between polls (default 0: poll without pause)"
    )
    args = parser.parse_args()
    watch(args.pid, args.tid or args.pid, args.seconds, args.out, args.interval_us / 1e6)


if __name__ == "__main__":
    main()
