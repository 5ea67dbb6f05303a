"""SEMU memory model: static bytes per rank (mixed-precision Adam) and activation bytes per layer."""

from __future__ import annotations

import pytest

from pipeweaver import presets
from pipeweaver.errors import DoesNotFit
from pipeweaver.plan.ir import Chunk, LayerRange, Recompute
from pipeweaver.plan.layouts import mixed_placement, modular_placement
from pipeweaver.simulator.costmodel import CostModel
from pipeweaver.simulator.memory import (
    BACKWARD_WORKSPACE_BLOCKS,
    backward_workspace_bytes,
    caption_bytes,
    check_fits,
    layer_activation_bytes,
    static_memory,
    static_memory_bytes,
)
from pipeweaver.spec import Instance, ModelSpec, ParallelSpec
from pipeweaver.spec.hardware import GB, H100_SXM, H800
from pipeweaver.spec.model import ModuleSpec

LLAMA3_8B_PARAMS = 8_030_457_856
"""Llama3-8B's 8,030,261,248 plus the Qwen2-style q/k/v biases pipeweaver counts (32 x 6,144)."""


def llama_only(frozen: bool = False) -> ModelSpec:
    m = presets.llama3_8b()
    if frozen:
        m = ModuleSpec(**{**{f: getattr(m, f) for f in m.__dataclass_fields__}, "frozen": True})
    return ModelSpec(name="llama", modules=(m,))


def test_llama3_8b_parameter_count() -> None:
    assert presets.llama3_8b().total_params() == LLAMA3_8B_PARAMS


@pytest.mark.parametrize(
    "tp, dp, distributed, bytes_per_param",
    [
        (1, 1, True, 2 + 4 + 12),  # bf16 weights, fp32 grads, fp32 master + Adam m, v
        (4, 1, True, (2 + 4 + 12) / 4),
        (1, 8, True, 2 + 4 + 12 / 8),  # distributed optimizer shards the 12 B across dp
        (1, 8, False, 2 + 4 + 12),
        (2, 4, True, (2 + 4 + 12 / 4) / 2),
    ],
)
def test_static_memory_of_llama3_8b(tp: int, dp: int, distributed: bool, bytes_per_param: float) -> None:
    model = llama_only()
    parallel = ParallelSpec(pp=1, tp=tp, dp=dp, microbatches=1, distributed_optimizer=distributed)
    (rank,) = static_memory(model, parallel, modular_placement(model, 1))
    assert rank.params == pytest.approx(LLAMA3_8B_PARAMS / tp)
    assert rank.param_bytes == pytest.approx(2 * LLAMA3_8B_PARAMS / tp)  # 16.06 GB at tp = 1
    assert rank.total_bytes == pytest.approx(bytes_per_param * LLAMA3_8B_PARAMS)


def test_frozen_modules_hold_weights_only() -> None:
    model = llama_only(frozen=True)
    (rank,) = static_memory(model, ParallelSpec(pp=1, microbatches=1), modular_placement(model, 1))
    assert rank.total_bytes == rank.param_bytes == pytest.approx(2 * LLAMA3_8B_PARAMS)
    assert rank.trainable_params == 0


@pytest.mark.parametrize("name", ["vlm-s", "t2v-s", "vlm-m"])
def test_static_memory_is_split_across_ranks(name: str) -> None:
    w = presets.workload(name)
    total = w.model.total_params()
    for placement in (modular_placement(w.model, w.parallel.pp), mixed_placement(w.model, w.parallel.pp, 2)):
        ranks = static_memory(w.model, w.parallel, placement)
        assert len(ranks) == w.parallel.pp
        assert sum(r.params for r in ranks) * w.parallel.tp == pytest.approx(total)
        assert static_memory_bytes(w.model, w.parallel, placement) == tuple(r.total_bytes for r in ranks)
        check_fits(static_memory_bytes(w.model, w.parallel, placement), w.hardware)


def test_does_not_fit_names_rank_need_and_capacity() -> None:
    model = llama_only()
    need = static_memory_bytes(model, ParallelSpec(pp=1, microbatches=1), modular_placement(model, 1))
    with pytest.raises(DoesNotFit, match=r"rank 0 needs 144\.5 GB of static memory but the h800's 80\.0 GB"):
        check_fits(need, H800)
    with pytest.raises(DoesNotFit, match=r"rank 1 needs 3\.0 GB of activations"):
        check_fits([1 * GB, 3 * GB], 2 * GB, what="activations")


def test_decoder_activations_per_token_match_korthikanti() -> None:
    """Llama3-8B: 6h + 2kv + 3f = 17h elements per token, i.e. 34 h bytes in bf16 (flash attention: no s^2)."""
    llm = presets.llama3_8b()
    h = llm.hidden
    inst = (Instance(tokens=8192, attention_spans=(4096, 4096)),)
    for tp in (1, 4):
        got = layer_activation_bytes(llm, inst, tp=tp, recompute=Recompute.NONE, dtype_bytes=2)
        assert got == pytest.approx(34 * h * 8192 / tp, rel=0.01)
        sel = layer_activation_bytes(llm, inst, tp=tp, recompute=Recompute.SELECTIVE, dtype_bytes=2)
        assert 0.6 * got < sel < 0.85 * got
        # Full recompute keeps each block's input: Korthikanti's 2sbh per layer.
        assert layer_activation_bytes(llm, inst, tp=tp, recompute=Recompute.FULL) == 8192 * h * 2 / tp
        assert caption_bytes(llm, inst, tp=tp) == 0.0
    # Activations follow tokens, not documents (flash attention keeps no score matrix).
    one_doc = (Instance(tokens=8192, attention_spans=(8192,)),)
    assert layer_activation_bytes(llm, one_doc, tp=1, recompute=Recompute.NONE) == layer_activation_bytes(
        llm, inst, tp=1, recompute=Recompute.NONE
    )


def test_stage_activation_bytes_per_strategy() -> None:
    w = presets.workload("vlm-s")
    cm = CostModel(w.model, w.parallel, H100_SXM)
    llm = w.model.module("llm")
    inst = {"llm": (Instance(tokens=8192, attention_spans=(8192,)),)}
    middle = Chunk("llm", 1, 1, (LayerRange("llm", 8, 16),))
    per_layer = layer_activation_bytes(llm, inst["llm"], tp=4, recompute=Recompute.NONE)
    assert cm.stage_activation_bytes(middle, inst) == pytest.approx(8 * per_layer)
    assert cm.stage_activation_bytes(middle, inst, Recompute.FULL) == pytest.approx(8 * 8192 * 4096 * 2 / 4)
    assert cm.layer_activation_bytes("llm", inst["llm"], Recompute.SELECTIVE) == layer_activation_bytes(
        llm, inst["llm"], tp=4, recompute=Recompute.SELECTIVE
    )
    # The last chunk also keeps the loss's fp32 softmax over the vocab-parallel logits.
    last = Chunk("llm", 3, 3, (LayerRange("llm", 24, 32),))
    extra = cm.stage_activation_bytes(last, inst) - cm.stage_activation_bytes(middle, inst)
    assert extra >= 8192 * 128256 / 4 * 4
    # ViT activations follow patches; a DiT also keeps K/V over each clip's caption.
    vit = (Instance(tokens=2704, attention_spans=(2704,), output_tokens=169),) * 4
    vit_chunk = Chunk("vit", 1, 1, (LayerRange("vit", 16, 32),))
    assert cm.stage_activation_bytes(vit_chunk, {"vit": vit}) == pytest.approx(
        16 * layer_activation_bytes(w.model.module("vit"), vit, tp=4, recompute=Recompute.NONE)
    )
    dit = presets.dit_5b(context_hidden=4096)
    with_caption = (Instance(tokens=4608, attention_spans=(4608,), context_tokens=200),)
    without = (Instance(tokens=4608, attention_spans=(4608,), context_tokens=0),)
    diff = layer_activation_bytes(dit, with_caption, tp=1, recompute=Recompute.NONE) - layer_activation_bytes(
        dit, without, tp=1, recompute=Recompute.NONE
    )
    assert diff == pytest.approx(200 * 2 * 3584 * 2)
    assert caption_bytes(dit, with_caption, tp=4) == 200 * 3584 * 2 / 4


def test_a_backwards_working_memory_is_one_blocks_activations_times_the_measured_factor() -> None:
    """A chunk of 8 decoder blocks needs the working memory of one block (one block's backward runs at a time),
    by strategy; a chunk without blocks (frozen, or no layers here) needs none."""
    w = presets.workload("vlm-s")
    cm = CostModel(w.model, w.parallel, H100_SXM)
    llm = w.model.module("llm")
    inst = {"llm": (Instance(tokens=8192, attention_spans=(8192,)),)}
    middle = Chunk("llm", 1, 1, (LayerRange("llm", 8, 16),))
    one_block = layer_activation_bytes(llm, inst["llm"], tp=4, recompute=Recompute.NONE)
    got = {rc: cm.stage_workspace_bytes(middle, inst, rc) for rc in Recompute}
    for rc, value in got.items():
        assert value == pytest.approx(BACKWARD_WORKSPACE_BLOCKS[(llm.kind, rc)] * one_block)
        assert value == backward_workspace_bytes(llm, inst["llm"], tp=4, recompute=rc)
    assert got[Recompute.NONE] < got[Recompute.SELECTIVE] < got[Recompute.FULL]
    # The last chunk also runs the loss head's backward, which needs twice the fp32 logits (vocab-parallel).
    last = Chunk("llm", 3, 3, (LayerRange("llm", 24, 32),))
    assert cm.stage_workspace_bytes(last, inst) == pytest.approx(max(got[Recompute.NONE], 2 * 8192 * 128256 / 4 * 4))
    frozen = llama_only(frozen=True)
    cm_frozen = CostModel(frozen, ParallelSpec(pp=4, tp=4, dp=1, microbatches=8), H100_SXM)
    assert cm_frozen.stage_workspace_bytes(middle, inst) == 0.0
