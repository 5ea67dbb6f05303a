"""The `pipeweaver` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeweaver import presets
from pipeweaver.cli import main


def pipeweaver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeweaver", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_workloads_json_lists_the_eight_presets() -> None:
    result = pipeweaver("workloads", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [w["name"] for w in listing] == [
        "vlm-s",
        "vlm-m",
        "vlm-l",
        "t2v-s",
        "t2v-l",
        "motivation-37b",
        "tiny-vlm",
        "tiny-t2v",
    ]
    vlm_s = listing[0]
    assert [m["display_name"] for m in vlm_s["modules"]] == ["ViT 5B", "Llama3 8B"]
    assert vlm_s["parallel"] == {"pp": 4, "tp": 4, "dp": 1, "microbatches": 32, "seq_len": 8192}
    assert vlm_s["gpus"] == 16 and vlm_s["hardware"] == "h800" and vlm_s["dataset"] == "vlm-mix"
    assert vlm_s["total_params"] == sum(m["params"] for m in vlm_s["modules"])


def test_batch_json_parses() -> None:
    result = pipeweaver("batch", "--workload", "vlm-s", "--seed", "1", "--json")
    assert result.returncode == 0, result.stderr
    batch = json.loads(result.stdout)
    assert batch["workload"] == "vlm-s" and batch["seed"] == 1 and batch["iteration"] == 0
    assert len(batch["microbatches"]) == 32
    media = [m for mb in batch["microbatches"] for d in mb["documents"] for m in d["media"]]
    assert media and all(m == {"modality": "image", "tokens": 2704, "merged_tokens": 169} for m in media)
    assert batch["summary"]["images"] == len(media)


def test_dynamic_batch_reports_its_bounds() -> None:
    result = pipeweaver("batch", "--workload", "tiny-t2v", "--seed", "2", "--iteration", "4", "--dynamic", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bounds"]["unit"] == "seconds"


@pytest.mark.parametrize(
    "args",
    [
        ("batch", "--workload", "nope", "--seed", "1"),
        ("batch", "--workload", "vlm-s", "--seed", "abc"),
        ("batch", "--workload", "vlm-s", "--seed", "1", "--iteration", "-3"),
        ("batch", "--seed", "1"),
        ("frobnicate",),
        (),
    ],
)
def test_errors_are_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    result = pipeweaver(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeweaver: error: "), result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_workload_names_the_choices() -> None:
    result = pipeweaver("batch", "--workload", "nope", "--seed", "1")
    assert "'nope'" in result.stderr and "vlm-s" in result.stderr


@pytest.mark.parametrize("args", [["workloads"], ["batch", "--workload", "tiny-vlm", "--seed", "3"]])
def test_tables_print(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tiny-vlm" in out
    if args[0] == "workloads":
        assert all(name in out for name in presets.WORKLOADS)


def test_plan_warms_up_like_the_service_unless_cold() -> None:
    runs = {}
    for extra in ((), ("--cold",)):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeweaver",
                "plan",
                "--workload",
                "tiny-vlm",
                "--budget-ms",
                "200",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        runs[extra] = json.loads(result.stdout)
    warm, cold = runs[()], runs[("--cold",)]
    assert warm["warm_up_ms"] > 0 and cold["warm_up_ms"] == 0
    for out in (warm, cold):
        assert out["predicted_ms"] >= out["lower_bound_ms"] > 0
        assert out["gap_to_lower_bound"] == pytest.approx(out["predicted_ms"] / out["lower_bound_ms"] - 1, abs=1e-3)


def test_plan_refuses_a_budget_that_is_not_positive() -> None:
    result = pipeweaver("plan", "--workload", "tiny-vlm", "--budget-ms", "0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["pipeweaver: error: --budget-ms must be positive, got 0.0"], result.stderr
