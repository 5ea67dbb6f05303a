"""The torchrun entry point: 4 gloo ranks, one iteration of a baseline, checked against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_launch_runs_a_baseline_and_matches_the_reference() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "-m", "pipeweaver.client.launch", "--workload", "tiny-vlm", "--schedule", "interleaved-1f1b",
        "--iterations", "1", "--check",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=True).stdout
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert line["schedule"] == "interleaved-1f1b" and line["backend"] == "gloo"
    assert line["loss_rel_err"] <= 1e-5 and line["grad_rel_err"] <= 1e-5
