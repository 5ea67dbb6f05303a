"""Measures what the cost model must be calibrated to, on the trainer's own device and modules.

`profile_layers` times one block of each module, forward and full backward, on one instance (an image, a clip,
a document) at several token counts, and returns the `LayerTiming` rows `PlannerClient.register_job` sends with
RegisterJob, which fits SEMU's efficiency factors to them. `TimedExecutor` records every action's [start, end) of
an iteration, what `ReportTimings` and the timeline pictures take.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.executor import IterationStats, PipelineExecutor
from pipeweaver.client.geometry import LossScale, context_source, geometry
from pipeweaver.client.models import BlockPart, ModalityModule, Stream, build_part, reference_modules
from pipeweaver.plan.ir import CommBatch, Compute, Pass, Plan
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.model import LayerKind, Modality, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec

__all__ = ["DIT_CONTEXT_TOKENS", "LayerTiming", "TimedExecutor", "default_token_counts", "profile_layers"]

DIT_CONTEXT_TOKENS = 64
"""Caption tokens a profiled DiT clip cross-attends to: the service assumes this length for DiT rows
(`pipeweaver.server.work.DIT_CALIBRATION_CONTEXT_TOKENS`; the proto's LayerTiming carries no context length)."""


@dataclass(frozen=True, slots=True)
class LayerTiming:
    """One measured block time for calibration (the proto's `LayerTiming`): a block of `module` on one instance
    (image, clip or document) of `tokens` tokens, forward (`Pass.F`) or full backward (`Pass.B`), tp = 1."""

    module: str
    tokens: int
    pass_: Pass
    measured_ms: float

    def __post_init__(self) -> None:
        if self.pass_ not in (Pass.F, Pass.B):
            raise ValueError(f"LayerTiming.pass_ must be Pass.F or Pass.B (full passes), got {self.pass_}")
        if self.tokens <= 0 or not self.measured_ms > 0:
            raise ValueError(
                f"LayerTiming of '{self.module}': tokens ({self.tokens}) and measured_ms ({self.measured_ms}) "
                "must be positive"
            )


def default_token_counts(model: ModelSpec, parallel: ParallelSpec) -> dict[str, tuple[int, ...]]:
    """Four token counts per module, spanning what an iteration feeds one instance and beyond (the fit needs at
    least three per module and pass): ViTs 1-64 images' worth of patches, decoders 1/8 to all of the sequence
    length, DiTs 1-16 seconds of video."""
    out: dict[str, tuple[int, ...]] = {}
    for m in model.modules:
        if m.kind is LayerKind.VIT_BLOCK:
            assert m.image is not None
            base = m.image.patches_per_image
            out[m.name] = (base, 4 * base, 16 * base, 64 * base)
        elif m.kind is LayerKind.DIT_BLOCK:
            assert m.video is not None
            base = m.video.tokens_per_second
            out[m.name] = (base, 2 * base, 4 * base, 16 * base)
        else:
            top = max(parallel.seq_len, 16)
            out[m.name] = tuple(sorted({max(top // 8, 8), max(top // 4, 8), max(top // 2, 8), top}))
    return out


def _one_instance(model: ModelSpec, module: ModuleSpec, tokens: int) -> BatchMetadata:
    """A one-microbatch batch whose `module` sees exactly one instance of `tokens` tokens."""
    if module.input is Modality.IMAGE:
        doc = Document(text_tokens=1, media=(MediaItem(Modality.IMAGE, tokens),))
    elif module.input is Modality.VIDEO:
        doc = Document(text_tokens=DIT_CONTEXT_TOKENS, media=(MediaItem(Modality.VIDEO, tokens),))
    else:
        doc = Document(text_tokens=tokens)
    return BatchMetadata(iteration=0, microbatches=(Microbatch(documents=(doc,)),))


GROUP_TOKENS = 32_768
"""Tokens of the blocks one timing group holds (activations for the backward): a group is at most `repeats`
blocks and at least one."""


def _time_block(
    model: ModelSpec,
    spec: ModuleSpec,
    block: BlockPart,
    tokens: int,
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[float, float]:
    """Median forward and backward ms per block of `block` on one instance of `tokens` tokens, blocks run back to
    back (see the comment below)."""
    batch = _one_instance(model, spec, tokens)
    data = SyntheticData(seed=0, iteration=0)
    geom = geometry(model, batch, spec.name, 0, (0,), data, LossScale.of(model, batch), device=device, dtype=dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden, generator=g).to(device=device, dtype=dtype)
    context: torch.Tensor | None = None
    if spec.kind is LayerKind.DIT_BLOCK:
        src = context_source(model, spec.name)
        if src is not None:
            context = torch.randn(batch.microbatches[0].text_tokens, src.output_hidden(), generator=g)
            context = context.to(device=device, dtype=dtype)
    forward: list[float] = []
    backward: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Blocks run back to back within a group, as in a pipeline chunk: the host queues the next block's kernels
    # while the device runs this one's, so a group's wall time per block is max(host, device) per block. A
    # synchronize after every block would add the host's launch time to the device's (on 4 H100s that made a
    # decoder block at 4,096 tokens look twice as slow as it ran inside the executor's chunks).
    group = max(1, min(repeats, GROUP_TOKENS // max(tokens, 1)))
    grad: torch.Tensor | None = None
    for i in range(warmup + max(2, -(-repeats // group))):  # two timed groups at least
        leaves = [x.detach().requires_grad_(True) for _ in range(group)]
        sync()
        t0 = time.perf_counter()
        outs = [block.run(Stream(leaf, context), geom, False).hidden for leaf in leaves]
        sync()
        t1 = time.perf_counter()
        if grad is None:
            grad = torch.ones_like(outs[0])
            sync()
            t1 = time.perf_counter()
        for out in outs:
            torch.autograd.backward(out, grad)
        sync()
        t2 = time.perf_counter()
        del outs
        block.zero_grad(set_to_none=True)
        if i >= warmup:
            forward.append((t1 - t0) * 1e3 / group)
            backward.append((t2 - t1) * 1e3 / group)
    return statistics.median(forward), statistics.median(backward)


def profile_layers(
    model: ModelSpec,
    parallel: ParallelSpec,
    *,
    modules: Mapping[str, ModalityModule] | None = None,
    tokens: Mapping[str, Sequence[int]] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[LayerTiming]:
    """Forward and full-backward time of one block of every module at each of its token counts (tp = 1).

    `modules` are the user's modality modules (default: the reference ones); `tokens` maps a module to its token
    counts (default `default_token_counts`). Frozen modules get forward rows only. Times are medians over
    `repeats` runs after `warmup`. Rank 0 profiles and shares the rows: every rank must register the same ones.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"profile_layers needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    mods = dict(modules) if modules is not None else reference_modules(model)
    counts = dict(tokens) if tokens is not None else default_token_counts(model, parallel)
    dev = device or torch.device("cpu")
    rows: list[LayerTiming] = []
    for spec in model.modules:
        block = build_part(mods[spec.name], 0, seed=seed, device=dev, dtype=dtype)
        assert isinstance(block, BlockPart), f"module '{spec.name}' built a {type(block).__name__} as a block"
        block.requires_grad_(True)  # a frozen module's blocks still backpropagate to upstream modules
        for n in counts.get(spec.name, ()):
            f_ms, b_ms = _time_block(model, spec, block, n, repeats=repeats, warmup=warmup, device=dev, dtype=dtype)
            rows.append(LayerTiming(spec.name, n, Pass.F, f_ms))
            if not spec.frozen:
                rows.append(LayerTiming(spec.name, n, Pass.B, b_ms))
    return rows


class TimedExecutor(PipelineExecutor):
    """A `PipelineExecutor` that records when each of its rank's actions ran in the latest iteration.

    `action_times` holds one (start, end) per action of `plan.ranks[rank]` on the `time.monotonic` clock (in
    seconds, shared by every process of a host), aligned with the actions, ready for `ReportTimings` (whose
    per-action times the service refits its stage costs with) and `viz.Timeline` after `relative_ms`.

    On a GPU the times are the device's: CUDA events recorded on the stream around each action, placed on the host
    clock by an event at the iteration's start (the device is idle then: the previous iteration ended with a
    synchronize). Host timestamps would measure when Python launched the kernels, not when they ran.

    It wraps the executor's per-action dispatch (`_compute`, `_post`, `_wait`): the executor has no public hook
    for this yet.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.action_times: list[tuple[float, float]] = []
        self.last_plan: Plan | None = None
        self._events: list[tuple[Any, Any]] = []

    def run_iteration(
        self, plan: Plan, batch: BatchMetadata, *, optimizer: torch.optim.Optimizer | None = None
    ) -> IterationStats:
        self.action_times = []
        self._events = []
        self.last_plan = plan
        if self.device.type != "cuda":
            return super().run_iteration(plan, batch, optimizer=optimizer)
        origin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        origin.record()
        host = time.monotonic()
        stats = super().run_iteration(plan, batch, optimizer=optimizer)  # ends with a synchronize
        self.action_times = [
            (host + origin.elapsed_time(s) / 1e3, host + origin.elapsed_time(e) / 1e3) for s, e in self._events
        ]
        return stats

    def _timed(self, fn: Any, *args: Any) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn(*args)
            end.record()
            self._events.append((start, end))
            return
        start_s = time.monotonic()
        fn(*args)
        self.action_times.append((start_s, time.monotonic()))

    def _compute(self, it: Any, action: Compute) -> None:
        self._timed(super()._compute, it, action)

    def _post(self, it: Any, batch: CommBatch) -> None:
        self._timed(super()._post, it, batch)

    def _wait(self, it: Any, handle: int) -> None:
        self._timed(super()._wait, it, handle)

    @property
    def first_start(self) -> float | None:
        """When the latest iteration's first action started (monotonic seconds)."""
        return self.action_times[0][0] if self.action_times else None

    def relative_ms(self, origin: float | None = None) -> list[tuple[float, float]]:
        """`action_times` in ms since `origin` (default: the first action's start)."""
        base = self.first_start if origin is None else origin
        if base is None:
            return []
        return [((s - base) * 1e3, (e - base) * 1e3) for s, e in self.action_times]
