"""Turn per-rank compute orders into a full plan: batched sends and receives, and their waits.

Rules that keep any DAG-consistent order deadlock-free (the validator's dry run proves it per plan):
- a producer posts all sends of a stage's output right after computing it; send waits go last, so a send never
  blocks its rank while the receiver is still busy;
- a consumer posts its receives right before the stage that needs them, and waits at once;
- point-to-point ops between two ranks are matched in posting order (NCCL and gloo both do), so a receiver posts
  every earlier-sent transfer from that peer in the same batch, in the sender's order.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence

from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import (
    Action,
    CommBatch,
    Compute,
    Direction,
    Plan,
    PlanHeader,
    RankPlan,
    StageKey,
    TensorSpec,
    Transfer,
    Wait,
)

TensorsFn = Callable[[StageKey, StageKey], tuple[TensorSpec, ...]]


def assemble_plan(
    header: PlanHeader,
    compute_orders: Sequence[Sequence[Compute]],
    tensors: TensorsFn,
    *,
    graph: StageGraph | None = None,
    predicted_ms: Sequence[Sequence[tuple[float, float]]] | None = None,
) -> Plan:
    """Build a `Plan` from each rank's compute order.

    `predicted_ms`, when given, holds each compute's predicted [start, end); communication actions get the
    window of the compute they serve.
    """
    g = graph or stage_graph(header)
    pp = header.placement.pp
    if len(compute_orders) != pp:
        raise ValueError(f"compute_orders has {len(compute_orders)} ranks, placement has pp={pp}")
    position = {c.stage: (r, i) for r, order in enumerate(compute_orders) for i, c in enumerate(order)}
    # Remote consumers of each stage in the receivers' order (the order both sides post their ops in).
    consumers = {
        c.stage: sorted((s for s in g.remote_consumers(c.stage) if s in position), key=position.__getitem__)
        for order in compute_orders
        for c in order
    }

    # Sends from a to b in a's posting order: by producer position, then by consumer position on b.
    sends: dict[tuple[int, int], list[tuple[StageKey, StageKey]]] = defaultdict(list)
    for a, order in enumerate(compute_orders):
        for c in order:
            for dst in consumers[c.stage]:
                sends[(a, position[dst][0])].append((c.stage, dst))
    pending: dict[tuple[int, int], deque[tuple[StageKey, StageKey]]] = {k: deque(v) for k, v in sends.items()}

    ranks: list[RankPlan] = []
    for r, order in enumerate(compute_orders):
        actions: list[Action] = []
        timing: list[tuple[float, float]] = []
        send_handles: list[int] = []
        handle = 0
        received: set[tuple[StageKey, StageKey]] = set()
        for i, c in enumerate(order):
            window = predicted_ms[r][i] if predicted_ms is not None else None
            recv_ops: list[Transfer] = []
            for src in g.remote_inputs(c.stage):
                if (src, c.stage) in received:
                    continue
                a = g.rank[src]
                queue = pending[(a, r)]
                while True:  # post every earlier-sent transfer from `a` too, in a's order
                    s, d = queue.popleft()
                    recv_ops.append(Transfer(Direction.RECV, a, s, d, tensors(s, d)))
                    received.add((s, d))
                    if (s, d) == (src, c.stage):
                        break
            if recv_ops:
                actions.append(CommBatch(handle, tuple(recv_ops)))
                actions.append(Wait(handle))
                if window is not None:
                    timing += [(window[0], window[0])] * 2
                handle += 1
            actions.append(c)
            if window is not None:
                timing.append(window)
            send_ops = [
                Transfer(Direction.SEND, g.rank[dst], c.stage, dst, tensors(c.stage, dst)) for dst in consumers[c.stage]
            ]
            if send_ops:
                actions.append(CommBatch(handle, tuple(send_ops)))
                if window is not None:
                    timing.append((window[1], window[1]))
                send_handles.append(handle)
                handle += 1
        end = timing[-1][1] if timing else 0.0
        for h in send_handles:
            actions.append(Wait(h))
            if predicted_ms is not None:
                timing.append((end, end))
        ranks.append(RankPlan(rank=r, actions=tuple(actions), predicted_ms=tuple(timing)))
    return Plan(header=header, ranks=tuple(ranks))
