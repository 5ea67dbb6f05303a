"""torch.distributed.pipelining on the scaled T2V model: stages over our chunks, microbatches padded to fixed shapes.

The T2V model is a text encoder (a decoder without LM head) whose final-norm output is the DiT's cross-attention
context. Laid out end to end (text encoder, then DiT) and cut like Megatron does, balanced by parameters: torch stage
c wraps exactly the modules of chunk c of our `1f1b` / `interleaved-1f1b` baseline placement, so both sides run the
same nn.Modules. What crosses a boundary: text-encoder hidden states inside the encoder, the context (the encoder's
output) into the stage that starts the DiT, and (DiT hidden states, context) inside the DiT, so that every DiT stage
cross-attends and sends the context's gradient back. A stage may hold the end of the encoder and the start of the DiT.

Padding (the cost torch pays for fixed shapes): every microbatch is its real documents plus one padding document
after them, whose caption fills the packed text to `max_text_tokens` and whose single clip fills the DiT tokens to
`max_video_tokens` (no clip where the real ones already fill it). `max_text_tokens` is one more than the longest real
caption sequence, so the padding caption always has a token for the padding clip to cross-attend to. Captions attend
causally within their document, clips within themselves and to their own caption: padding never changes a real
token's output. The padding clip's latents are zeros; the real clips get the synthetic latents, noise and timesteps
ours draws (same keys, copied from the unpadded geometry), the captions the same token ids. The last stage computes
DiTPost's loss over the real tokens only, divided by the real batch's `LossScale`, and outputs it (a 1-element tensor
that `loss_fn` passes on): the loss equals the unpadded one (ours), which `e2e_compare.py` checks.

Captions-only microbatches (the dynamic trace's last 6 iterations of 20) still run the DiT on the padding clip, as a
fixed-shape pipeline must; their loss is 0 and every gradient is exactly 0, as ours (which skips the DiT). A run
without any video pads with one latent frame, so no boundary tensor is ever empty.

One GEMM still changes its row count between microbatches, the DiT's timestep modulation (one row per clip): on CUDA
each step first loads the kernels of its clip counts, as our executor does for its row counts (`kernel_warmup`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from e2e_torch_vlm import TORCH_SCHEDULES, StageFeed, TorchPipeline, TorchStage, swapped_geometry, torch_pipeline
from torch import Tensor, nn

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.geometry import LossScale, TextGeometry, VideoGeometry
from pipeweaver.client.kernel_warmup import warm_up_rows
from pipeweaver.client.models import Piece, Stream
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.model import LayerKind, MergeKind, Modality, ModelSpec

__all__ = ["TORCH_SCHEDULES", "PaddedT2VMicrobatch", "T2VShape", "TorchT2VStage", "build_torch_pipeline"]


@dataclass(frozen=True, slots=True)
class T2VShape:
    """Which module gives the context to which, and the padded sizes of the run."""

    text: str
    dit: str
    max_text_tokens: int
    """Packed caption tokens of every microbatch (real captions plus a padding caption of at least one token)."""
    max_video_tokens: int
    """DiT tokens of every microbatch (real clips plus a padding clip); at least one latent frame."""

    @staticmethod
    def of(model: ModelSpec, batches: list[BatchMetadata]) -> T2VShape:
        edges = [e for e in model.edges if e.merge is MergeKind.CROSS_ATTENTION_CONTEXT]
        if len(edges) != 1 or len(model.modules) != 2:
            raise ValueError("the torch T2V stages support one text encoder giving the context of one DiT")
        text, dit = model.module(edges[0].src), model.module(edges[0].dst)
        if text.kind is not LayerKind.DECODER_BLOCK or text.lm_head or dit.kind is not LayerKind.DIT_BLOCK:
            raise ValueError(f"expected a text encoder without LM head and a DiT, got '{text.name}' and '{dit.name}'")
        if text.frozen or dit.frozen:
            # every boundary tensor is sent with its gradient; a frozen module would send none
            raise ValueError("the torch T2V stages train both modules; unfreeze the text encoder and the DiT")
        assert dit.video is not None
        mbs = [mb for b in batches for mb in b.microbatches]
        return T2VShape(
            text=text.name,
            dit=dit.name,
            max_text_tokens=max(mb.text_tokens for mb in mbs) + 1,
            max_video_tokens=max(max(_video_tokens(mb) for mb in mbs), dit.video.tokens_per_latent_frame),
        )

    def padding(self, batch: BatchMetadata) -> dict[str, int]:
        """Real and padded DiT and caption tokens of one batch (what torch computes on)."""
        video = sum(_video_tokens(mb) for mb in batch.microbatches)
        m = len(batch.microbatches)
        return {
            "tokens": video,  # the throughput unit: real DiT tokens (0 for a captions-only batch)
            "dit_tokens": video,
            "dit_tokens_padded": m * self.max_video_tokens,
            "text_tokens": sum(mb.text_tokens for mb in batch.microbatches),
            "text_tokens_padded": m * self.max_text_tokens,
        }


def _video_tokens(mb: Microbatch) -> int:
    return sum(m.tokens for m in mb.media(Modality.VIDEO))


@dataclass(eq=False)
class PaddedVideoGeometry(VideoGeometry):
    """The padded microbatch's clips: the real clips' latents and noise as ours draws them (from `real`), then zeros
    (no draws for the padding clip). Timesteps come from the data keys, the real clips' the same as ours."""

    real: VideoGeometry | None = None

    def _padded(self, x: Tensor) -> Tensor:
        pad = self.tokens - x.shape[0]
        return torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x

    @property
    def noisy_latents(self) -> Tensor:
        assert self.real is not None
        return self._padded(self.real.noisy_latents)

    @property
    def noise(self) -> Tensor:
        assert self.real is not None
        return self._padded(self.real.noise)


@dataclass(eq=False)
class PaddedT2VMicrobatch:
    """One microbatch as torch sees it; geometries are built on first use (inside the timed step)."""

    model: ModelSpec
    shape: T2VShape
    batch: BatchMetadata
    index: int
    data: SyntheticData
    scale: LossScale
    device: torch.device
    dtype: torch.dtype

    @property
    def real(self) -> Microbatch:
        return self.batch.microbatches[self.index]

    @cached_property
    def padded(self) -> Microbatch:
        """The real documents, then one padding document: a caption of >= 1 token and a clip (when one is due)."""
        s = self.shape
        n_text = s.max_text_tokens - self.real.text_tokens
        n_video = s.max_video_tokens - _video_tokens(self.real)
        assert n_text >= 1 and n_video >= 0, "the run's shape must cover every batch (T2VShape.of all of them)"
        clip = (MediaItem(Modality.VIDEO, n_video),) if n_video else ()
        return Microbatch((*self.real.documents, Document(n_text, clip)))

    @cached_property
    def text(self) -> TextGeometry:
        """The packed captions: real documents first, so their token ids and positions are ours."""
        g = self._geometry(self.shape.text, self.padded, (0,))
        assert isinstance(g, TextGeometry)
        return g

    @cached_property
    def real_video(self) -> VideoGeometry:
        """The unpadded clips, exactly as ours builds them: the latents' source and the loss's targets."""
        g = self._geometry(self.shape.dit, self.real, tuple(range(len(self.real.media(Modality.VIDEO)))))
        assert isinstance(g, VideoGeometry)
        return g

    @cached_property
    def video(self) -> PaddedVideoGeometry:
        """The padded clips: the real ones (our latents, noise and timesteps), then the padding clip (zeros)."""
        mb = self.padded
        return PaddedVideoGeometry(
            model=self.model,
            module=self.model.module(self.shape.dit),
            microbatch=self.index,
            instances=tuple(range(len(mb.media(Modality.VIDEO)))),
            mb=mb,
            data=self.data,
            scale=self.scale,
            device=self.device,
            dtype=self.dtype,
            real=self.real_video,
        )

    def _geometry(self, module: str, mb: Microbatch, instances: tuple[int, ...]) -> Any:
        """`module`'s geometry with this microbatch replaced by `mb` (same index: same synthetic data keys)."""
        return swapped_geometry(self, module, mb, instances)


class TorchT2VStage(TorchStage[PaddedT2VMicrobatch]):
    """A T2V stage on the padded geometry.

    Inputs: a dummy (the first stage: its inputs come from the geometry), text-encoder hidden states, the context
    (into the stage that starts the DiT) or (DiT hidden states, context). Outputs likewise; the last stage returns the
    microbatch's loss as a 1-element tensor (`loss_fn` passes it on).
    """

    def __init__(self, parts: list[Any], shape: T2VShape, feed: StageFeed[PaddedT2VMicrobatch]) -> None:
        super().__init__(parts, feed)
        self.shape = shape

    def forward(self, *xs: Tensor) -> Tensor | tuple[Tensor, ...]:
        mb = self.next_microbatch()
        stream: Stream | None = None
        context = xs[0]  # the received context, when this stage starts the DiT
        for k, part in enumerate(self.parts):
            text = part.layers.module == self.shape.text
            geom: TextGeometry | VideoGeometry = mb.text if text else mb.video
            if part.pre is not None and text:
                stream = part.pre.run({}, geom)
            elif part.pre is not None:
                stream = part.pre.run({self.shape.text: [Piece((0,), context)]}, geom)
            else:
                assert k == 0, "only a chunk's first part starts inside a module"
                stream = Stream(xs[0], xs[1] if len(xs) > 1 else None)
            for block in part.blocks:
                stream = block.run(stream, geom, False)
            if part.post is not None and text:
                out = part.post.run(stream, geom).output  # the final norm: the DiT's context
                assert out is not None
                context, stream = out, None
            elif part.post is not None:
                # DiTPost's loss over the real tokens only: against the real clips' noise, divided by the real
                # batch's scale. The projection runs on every token: fixed GEMM shapes, as everything torch runs.
                assert stream is not None
                pred: Tensor = part.post.out(part.post.norm(stream.hidden)).float()[: mb.real_video.tokens]
                loss = (pred - mb.real_video.noise.float()).pow(2).sum() / mb.scale.video_values
                return loss.reshape(1)
        if stream is None:
            return context
        if stream.context is None:
            return stream.hidden
        # a view, not the received tensor itself: torch's stage then sees an output of this stage's own graph
        return stream.hidden, stream.context.view_as(stream.context)


def boundary(parts: list[Any], shape: T2VShape, model: ModelSpec, *, output: bool) -> list[tuple[int, ...]]:
    """Shapes of the tensors entering (output=False) or leaving a chunk."""
    part = parts[-1] if output else parts[0]
    rng = part.layers
    spec = model.module(rng.module)
    text = model.module(shape.text)
    context = (shape.max_text_tokens, text.output_hidden())
    at_end = rng.stop == spec.layers if output else rng.start == 0
    if rng.module == shape.text:
        if at_end:
            return [context] if output else [(1, 1)]  # the first stage: torch's (unused) microbatch input
        return [(shape.max_text_tokens, spec.hidden)]
    if at_end:
        return [(1,)] if output else [context]  # the loss; the DiT's start takes the context
    return [(shape.max_video_tokens, spec.hidden), context]


def build_torch_pipeline(
    name: str, executor: Any, model: ModelSpec, shape: T2VShape, microbatches: int, device: Any, dtype: Any
) -> TorchPipeline:
    """torch's `Schedule1F1B` / `ScheduleInterleaved1F1B` over `executor`'s chunks (its baseline placement)."""
    feed: StageFeed[PaddedT2VMicrobatch] = StageFeed(PaddedT2VMicrobatch)

    def stage_of(c: int, parts: list[Any]) -> tuple[nn.Module, tuple[Tensor, ...], tuple[Tensor, ...]]:
        last = parts[-1].layers.module == shape.dit and parts[-1].post is not None
        # requires_grad matters: torch takes it from these examples for its receive buffers
        inputs = tuple(
            torch.zeros(s, dtype=dtype, device=device, requires_grad=c > 0)
            for s in boundary(parts, shape, model, output=False)
        )
        out_dtype = torch.float32 if last else dtype  # DiTPost's loss is float32
        outputs = tuple(
            torch.zeros(s, dtype=out_dtype, device=device).requires_grad_()
            for s in boundary(parts, shape, model, output=True)
        )
        return TorchT2VStage(parts, shape, feed), inputs, outputs

    def loss_fn(loss: Tensor, target: Tensor) -> Tensor:
        return loss.sum()  # the stage's output is the loss already

    def no_target(feed: StageFeed[Any]) -> Tensor:
        return torch.zeros(len(feed.microbatches), 1, device=device)  # torch's schedule wants one per microbatch

    # The one GEMM whose row count changes between microbatches: the DiT's timestep modulation, one row per clip.
    # cuBLASLt loads a new count's kernel lazily, waiting for the device to drain, which deadlocks a pipeline with
    # receives in flight (pipeweaver.client.kernel_warmup); ours warms its counts at the start of an iteration too.
    adas = [
        b.ada for parts in executor.chunks.values() for p in parts if p.layers.module == shape.dit for b in p.blocks
    ]

    def warm_clip_counts(feed: StageFeed[PaddedT2VMicrobatch]) -> None:
        warm_up_rows(adas, {len(mb.padded.media(Modality.VIDEO)) for mb in feed.microbatches})

    prepare = warm_clip_counts if torch.device(device).type == "cuda" and adas else None
    return torch_pipeline(name, executor, microbatches, device, feed, stage_of, loss_fn, no_target, prepare)
