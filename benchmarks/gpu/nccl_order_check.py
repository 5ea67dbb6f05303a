"""Dry run of plans under NCCL's ordering rules (CPU only): does the executor's p2p order deadlock on NCCL?

    .venv/bin/python benchmarks/gpu/nccl_order_check.py benchmarks/gpu/data/e2e_plans.json.gz

`plan.validator` proves that every receive has its send and that each pair of ranks posts in the same order
(gloo semantics: a posted send completes on its own, buffered). NCCL is stricter: a send of a large tensor
cannot complete before its receive is posted, and ProcessGroupNCCL runs a rank pair's point-to-point groups one
after another on that pair's stream (both directions). So a send posted early blocks every later transfer between
the same two ranks, in both directions, until the peer posts the matching receive.
Model: the host of each rank walks its actions; a `CommBatch` whose tensors are all empty is never posted (the
executor skips empty tensors); a `Wait` blocks until its batch has completed; each rank pair has a FIFO of posted
batches per side, and a send/receive pair completes when both sit at the heads of their sides' FIFOs.
Checked against the 4 x H100 runs of 2026-11-27: 1f1b and interleaved-1f1b ran (no deadlock predicted), while
optimus-coarse and pipeweaver hung (NCCL watchdog, 45 s) as this model predicts.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import deque
from math import prod
from typing import Any

from pipeweaver.plan.export import plan_from_dict
from pipeweaver.plan.ir import CommBatch, Direction, Plan, Wait


def _nbytes(o: Any) -> int:
    return sum(prod(t.shape) * _ELEM.get(t.dtype, 4) for t in o.tensors)


_ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}


def nccl_dry_run(plan: Plan, eager_bytes: float, directed: bool = False) -> dict[str, Any]:
    """One FIFO of posted groups per rank (the process group's NCCL stream). The head group runs; a receive
    completes when its send has run (eagerly or matched); a send completes at once when the bytes already sent
    eagerly to that peer and not yet received, plus its own, fit in `eager_bytes` (NCCL's per-peer buffers), else
    it waits until the peer's running group holds the matching receive.

    `directed=True` models the proposed fix instead: one communicator (stream) per directed rank pair, so a rank
    has one FIFO per (peer, direction) and a transfer only queues behind transfers of the same direction.
    """
    ranks = plan.ranks
    n = len(ranks)
    pc = [0] * n
    fifo: dict[tuple[int, Any], deque[int]] = {}

    def lane(r: int, peer: int, d: Direction) -> Any:
        return (peer, d) if directed else None

    pending: dict[tuple[int, int], set[tuple[Any, Any, Direction]]] = {}
    size: dict[tuple[Any, Any], int] = {}
    peer_of: dict[tuple[int, Any, Any, Direction], int] = {}
    done: set[tuple[int, int]] = set()
    sent: set[tuple[Any, Any]] = set()  # edges whose send has run and whose receive has not
    inflight = [[0] * n for _ in range(n)]  # eager bytes r -> p not yet received
    for r, rp in enumerate(ranks):
        for act in rp.actions:
            if isinstance(act, CommBatch):
                live = [o for o in act.ops if any(prod(t.shape) > 0 for t in o.tensors)]
                pending[(r, act.handle)] = {(o.src, o.dst, o.direction) for o in live}
                for o in act.ops:
                    peer_of[(r, o.src, o.dst, o.direction)] = o.peer
                    size[(o.src, o.dst)] = _nbytes(o)
    progress = True
    while progress:
        progress = False
        for r in range(n):
            acts = ranks[r].actions
            while pc[r] < len(acts):
                act = acts[pc[r]]
                if isinstance(act, CommBatch):
                    if pending[(r, act.handle)]:
                        for key in {lane(r, peer_of[(r, a_, b_, d_)], d_) for a_, b_, d_ in pending[(r, act.handle)]}:
                            fifo.setdefault((r, key), deque()).append(act.handle)
                    else:
                        done.add((r, act.handle))
                elif isinstance(act, Wait) and (r, act.handle) not in done:
                    break
                pc[r] += 1
                progress = True
        for (r, key), q in list(fifo.items()):
            if not q:
                continue
            h = q[0]
            for src, dst, d in sorted(pending[(r, h)], key=lambda x: x[2].value):
                p = peer_of[(r, src, dst, d)]
                if lane(r, p, d) != key:
                    continue
                if d is Direction.SEND:
                    qp = fifo.get((p, lane(p, r, Direction.RECV)))
                    head_p = qp[0] if qp else None
                    matched = head_p is not None and (src, dst, Direction.RECV) in pending[(p, head_p)]
                    if matched:
                        pending[(r, h)].discard((src, dst, d))
                        pending[(p, head_p)].discard((src, dst, Direction.RECV))
                        progress = True
                    elif inflight[r][p] + size[(src, dst)] <= eager_bytes:
                        inflight[r][p] += size[(src, dst)]
                        sent.add((src, dst))
                        pending[(r, h)].discard((src, dst, d))
                        progress = True
                elif (src, dst) in sent:
                    sent.discard((src, dst))
                    inflight[p][r] -= size[(src, dst)]
                    pending[(r, h)].discard((src, dst, d))
                    progress = True
        for (r, key), q in fifo.items():
            while q and not any(lane(r, peer_of[(r, a_, b_, d_)], d_) == key for a_, b_, d_ in pending[(r, q[0])]):
                q.popleft()
                progress = True
        for (r, h), ops in pending.items():
            if not ops and (r, h) not in done and pc[r] > 0:
                done.add((r, h))
    ok = all(pc[r] == len(ranks[r].actions) for r in range(n)) and not any(fifo.values())
    stuck: dict[int, Any] = {}
    if not ok:
        for r in range(n):
            acts = ranks[r].actions
            heads = [q[0] for (rr, _), q in fifo.items() if rr == r and q]
            stuck[r] = {
                "at_action": pc[r],
                "of": len(acts),
                "blocked_on": str(acts[pc[r]]) if pc[r] < len(acts) else "end",
                "running_groups_wait_for": sorted(
                    {f"{d.value} {s}->{t}" for h in heads for s, t, d in pending[(r, h)]}
                ),
                "groups_queued": sum(len(q) for (rr, _), q in fifo.items() if rr == r),
            }
    return {"ok": ok, "stuck": stuck}


def main() -> None:
    path = sys.argv[1]
    eager = float(sys.argv[2]) * 2**20 if len(sys.argv) > 2 else 0.0
    directed = len(sys.argv) > 3 and sys.argv[3] == "directed"
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    summary: dict[str, list[int]] = {}
    first_stuck: dict[str, Any] = {}
    for e in data["iterations"]:
        for name, d in e["plans"].items():
            res = nccl_dry_run(plan_from_dict(d), eager, directed)
            summary.setdefault(name, [])
            if not res["ok"]:
                summary[name].append(e["iteration"])
                first_stuck.setdefault(name, {"iteration": e["iteration"], **res["stuck"]})
    for name, bad in summary.items():
        model = "directed-pair" if directed else "rank"
        row = {"schedule": name, "eager_mib": eager / 2**20, "model": model, "iterations": len(data["iterations"])}
        print(json.dumps(row | {"nccl_deadlock_iterations": bad}))
    for name, s in first_stuck.items():
        print(json.dumps({"schedule": name, "first_deadlock": s}, default=str)[:1500])


if __name__ == "__main__":
    main()
