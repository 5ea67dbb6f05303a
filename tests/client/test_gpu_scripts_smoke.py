"""CPU checks of the GPU benchmark helpers (benchmarks/gpu): torch's padded VLM stages compute our loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))

from e2e_torch_vlm import StageFeed, TorchVLMStage, VLMShape  # noqa: E402
from e2e_workload import scaled_vlm  # noqa: E402

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
        "batches": {"measured": [{"lm_tokens": 1000}] * 3},
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
