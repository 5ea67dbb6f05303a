"""The stage DAG a plan must respect, derived from its header alone.

Every (pipeline, chunk, microbatch, sub-microbatch, pass) is a stage. Edges carry data (activations forward,
gradients backward; a transfer when the two chunks sit on different ranks) or are local orderings (a chunk's
backward needs its own forward's activations; W needs I). The validator, SEMU, the baselines and the search
all walk this one graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pipeweaver.plan.ir import Pass, PlanHeader, StageKey


@dataclass(frozen=True, slots=True)
class StageGraph:
    stages: tuple[StageKey, ...]
    """Every stage the batch needs, in a deterministic topological order."""
    rank: dict[StageKey, int]
    preds: dict[StageKey, tuple[StageKey, ...]]
    """All predecessors (data and local)."""
    data_preds: dict[StageKey, tuple[StageKey, ...]]
    """Predecessors whose output this stage consumes (a transfer when ranks differ)."""
    succs: dict[StageKey, tuple[StageKey, ...]]

    def remote_inputs(self, stage: StageKey) -> tuple[StageKey, ...]:
        r = self.rank[stage]
        return tuple(p for p in self.data_preds[stage] if self.rank[p] != r)

    def remote_consumers(self, stage: StageKey) -> tuple[StageKey, ...]:
        r = self.rank[stage]
        return tuple(s for s in self.succs[stage] if stage in self.data_preds[s] and self.rank[s] != r)


def backward_passes(header: PlanHeader, pipeline: str) -> tuple[Pass, ...]:
    """The backward passes every chunk of `pipeline` runs: (), (B,), (I,) or (I, W)."""
    info = header.placement.pipeline(pipeline)
    if not info.backward:
        return ()
    if not header.split_backward:
        return (Pass.B,)
    return (Pass.I, Pass.W) if info.weight_grad else (Pass.I,)


def grad_pass(header: PlanHeader) -> Pass:
    """The pass that carries input gradients upstream."""
    return Pass.I if header.split_backward else Pass.B


def stage_graph(header: PlanHeader) -> StageGraph:
    placement = header.placement
    rank: dict[StageKey, int] = {}
    preds: dict[StageKey, list[StageKey]] = defaultdict(list)
    data: dict[StageKey, list[StageKey]] = defaultdict(list)
    order: list[StageKey] = []
    g = grad_pass(header)

    def add(stage: StageKey, r: int) -> None:
        rank[stage] = r
        order.append(stage)
        preds.setdefault(stage, [])
        data.setdefault(stage, [])

    def edge(src: StageKey, dst: StageKey, *, carries_data: bool) -> None:
        preds[dst].append(src)
        if carries_data:
            data[dst].append(src)

    # Forward stages, pipelines in declaration (DAG) order.
    for info in placement.pipelines:
        n = placement.num_chunks(info.name)
        for sub in header.sub_microbatches:
            if sub.pipeline != info.name:
                continue
            for c in range(n):
                stage = StageKey(info.name, c, sub.microbatch, sub.index, Pass.F)
                add(stage, placement.rank_of(info.name, c))
                if c > 0:
                    edge(StageKey(info.name, c - 1, sub.microbatch, sub.index, Pass.F), stage, carries_data=True)
                else:
                    for up in placement.upstream(info.name):
                        last = placement.num_chunks(up) - 1
                        for s in header.subs_of(up, sub.microbatch):
                            edge(StageKey(up, last, s.microbatch, s.index, Pass.F), stage, carries_data=True)

    # Backward stages, pipelines in reverse DAG order (gradients flow from the loss back to the inputs).
    for info in reversed(placement.pipelines):
        passes = backward_passes(header, info.name)
        if not passes:
            continue
        n = placement.num_chunks(info.name)
        downstream = [d for d in placement.downstream(info.name) if backward_passes(header, d)]
        for sub in header.sub_microbatches:
            if sub.pipeline != info.name:
                continue
            for c in reversed(range(n)):
                r = placement.rank_of(info.name, c)
                stage = StageKey(info.name, c, sub.microbatch, sub.index, g)
                add(stage, r)
                edge(stage.with_pass(Pass.F), stage, carries_data=False)
                if c < n - 1:
                    edge(StageKey(info.name, c + 1, sub.microbatch, sub.index, g), stage, carries_data=True)
                else:
                    for d in downstream:
                        for s in header.subs_of(d, sub.microbatch):
                            edge(StageKey(d, 0, s.microbatch, s.index, g), stage, carries_data=True)
                if Pass.W in passes:
                    w = stage.with_pass(Pass.W)
                    add(w, r)
                    edge(stage, w, carries_data=False)

    succs: dict[StageKey, list[StageKey]] = defaultdict(list)
    for dst, ps in preds.items():
        for p in ps:
            succs[p].append(dst)
    return StageGraph(
        stages=tuple(order),
        rank=rank,
        preds={k: tuple(v) for k, v in preds.items()},
        data_preds={k: tuple(v) for k, v in data.items()},
        succs={k: tuple(succs.get(k, ())) for k in order},
    )
