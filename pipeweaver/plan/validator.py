"""Prove that a plan runs, before a trainer finds out by hanging or by computing a wrong gradient.

Structural checks come first: every stage once on its rank, backward memory strategy equal to forward's, every
cross-rank data edge sent and received exactly once, per-peer posting orders and shapes that agree. Then a dry
run walks all ranks with NCCL/gloo rendezvous semantics and finds use-before-receive and deadlocks. An error
names the defect on its first line and renders the rank-by-step grid with the offending cells marked.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.grid import render_grid
from pipeweaver.plan.ir import (
    CommBatch,
    Compute,
    Direction,
    Pass,
    Plan,
    Prefetch,
    Recompute,
    StageKey,
    TensorSpec,
    Transfer,
    Wait,
)

Edge = tuple[StageKey, StageKey]
"""A data edge: (producer, consumer)."""
Pair = tuple[int, int]
"""An ordered rank pair: (sender, receiver)."""
Cell = tuple[int, int]
"""A grid cell: (rank, step)."""


@dataclass(frozen=True, slots=True)
class _Posted:
    """One transfer where a rank posts it."""

    rank: int
    step: int
    handle: int
    op: Transfer
    k: int
    """Position among the same-direction ops of its (sender, receiver) pair, in posting order."""

    @property
    def is_send(self) -> bool:
        return self.op.direction is Direction.SEND

    @property
    def pair(self) -> Pair:
        return (self.rank, self.op.peer) if self.is_send else (self.op.peer, self.rank)

    @property
    def edge(self) -> Edge:
        return (self.op.src, self.op.dst)

    @property
    def where(self) -> str:
        return f"comm#{self.handle} at step {self.step}"


def _where(r: int, h: int, i: int) -> str:
    """Where an op sits, for messages only (formatted when a check fails, not for every op)."""
    return f"rank {r} comm#{h} (step {i})"


Communicators = Literal["pairs", "pipeline"]
"""How an executor maps transfers onto communicators (NCCL runs one communicator's groups in order):
`pairs`, one per directed rank pair (`PipelineExecutor`'s default on NCCL), or `pipeline`, one for the whole
pipeline (torch's schedules; `pair_groups=False`), where every batch of a rank waits for the one before it."""


def validate(plan: Plan, *, graph: StageGraph | None = None, communicators: Communicators = "pairs") -> None:
    """Raise `InvalidPlan` unless every rank of `plan` can run its actions to the end with matched transfers.

    `graph` must be `stage_graph(plan.header)`; pass it when you already have it. `communicators="pipeline"`
    also proves the plan on one communicator per pipeline (`_StreamDryRun`), which fewer plans pass.
    """
    _Checker(plan, graph or stage_graph(plan.header), communicators).run()


def runs_on_one_communicator(plan: Plan, *, graph: StageGraph | None = None) -> bool:
    """`validate(plan)` (raising as it does), then whether `communicators="pipeline"` would pass too: one pass over
    the plan's indexes for both answers."""
    checker = _Checker(plan, graph or stage_graph(plan.header))
    checker.run()
    try:
        _StreamDryRun(checker).run()
    except InvalidPlan:
        return False
    return True


def _ordinal(k: int) -> str:
    n = k + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _tensors_text(tensors: Sequence[TensorSpec]) -> str:
    return "[" + ", ".join(f"{t.dtype}{list(t.shape)}" for t in tensors) + "]"


class _Checker:
    """One validation: builds O(actions) indexes once, raises on the first defect."""

    def __init__(self, plan: Plan, graph: StageGraph, communicators: Communicators = "pairs") -> None:
        self.plan = plan
        self.g = graph
        self.communicators = communicators
        self.computes: dict[StageKey, tuple[int, int, Compute]] = {}
        """stage -> (rank, step, action)."""
        self.sends: dict[Edge, _Posted] = {}
        self.recvs: dict[Edge, _Posted] = {}
        self.pair_sends: dict[Pair, list[_Posted]] = defaultdict(list)
        self.pair_recvs: dict[Pair, list[_Posted]] = defaultdict(list)
        self.batches: dict[tuple[int, int], list[_Posted]] = {}
        """(rank, handle) -> the batch's ops."""
        self.waits: dict[tuple[int, int], int] = {}
        """(rank, handle) -> step of the batch's wait."""

    def run(self) -> None:
        self._check_ranks()
        self._check_computes()
        self._check_missing()
        self._check_recompute()
        self._check_offload()
        self._check_comms()
        self._check_edges()
        self._check_pairs()
        _DryRun(self).run()
        if self.communicators == "pipeline":
            _StreamDryRun(self).run()

    def fail(self, defect: str, detail: str, marks: Sequence[Cell] = ()) -> NoReturn:
        h = self.plan.header
        raise InvalidPlan(
            f"{defect}: {detail}\n"
            f"plan '{h.job_id}' iteration {h.iteration} ({h.schedule}), {len(self.plan.ranks)} ranks:\n"
            + render_grid(self.plan, marks)
        )

    # ---- (a) ranks and computes ---------------------------------------------------------------------------

    def _check_ranks(self) -> None:
        pp, n_ranks = self.plan.header.placement.pp, len(self.plan.ranks)
        if n_ranks != pp:
            self.fail("rank count", f"the plan has {n_ranks} rank lists but the placement has pp={pp}")
        for r, rp in enumerate(self.plan.ranks):
            if rp.rank != r:
                self.fail("rank order", f"plan.ranks[{r}] holds rank {rp.rank}; list ranks 0..{pp - 1} in order")
            n, m = len(rp.predicted_ms), len(rp.actions)
            if n and n != m:
                self.fail(
                    "predicted_ms length",
                    f"rank {r} has {n} predicted windows for {m} actions; give one per action or none",
                    [(r, min(n, m))],
                )

    def _check_computes(self) -> None:
        g = self.g
        for r, rp in enumerate(self.plan.ranks):
            for i, action in enumerate(rp.actions):
                if not isinstance(action, Compute):
                    continue
                s = action.stage
                if s not in g.rank:
                    self.fail(
                        "extra action",
                        f"rank {r} runs {s} at step {i}, which is not a stage of this batch (no such "
                        "pipeline, chunk, microbatch or sub-microbatch, or a pass this plan does not run)",
                        [(r, i)],
                    )
                if g.rank[s] != r:
                    self.fail(
                        "wrong rank",
                        f"rank {r} runs {s} at step {i}, but chunk {s.chunk} of pipeline '{s.pipeline}' "
                        f"is placed on rank {g.rank[s]}",
                        [(r, i)],
                    )
                if s in self.computes:
                    j = self.computes[s][1]
                    self.fail("duplicate action", f"rank {r} runs {s} twice (steps {j} and {i})", [(r, j), (r, i)])
                self.computes[s] = (r, i, action)

    def _check_missing(self) -> None:
        g = self.g
        for s in g.stages:
            if s in self.computes:
                continue
            r = g.rank[s]
            needers = sorted((self.computes[t][1], t) for t in g.succs[s] if self.computes.get(t, (-1,))[0] == r)
            if needers:
                step, needer = needers[0]
                detail = f"{s} is never computed; rank {r} runs {needer} at step {step}, which needs it"
            else:
                step, detail = (
                    len(self.plan.ranks[r].actions),
                    f"{s} is never computed; it belongs on rank {r}",
                )
            self.fail("missing action", detail, [(r, step)])

    # ---- (b) memory strategy ------------------------------------------------------------------------------

    def _check_recompute(self) -> None:
        for s, (r, i, action) in self.computes.items():
            if not s.pass_.is_backward:
                continue
            fr, fi, forward = self.computes[s.with_pass(Pass.F)]
            if forward.recompute is not action.recompute:
                self.fail(
                    "recompute mismatch",
                    f"rank {r} runs {s} with recompute '{action.recompute.value}' but its forward "
                    f"{forward.stage} ran with '{forward.recompute.value}'; a backward must use its "
                    "forward's memory strategy",
                    [(r, i), (fr, fi)],
                )

    def _check_offload(self) -> None:
        """An offloading forward keeps NONE or SELECTIVE activations of a pair that has a backward; its rank
        prefetches them once, after the forward and before the pair's first backward pass (B, or I)."""
        g = self.g
        wanted: dict[StageKey, tuple[int, int]] = {}
        """First backward pass of each offloaded pair -> (rank, step) of its forward."""
        for s, (r, i, action) in self.computes.items():
            if not action.offload:
                continue
            if s.pass_ is not Pass.F:
                self.fail(
                    "offload on a backward", f"rank {r} marks {s} (step {i}) offload; only a forward can", [(r, i)]
                )
            if action.recompute is Recompute.FULL:
                self.fail(
                    "offload with full recompute",
                    f"rank {r} offloads {s} (step {i}) under full recompute; offload keeps the activations of "
                    "recompute 'none' or 'selective'",
                    [(r, i)],
                )
            first = next((s.with_pass(p) for p in (Pass.B, Pass.I) if s.with_pass(p) in g.rank), None)
            if first is None:
                self.fail(
                    "offload without backward", f"rank {r} offloads {s} (step {i}), which has no backward", [(r, i)]
                )
            wanted[first] = (r, i)
        for r, rp in enumerate(self.plan.ranks):
            for i, prefetch in enumerate(rp.actions):
                if not isinstance(prefetch, Prefetch):
                    continue
                b = prefetch.stage
                if b not in wanted:
                    self.fail(
                        "prefetch without offload",
                        f"rank {r} prefetches for {b} at step {i}, which is not the first backward pass of an "
                        "offloaded stage pair",
                        [(r, i)],
                    )
                fr, fi = wanted.pop(b)
                _, bi, _ = self.computes[b]
                if fr != r or not fi < i < bi:
                    self.fail(
                        "prefetch out of place",
                        f"rank {r} prefetches for {b} at step {i}; it must come on rank {fr} after the forward "
                        f"(step {fi}) and before {b} (step {bi})",
                        [(r, i), (fr, fi), (fr, bi)],
                    )
        for b, (r, i) in wanted.items():
            step = self.computes[b][1]
            self.fail(
                "missing prefetch",
                f"rank {r} offloads {b.with_pass(Pass.F)} (step {i}) but never prefetches for {b} (step {step})",
                [(r, i), (r, step)],
            )

    # ---- (c) transfers, batches and waits -----------------------------------------------------------------

    def _check_comms(self) -> None:
        for r, rp in enumerate(self.plan.ranks):
            handles: dict[int, int] = {}
            for i, action in enumerate(rp.actions):
                if isinstance(action, CommBatch):
                    self._check_batch(r, i, action, handles)
                elif isinstance(action, Wait):
                    self._check_wait(r, i, action.handle, handles)
            for h, i in handles.items():
                if (r, h) not in self.waits:
                    self.fail("missing wait", f"rank {r} posts comm#{h} at step {i} but never waits on it", [(r, i)])

    def _check_wait(self, r: int, i: int, h: int, handles: dict[int, int]) -> None:
        if h not in handles:
            self.fail("wait without batch", f"rank {r} reaches wait#{h} at step {i} before any comm#{h}", [(r, i)])
        if (r, h) in self.waits:
            j = self.waits[(r, h)]
            self.fail("duplicate wait", f"rank {r} waits on comm#{h} twice (steps {j} and {i})", [(r, j), (r, i)])
        self.waits[(r, h)] = i

    def _check_batch(self, r: int, i: int, batch: CommBatch, handles: dict[int, int]) -> None:
        h = batch.handle
        if h in handles:
            j = handles[h]
            self.fail("duplicate handle", f"rank {r} posts comm#{h} twice (steps {j} and {i})", [(r, j), (r, i)])
        handles[h] = i
        if not batch.ops:
            self.fail("empty batch", f"rank {r} posts comm#{h} at step {i} with no transfers", [(r, i)])
        posted: list[_Posted] = []
        for op in batch.ops:
            self._check_op(r, i, h, op)
            send = op.direction is Direction.SEND
            book = self.sends if send else self.recvs
            first = book.get((op.src, op.dst))
            if first is not None:
                self.fail(
                    f"duplicate {op.direction.value}",
                    f"{op.src}->{op.dst} is {'sent' if send else 'received'} twice: by rank {first.rank} in "
                    f"{first.where} and by rank {r} in comm#{h} at step {i}",
                    [(first.rank, first.step), (r, i)],
                )
            queue = self.pair_sends[(r, op.peer)] if send else self.pair_recvs[(op.peer, r)]
            p = _Posted(rank=r, step=i, handle=h, op=op, k=len(queue))
            queue.append(p)
            book[p.edge] = p
            posted.append(p)
        self.batches[(r, h)] = posted

    def _check_op(self, r: int, i: int, h: int, op: Transfer) -> None:
        g, src, dst = self.g, op.src, op.dst
        rank_src, rank_dst = g.rank.get(src), g.rank.get(dst)
        if rank_src is None or rank_dst is None or src not in g.data_preds[dst]:
            self.fail("not a data edge", f"{_where(r, h, i)} carries {op}, but {dst} does not consume {src}", [(r, i)])
        if rank_src == rank_dst:
            self.fail("local transfer", f"{_where(r, h, i)} carries {op}, but both run on rank {rank_src}", [(r, i)])
        if op.direction is Direction.SEND:
            owner, peer, role = rank_src, rank_dst, "producer"
        else:
            owner, peer, role = rank_dst, rank_src, "consumer"
        if r != owner:
            self.fail("wrong rank", f"{_where(r, h, i)} carries {op}, but its {role} runs on rank {owner}", [(r, i)])
        if op.peer != peer:
            self.fail("wrong peer", f"{_where(r, h, i)} carries {op}, but the peer stage runs on rank {peer}", [(r, i)])

    def _check_edges(self) -> None:
        """Every cross-rank data edge has its send and its receive."""
        g = self.g
        for dst in g.stages:
            for src in g.remote_inputs(dst):
                send, recv = self.sends.get((src, dst)), self.recvs.get((src, dst))
                a, b = g.rank[src], g.rank[dst]
                if send is None and recv is None:
                    self.fail(
                        "missing transfer",
                        f"{src}->{dst} crosses from rank {a} to rank {b} but is neither sent nor received",
                        [(b, self.computes[dst][1])],
                    )
                if recv is None:
                    assert send is not None
                    self.fail(
                        "missing recv",
                        f"rank {a} sends {src}->{dst} in {send.where} but rank {b} never receives it",
                        [(a, send.step)],
                    )
                if send is None:
                    self.fail(
                        "missing send",
                        f"rank {b} receives {src}->{dst} in {recv.where} but rank {a} never sends it",
                        [(b, recv.step)],
                    )

    # ---- (d) per-peer order and shapes --------------------------------------------------------------------

    def _check_pairs(self) -> None:
        """The k-th send from a to b and the k-th receive on b from a are one transfer, alike in shape."""
        for (a, b), sends in sorted(self.pair_sends.items()):
            recvs = self.pair_recvs[(a, b)]
            if len(sends) != len(recvs):  # unreachable after _check_edges; kept so this check stands alone
                self.fail(
                    "unmatched transfers",
                    f"rank {a} sends {len(sends)} to rank {b}, which receives {len(recvs)}",
                )
            for k, (s, v) in enumerate(zip(sends, recvs, strict=True)):
                marks = [(a, s.step), (b, v.step)]
                if s.edge != v.edge:
                    self.fail(
                        "order mismatch",
                        f"rank {a}'s {_ordinal(k)} send to rank {b} is {s.op.src}->{s.op.dst} ({s.where}) "
                        f"but rank {b}'s {_ordinal(k)} receive from rank {a} is {v.op.src}->{v.op.dst} "
                        f"({v.where}); point-to-point ops between two ranks match in posting order",
                        marks,
                    )
                if s.op.tensors != v.op.tensors:
                    ns, nv = len(s.op.tensors), len(v.op.tensors)
                    self.fail(
                        "shape mismatch",
                        f"rank {a} sends {s.op.src}->{s.op.dst} as {_tensors_text(s.op.tensors)} ({s.where}) "
                        f"but rank {b} receives it into {_tensors_text(v.op.tensors)} ({v.where})"
                        + (f": {ns} tensors vs {nv}" if ns != nv else ""),
                        marks,
                    )


class _DryRun:
    """Every rank runs until it blocks on a wait; it resumes when a peer posts what the wait needs.

    Computes and batch posts never block; a send is matched once the peer posted the matching receive and a
    receive once the peer posted the matching send (rendezvous, as NCCL and gloo behave).
    """

    def __init__(self, checker: _Checker) -> None:
        self.c = checker
        self.ranks = checker.plan.ranks
        self.pos = [0] * len(self.ranks)
        self.done: set[StageKey] = set()
        self.delivered: set[Edge] = set()
        """Edges whose receive has completed (its wait passed) on the consumer's rank."""
        self.posted_sends: dict[Pair, int] = defaultdict(int)
        self.posted_recvs: dict[Pair, int] = defaultdict(int)

    def matched(self, p: _Posted) -> bool:
        return (self.posted_recvs if p.is_send else self.posted_sends)[p.pair] > p.k

    def run(self) -> None:
        ready = deque(range(len(self.ranks)))
        queued = [True] * len(self.ranks)
        while ready:
            r = ready.popleft()
            queued[r] = False
            actions = self.ranks[r].actions
            while self.pos[r] < len(actions):
                i, action = self.pos[r], actions[self.pos[r]]
                if isinstance(action, Compute):
                    self.check_inputs(r, i, action.stage)
                    self.done.add(action.stage)
                elif isinstance(action, CommBatch):
                    for p in self.c.batches[(r, action.handle)]:
                        self.post(p)
                        if not queued[p.op.peer]:
                            queued[p.op.peer] = True
                            ready.append(p.op.peer)
                elif isinstance(action, Prefetch):
                    pass  # a copy on the side: never blocks
                else:
                    ops = self.c.batches[(r, action.handle)]
                    if not all(self.matched(p) for p in ops):
                        break
                    self.delivered.update(p.edge for p in ops if not p.is_send)
                self.pos[r] += 1
        self.check_finished()

    def post(self, p: _Posted) -> None:
        if not p.is_send:
            self.posted_recvs[p.pair] += 1
            return
        if p.op.src not in self.done:
            j = self.c.computes[p.op.src][1]
            self.c.fail(
                "send before compute",
                f"rank {p.rank} sends {p.op.src}->{p.op.dst} in {p.where}, before computing {p.op.src} (step {j})",
                [(p.rank, p.step), (p.rank, j)],
            )
        self.posted_sends[p.pair] += 1

    def check_inputs(self, r: int, i: int, stage: StageKey) -> None:
        g, c = self.c.g, self.c
        for p in g.preds[stage]:
            if g.rank[p] != r:  # a remote producer: its receive must have completed here
                if (p, stage) in self.delivered:
                    continue
                recv = c.recvs[(p, stage)]
                wait = c.waits[(r, recv.handle)]
                late = f"wait#{recv.handle} comes at step {wait}" if recv.step < i else f"{recv.where} comes later"
                c.fail(
                    "use before receive",
                    f"rank {r} runs {stage} at step {i}, which consumes {p} before its receive completed ({late})",
                    [(r, i), (r, wait if recv.step < i else recv.step)],
                )
            if p in self.done:
                continue
            j = c.computes[p][1]
            if p in g.data_preds[stage]:
                c.fail(
                    "use before compute",
                    f"rank {r} runs {stage} at step {i}, which consumes {p} before computing it (step {j})",
                    [(r, i), (r, j)],
                )
            c.fail(
                f"{stage.pass_.value} before {p.pass_.value}",
                f"rank {r} runs {stage} at step {i} before {p} (step {j})",
                [(r, i), (r, j)],
            )

    def check_finished(self) -> None:
        blocked = [r for r, rp in enumerate(self.ranks) if self.pos[r] < len(rp.actions)]
        if not blocked:
            return
        lines = []
        for r in blocked:
            wait = self.ranks[r].actions[self.pos[r]]
            assert isinstance(wait, Wait)  # computes and posts never block
            needs = [self.unmatched(p) for p in self.c.batches[(r, wait.handle)] if not self.matched(p)]
            lines.append(f"  rank {r} blocks at step {self.pos[r]} on wait#{wait.handle}: " + "; ".join(needs))
        self.c.fail(
            "deadlock",
            f"ranks {', '.join(map(str, blocked))} wait on each other and none can progress\n" + "\n".join(lines),
            [(r, self.pos[r]) for r in blocked],
        )

    def unmatched(self, p: _Posted) -> str:
        partner = (self.c.recvs if p.is_send else self.c.sends)[p.edge]
        what = "receive" if p.is_send else "send"
        return (
            f"{p.op.direction.value} {p.op.src}->{p.op.dst} needs rank {partner.rank}'s {what} "
            f"({partner.where}), but rank {partner.rank} is stuck at step {self.pos[partner.rank]}"
        )


class _StreamDryRun:
    """The plan on one communicator per pipeline, as NCCL runs it: each rank's batches form one queue, a batch
    starts only when the one before it has completed, and its transfers complete once the peer's batch holding
    the matching op has started too. Computes and posts never block the rank; a wait blocks it until its batch
    has completed. (`_DryRun` matches ops independently, as separate communicators per directed pair allow.)
    """

    def __init__(self, checker: _Checker) -> None:
        self.c = checker
        self.ranks = checker.plan.ranks
        self.pos = [0] * len(self.ranks)
        self.queues: list[deque[int]] = [deque() for _ in self.ranks]
        """Posted, not yet completed batch handles per rank, oldest first."""
        self.pending: dict[tuple[int, int], int] = {}
        """(rank, handle) -> ops of the batch not yet completed."""
        self.done_ops: set[tuple[int, int, int]] = set()
        """(rank, handle, op index) of completed ops."""
        self.partner: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        for (r, h), ops in checker.batches.items():
            for j, p in enumerate(ops):
                other = (checker.recvs if p.is_send else checker.sends)[p.edge]
                oh = other.handle
                self.partner[(r, h, j)] = (other.rank, oh, checker.batches[(other.rank, oh)].index(other))

    def head(self, r: int) -> int | None:
        return self.queues[r][0] if self.queues[r] else None

    def progress(self) -> bool:
        """Complete what the started batches (queue heads) can; True if anything completed."""
        moved = False
        for r in range(len(self.ranks)):
            h = self.head(r)
            if h is None:
                continue
            for j in range(len(self.c.batches[(r, h)])):
                if (r, h, j) in self.done_ops:
                    continue
                pr, ph, pj = self.partner[(r, h, j)]
                if self.head(pr) == ph:
                    for key in ((r, h, j), (pr, ph, pj)):
                        self.done_ops.add(key)
                        self.pending[key[:2]] -= 1
                    moved = True
        for r in range(len(self.ranks)):
            while (h := self.head(r)) is not None and self.pending[(r, h)] == 0:
                self.queues[r].popleft()
                moved = True
        return moved

    def run(self) -> None:
        while True:
            for r, rp in enumerate(self.ranks):
                while self.pos[r] < len(rp.actions):
                    action = rp.actions[self.pos[r]]
                    if isinstance(action, CommBatch):
                        self.queues[r].append(action.handle)
                        self.pending[(r, action.handle)] = len(action.ops)
                    elif isinstance(action, Wait) and self.pending[(r, action.handle)] > 0:
                        break
                    self.pos[r] += 1
            if not self.progress():
                break
        blocked = [r for r, rp in enumerate(self.ranks) if self.pos[r] < len(rp.actions)]
        if not blocked:
            return
        lines = []
        for r in blocked:
            wait = self.ranks[r].actions[self.pos[r]]
            assert isinstance(wait, Wait)
            h = self.head(r)
            lines.append(
                f"  rank {r} blocks at step {self.pos[r]} on wait#{wait.handle}; its communicator is busy with "
                f"comm#{h}, whose peers have not started the matching batches"
            )
        self.c.fail(
            "deadlock on one communicator per pipeline",
            f"ranks {', '.join(map(str, blocked))} wait on each other: each communicator runs its batches in order\n"
            + "\n".join(lines),
            [(r, self.pos[r]) for r in blocked],
        )
