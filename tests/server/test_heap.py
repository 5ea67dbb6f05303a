"""`heap.keep_heap_pages`: large buffers allocated over and over stop faulting their pages in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeweaver.server import heap

_PROBE = """
import json, os, pickle, resource, sys
from pipeweaver.server import heap
kept = heap.keep_heap_pages() if sys.argv[1] == "kept" else None
parts = tuple(os.urandom(50_000) for _ in range(6))  # a search result: a plan's parts as bytes, ~300 KB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # pickled for the pipe and read back, as between a worker and the event loop
    data = pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)
    back = pickle.loads(data)
    del data, back
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(setting: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE, setting], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_heap_pages_stop_large_buffers_faulting() -> None:
    default, kept = _faults("default"), _faults("kept")
    assert kept["kept"] is True
    # By default pickle's growing output buffer ends in fresh mappings: tens of page faults per round (15,000 in
    # 200 rounds on the 2-core machine). Kept: the first rounds' only (about 150).
    assert int(str(default["faults"])) > 200 * 20
    assert int(str(kept["faults"])) < 200 * 5


def test_settings_are_sane() -> None:
    assert heap.MMAP_THRESHOLD_BYTES >= 1 << 20  # above a search result's size
    assert heap.TRIM_THRESHOLD_BYTES >= heap.MMAP_THRESHOLD_BYTES
