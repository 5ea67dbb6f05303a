"""torch.distributed.pipelining on the scaled VLM: stages over our chunks, every microbatch padded to fixed shapes.

torch's schedules need a linear chain of stages whose boundary tensors have one shape for the whole run. The VLM
is laid out end to end (ViT layers, merger, LM embedding with the image tokens scattered into their placeholders,
LM layers) and cut like Megatron does, balanced by parameters: torch stage c wraps exactly the modules of chunk c
of our `1f1b` / `interleaved-1f1b` baseline placement (`mixed_placement`), so both sides run the same nn.Modules.

Padding (the cost torch pays for fixed shapes):
- ViT: every microbatch carries `max_images` images (the most any microbatch of the run has); the missing ones are
  zero images appended after the real ones. Images attend only within themselves, so padding never changes a
  real image's output; the padded images' merged tokens are dropped before the scatter.
- LM: every microbatch is `max_tokens` long (the longest packed sequence of the run); the padding is one extra
  document after the real ones (attends only to itself), its labels are ignored in the loss.
So the loss equals the unpadded one (ours), which `e2e_compare.py` checks.

Inputs are synthesised inside the timed step, exactly as our executor does (`SyntheticData`: pixels drawn on the
GPU, token ids on the host; padding images are zeros made on the device). torch hands a stage only tensors, so a
stage learns which microbatch it is running from a call counter: torch's 1F1B and interleaved 1F1B run each stage's
forwards in microbatch order, once per step (checked: `StageFeed.check_complete`).

The model-independent half (`StageFeed`, `TorchStage`, `TorchPipeline`, `torch_pipeline`) is shared with the
text-to-video side, `e2e_torch_t2v.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.geometry import IGNORE_INDEX, LossScale, TextGeometry, VisionGeometry, geometry, patch_dim
from pipeweaver.client.models import Piece, Stream
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.model import LayerKind, MergeKind, Modality, ModelSpec

TORCH_SCHEDULES = {"torch-1f1b": "1f1b", "torch-interleaved-1f1b": "interleaved-1f1b"}
"""Our schedule name -> the baseline whose placement (Megatron, balanced by parameters) gives torch's stages."""


@dataclass(frozen=True, slots=True)
class VLMShape:
    """Which module scatters into which, and the padded sizes of the run."""

    vit: str
    llm: str
    patches_per_image: int
    merged_per_image: int
    max_images: int
    max_tokens: int

    @staticmethod
    def of(model: ModelSpec, batches: list[BatchMetadata]) -> VLMShape:
        edges = [e for e in model.edges if e.merge is MergeKind.TOKEN_SCATTER]
        if len(edges) != 1 or len(model.modules) != 2:
            raise ValueError("the torch VLM stages support one image encoder scattering into one decoder")
        vit, llm = model.module(edges[0].src), model.module(edges[0].dst)
        assert vit.kind is LayerKind.VIT_BLOCK and vit.image is not None
        items = [m for b in batches for mb in b.microbatches for m in mb.media(Modality.IMAGE)]
        sizes = {(m.tokens, m.merged_tokens) for m in items}
        if len(sizes) != 1:
            raise ValueError(f"padding needs one image size for the whole run, the batches have {sorted(sizes)}")
        (patches, merged), *_ = sizes
        return VLMShape(
            vit=vit.name,
            llm=llm.name,
            patches_per_image=patches,
            merged_per_image=merged,
            max_images=max(len(mb.media(Modality.IMAGE)) for b in batches for mb in b.microbatches),
            max_tokens=max(mb.language_tokens() for b in batches for mb in b.microbatches),
        )

    def padding(self, batch: BatchMetadata) -> dict[str, int]:
        """Real and padded ViT patches and LM tokens of one batch (what torch computes on)."""
        images = sum(len(mb.media(Modality.IMAGE)) for mb in batch.microbatches)
        tokens = sum(mb.language_tokens() for mb in batch.microbatches)
        m = len(batch.microbatches)
        return {
            "vit_patches": images * self.patches_per_image,
            "vit_patches_padded": m * self.max_images * self.patches_per_image,
            "tokens": tokens,  # the throughput unit, shared with the T2V shape
            "lm_tokens": tokens,
            "lm_tokens_padded": m * self.max_tokens,
        }


def swapped_geometry(padded: Any, module: str, mb: Microbatch, instances: tuple[int, ...]) -> Any:
    """`module`'s geometry of `padded.batch` with microbatch `padded.index` replaced by `mb` (same index: the same
    synthetic data keys as the real microbatch's), for a padded microbatch of either model."""
    mbs = list(padded.batch.microbatches)
    mbs[padded.index] = mb
    b = padded.batch
    batch = BatchMetadata(iteration=b.iteration, microbatches=tuple(mbs), dp_replica=b.dp_replica)
    return geometry(
        padded.model,
        batch,
        module,
        padded.index,
        instances,
        padded.data,
        padded.scale,
        device=padded.device,
        dtype=padded.dtype,
    )


@dataclass(eq=False)
class PaddedMicrobatch:
    """One microbatch as torch sees it; geometries are built on first use (inside the timed step)."""

    model: ModelSpec
    shape: VLMShape
    batch: BatchMetadata
    index: int
    data: SyntheticData
    scale: LossScale
    device: torch.device
    dtype: torch.dtype
    _vision: VisionGeometry | None = None
    _text: TextGeometry | None = None

    @property
    def real(self) -> Microbatch:
        return self.batch.microbatches[self.index]

    @property
    def real_images(self) -> int:
        return len(self.real.media(Modality.IMAGE))

    def _geometry(self, module: str, mb: Microbatch, instances: tuple[int, ...]) -> Any:
        """`module`'s geometry with this microbatch replaced by `mb` (same index: same synthetic data keys)."""
        return swapped_geometry(self, module, mb, instances)

    @property
    def vision(self) -> VisionGeometry:
        """max_images images: the real ones (same synthetic pixels as ours), then zero images."""
        if self._vision is None:
            s = self.shape
            n_pad = s.max_images - self.real_images
            pad_doc = Document(0, (MediaItem(Modality.IMAGE, s.patches_per_image, s.merged_per_image),) * n_pad)
            mb = Microbatch((*self.real.documents, pad_doc)) if n_pad else self.real
            g = self._geometry(s.vit, mb, tuple(range(s.max_images)))
            real = self._geometry(s.vit, self.real, tuple(range(self.real_images)))
            zeros = torch.zeros(
                n_pad * s.patches_per_image, patch_dim(self.model.module(s.vit)), device=self.device, dtype=self.dtype
            )
            g.patches = torch.cat([real.patches, zeros]) if self.real_images else zeros  # type: ignore[misc]
            self._vision = g
        return self._vision

    @property
    def text(self) -> TextGeometry:
        """The real packed sequence, then one padding document up to max_tokens."""
        if self._text is None:
            n_pad = self.shape.max_tokens - self.real.language_tokens()
            mb = Microbatch((*self.real.documents, Document(n_pad))) if n_pad else self.real
            self._text = self._geometry(self.shape.llm, mb, (0,))
        return self._text

    def labels(self) -> Tensor:
        labels = self.text.labels.clone()
        labels[self.real.language_tokens() :] = IGNORE_INDEX
        return labels


M = TypeVar("M")
"""One microbatch as torch sees it (`PaddedMicrobatch` here, `PaddedT2VMicrobatch` for the T2V model)."""


@dataclass
class StageFeed(Generic[M]):
    """The padded microbatches of the current step, shared by this rank's stages."""

    padded: Callable[..., M] = PaddedMicrobatch  # type: ignore[assignment]
    """Builds microbatch j: (model, shape, batch, j, data, scale, device, dtype) -> M."""
    microbatches: list[M] = field(default_factory=list)
    stages: list[TorchStage[M]] = field(default_factory=list)
    scale: LossScale = field(default_factory=lambda: LossScale(text_targets=1, video_values=1))
    """The current batch's loss denominators (the real batch's, as ours)."""

    def start(self, model: ModelSpec, shape: Any, batch: BatchMetadata, device: Any, dtype: Any) -> None:
        dev = torch.device(device)
        data_device = str(dev) if dev.type == "cuda" else "cpu"  # as PipelineExecutor draws them
        data = SyntheticData(seed=0, iteration=batch.iteration, dp_replica=batch.dp_replica, device=data_device)
        self.scale = LossScale.of(model, batch)
        self.microbatches = [
            self.padded(model, shape, batch, j, data, self.scale, device, dtype) for j in range(len(batch.microbatches))
        ]
        for s in self.stages:
            s.calls = 0

    def check_complete(self) -> None:
        for s in self.stages:
            if s.calls != len(self.microbatches):
                raise RuntimeError(f"torch stage ran {s.calls} forwards for {len(self.microbatches)} microbatches")


class TorchStage(nn.Module, Generic[M]):
    """A torch pipelining stage over one of our chunks (its `_Part`s): the same pre/blocks/post modules."""

    def __init__(self, parts: list[Any], feed: StageFeed[M]) -> None:
        super().__init__()
        self.parts = parts
        self.mods = nn.ModuleList([m for p in parts for m in (p.pre, *p.blocks, p.post) if m is not None])
        self.feed = feed
        self.calls = 0
        feed.stages.append(self)

    def next_microbatch(self) -> M:
        """The microbatch of this forward: torch hands a stage only tensors, and runs its forwards in order."""
        mb = self.feed.microbatches[self.calls]
        self.calls += 1
        return mb


class TorchVLMStage(TorchStage[PaddedMicrobatch]):
    """A VLM stage on the padded geometry.

    Its single input and output is whatever crosses the chunk boundary: ViT hidden states, merged image tokens
    (the ViT's output) or LM hidden states. The last stage ends at the final norm; `loss_fn` applies the LM head.
    """

    def __init__(self, parts: list[Any], shape: VLMShape, feed: StageFeed[PaddedMicrobatch]) -> None:
        super().__init__(parts, feed)
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        mb = self.next_microbatch()
        h = x
        for k, part in enumerate(self.parts):
            vit = part.layers.module == self.shape.vit
            geom = mb.vision if vit else mb.text
            if part.pre is not None and vit:
                stream = part.pre.run({}, geom)
            elif part.pre is not None:
                merged = h[: mb.real_images * self.shape.merged_per_image]  # padded images' tokens dropped
                pieces = {self.shape.vit: [Piece(tuple(range(mb.real_images)), merged)]}
                stream = part.pre.run(pieces, geom)
            else:
                assert k == 0, "only a chunk's first part starts inside a module"
                stream = Stream(h)
            for block in part.blocks:
                stream = block.run(stream, geom, False)
            if part.post is not None and vit:
                out = part.post.run(stream, geom).output
                assert out is not None
                h = out
            elif part.post is not None:
                h = part.post.norm(stream.hidden)
            else:
                h = stream.hidden
        return h


def boundary_shape(parts: list[Any], shape: VLMShape, model: ModelSpec, *, output: bool) -> tuple[int, ...]:
    """Shape of the tensor entering (output=False) or leaving a chunk."""
    part = parts[-1] if output else parts[0]
    rng = part.layers
    spec = model.module(rng.module)
    if rng.module == shape.vit:
        if not output and rng.start == 0:
            return (1, 1)  # the first stage: torch's (unused) microbatch input; the pixels come from the geometry
        if output and rng.stop == spec.layers:
            return (shape.max_images * shape.merged_per_image, spec.output_hidden())
        return (shape.max_images * shape.patches_per_image, spec.hidden)
    if not output and rng.start == 0:
        vit = model.module(shape.vit)
        return (shape.max_images * shape.merged_per_image, vit.output_hidden())
    return (shape.max_tokens, spec.hidden)


@dataclass
class TorchPipeline:
    """torch's schedule on this rank, with what a step needs."""

    schedule: Any
    feed: StageFeed[Any]
    first: bool
    last: bool
    microbatches: int
    step_kwargs: dict[str, Any]
    target: Callable[[StageFeed[Any]], Tensor]
    """The last stage's `target` of the step (torch splits it per microbatch and hands each piece to `loss_fn`)."""
    prepare: Callable[[StageFeed[Any]], None] | None = None
    """Runs after the step's microbatches are known, before torch's schedule (nothing in flight yet)."""

    def step(self, model: ModelSpec, shape: Any, batch: BatchMetadata, device: Any, dtype: Any) -> float:
        """One training step on `batch` (inputs synthesised here, as ours does); the loss on the last rank."""
        self.feed.start(model, shape, batch, device, dtype)
        if self.prepare is not None:
            self.prepare(self.feed)
        losses: list[Tensor] = []
        if self.first:
            self.schedule.step(torch.zeros(self.microbatches, 1, device=device, dtype=dtype), **self.step_kwargs)
        elif self.last:
            self.schedule.step(target=self.target(self.feed), losses=losses, **self.step_kwargs)
        else:
            self.schedule.step(**self.step_kwargs)
        self.feed.check_complete()
        return float(sum(float(x.detach().float()) for x in losses)) if self.last else 0.0


StageOf = Callable[[int, list[Any]], tuple[nn.Module, tuple[Tensor, ...], tuple[Tensor, ...]]]
"""(chunk index, its parts) -> (the stage module, example inputs, example outputs)."""


def torch_pipeline(
    name: str,
    executor: Any,
    microbatches: int,
    device: Any,
    feed: StageFeed[Any],
    stage_of: StageOf,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    target: Callable[[StageFeed[Any]], Tensor],
    prepare: Callable[[StageFeed[Any]], None] | None = None,
) -> TorchPipeline:
    """torch's `Schedule1F1B` / `ScheduleInterleaved1F1B` with one stage per chunk of `executor` on this rank."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    placement = executor.placement
    n = len(placement.chunks)
    mine = sorted(c.index for c in placement.chunks if c.rank == executor.rank)
    stages: list[Any] = []
    for c in mine:
        mod, inputs, outputs = stage_of(c, executor.chunks[(placement.pipelines[0].name, c)])
        stages.append(PipelineStage(mod, c, n, device, input_args=inputs, output_args=outputs))
    sched: Schedule1F1B | ScheduleInterleaved1F1B
    if TORCH_SCHEDULES[name] == "1f1b":
        sched = Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        sched = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    # torch >= 2.12 can skip merging the last stage's outputs into one tensor (nobody reads them here)
    kwargs = {"return_outputs": False} if "return_outputs" in inspect.signature(sched.step).parameters else {}
    return TorchPipeline(sched, feed, 0 in mine, (n - 1) in mine, microbatches, kwargs, target, prepare)


def build_torch_pipeline(
    name: str, executor: Any, model: ModelSpec, shape: VLMShape, microbatches: int, device: Any, dtype: Any
) -> TorchPipeline:
    """torch's `Schedule1F1B` / `ScheduleInterleaved1F1B` over `executor`'s chunks (its baseline placement)."""
    feed: StageFeed[PaddedMicrobatch] = StageFeed(PaddedMicrobatch)
    heads = [
        parts[-1].post.head
        for parts in executor.chunks.values()
        if parts[-1].post is not None and parts[-1].layers.module == shape.llm
    ]

    def stage_of(c: int, parts: list[Any]) -> tuple[nn.Module, tuple[Tensor, ...], tuple[Tensor, ...]]:
        in_shape = boundary_shape(parts, shape, model, output=False)
        # requires_grad matters: torch takes it from these examples for its receive buffers
        inp = torch.zeros(in_shape, dtype=dtype, device=device, requires_grad=c > 0)
        out = torch.zeros(boundary_shape(parts, shape, model, output=True), dtype=dtype, device=device)
        return TorchVLMStage(parts, shape, feed), (inp,), (out.requires_grad_(),)

    def loss_fn(hidden: Tensor, target: Tensor) -> Tensor:
        (head,) = heads
        logits = head(hidden).float()
        ce = F.cross_entropy(logits, target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return ce / feed.scale.text_targets

    def labels(feed: StageFeed[Any]) -> Tensor:
        return torch.stack([mb.labels() for mb in feed.microbatches])

    return torch_pipeline(name, executor, microbatches, device, feed, stage_of, loss_fn, labels)
