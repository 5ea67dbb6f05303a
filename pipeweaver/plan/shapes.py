"""Shapes of the tensors a transfer carries, from the model and the batch.

Receivers allocate their buffers from these shapes, so they must be exact. Within a module the activation is
(tokens of the sub-microbatch, hidden); a DiT chain also forwards its cross-attention context; the tensor that
crosses from one module to the next is the producer's output (ViT: merged tokens at the LM's width).
"""

from __future__ import annotations

from pipeweaver.plan.ir import Chunk, PlanHeader, StageKey, SubMicrobatch, TensorSpec
from pipeweaver.spec.batch import BatchMetadata, Instance, module_instances
from pipeweaver.spec.model import LayerKind, MergeKind, ModelSpec


class TransferShapes:
    """Computes `tensors(src, dst)` for the data edges of one plan; caches per-module token counts."""

    def __init__(self, model: ModelSpec, batch: BatchMetadata, header: PlanHeader, *, dtype: str) -> None:
        self.model = model
        self.batch = batch
        self.header = header
        self.dtype = dtype
        self._subs = {(s.pipeline, s.microbatch, s.index): s for s in header.sub_microbatches}
        self._chunks = {(c.pipeline, c.index): c for c in header.placement.chunks}
        self._instances: dict[tuple[str, int], tuple[Instance, ...]] = {}
        self._memo: dict[tuple[StageKey, StageKey], tuple[TensorSpec, ...]] = {}

    def _module_instances(self, module: str, microbatch: int) -> tuple[Instance, ...]:
        key = (module, microbatch)
        found = self._instances.get(key)
        if found is None:
            found = module_instances(self.model, module, self.batch.microbatches[microbatch])
            self._instances[key] = found
        return found

    def _tokens(self, sub: SubMicrobatch, module: str, *, output: bool) -> int:
        instances = self._module_instances(module, sub.microbatch)
        idx = sub.instances_of(module)
        return sum(instances[i].output_tokens if output else instances[i].tokens for i in idx)

    def _context(self, sub: SubMicrobatch, module: str) -> tuple[int, int] | None:
        """(tokens, width) of the cross-attention context a DiT module carries along its chain."""
        if self.model.module(module).kind is not LayerKind.DIT_BLOCK:
            return None
        for e in self.model.upstream(module):
            if e.merge is MergeKind.CROSS_ATTENTION_CONTEXT:
                tokens = sum(i.tokens for i in self._module_instances(e.src, sub.microbatch))
                return tokens, self.model.module(e.src).output_hidden()
        return None

    def _spec(self, *dims: int) -> TensorSpec:
        return TensorSpec(shape=tuple(dims), dtype=self.dtype)

    def _boundary(self, sub: SubMicrobatch, chunk: Chunk) -> tuple[TensorSpec, ...]:
        """Tensors entering `chunk` from the previous chunk of the same pipeline."""
        first = chunk.layers[0]
        module = self.model.module(first.module)
        if first.start > 0:
            out = [self._spec(self._tokens(sub, first.module, output=False), module.hidden)]
            ctx = self._context(sub, first.module)
            if ctx is not None:
                out.append(self._spec(*ctx))
            return tuple(out)
        # The chunk starts a module inside a mixed pipeline: it receives the previous module's output.
        prev = [e.src for e in self.model.upstream(first.module) if e.src in self._pipeline_modules(sub.pipeline)]
        return tuple(self._spec(self._tokens(sub, p, output=True), self.model.module(p).output_hidden()) for p in prev)

    def _pipeline_modules(self, pipeline: str) -> tuple[str, ...]:
        return self.header.placement.pipeline(pipeline).modules

    def tensors(self, src: StageKey, dst: StageKey) -> tuple[TensorSpec, ...]:
        """Tensors `src`'s output hands to `dst` (gradients have the forward activation's shapes)."""
        key = (src, dst)
        found = self._memo.get(key)
        if found is None:
            found = self._tensors(src, dst)
            self._memo[key] = found
        return found

    def _tensors(self, src: StageKey, dst: StageKey) -> tuple[TensorSpec, ...]:
        fwd_src, fwd_dst = (src, dst) if not src.pass_.is_backward else (dst, src)
        if fwd_src.pipeline == fwd_dst.pipeline:
            sub = self._subs[(fwd_dst.pipeline, fwd_dst.microbatch, fwd_dst.sub)]
            return self._boundary(sub, self._chunks[(fwd_dst.pipeline, fwd_dst.chunk)])
        # Cross-pipeline edge: the producing pipeline's last module output.
        sub = self._subs[(fwd_src.pipeline, fwd_src.microbatch, fwd_src.sub)]
        last_chunk = self._chunks[(fwd_src.pipeline, fwd_src.chunk)]
        module = last_chunk.layers[-1].module
        tokens = self._tokens(sub, module, output=True)
        return (self._spec(tokens, self.model.module(module).output_hidden()),)
