"""Turn per-rank compute orders into a full plan: batched sends and receives, and their waits.

Rules that keep any DAG-consistent order deadlock-free (the validator's dry run proves it per plan):
- a producer posts all sends of a stage's output right after computing it; send waits go last, so a send never
  blocks its rank while the receiver is still busy;
- a consumer posts each receive `receive_lookahead` computes ahead of the stage that needs it (default: right
  before it, see `RECEIVE_LOOKAHEAD`) and waits right before that stage; posts never block, so posting earlier
  cannot deadlock a plan that posting late would not;
- point-to-point ops between two ranks are matched in posting order (NCCL and gloo both do), so a receiver posts
  the transfers from each peer in the sender's order: a receive is posted no later than any later-sent one from
  that peer, and waited no later than any later-sent one's consumer.
"""

from __future__ import annotations

from collections import defaultdict
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

RECEIVE_LOOKAHEAD = 0
"""Computes between a receive's post and its consumer (fewer near the start of a rank's order). SEMU favours posting
one compute ahead (vlm-s 16.74 -> 16.31 s, t2v-s 32.32 -> 31.37 s: the transfer overlaps the compute in between),
but on GPUs a posted receive is an NCCL kernel that sits on the device until its data comes: on 4 H100s our 1F1B
ran 16.9% slower than torch's Schedule1F1B with receives posted one compute ahead and 3.3% slower with them posted
at their consumer, our interleaved 1F1B 10.8% vs 17.1% faster than torch's (`benchmarks/gpu/executor_overhead.py
--receive-lookaheads 1,0`, benchmarks/results/executor_overhead_lookahead_h100x4.json). SEMU does not yet charge
a waiting receive for the device time it takes."""


def assemble_plan(
    header: PlanHeader,
    compute_orders: Sequence[Sequence[Compute]],
    tensors: TensorsFn,
    *,
    graph: StageGraph | None = None,
    predicted_ms: Sequence[Sequence[tuple[float, float]]] | None = None,
    receive_lookahead: int = RECEIVE_LOOKAHEAD,
) -> Plan:
    """Build a `Plan` from each rank's compute order.

    Each receive is posted `receive_lookahead` computes before its consumer (0: right before it) and waited right
    before the consumer. `predicted_ms`, when given, holds each compute's predicted [start, end); communication
    actions get the time they are reached at: a send batch its producer's end, a receive post or wait the start of
    the compute it precedes.
    """
    if receive_lookahead < 0:
        raise ValueError(f"receive_lookahead must be 0 or more computes, got {receive_lookahead}")
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

    # Where each receive is posted and waited (compute indexes on the receiver), per pair in the sender's order.
    # Suffix minima keep both non-decreasing along a pair, so posting by (post, wait, peer, k) keeps its order.
    posts: list[list[tuple[int, int, int, int, Transfer]]] = [[] for _ in range(pp)]
    for (a, b), edges in sends.items():
        post = wait = len(compute_orders[b])
        for k in reversed(range(len(edges))):
            src, dst = edges[k]
            consumer = position[dst][1]
            wait = min(wait, consumer)
            post = min(post, max(0, consumer - receive_lookahead))
            posts[b].append((post, wait, a, k, Transfer(Direction.RECV, a, src, dst, tensors(src, dst))))

    ranks: list[RankPlan] = []
    for r, order in enumerate(compute_orders):
        # Receives that share a post and a wait form one batch; batches in posting order, by where they are posted.
        grouped: dict[tuple[int, int], list[Transfer]] = {}
        for post, wait, _, _, op in sorted(posts[r], key=lambda p: p[:4]):
            grouped.setdefault((post, wait), []).append(op)
        recvs_at: dict[int, list[tuple[int, tuple[Transfer, ...]]]] = defaultdict(list)
        for (post, wait), recv_ops in grouped.items():
            recvs_at[post].append((wait, tuple(recv_ops)))

        actions: list[Action] = []
        timing: list[tuple[float, float]] = []
        send_handles: list[int] = []
        waits_before: dict[int, list[int]] = defaultdict(list)
        handle = 0
        for i, c in enumerate(order):
            window = predicted_ms[r][i] if predicted_ms is not None else None
            for wait, batch in recvs_at.get(i, ()):
                actions.append(CommBatch(handle, batch))
                waits_before[wait].append(handle)
                handle += 1
            for h in waits_before.pop(i, ()):
                actions.append(Wait(h))
            if window is not None:  # the posts and waits just added are reached when this compute starts
                timing += [(window[0], window[0])] * (len(actions) - len(timing))
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
