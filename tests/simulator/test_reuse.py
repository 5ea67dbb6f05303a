"""Spatial-temporal reuse: the cache never changes a result, and recurring shapes become lookups."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver import presets
from pipeweaver.plan.ir import Chunk, LayerRange, Pass, PlanHeader, Recompute
from pipeweaver.plan.layouts import modular_placement, split_sub_microbatches
from pipeweaver.simulator.costmodel import ANY, ClassFactors, CostModel, EfficiencyFactors
from pipeweaver.simulator.ops import OpClass
from pipeweaver.simulator.reuse import StageCostCache, signature_instances, token_signature
from pipeweaver.spec import BatchMetadata, Document, Instance, MediaItem, Microbatch, Modality
from pipeweaver.spec.workload import Workload

WORKLOADS = {name: presets.workload(name) for name in ("vlm-s", "t2v-s", "tiny-vlm")}


def random_instances(rng: random.Random, w: Workload, module: str) -> tuple[Instance, ...]:
    m = w.model.module(module)
    if m.input is Modality.IMAGE:
        assert m.image is not None
        p = m.image.patches_per_image
        return tuple(
            Instance(tokens=p, attention_spans=(p,), output_tokens=m.image.tokens_per_image)
            for _ in range(rng.randint(1, 12))
        )
    if m.input is Modality.VIDEO:
        return tuple(
            Instance(
                tokens=(s := 16 * rng.randint(1, 64)),
                attention_spans=(s,),
                context_tokens=rng.randint(1, 300),
                output_tokens=s,
            )
            for _ in range(rng.randint(1, 4))
        )
    docs = tuple(rng.randint(1, 2000) for _ in range(rng.randint(1, 6)))
    return (Instance(tokens=sum(docs), attention_spans=docs, output_tokens=sum(docs)),)


def random_chunk(rng: random.Random, w: Workload) -> Chunk:
    modules = w.model.modules
    first = rng.randrange(len(modules))
    ranges = []
    for m in modules[first : first + rng.randint(1, 2)]:
        start = rng.randrange(m.layers)
        ranges.append(LayerRange(m.name, start, rng.randint(start + 1, m.layers)))
    return Chunk("p", 0, rng.randrange(w.parallel.pp), tuple(ranges))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(sorted(WORKLOADS)))
def test_cached_and_uncached_costs_are_bit_identical(seed: int, name: str) -> None:
    rng = random.Random(seed)
    w = WORKLOADS[name]
    cache = StageCostCache()
    cached = CostModel(w.model, w.parallel, w.hardware, cache=cache)
    plain = CostModel(w.model, w.parallel, w.hardware)
    for _ in range(6):
        chunk = random_chunk(rng, w)
        inst = {r.module: random_instances(rng, w, r.module) for r in chunk.layers}
        # Shuffled instance order is the same sub-microbatch: same signature, same cost.
        shuffled = {k: tuple(rng.sample(v, len(v))) for k, v in inst.items()}
        for pass_ in Pass:
            for rc in Recompute:
                want = plain.stage_time_ms(chunk, inst, pass_, rc)
                for by_module in (inst, shuffled, inst):  # the third is a hit
                    assert cached.stage_time_ms(chunk, by_module, pass_, rc) == want
        for rc in Recompute:
            assert cached.stage_activation_bytes(chunk, inst, rc) == plain.stage_activation_bytes(chunk, inst, rc)
        m = chunk.layers[0].module
        assert cached.layer_time_ms(m, inst[m], Pass.F) == plain.layer_time_ms(m, inst[m], Pass.F)
    assert cache.hits > 0


def test_token_signature_is_canonical() -> None:
    a = Instance(tokens=30, attention_spans=(10, 20), output_tokens=30)
    b = Instance(tokens=30, attention_spans=(20, 10), output_tokens=30)
    c = Instance(tokens=5, attention_spans=(5,), context_tokens=3, output_tokens=5)
    assert token_signature([a, c]) == token_signature([c, b])
    assert signature_instances(token_signature([a])) == (a,)


def vlm_batch(iteration: int, images: int) -> BatchMetadata:
    image = MediaItem(Modality.IMAGE, tokens=2704, merged_tokens=169)
    mbs = tuple(
        Microbatch((Document(500 + 100 * (j % 3), (image,) * (images + j % 5)), Document(800))) for j in range(8)
    )
    return BatchMetadata(iteration=iteration, microbatches=mbs)


def test_spatial_and_temporal_reuse_hit_rate() -> None:
    w = presets.workload("vlm-s")
    placement = modular_placement(w.model, w.parallel.pp, {"vit": 2, "llm": 1})
    cache = StageCostCache()
    cm = CostModel(w.model, w.parallel, w.hardware, cache=cache)

    def costs(iteration: int) -> dict[object, float]:
        batch = vlm_batch(iteration, images=12)
        subs = split_sub_microbatches(w.model, placement, batch, {"vit": 12})
        header = PlanHeader(
            job_id="t",
            iteration=iteration,
            placement=placement,
            sub_microbatches=subs,
            num_microbatches=8,
            schedule="test",
            split_backward=True,
        )
        return dict(cm.header_costs(header, batch).duration_ms)

    first = costs(0)
    spatial = cache.stats()
    # Spatial: equal-sized chunks on all ranks and repeated sub-microbatch shapes share entries, and a chunk of n
    # identical layers is one layer lookup.
    assert spatial.hit_rate > 0.5
    assert spatial.layers_served > 4 * (spatial.layer_hits + spatial.layer_misses)
    second = costs(1)  # the next iteration's batch has the same shapes: all stage lookups hit
    temporal = cache.stats()
    assert second == first
    assert temporal.stage_misses == spatial.stage_misses
    assert temporal.hit_rate > spatial.hit_rate
    print(
        f"\nreuse: {cache!r}; spatial hit rate {spatial.hit_rate:.1%}, after a second iteration "
        f"{temporal.hit_rate:.1%}; {temporal.layers_served} block evaluations from "
        f"{temporal.layer_hits + temporal.layer_misses} layer lookups"
    )
    cache.clear()
    assert len(cache) == 0 and cache.hits == 0 and cache.hit_rate == 0.0


def test_cost_contexts_never_mix() -> None:
    """Two cost models with different factors share a cache without seeing each other's entries."""
    w = presets.workload("vlm-s")
    slow = EfficiencyFactors.uncalibrated().with_entries({(ANY, ANY, OpClass.GEMM): ClassFactors(a_flop=3.0)})
    cache = StageCostCache()
    a = CostModel(w.model, w.parallel, w.hardware, cache=cache)
    b = CostModel(w.model, w.parallel, w.hardware, slow, cache=cache)
    inst = {"llm": (Instance(tokens=4096, attention_spans=(4096,)),)}
    chunk = Chunk("llm", 0, 0, (LayerRange("llm", 0, 8),))
    ta = a.stage_time_ms(chunk, inst, Pass.F)
    tb = b.stage_time_ms(chunk, inst, Pass.F)
    assert tb > ta
    assert a.stage_time_ms(chunk, inst, Pass.F) == ta
    assert CostModel(w.model, w.parallel, w.hardware, slow).stage_time_ms(chunk, inst, Pass.F) == tb


def test_bounded_cache_still_answers_correctly() -> None:
    w = presets.workload("tiny-vlm")
    cache = StageCostCache(max_entries=3)
    cm = CostModel(w.model, w.parallel, w.hardware, cache=cache)
    plain = CostModel(w.model, w.parallel, w.hardware)
    chunk = Chunk("llm", 0, 0, (LayerRange("llm", 0, 2),))
    for t in range(1, 20):
        inst = {"llm": (Instance(tokens=t, attention_spans=(t,)),)}
        assert cm.stage_time_ms(chunk, inst, Pass.B) == plain.stage_time_ms(chunk, inst, Pass.B)
    assert len(cache) <= 3


def test_models_sharing_a_cache_never_mix() -> None:
    """vlm-s and vlm-m both name their modules 'vit' and 'llm' (with other dims): stages stay apart."""
    cache = StageCostCache()
    chunk = Chunk("llm", 0, 0, (LayerRange("llm", 0, 8),))
    inst = {"llm": (Instance(tokens=4096, attention_spans=(4096,)),)}
    results = []
    for name in ("vlm-s", "vlm-m", "vlm-s"):
        w = presets.workload(name)
        parallel = replace(w.parallel, tp=4)
        cached = CostModel(w.model, parallel, w.hardware, cache=cache)
        plain = CostModel(w.model, parallel, w.hardware)
        got = cached.stage_time_ms(chunk, inst, Pass.F)
        assert got == plain.stage_time_ms(chunk, inst, Pass.F)
        results.append(got)
    assert results[0] != results[1] and results[0] == results[2]
