"""The unpipelined reference: the whole model in one process, one microbatch at a time, gradients accumulated.

The executor's strongest test compares its loss and every parameter gradient with this one (same weights,
same synthetic batch, float32).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.geometry import LossScale, geometry
from pipeweaver.client.models import (
    BlockPart,
    ModalityModule,
    Piece,
    PostPart,
    PrePart,
    build_part,
    part_key,
    reference_modules,
)
from pipeweaver.spec.batch import BatchMetadata, module_instances
from pipeweaver.spec.model import ModelSpec


@dataclass(frozen=True, slots=True)
class ReferenceResult:
    loss: float
    """The iteration's loss (sum of the normalised microbatch losses)."""
    grads: dict[str, Tensor]
    """Gradient of every trainable parameter, by global name (zeros where the batch did not reach it)."""


class ReferenceModel:
    """Every part of every module, built with the same seeded initialisation as the executor's chunks."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        init_seed: int = 0,
        modules: Mapping[str, ModalityModule] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.modules = dict(modules) if modules is not None else reference_modules(model)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.parts: dict[str, nn.Module] = {}
        for m in model.modules:
            parts: list[str | int] = ["pre", *range(m.layers), "post"]
            for p in parts:
                built = build_part(self.modules[m.name], p, seed=init_seed, device=self.device, dtype=dtype)
                if built is not None:
                    self.parts[part_key(m.name, p)] = built

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for key, part in self.parts.items():
            for name, p in part.named_parameters():
                yield f"{key}.{name}", p

    def microbatch_loss(self, batch: BatchMetadata, j: int, data: SyntheticData, scale: LossScale) -> Tensor | None:
        """Forward of microbatch `j` through every module in DAG order; None when no module produced a loss."""
        mb = batch.microbatches[j]
        outputs: dict[str, Piece] = {}
        loss: Tensor | None = None
        for m in self.model.modules:
            n = len(module_instances(self.model, m.name, mb))
            if n == 0:
                continue
            geom = geometry(
                self.model, batch, m.name, j, tuple(range(n)), data, scale, device=self.device, dtype=self.dtype
            )
            pieces = {e.src: [outputs[e.src]] for e in self.model.upstream(m.name) if e.src in outputs}
            pre = self.parts.get(part_key(m.name, "pre"))
            assert isinstance(pre, PrePart)
            stream = pre.run(pieces, geom)
            for i in range(m.layers):
                block = self.parts[part_key(m.name, i)]
                assert isinstance(block, BlockPart)
                stream = block.run(stream, geom, False)
            post = self.parts[part_key(m.name, "post")]
            assert isinstance(post, PostPart)
            out = post.run(stream, geom)
            if out.output is not None:
                outputs[m.name] = Piece(tuple(range(n)), out.output)
            if out.loss is not None:
                loss = out.loss if loss is None else loss + out.loss
        return loss

    def step(self, batch: BatchMetadata, *, data_seed: int = 0) -> ReferenceResult:
        """Loss and gradients of one iteration (gradients accumulated over microbatches, nothing updated)."""
        for _, p in self.named_parameters():
            p.grad = None
        data = SyntheticData(seed=data_seed, iteration=batch.iteration, dp_replica=batch.dp_replica)
        scale = LossScale.of(self.model, batch)
        total = 0.0
        for j in range(len(batch.microbatches)):
            loss = self.microbatch_loss(batch, j, data, scale)
            if loss is None:
                continue
            if loss.requires_grad:
                torch.autograd.backward(loss)
            total += float(loss.detach())
        grads = {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in self.named_parameters()
            if p.requires_grad
        }
        return ReferenceResult(loss=total, grads=grads)


def reference_step(
    model: ModelSpec, batch: BatchMetadata, *, init_seed: int = 0, data_seed: int = 0
) -> ReferenceResult:
    """Loss and gradients of the unpipelined model on `batch` (float32, CPU)."""
    return ReferenceModel(model, init_seed=init_seed).step(batch, data_seed=data_seed)
