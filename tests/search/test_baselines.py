"""Baseline schedules: valid plans for every preset and random batches, static placements and orders, and the
bubble formulas of the schedules they implement (GPipe/1F1B, Megatron's interleaved 1F1B, ZB-H1, ZBV)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver import presets
from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.graph import stage_graph
from pipeweaver.plan.ir import Compute, Pass, Plan, PlanHeader, PlanSource, StageKey
from pipeweaver.plan.layouts import mixed_placement, whole_sub_microbatches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.search.baselines import (
    BASELINES,
    baseline_header,
    baseline_orders,
    baseline_placement,
    build_baseline_plan,
    layer_flops,
    nominal_batch,
)
from pipeweaver.search.baselines.interleaved import group_size
from pipeweaver.spec import (
    BatchMetadata,
    Document,
    LayerKind,
    MediaItem,
    Microbatch,
    Modality,
    ModelSpec,
    ModuleSpec,
    ParallelSpec,
    Workload,
)
from pipeweaver.spec.hardware import CPU, H800, HardwareSpec

NAMES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "optimus-coarse", "nnscaler-static")


def validate(plan: Plan) -> None:
    from pipeweaver.plan.validator import (
        validate as _validate,
    )  # imported late: written alongside the baselines

    _validate(plan)


def sample(workload: Workload, seed: int) -> BatchMetadata:
    from pipeweaver.datagen import sample_batch

    return sample_batch(workload, seed=seed)


def order_keys(orders: list[list[Compute]]) -> list[list[tuple[int, Pass, int, int]]]:
    """Orders without pipeline names: (chunk, pass, microbatch, sub) per rank."""
    return [[(c.stage.chunk, c.stage.pass_, c.stage.microbatch, c.stage.sub) for c in order] for order in orders]


# ---- helpers: a linear (one-module) model and text-only batches --------------------------------------------


def linear_model(layers: int) -> ModelSpec:
    llm = ModuleSpec(
        name="llm",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=layers,
        hidden=64,
        ffn_hidden=128,
        heads=4,
        kv_heads=4,
        vocab_size=64,
        lm_head=True,
    )
    return ModelSpec(name="linear", modules=(llm,))


def text_batch(m: int, tokens: int = 32) -> BatchMetadata:
    return BatchMetadata(iteration=0, microbatches=tuple(Microbatch((Document(tokens),)) for _ in range(m)))


def linear_plan(name: str, p: int, m: int) -> Plan:
    return build_baseline_plan(
        name,
        model=linear_model(4 * p),
        parallel=ParallelSpec(pp=p, microbatches=m, seq_len=64),
        batch=text_batch(m),
    )


def simulate_uniform(plan: Plan, cost: Callable[[StageKey], float]) -> tuple[float, float]:
    """(makespan_ms, bubble_fraction) under SEMU with free transfers."""
    from pipeweaver.simulator.engine import LinkModel, StageCosts, simulate

    stages = stage_graph(plan.header).stages
    costs = StageCosts(compute_ms={s: cost(s) for s in stages})
    result = simulate(plan, costs, link=LinkModel.zero(plan.header.placement.pp), use_numba=False)
    return result.makespan_ms, result.bubble_fraction


def per_stage(plan: Plan, f: float, i: float, w: float) -> Callable[[StageKey], float]:
    """Costs of one pipeline stage's worth of layers, split evenly across a rank's chunks (same total
    work)."""
    scale = plan.header.placement.pp / len(plan.header.placement.chunks)
    by_pass = {Pass.F: f * scale, Pass.I: i * scale, Pass.W: w * scale, Pass.B: (i + w) * scale}
    return lambda s: by_pass[s.pass_]


# ---- registry ----------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name() -> None:
    assert tuple(BASELINES) == NAMES
    assert all(BASELINES[n].name == n and BASELINES[n].description for n in NAMES)
    w = presets.tiny_vlm()
    with pytest.raises(KeyError, match="unknown baseline 'megatron'; choose one of"):
        build_baseline_plan("megatron", model=w.model, parallel=w.parallel, batch=sample(w, 0))


# ---- every preset ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(presets.WORKLOADS))
def test_every_baseline_is_valid_on_every_preset(preset: str) -> None:
    w = presets.workload(preset)
    batch = sample(w, seed=1)
    for name in NAMES:
        plan = build_baseline_plan(
            name, model=w.model, parallel=w.parallel, batch=batch, hardware=w.hardware, job_id="job"
        )
        validate(plan)
        h = plan.header
        assert (h.schedule, h.source, h.job_id, h.iteration) == (
            name,
            PlanSource.BASELINE,
            "job",
            batch.iteration,
        )
        assert h.num_microbatches == len(batch.microbatches)
        assert h.split_backward == (name in ("zb-h1", "zbv"))


# ---- random batches of tiny workloads ----------------------------------------------------------------------


@st.composite
def tiny_cases(draw: st.DrawFn) -> tuple[ModelSpec, ParallelSpec, BatchMetadata]:
    """A tiny VLM or T2V model (modules randomly frozen), pp in 1..4 and a batch of 1..6 microbatches with
    0..3 media items each (microbatches without media, and some without any work, are common)."""
    w = draw(st.sampled_from([presets.tiny_vlm, presets.tiny_t2v]))()
    frozen = draw(st.lists(st.booleans(), min_size=2, max_size=2))
    model = replace(w.model, modules=tuple(replace(m, frozen=f) for m, f in zip(w.model.modules, frozen, strict=True)))
    m = draw(st.integers(1, 6))
    parallel = replace(w.parallel, pp=draw(st.integers(1, 4)), microbatches=m)
    media_module = next(mod for mod in model.modules if mod.input is not Modality.TEXT)
    if media_module.image is not None:
        item = MediaItem(Modality.IMAGE, media_module.image.patches_per_image, media_module.image.tokens_per_image)
    else:
        assert media_module.video is not None
        item = MediaItem(Modality.VIDEO, media_module.video.tokens_for(draw(st.sampled_from([0.5, 2.0, 4.0]))))
    docs = st.builds(lambda t, k: Document(t, (item,) * k), st.integers(0, 40), st.integers(0, 3))
    mbs = st.lists(docs, min_size=1, max_size=2).map(lambda d: Microbatch(tuple(d)))
    batch = BatchMetadata(
        iteration=draw(st.integers(0, 9)), microbatches=tuple(draw(st.lists(mbs, min_size=m, max_size=m)))
    )
    return model, parallel, batch


@settings(max_examples=60, deadline=None)
@given(case=tiny_cases(), name=st.sampled_from(NAMES))
def test_random_tiny_batches_give_valid_plans(case: tuple[ModelSpec, ParallelSpec, BatchMetadata], name: str) -> None:
    model, parallel, batch = case
    plan = build_baseline_plan(name, model=model, parallel=parallel, batch=batch, hardware=CPU)
    validate(plan)
    # Every stage of the batch runs exactly once (the validator checks this too; this names the culprit).
    ran = sorted(str(s) for r in range(parallel.pp) for s in plan.compute_order(r))
    assert ran == sorted(str(s) for s in stage_graph(plan.header).stages)


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 20), v=st.sampled_from([2, 3]))
def test_interleaved_any_microbatch_count(p: int, m: int, v: int) -> None:
    """Megatron's virtual pipeline for m not a multiple of p (and m < p): valid, with
    Megatron's group sizes."""
    model = linear_model(v * p)
    placement = mixed_placement(model, p, v)
    batch = text_batch(m)
    header = PlanHeader(
        job_id="",
        iteration=0,
        placement=placement,
        num_microbatches=m,
        schedule="interleaved-1f1b",
        sub_microbatches=whole_sub_microbatches(model, placement, batch),
    )
    plan = assemble_plan(
        header,
        baseline_orders("interleaved-1f1b", header),
        TransferShapes(model, batch, header, dtype="float32").tensors,
    )
    validate(plan)
    n = group_size(m, p)
    if m >= p:  # Megatron's own constraints on microbatch_group_size_per_vp_stage
        assert p <= n <= m and (m % n == 0 or m % n >= p)
        assert n == p or m % p != 0
    else:
        assert n == m


# ---- static placement and order ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_placement_and_order_are_static(name: str) -> None:
    """Two batches with work in every pipeline of every microbatch: same placement, same order;
    shapes differ."""
    w = presets.tiny_vlm()
    img = MediaItem(Modality.IMAGE, 16, 4)
    a = BatchMetadata(0, tuple(Microbatch((Document(10 + j, (img,) * (1 + j % 3)),)) for j in range(8)))
    b = BatchMetadata(1, tuple(Microbatch((Document(90 - j, (img,) * (3 - j % 3)),)) for j in range(8)))
    pa = build_baseline_plan(name, model=w.model, parallel=w.parallel, batch=a)
    pb = build_baseline_plan(name, model=w.model, parallel=w.parallel, batch=b)
    assert pa.header.placement == pb.header.placement
    assert pa.header.placement == baseline_placement(name, model=w.model, parallel=w.parallel)
    assert [list(pa.compute_order(r)) for r in range(4)] == [list(pb.compute_order(r)) for r in range(4)]
    assert pa.ranks != pb.ranks  # the transfers' shapes follow each batch


def test_baseline_orders_match_the_plan() -> None:
    w = presets.tiny_t2v()
    batch = sample(w, 3)
    for name in NAMES:
        header = baseline_header(name, model=w.model, parallel=w.parallel, batch=batch)
        plan = build_baseline_plan(name, model=w.model, parallel=w.parallel, batch=batch)
        assert header == plan.header
        orders = baseline_orders(name, header)
        assert [[c.stage for c in o] for o in orders] == [list(plan.compute_order(r)) for r in range(w.parallel.pp)]


def test_placements_per_family() -> None:
    w = presets.tiny_vlm()
    pp = w.parallel.pp

    def place(name: str) -> list[tuple[str, int, int]]:
        p = baseline_placement(name, model=w.model, parallel=w.parallel)
        return [(c.pipeline, c.index, c.rank) for c in p.chunks]

    assert place("1f1b") == [("model", c, c) for c in range(pp)]
    assert place("interleaved-1f1b") == [("model", c, c % pp) for c in range(2 * pp)]
    assert place("zbv") == [("model", c, c if c < pp else 2 * pp - 1 - c) for c in range(2 * pp)]
    assert place("optimus-coarse") == [(m, c, c) for m in ("vit", "llm") for c in range(pp)]


def test_dtype_follows_hardware_unless_given() -> None:
    w = presets.tiny_vlm()
    batch = sample(w, 0)

    def dtypes(hardware: HardwareSpec | None = None, tensors_dtype: str | None = None) -> set[str]:
        plan = build_baseline_plan(
            "1f1b",
            model=w.model,
            parallel=w.parallel,
            batch=batch,
            hardware=hardware,
            tensors_dtype=tensors_dtype,
        )
        return {
            t.dtype for rp in plan.ranks for a in rp.actions if hasattr(a, "ops") for op in a.ops for t in op.tensors
        }

    assert dtypes(hardware=CPU) == {"float32"}
    assert dtypes(hardware=H800) == {"bfloat16"}
    assert dtypes() == {"bfloat16"}
    assert dtypes(hardware=CPU, tensors_dtype="float16") == {"float16"}


# ---- schedule structure ------------------------------------------------------------------------------------


def test_optimus_runs_encoder_forwards_first_and_encoder_backwards_last() -> None:
    w = presets.tiny_vlm()
    plan = build_baseline_plan("optimus-coarse", model=w.model, parallel=w.parallel, batch=sample(w, 2))
    for r in range(w.parallel.pp):
        order = plan.compute_order(r)
        kinds = [
            "enc-F" if s.pipeline == "vit" and s.pass_ is Pass.F else "enc-B" if s.pipeline == "vit" else "llm"
            for s in order
        ]
        first_llm, last_llm = kinds.index("llm"), len(kinds) - 1 - kinds[::-1].index("llm")
        assert set(kinds[:first_llm]) <= {"enc-F"} and "enc-F" not in kinds[first_llm:]
        assert set(kinds[last_llm + 1 :]) <= {"enc-B"} and "enc-B" not in kinds[:last_llm]
        # The backbone part on this rank is 1F1B: warm-up forwards = pp - 1 - r.
        llm = [s for s in order if s.pipeline == "llm"]
        assert [s.pass_ for s in llm[: w.parallel.pp - r]] == [Pass.F] * (w.parallel.pp - 1 - r) + [Pass.F]


def test_nnscaler_balances_the_representative_flops() -> None:
    """The FLOP-balanced cut has a lighter heaviest chunk than Megatron's parameter-balanced one on the batch
    it was cut for; without a representative batch a nominal one (a function of model and parallelism) stands
    in."""
    w = presets.vlm_s()
    rep = sample(w, 0)
    flops = layer_flops(w.model, rep)

    def heaviest(placement_chunks: tuple[int, ...]) -> float:
        out, pos = [], 0
        for size in placement_chunks:
            out.append(sum(flops[pos : pos + size]))
            pos += size
        return max(out)

    def sizes(name: str, representative: BatchMetadata | None) -> tuple[int, ...]:
        p = baseline_placement(name, model=w.model, parallel=w.parallel, representative=representative)
        return tuple(sum(r.stop - r.start for r in c.layers) for c in p.chunks)

    assert heaviest(sizes("nnscaler-static", rep)) < heaviest(sizes("1f1b", None))
    nominal = baseline_placement("nnscaler-static", model=w.model, parallel=w.parallel)
    assert nominal == baseline_placement(
        "nnscaler-static",
        model=w.model,
        parallel=w.parallel,
        representative=nominal_batch(w.model, w.parallel),
    )
    assert len(nominal_batch(w.model, w.parallel).microbatches) == w.parallel.microbatches


# ---- bubbles (SEMU, free transfers, uniform stages) --------------------------------------------------------


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_zb_h1_bubble_equals_the_zero_bubble_formula(p: int, k: int) -> None:
    """ZB-H1 leaves (p-1)(T_F + T_B - T_W) idle per rank (Qi et al., ICLR'24; T_B = input gradient) and ZBV at
    most that, with T_F = T_B = T_W; m = k*p and k*p + 1 microbatches."""
    t = 1.5
    for m in (k * p, k * p + 1):
        zb = linear_plan("zb-h1", p, m)
        makespan, bubble = simulate_uniform(zb, per_stage(zb, t, t, t))
        idle_per_rank = (p - 1) * (t + t - t)
        assert makespan == pytest.approx(3 * t * m + idle_per_rank)
        assert bubble == pytest.approx(idle_per_rank / (3 * t * m + idle_per_rank))
        zbv = linear_plan("zbv", p, m)
        _, zbv_bubble = simulate_uniform(zbv, per_stage(zbv, t, t, t))
        assert zbv_bubble <= bubble + 1e-12


@pytest.mark.parametrize("p", [2, 4, 8])
def test_gpipe_1f1b_interleaved_bubbles(p: int) -> None:
    """(p-1)/(m+p-1) for GPipe and 1F1B; (p-1)/v / (m + (p-1)/v) for Megatron's interleaved
    schedule (v = 2)."""
    for m in (p, 2 * p, 4 * p):
        for name in ("gpipe", "1f1b"):
            plan = linear_plan(name, p, m)
            assert simulate_uniform(plan, per_stage(plan, 1.0, 1.0, 1.0))[1] == pytest.approx((p - 1) / (m + p - 1))
        plan = linear_plan("interleaved-1f1b", p, m)
        _, bubble = simulate_uniform(plan, per_stage(plan, 1.0, 1.0, 1.0))
        assert bubble == pytest.approx((p - 1) / 2 / (m + (p - 1) / 2))


def test_public_surface() -> None:
    import pipeweaver.search.baselines as baselines

    assert set(baselines.__all__) == {
        "BASELINES",
        "INTERLEAVED_VIRTUAL",
        "BaselineSchedule",
        "baseline",
        "baseline_header",
        "baseline_orders",
        "baseline_placement",
        "build_baseline_plan",
        "layer_flops",
        "nominal_batch",
        "tensors_dtype_for",
    }
