"""Parallelism of a training job: pipeline, tensor and data parallel sizes, microbatches, sequence length."""

from __future__ import annotations

from dataclasses import dataclass

from pipeweaver.errors import require
from pipeweaver.spec.model import ModelSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelSpec:
    """3D parallelism (Megatron-style) of one job."""

    pp: int
    """Pipeline-parallel size: ranks one pipeline spans."""
    microbatches: int
    """Microbatches per iteration, per data-parallel replica."""
    tp: int = 1
    """Tensor-parallel size (GPUs that split each layer)."""
    dp: int = 1
    """Data-parallel replicas, each running its own pipeline on its own batch."""
    seq_len: int = 8192
    """Packed sequence length of the language model (tokens per microbatch)."""
    distributed_optimizer: bool = True
    """Shard optimizer states across data-parallel replicas (ZeRO-1 / Megatron distributed optimizer)."""

    def __post_init__(self) -> None:
        for name in ("pp", "tp", "dp", "microbatches", "seq_len"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be at least 1, got {value}")

    @property
    def gpus(self) -> int:
        return self.pp * self.tp * self.dp

    def check_model(self, model: ModelSpec) -> None:
        """Raise `SpecError` naming the module and field when this parallelism cannot split `model`."""
        for m in model.modules:
            require(
                m.heads % self.tp == 0,
                f"tp ({self.tp}) must divide the attention heads of module '{m.name}' ({m.heads})",
            )
            require(
                m.kv_heads % self.tp == 0 or self.tp % m.kv_heads == 0,
                f"tp ({self.tp}) and the kv heads of module '{m.name}' ({m.kv_heads}) must divide one another",
            )
            require(
                m.ffn_hidden % self.tp == 0,
                f"tp ({self.tp}) must divide ffn_hidden of module '{m.name}' ({m.ffn_hidden})",
            )
            require(
                m.layers >= self.pp,
                f"pp ({self.pp}) must not exceed the layers of module '{m.name}' ({m.layers}): every module is "
                "cut into chunks on all pipeline ranks",
            )
