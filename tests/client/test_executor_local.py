"""Single-process executor checks: pp 1 plans (every chunk on one rank, so every boundary is local and no process
group is needed), refusals, deterministic per-layer weights, and the package's public surface."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import pipeweaver.client as client
from pipeweaver import presets
from pipeweaver.client import PipelineExecutor, ReferenceModel
from pipeweaver.client.models import build_part, reference_modules
from pipeweaver.datagen import sample_batch
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.graph import stage_graph
from pipeweaver.plan.ir import Compute, Pass, Plan, PlanHeader, PlanSource, Recompute
from pipeweaver.plan.layouts import mixed_placement, modular_placement, split_sub_microbatches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.spec import BatchMetadata, ModelSpec, Workload

WORKLOADS = {"tiny-vlm": presets.tiny_vlm, "tiny-t2v": presets.tiny_t2v}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def small(name: str) -> Workload:
    wl = WORKLOADS[name](pp=1)
    return replace(wl, parallel=replace(wl.parallel, microbatches=3))


def local_plan(model: ModelSpec, batch: BatchMetadata, *, mixed: bool, split: bool) -> Plan:
    """pp 1: two chunks per module (or a mixed pipeline of 3 chunks), small sub-microbatches, recompute on two
    thirds of the units, all W passes last."""
    placement = (
        mixed_placement(model, 1, 3) if mixed else modular_placement(model, 1, {m.name: 2 for m in model.modules})
    )
    header = PlanHeader(
        job_id="local",
        iteration=batch.iteration,
        placement=placement,
        sub_microbatches=split_sub_microbatches(model, placement, batch, {"vit": 2, "dit": 1}),
        num_microbatches=len(batch.microbatches),
        schedule="local",
        source=PlanSource.SEARCH,
        split_backward=split,
    )
    graph = stage_graph(header)
    rule = (Recompute.FULL, Recompute.SELECTIVE, Recompute.NONE)
    order = [Compute(s, rule[(s.microbatch + s.sub) % 3]) for s in graph.stages if s.pass_ is not Pass.W]
    order += [Compute(s, rule[(s.microbatch + s.sub) % 3]) for s in graph.stages if s.pass_ is Pass.W]
    return assemble_plan(header, [order], TransferShapes(model, batch, header, dtype="float32").tensors, graph=graph)


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize(("mixed", "split"), [(False, False), (False, True), (True, True)])
def test_single_rank_plan_matches_reference(name: str, mixed: bool, split: bool) -> None:
    wl = small(name)
    batch = sample_batch(wl, seed=5)
    plan = local_plan(wl.model, batch, mixed=mixed, split=split)
    ex = PipelineExecutor(wl.model, plan.header.placement, 0)
    stats = ex.run_iteration(plan, batch)
    ref = ReferenceModel(wl.model).step(batch)
    assert stats.loss == pytest.approx(ref.loss, rel=1e-5)
    grads = ex.gradients()
    assert set(grads) == set(ref.grads)
    for k, want in ref.grads.items():
        torch.testing.assert_close(grads[k], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=k)
    assert stats.sent_bytes == stats.received_bytes == 0


def test_refuses_a_plan_for_another_placement_or_batch_before_touching_tensors() -> None:
    wl = small("tiny-vlm")
    batch = sample_batch(wl, seed=5)
    plan = local_plan(wl.model, batch, mixed=False, split=False)
    other = local_plan(wl.model, batch, mixed=True, split=False)
    ex = PipelineExecutor(wl.model, other.header.placement, 0)
    with pytest.raises(InvalidPlan, match="another placement"):
        ex.run_iteration(plan, batch)
    ex = PipelineExecutor(wl.model, plan.header.placement, 0)
    with pytest.raises(InvalidPlan, match="another batch"):
        ex.run_iteration(plan, sample_batch(wl, seed=6))
    broken = replace(plan, ranks=(replace(plan.ranks[0], actions=plan.ranks[0].actions[1:]),))
    with pytest.raises(InvalidPlan):
        ex.run_iteration(broken, batch)
    assert all(p.grad is None for p in ex.parameters())


def test_a_plan_prepared_ahead_is_not_checked_again_and_the_idle_hook_runs_once_per_iteration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wl = small("tiny-vlm")
    batches = [sample_batch(wl, seed=s) for s in (5, 6)]
    plans = [local_plan(wl.model, b, mixed=False, split=False) for b in batches]
    ex = PipelineExecutor(wl.model, plans[0].header.placement, 0)
    checks: list[int] = []
    real_check = ex._check

    def counting_check(plan: Plan, batch: BatchMetadata) -> object:
        checks.append(batch.iteration)
        return real_check(plan, batch)

    ex._check = counting_check  # type: ignore[method-assign]
    hook_calls: list[int] = []

    def hook() -> None:  # what PlanPrefetcher.prepare_arrived does: check the next iteration's plan
        hook_calls.append(len(checks))
        ex.prepare(plans[1], batches[1])

    ex.idle_hook = hook
    first = ex.run_with_fallback(plans[0], batches[0], lambda b: plans[0])
    assert len(checks) == 2 and hook_calls == [1]  # this plan, then the next one inside the hook
    assert 0 < first.hook_check_ms <= first.idle_hook_ms and first.hook_warm_ms == 0.0  # no kernels to load on CPU
    second = ex.run_with_fallback(plans[1], batches[1], lambda b: plans[1])
    assert len(checks) == 2 and second.fallback_reason == ""  # checked ahead: not again
    # A different batch for the same plan is still refused, and the cache stays bounded.
    with pytest.raises(InvalidPlan, match="another batch"):
        ex.prepare(plans[1], batches[0])
    for seed in range(7, 14):
        b = sample_batch(wl, seed=seed)
        ex.prepare(local_plan(wl.model, b, mixed=False, split=False), b)
    assert len(ex._checked) == client.executor.CHECKED_PLANS

    def broken() -> None:
        raise RuntimeError("planner client trouble")

    ex.idle_hook = broken  # a failing hook is logged; the iteration still completes
    with caplog.at_level("WARNING", logger="pipeweaver.client"):
        stats = ex.run_iteration(plans[0], batches[0])
    assert stats.computes > 0 and "idle hook failed" in caplog.text


def test_weights_depend_on_the_layer_not_on_the_rank_or_placement() -> None:
    model = presets.tiny_vlm().model
    modules = reference_modules(model)
    a = build_part(modules["llm"], 3, seed=0)
    b = build_part(modules["llm"], 3, seed=0)
    c = build_part(modules["llm"], 4, seed=0)
    assert a is not None and b is not None and c is not None
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(p, q), n
        assert not torch.equal(p, r), n
    ex = PipelineExecutor(model, modular_placement(model, 4), 2)
    ref = dict(ReferenceModel(model).named_parameters())
    for name, p in ex.named_parameters():
        assert torch.equal(p, ref[name]), name


def test_public_surface() -> None:
    assert sorted(client.__all__) == [
        "BlockPart",
        "Geometry",
        "IterationStats",
        "JobRegistration",
        "LayerTiming",
        "LossScale",
        "ModalityModule",
        "Piece",
        "PipelineExecutor",
        "PlanPrefetcher",
        "PlanReply",
        "PlanStream",
        "PlannedBatch",
        "PlannerClient",
        "PostOutput",
        "PostPart",
        "PrePart",
        "PrefetchStats",
        "ReferenceModel",
        "ReferenceResult",
        "RetryPolicy",
        "RpcFailure",
        "SimulationResult",
        "Stream",
        "SyntheticData",
        "TextGeometry",
        "TimedExecutor",
        "TimingReport",
        "VideoGeometry",
        "VisionGeometry",
        "assemble_plan_replies",
        "batch_metadata",
        "profile_layers",
        "reference_modules",
        "reference_step",
        "rpc_failure",
        "wire_dtype",
    ]
    for name in client.__all__:  # the gRPC side loads lazily; every name must still resolve
        assert getattr(client, name) is not None, name


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("split", [False, True])
def test_offloading_plan_gives_the_gradients_of_the_same_plan_without(device: str, name: str, split: bool) -> None:
    """The local plan with every NONE and SELECTIVE unit offloading its forward (prefetched a compute or more
    ahead, or right before the backward): the same loss and gradients as the plan without offloading, on this
    machine's CPU and, where there is one, a CUDA device (side streams, pinned host memory)."""
    from pipeweaver.plan.offload import place_prefetches

    wl = small(name)
    batch = sample_batch(wl, seed=5)
    plain = local_plan(wl.model, batch, mixed=False, split=split)
    ranks = []
    for rp in plain.ranks:
        actions = tuple(
            replace(a, offload=a.stage.pass_ is Pass.F and a.recompute is not Recompute.FULL)
            if isinstance(a, Compute)
            else a
            for a in rp.actions
        )
        ranks.append(replace(rp, actions=actions))
    stages = [a.stage for a in plain.ranks[0].actions if isinstance(a, Compute)]
    copies = {s: float(s.microbatch) for s in stages if s.pass_ is Pass.F}  # microbatch 0: right before
    offloaded = place_prefetches(replace(plain, ranks=tuple(ranks)), dict.fromkeys(stages, 1.0), copies)
    assert offloaded.offloaded()
    results = []
    for plan in (plain, offloaded):
        ex = PipelineExecutor(wl.model, plan.header.placement, 0, device=torch.device(device))
        stats = ex.run_iteration(plan, batch)
        results.append((stats, ex.gradients()))
    (base, want), (stats, got) = results
    assert stats.offloaded_bytes > 0 and base.offloaded_bytes == 0
    assert stats.loss == pytest.approx(base.loss, rel=1e-6)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-6, atol=1e-6 * float(w.abs().max()), msg=k)
