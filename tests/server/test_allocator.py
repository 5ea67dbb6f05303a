"""The main process keeps freed heap memory (glibc's mallopt), and the setting is optional and harmless."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest

from pipeweaver.server import allocator
from pipeweaver.server.config import ServerConfig

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_glibc_accepts_the_thresholds() -> None:
    # In a child process: the thresholds stay set for the life of the process that sets them.
    code = "from pipeweaver.server.allocator import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_stops_the_heap_from_shrinking_after_a_burst() -> None:
    """What the setting is for: after a burst of ~60 KB blocks is freed, the heap keeps its pages (glibc's
    mallinfo2: the bytes still held from the kernel) instead of trimming them back."""
    code = textwrap.dedent(
        """
        import ctypes, sys
        from pipeweaver.server.allocator import keep_freed_memory
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = Info
        if sys.argv[1] == "keep":
            keep_freed_memory()
        before = libc.mallinfo2().arena
        burst = [bytes(60_000) + bytes(i % 7) for i in range(64)]  # distinct objects, each from malloc
        del burst
        print(libc.mallinfo2().arena - before)
        """
    )

    def held_after(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.strip())

    assert held_after("keep") >= 64 * 60_000 // 2  # the burst's pages stay in the heap
    assert held_after("default") < 64 * 60_000 // 2  # glibc trimmed them (or never took them from the heap)


def test_no_c_library_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator.keep_freed_memory() is False

    def missing(name: str) -> ctypes.CDLL:
        raise OSError("no such library")

    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(allocator.ctypes, "CDLL", missing)
    assert allocator.keep_freed_memory() is False


def test_on_by_default_and_can_be_switched_off() -> None:
    assert ServerConfig().keep_freed_memory is True
    assert ServerConfig(keep_freed_memory=False).keep_freed_memory is False
