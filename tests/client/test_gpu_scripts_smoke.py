"""CPU checks of the GPU benchmark helpers (benchmarks/gpu): torch's padded VLM and T2V stages compute our loss
(and, for T2V, our gradients)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))

from e2e_torch_t2v import PaddedT2VMicrobatch, T2VShape, TorchT2VStage  # noqa: E402
from e2e_torch_vlm import StageFeed, TorchVLMStage, VLMShape  # noqa: E402
from e2e_workload import scaled_t2v, scaled_vlm  # noqa: E402

from pipeweaver.client.executor import PipelineExecutor  # noqa: E402
from pipeweaver.client.geometry import IGNORE_INDEX  # noqa: E402
from pipeweaver.client.reference import ReferenceModel  # noqa: E402
from pipeweaver.datagen import dynamic_batch  # noqa: E402
from pipeweaver.search.baselines import baseline_placement  # noqa: E402


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_padded_torch_stages_give_the_unpadded_loss(schedule: str) -> None:
    """Every microbatch through torch's stages in order (no pipelining): padding must not change the loss."""
    torch.manual_seed(0)
    wl = scaled_vlm(tiny=True, microbatches=4)
    batches = [dynamic_batch(wl, seed=0, iteration=k) for k in (3, 14)]  # image-heavy and text-only
    shape = VLMShape.of(wl.model, batches)
    placement = baseline_placement(schedule, model=wl.model, parallel=wl.parallel)
    executors = [PipelineExecutor(wl.model, placement, r, pair_groups=False) for r in range(wl.parallel.pp)]
    feed = StageFeed()
    stages = []
    head = None
    for c in placement.chunks:
        parts = executors[c.rank].chunks[(c.pipeline, c.index)]
        stages.append(TorchVLMStage(parts, shape, feed))
        if parts[-1].post is not None and parts[-1].layers.module == shape.llm:
            head = parts[-1].post.head
    assert head is not None
    reference = ReferenceModel(wl.model)
    for batch in batches:
        feed.start(wl.model, shape, batch, torch.device("cpu"), torch.float32)
        loss = 0.0
        for mb in feed.microbatches:
            h = torch.zeros(1, 1)
            for stage in stages:
                h = stage(h)
            logits = head(h).float()
            ce = torch.nn.functional.cross_entropy(logits, mb.labels(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss += float(ce.detach()) / mb.scale.text_targets
        feed.check_complete()
        want = reference.step(batch, data_seed=0).loss
        assert loss == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_padded_torch_t2v_stages_give_the_unpadded_loss_and_gradients(schedule: str) -> None:
    """T2V: captions and clips padded to the run's longest (iteration 0: microbatches of 1-3 clips; 15: captions
    only, the DiT runs on padding alone); loss and every gradient equal the unpadded reference's."""
    torch.manual_seed(0)
    wl = scaled_t2v(tiny=True, microbatches=4)
    batches = [dynamic_batch(wl, seed=0, iteration=k) for k in (0, 15)]
    shape = T2VShape.of(wl.model, batches)
    assert shape.padding(batches[1])["tokens"] == 0 and shape.padding(batches[1])["dit_tokens_padded"] > 0
    placement = baseline_placement(schedule, model=wl.model, parallel=wl.parallel)
    executors = [PipelineExecutor(wl.model, placement, r, pair_groups=False) for r in range(wl.parallel.pp)]
    feed = StageFeed(PaddedT2VMicrobatch)
    stages = [TorchT2VStage(executors[c.rank].chunks[(c.pipeline, c.index)], shape, feed) for c in placement.chunks]
    reference = ReferenceModel(wl.model)
    for batch in batches:
        for ex in executors:
            for p in ex.parameters():
                p.grad = None
        feed.start(wl.model, shape, batch, torch.device("cpu"), torch.float32)
        loss = 0.0
        for _ in feed.microbatches:
            h: tuple[torch.Tensor, ...] = (torch.zeros(1, 1),)
            for stage in stages:
                out = stage(*h)
                h = out if isinstance(out, tuple) else (out,)
            (mb_loss,) = h
            mb_loss.sum().backward()
            loss += float(mb_loss.detach())
        feed.check_complete()
        want = reference.step(batch, data_seed=0)
        assert loss == pytest.approx(want.loss, rel=1e-5, abs=1e-12)
        grads = {k: v for ex in executors for k, v in ex.gradients().items()}
        assert set(grads) == set(want.grads)
        for k, g in want.grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()) + 1e-12, msg=k)


def test_summary_speedups_mape_and_losses() -> None:
    """The end-to-end summary: PipeWeaver's speedups on common iterations, SEMU's error, the loss cross-check."""
    from e2e_compare import summarize

    def rows(ms: list[float], loss: float = 1.0, **extra: object) -> list[dict[str, object]]:
        return [{"i": i, "ms": m, "loss": loss, **extra} for i, m in enumerate(ms)]

    pw_extra = {
        "source": "search",
        "predicted_ms": 50.0,
        "margin_ms": 10.0,
        "local_fallback_reasons": [],
        "vote_fallback_reason": "",
        "served_fallback": False,
    }
    result = {
        "batches": {"measured": [{"tokens": 1000}] * 3},
        "schedules": {
            "pipeweaver": {"rows": rows([100.0, 100.0], **pw_extra)},
            "1f1b": {"rows": rows([150.0, 130.0, 500.0])},
            "torch-1f1b": {"rows": rows([200.0], loss=1.001)},
            "optimus-coarse": {"status": "error"},
        },
        "semu": {
            "schedules": {"1f1b": {"uncalibrated_ms": [15.0, 13.0, 50.0], "calibrated_ms": [150.0, 130.0, 400.0]}}
        },
    }
    s = summarize(result)
    assert s["speedup_pipeweaver_vs"]["1f1b"]["iterations"] == 2
    assert s["speedup_pipeweaver_vs"]["1f1b"]["mean_time_ratio"] == pytest.approx(1.4)
    assert s["speedup_pipeweaver_vs"]["torch-1f1b"]["mean_time_ratio"] == pytest.approx(2.0)
    assert s["schedules"]["pipeweaver"]["tokens_per_s"] == pytest.approx(10_000.0)
    assert s["semu_mape"]["1f1b"]["uncalibrated"]["mape_pct"] == pytest.approx(90.0)
    assert s["semu_mape"]["1f1b"]["calibrated"]["mape_pct"] == pytest.approx(100 * 0.2 / 3)
    assert s["semu_mape"]["pipeweaver"]["service_header_calibrated"]["mape_pct"] == pytest.approx(50.0)
    assert s["loss_max_rel_diff_vs_1f1b"]["torch-1f1b"] == pytest.approx(1e-3)
    assert s["pipeweaver_plans"]["late_plans"] == 0
    assert "optimus-coarse" not in s["schedules"]


def test_summary_records_status_fallback_reasons_and_loss_reference() -> None:
    """How each schedule ended, why the service fell back, and the loss reference when 1F1B did not run."""
    from e2e_compare import summarize

    def row(i: int, served: bool, why: str = "") -> dict[str, object]:
        return {
            "i": i,
            "ms": 100.0,
            "loss": 2.0,
            "source": "fallback" if served else "search",
            "predicted_ms": None,
            "margin_ms": 5.0,
            "local_fallback_reasons": [],
            "vote_fallback_reason": "",
            "served_fallback": served,
            "service_fallback_reason": why,
        }

    result = {
        "batches": {"measured": [{"tokens": 1000}] * 3},
        "schedules": {
            "pipeweaver": {"status": "ok", "rows": [row(0, True, "deadline"), row(1, True, "deadline"), row(2, False)]},
            "interleaved-1f1b": {"status": "ok", "rows": [{"i": 0, "ms": 120.0, "loss": 2.002}]},
            "optimus-coarse": {"status": "hung", "rows": [{"i": 0, "ms": 110.0, "loss": 2.0}]},
        },
        "semu": {"schedules": {}},
    }
    s = summarize(result)
    assert s["status"] == {"pipeweaver": "ok", "interleaved-1f1b": "ok", "optimus-coarse": "hung"}
    assert s["pipeweaver_plans"]["served_fallbacks"] == 2
    assert s["pipeweaver_plans"]["served_fallback_reasons"] == {"deadline": 2}
    assert s["pipeweaver_plans"]["sources"] == {"fallback": 2, "search": 1}
    assert s["loss_reference"] == "interleaved-1f1b"
    assert s["loss_max_rel_diff_vs_1f1b"]["pipeweaver"] == pytest.approx(0.001, rel=1e-3)
    assert s["schedules"]["optimus-coarse"]["n"] == 1  # a hung schedule keeps the rows it measured


def test_service_metrics_parse_and_delta() -> None:
    """The sidecar's Prometheus text: fallback counters by reason, and their increase between two scrapes."""
    from e2e_service import counter_delta, parse_metrics

    text = "\n".join(
        [
            "# HELP pipeweaver_fallback_plans_total Fallback plans, by why the searched plan was missing",
            "# TYPE pipeweaver_fallback_plans_total counter",
            'pipeweaver_fallback_plans_total{reason="deadline"} 3.0',
            'pipeweaver_fallback_plans_total{reason="error"} 0.0',
            'pipeweaver_plans_total{source="search"} 2.0',
            "process_cpu_seconds_total 1.5",
        ]
    )
    now = parse_metrics(text)
    assert now == {
        'pipeweaver_fallback_plans_total{reason="deadline"}': 3.0,
        'pipeweaver_fallback_plans_total{reason="error"}': 0.0,
        'pipeweaver_plans_total{source="search"}': 2.0,
    }
    before = {'pipeweaver_fallback_plans_total{reason="deadline"}': 1.0}
    assert counter_delta(now, before, "pipeweaver_fallback_plans_total") == {"deadline": 2.0}
    assert counter_delta(now, now, "pipeweaver_fallback_plans_total") == {}


def test_watchdog_thresholds() -> None:
    """A schedule is late past its limit plus the grace, or after a stall (twice as long before its first step)."""
    from types import SimpleNamespace

    from e2e_compare import Watchdog

    w = Watchdog.__new__(Watchdog)  # no thread: only the decision
    w.run = SimpleNamespace(args=SimpleNamespace(watchdog_s=60.0, stall_s=30.0))
    w.started, w.limit_s, w.last, w.label, w.stepped = 0.0, 40.0, 0.0, "start", False
    assert w.late(59.0) == ""  # before the first step: 2 x stall_s
    assert "no progress" in w.late(61.0)
    w.stepped, w.last = True, 50.0
    assert w.late(79.0) == ""
    assert "no progress" in w.late(81.0)
    w.last = 100.0
    assert "past its 40 s limit" in w.late(101.0)


def test_trace_ratios_per_stage_kind_from_a_committed_trace() -> None:
    """The committed run 13 trace: every (module, chunk, pass) of PipeWeaver's plan has a measured and a predicted
    mean, and the decoder's forward is the kind SEMU under-predicts most (docs/gpu.md section 6)."""
    from trace_ratios import kind_ratios

    root = Path(__file__).resolve().parents[2]
    rows = kind_ratios(root / "benchmarks/results/e2e_traces_run13/pipeweaver_it3.trace.json.gz")
    kinds = {r.kind for r in rows}
    assert kinds == {(m, c, p) for m in ("vit", "llm") for c in range(4) for p in ("F", "B")}
    assert all(r.computes == 16 and r.measured_ms > 0 and r.predicted_ms > 0 for r in rows)
    worst = max(rows, key=lambda r: r.ratio)
    assert worst.kind[0] == "llm" and worst.kind[2] == "F" and worst.ratio > 1.5
    with pytest.raises(ValueError, match="no 'semu_nothing' timeline"):
        kind_ratios(root / "benchmarks/results/e2e_traces_run13/pipeweaver_it3.trace.json.gz", "semu_nothing")


def test_offline_refit_reproduces_the_runs_calibrated_error_and_the_partition() -> None:
    """semu_offline.py on a committed run: its calibrated MAPE is the one the run reported, and the partitioner on
    the run's profile gives the K_i the run's sidecar used."""
    import json

    from semu_offline import partition, refit

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    run = json.loads((results / "e2e_compare_run21_h200x4.json").read_text())
    got = refit(run)
    for name, entry in got.items():
        reported = run["summary"]["semu_mape"][name]["calibrated"]["mape_pct"]
        assert entry["mape_pct"]["calibrated"] == round(reported, 1), name
        assert entry["iterations"] == 30
    part = partition(run)
    assert part is not None
    assert part["segments"] == run["schedules"]["pipeweaver"]["service"]["segments"]


def test_executor_overhead_runs_both_sides_on_gloo_and_counts_the_profiled_operators(tmp_path: Path) -> None:
    """benchmarks/gpu/executor_overhead.py on 2 gloo processes (--tiny): both executors train the same batches to
    the same loss, and --profile-dir records every rank's host operators per side."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "overhead.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(root / "benchmarks" / "gpu" / "executor_overhead.py"), "--tiny", "--configs", "64:4", "--schedules",
        "1f1b", "--iters", "2", "--warmup", "1", "--block", "1", "--profile-dir", str(tmp_path / "prof"),
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert case["loss_ours"] == pytest.approx(case["loss_torch"], rel=1e-5)
    ops = case["profiled_ops"]
    assert set(ops) == {"ours", "torch"}
    for side in ops.values():
        assert len(side["host_ops"]) == 2 and all(n > 100 for n in side["host_ops"])
    assert len(list((tmp_path / "prof").glob("*.json.gz"))) == 4


@pytest.mark.parametrize("key", ["vlm-large", "t2v-large"])
def test_large_sizes_build_partition_and_fit_the_h200(key: str) -> None:
    """The opt-in large e2e sizes (issue 10): ~1B + ~3B modules, a partition with every module on every rank,
    static memory that leaves room for activations under the planning cap, and a plan filling that cap that
    still fits an H200 by e2e_size_check.py's device estimate. The default sizes are untouched."""
    from e2e_size_check import (
        ACTIVATION_RATIO,
        DEVICE_BYTES_PER_PARAM,
        DEVICE_OVERHEAD_BYTES,
        USABLE_H200_BYTES,
        padded_batch,
    )
    from e2e_workload import PLANNING_H200, PLANNING_HARDWARE, SCALED_WORKLOADS

    from pipeweaver.search.planner import Planner, SearchConfig
    from pipeweaver.simulator.memory import static_memory

    wl = SCALED_WORKLOADS[key](microbatches=16)
    default = SCALED_WORKLOADS[key.removesuffix("-large")](microbatches=16)
    assert default.hardware is PLANNING_HARDWARE and default.name == key.replace("-large", "-scaled")
    assert wl.hardware is PLANNING_H200 and wl.name == key.replace("-large", "-scaled-large")
    assert wl.parallel == default.parallel and wl.dataset is default.dataset
    small, big = (m.layers * m.block_params() + m.pre_params() + m.post_params() for m in wl.model.modules)
    assert 0.9e9 < small < 1.3e9 and 2.8e9 < big < 3.3e9
    part = Planner(wl.model, wl.parallel, wl.hardware, config=SearchConfig(compare_baselines=())).partition
    assert {c.rank for c in part.placement.chunks} == set(range(wl.parallel.pp))
    for m in wl.model.modules:  # every module cut into pp * K_i chunks, each on one rank
        chunks = [c for c in part.placement.chunks if c.pipeline == m.name]
        assert len(chunks) == wl.parallel.pp * part.segments[m.name]
    static = static_memory(wl.model, wl.parallel, part.placement)
    assert max(s.total_bytes for s in static) < 0.25 * wl.hardware.memory_bytes  # room for activations
    for s in static:
        at_cap = (
            DEVICE_BYTES_PER_PARAM * s.params
            + ACTIVATION_RATIO * (wl.hardware.memory_bytes - s.total_bytes)
            + DEVICE_OVERHEAD_BYTES
        )
        assert at_cap < USABLE_H200_BYTES
    # torch's padded shapes exist for the run's batches, and the padded batch is what the shape says
    batches = [dynamic_batch(wl, seed=0, iteration=k) for k in range(4)]
    shape = (VLMShape if key.startswith("vlm") else T2VShape).of(wl.model, batches)
    padded = padded_batch(wl, shape, batches[0])
    assert len(padded.microbatches) == 16 and len(set(padded.microbatches)) == 1
