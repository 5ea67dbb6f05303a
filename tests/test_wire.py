"""The v1 wire contract: dataclass -> message -> bytes -> message -> dataclass is the identity, wire defaults
match the dataclass defaults, and bad wire input raises `SpecError` naming the field path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeweaver import presets, wire
from pipeweaver.errors import SpecError
from pipeweaver.plan.ir import (
    Action,
    CommBatch,
    Compute,
    Direction,
    Pass,
    PipelineInfo,
    Placement,
    Plan,
    PlanHeader,
    PlanSource,
    Prefetch,
    RankPlan,
    Recompute,
    StageKey,
    TensorSpec,
    Transfer,
    Wait,
)
from pipeweaver.plan.layouts import modular_placement, split_sub_microbatches
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.hardware import HARDWARE_PRESETS, HardwareSpec
from pipeweaver.spec.model import ImageGeometry, Modality, ModelSpec, VideoGeometry
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.spec.workload import Workload
from pipeweaver.v1 import planner_pb2 as pb
from tests.strategies import (
    batch_metadata,
    hardware_specs,
    model_specs,
    parallel_specs,
    placements,
    plans,
)

T = TypeVar("T")
M = TypeVar("M", bound=Message)

plan_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_round_trips(value: T, to_proto: Callable[[T], M], from_proto: Callable[[M], T]) -> None:
    """Both in memory and through the serialized bytes, as a peer in another process would see them."""
    msg = to_proto(value)
    assert from_proto(msg) == value
    assert from_proto(type(msg).FromString(msg.SerializeToString())) == value


# ---- round trips -------------------------------------------------------------------------------------------


@given(model_specs())
def test_model_round_trips(model: ModelSpec) -> None:
    assert_round_trips(model, wire.model_to_proto, wire.model_from_proto)


@given(st.data())
def test_parallel_round_trips(data: st.DataObject) -> None:
    model = data.draw(st.none() | model_specs())
    assert_round_trips(data.draw(parallel_specs(model=model)), wire.parallel_to_proto, wire.parallel_from_proto)


@given(hardware_specs())
def test_hardware_round_trips(hardware: HardwareSpec) -> None:
    assert_round_trips(hardware, wire.hardware_to_proto, wire.hardware_from_proto)


@given(st.data())
def test_batch_round_trips(data: st.DataObject) -> None:
    model = data.draw(st.none() | model_specs())
    assert_round_trips(data.draw(batch_metadata(model=model)), wire.batch_to_proto, wire.batch_from_proto)


@given(placements())
def test_placement_round_trips(placement: Placement) -> None:
    assert_round_trips(placement, wire.placement_to_proto, wire.placement_from_proto)


@plan_settings
@given(plans())
def test_plan_round_trips(plan: Plan) -> None:
    assert_round_trips(plan, wire.plan_to_proto, wire.plan_from_proto)
    assert_round_trips(plan.header, wire.header_to_proto, wire.header_from_proto)
    assert_round_trips(plan, lambda p: wire.plan_to_proto(p, packed=True), wire.plan_from_proto)
    for rank_plan in plan.ranks:
        assert_round_trips(rank_plan, wire.rank_plan_to_proto, wire.rank_plan_from_proto)
        packed = wire.rank_plan_to_proto(rank_plan, packed=True)
        assert not packed.actions and wire.action_count(packed) == len(rank_plan.actions)
        assert wire.rank_plan_from_proto(pb.RankPlan.FromString(packed.SerializeToString())) == rank_plan
        for action in rank_plan.actions:
            assert_round_trips(action, wire.action_to_proto, wire.action_from_proto)


@pytest.mark.parametrize(
    "workload",
    [presets.vlm_m(), presets.t2v_l(), presets.tiny_vlm(), presets.tiny_t2v()],
    ids=lambda w: w.name,
)
def test_preset_workloads_round_trip(workload: Workload) -> None:
    assert_round_trips(workload.model, wire.model_to_proto, wire.model_from_proto)
    assert_round_trips(workload.parallel, wire.parallel_to_proto, wire.parallel_from_proto)
    assert_round_trips(workload.hardware, wire.hardware_to_proto, wire.hardware_from_proto)


@pytest.mark.parametrize("hardware", HARDWARE_PRESETS.values(), ids=lambda h: h.name)
def test_hardware_presets_round_trip(hardware: HardwareSpec) -> None:
    assert_round_trips(hardware, wire.hardware_to_proto, wire.hardware_from_proto)


def test_real_placement_and_split_round_trip() -> None:
    """What the planner actually sends: a modular placement and a token-balanced sub-microbatch split."""
    workload = presets.tiny_vlm(pp=2)
    placement = modular_placement(workload.model, 2, {"vit": 2, "llm": 1})
    image = MediaItem(Modality.IMAGE, 16, 4)
    batch = BatchMetadata(3, (Microbatch((Document(20, (image,) * 3), Document(5))), Microbatch((Document(9),))))
    header = PlanHeader(
        job_id="job-1",
        iteration=batch.iteration,
        placement=placement,
        sub_microbatches=split_sub_microbatches(workload.model, placement, batch, {"vit": 2}),
        num_microbatches=len(batch.microbatches),
        schedule="pipeweaver",
        source=PlanSource.SEARCH,
        split_backward=True,
        peak_memory_bytes=(1.5e9, 2.5e9),
        baseline_makespans_ms=(("1f1b", 12.5),),
    )
    assert_round_trips(batch, wire.batch_to_proto, wire.batch_from_proto)
    assert_round_trips(header, wire.header_to_proto, wire.header_from_proto)


# ---- unset wire fields take the dataclass defaults ---------------------------------------------------------


def test_unset_optional_fields_take_dataclass_defaults() -> None:
    assert wire.parallel_from_proto(pb.ParallelSpec(pp=2, microbatches=8)) == ParallelSpec(pp=2, microbatches=8)
    bare = pb.HardwareSpec(
        name="x",
        peak_flops=1.0,
        hbm_bandwidth=1.0,
        memory_bytes=1.0,
        nvlink_bandwidth=1.0,
        internode_bandwidth=1.0,
    )
    assert wire.hardware_from_proto(bare) == HardwareSpec(
        name="x",
        peak_flops=1.0,
        hbm_bandwidth=1.0,
        memory_bytes=1.0,
        nvlink_bandwidth=1.0,
        internode_bandwidth=1.0,
    )
    vit = wire.model_to_proto(presets.tiny_vlm().model)
    vit.modules[0].image.Clear()
    assert wire.model_from_proto(vit).modules[0].image == ImageGeometry()
    t2v = wire.model_to_proto(presets.tiny_t2v().model)
    t2v.modules[1].video.Clear()
    assert wire.model_from_proto(t2v).modules[1].video == VideoGeometry()


def test_unspecified_enums_take_dataclass_defaults() -> None:
    stage = StageKey("llm", 0, 0, 0, Pass.F)
    compute = pb.Action(compute=pb.Compute(stage=wire.stage_key_to_proto(stage)))
    assert wire.action_from_proto(compute) == Compute(stage, Recompute.NONE)
    header = pb.PlanHeader(placement=pb.Placement(pp=1), schedule="1f1b")
    decoded = wire.header_from_proto(header)
    assert decoded.source is PlanSource.BASELINE
    assert decoded == PlanHeader(
        job_id="", iteration=0, placement=Placement(pp=1, pipelines=(), chunks=()), sub_microbatches=(),
        num_microbatches=0, schedule="1f1b",
    )  # fmt: skip


def test_unset_tensor_dtype_and_pipeline_flags_take_dataclass_defaults() -> None:
    stage = wire.stage_key_to_proto(StageKey("vit", 0, 0, 0, Pass.F))
    op = pb.Transfer(direction=pb.DIRECTION_SEND, peer=1, src=stage, dst=stage, tensors=[pb.TensorSpec(shape=[4, 8])])
    action = wire.action_from_proto(pb.Action(comm_batch=pb.CommBatch(handle=3, ops=[op])))
    assert isinstance(action, CommBatch)
    assert action.ops[0].tensors == (TensorSpec((4, 8)),)
    placement = wire.placement_from_proto(pb.Placement(pp=1, pipelines=[pb.PipelineInfo(name="vit")]))
    assert placement.pipelines == (PipelineInfo("vit", ()),)


def test_the_default_tensor_dtype_is_left_unset_on_the_wire() -> None:
    """Every transfer carries its tensors' specs; "bfloat16", the default, goes unset (10 bytes a transfer) and
    reads back the same, while any other dtype is written out."""
    stage = StageKey("vit", 0, 0, 0, Pass.F)
    specs = (TensorSpec((4, 8)), TensorSpec((2,), "float32"))
    batch = CommBatch(3, (Transfer(Direction.SEND, 1, stage, stage, specs),))
    msg = wire.action_to_proto(batch)
    first, second = msg.comm_batch.ops[0].tensors
    assert not first.HasField("dtype") and second.dtype == "float32"
    assert wire.action_from_proto(pb.Action.FromString(msg.SerializeToString())) == batch


# ---- bad wire input names the field ------------------------------------------------------------------------


def _tiny_model() -> pb.ModelSpec:
    return wire.model_to_proto(presets.tiny_vlm().model)


def _set(path: str, value: object) -> Callable[[pb.ModelSpec], None]:
    """A mutation of the tiny VLM message: `_set("modules[0].layers", -1)`."""

    def mutate(msg: pb.ModelSpec) -> None:
        *parents, leaf = path.replace("]", "").replace("[", ".").split(".")
        target: Any = msg
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, leaf, value)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("modules[0].layers", -1), ["model.modules[0]:", "layers must be positive, got -1"]),
        (_set("modules[1].heads", 5), ["model.modules[1]:", "heads (5) must divide hidden (64)"]),
        (_set("modules[1].kv_heads", 3), ["model.modules[1]:", "kv_heads (3) must divide heads (4)"]),
        (_set("modules[0].name", "ViT"), ["model.modules[0]:", "lowercase identifier"]),
        (_set("modules[0].kind", 0), ["model.modules[0].kind:", "got LAYER_KIND_UNSPECIFIED"]),
        (_set("modules[0].kind", 99), ["model.modules[0].kind:", "unknown value 99"]),
        (_set("modules[0].input", pb.MODALITY_TEXT), ["model.modules[0]:", "vit_block module takes images"]),
        (_set("modules[0].image.merge", 3), ["model.modules[0].image:", "merge (3)"]),
        (_set("edges[0].merge", 0), ["model.edges[0].merge:", "MERGE_KIND_TOKEN_SCATTER"]),
        (_set("edges[0].dst", "nope"), ["model:", "edge target 'nope'"]),
        (lambda m: m.modules[0].ClearField("image"), ["model.modules[0]:", "needs image geometry"]),
        (lambda m: m.ClearField("modules"), ["model:", "modules must not be empty"]),
    ],
)
def test_bad_model_raises_spec_error_naming_the_field(
    mutate: Callable[[pb.ModelSpec], None], expected: list[str]
) -> None:
    msg = _tiny_model()
    mutate(msg)
    with pytest.raises(SpecError) as info:
        wire.model_from_proto(msg)
    for fragment in expected:
        assert fragment in str(info.value)


def test_tp_not_dividing_heads_is_left_to_check_model() -> None:
    """The wire checks each message alone; cross-message rules stay with `ParallelSpec.check_model`."""
    parallel = wire.parallel_from_proto(pb.ParallelSpec(pp=2, microbatches=4, tp=3))
    with pytest.raises(SpecError, match=r"tp \(3\) must divide the attention heads"):
        parallel.check_model(wire.model_from_proto(_tiny_model()))


def test_bad_parallel_and_hardware_name_the_field() -> None:
    with pytest.raises(SpecError, match=r"^parallel: pp must be at least 1, got 0"):
        wire.parallel_from_proto(pb.ParallelSpec(pp=0, microbatches=4))
    with pytest.raises(SpecError, match=r"^job\.parallel: tp must be at least 1, got -2"):
        wire.parallel_from_proto(pb.ParallelSpec(pp=1, microbatches=4, tp=-2), path="job.parallel")
    hw = wire.hardware_to_proto(HARDWARE_PRESETS["h100-sxm"])
    hw.memory_bytes = -1.0
    with pytest.raises(SpecError, match=r"^hardware: .*memory_bytes must be positive"):
        wire.hardware_from_proto(hw)
    hw = wire.hardware_to_proto(HARDWARE_PRESETS["h100-sxm"])
    hw.dtype_bytes = 3
    with pytest.raises(SpecError, match=r"dtype_bytes must be 2 or 4"):
        wire.hardware_from_proto(hw)


def _batch() -> pb.BatchMetadata:
    media = [pb.MediaItem(modality=pb.MODALITY_IMAGE, tokens=16, merged_tokens=4)]
    return pb.BatchMetadata(
        iteration=7, microbatches=[pb.Microbatch(documents=[pb.Document(text_tokens=10, media=media)])]
    )


def test_bad_batch_names_the_field() -> None:
    assert wire.batch_from_proto(_batch()).iteration == 7
    where = "batch.microbatches[0].documents[0]"
    cases: list[tuple[Callable[[pb.BatchMetadata], None], str]] = [
        (
            lambda b: setattr(b.microbatches[0].documents[0].media[0], "modality", 0),
            f"{where}.media[0].modality:",
        ),
        (
            lambda b: setattr(b.microbatches[0].documents[0].media[0], "tokens", 0),
            f"{where}.media[0]: media tokens",
        ),
        (
            lambda b: setattr(b.microbatches[0].documents[0].media[0], "modality", pb.MODALITY_TEXT),
            f"{where}.media[0]: a media item is an image or a video",
        ),
        (lambda b: setattr(b.microbatches[0].documents[0], "text_tokens", -1), f"{where}: text_tokens"),
        (lambda b: setattr(b, "iteration", -1), "batch: iteration must not be negative"),
        (lambda b: b.ClearField("microbatches"), "batch: a batch needs at least one microbatch"),
    ]
    for mutate, expected in cases:
        msg = _batch()
        mutate(msg)
        with pytest.raises(SpecError) as info:
            wire.batch_from_proto(msg)
        assert str(info.value).startswith(expected), str(info.value)


def test_bad_plan_names_the_field() -> None:
    stage = wire.stage_key_to_proto(StageKey("llm", 0, 0, 0, Pass.F))
    with pytest.raises(SpecError, match=r"^plan\.header: missing"):
        wire.plan_from_proto(pb.Plan())
    with pytest.raises(SpecError, match=r"^header\.placement: missing"):
        wire.header_from_proto(pb.PlanHeader())
    with pytest.raises(SpecError, match=r"^rank_plan\.actions\[1\]: empty; set one of compute"):
        wire.rank_plan_from_proto(pb.RankPlan(actions=[pb.Action(wait=pb.Wait(handle=0)), pb.Action()]))
    with pytest.raises(SpecError, match=r"^action\.compute\.stage: missing"):
        wire.action_from_proto(pb.Action(compute=pb.Compute()))
    with pytest.raises(SpecError, match=r"^action\.compute\.stage\.pass_kind: .*got PASS_UNSPECIFIED"):
        wire.action_from_proto(pb.Action(compute=pb.Compute(stage=pb.StageKey(pipeline="llm"))))
    bad_op = pb.Transfer(peer=1, src=stage, dst=stage)
    with pytest.raises(SpecError, match=r"^action\.comm_batch\.ops\[0\]\.direction: "):
        wire.action_from_proto(pb.Action(comm_batch=pb.CommBatch(ops=[bad_op])))
    with pytest.raises(SpecError, match=r"^action\.comm_batch\.ops\[0\]\.dst: missing"):
        wire.action_from_proto(
            pb.Action(comm_batch=pb.CommBatch(ops=[pb.Transfer(direction=pb.DIRECTION_RECV, src=stage)]))
        )
    one_action = [pb.Action(wait=pb.Wait(handle=0))]
    with pytest.raises(SpecError, match=r"^rank_plan\.predicted_start_ms/predicted_end_ms: "):
        wire.rank_plan_from_proto(pb.RankPlan(actions=one_action, predicted_start_ms=[0.0]))
    with pytest.raises(SpecError, match=r"one entry per action \(1\), got 2 starts and 2 ends"):
        wire.rank_plan_from_proto(
            pb.RankPlan(actions=one_action, predicted_start_ms=[0.0, 1.0], predicted_end_ms=[1.0, 2.0])
        )
    ok = pb.RankPlan(rank=2, actions=one_action, predicted_start_ms=[0.5], predicted_end_ms=[1.5])
    assert wire.rank_plan_from_proto(ok) == RankPlan(2, (Wait(0),), ((0.5, 1.5),))


def _packed(*actions: Action) -> pb.PackedActions:
    return wire.packed_actions_to_proto(actions)


def test_packed_actions_share_stage_rows_and_tensor_lists() -> None:
    """A stage key or tensor list used twice is one row; each action is its kind and its values in `args`."""
    f0, f1 = StageKey("vit", 0, 0, 0, Pass.F), StageKey("vit", 1, 0, 0, Pass.F)
    spec = (TensorSpec((4, 8)),)
    actions: tuple[Action, ...] = (
        Compute(f0, Recompute.FULL),
        CommBatch(7, (Transfer(Direction.SEND, 1, f0, f1, spec), Transfer(Direction.SEND, 1, f0, f1, spec))),
        Wait(7),
        Prefetch(f0),
    )
    msg = _packed(*actions)
    assert list(msg.pipelines) == ["vit"] and list(msg.stage_chunk) == [0, 1] and len(msg.tensor_lists) == 1
    assert list(msg.kinds) == [
        pb.ACTION_KIND_COMPUTE,
        pb.ACTION_KIND_COMM_BATCH,
        pb.ACTION_KIND_WAIT,
        pb.ACTION_KIND_PREFETCH,
    ]
    send = [pb.DIRECTION_SEND, 1, 0, 1, 0]
    assert list(msg.args) == [0, pb.RECOMPUTE_FULL, 0, 7, 2, *send, *send, 7, 0]
    assert wire.packed_actions_from_proto(msg) == actions


def test_a_real_plan_packs_into_less_than_half_its_bytes() -> None:
    """What packing is for: each stage key and tensor list once, then small integers. On a baseline plan of a
    preset (vlm-s's searched plans: 58 -> 22 KB per rank), less than half the bytes, and the same plan back."""
    from pipeweaver.datagen import sample_batch
    from pipeweaver.search.baselines import build_baseline_plan

    w = presets.vlm_m()
    b = sample_batch(w, seed=0)
    plan = build_baseline_plan("interleaved-1f1b", model=w.model, parallel=w.parallel, batch=b, hardware=w.hardware)
    plain, packed = wire.plan_to_proto(plan), wire.plan_to_proto(plan, packed=True)
    for whole, lean in zip(plain.ranks, packed.ranks, strict=True):
        assert lean.ByteSize() < 0.5 * whole.ByteSize()
    assert wire.plan_from_proto(pb.Plan.FromString(packed.SerializeToString())) == plan


def test_bad_packed_actions_name_the_field() -> None:
    stage = StageKey("llm", 0, 0, 0, Pass.F)
    good = _packed(Compute(stage), CommBatch(1, (Transfer(Direction.RECV, 0, stage, stage, (TensorSpec((2,)),)),)))

    def broken(**fields: Any) -> pb.PackedActions:
        msg = pb.PackedActions()
        msg.CopyFrom(good)
        for name, value in fields.items():
            msg.ClearField(name)
            getattr(msg, name).extend(value)
        return msg

    op = [0, 0, 0, 1, 1]  # the compute, then the batch's handle and op count: its op starts at args[5]
    cases = [
        (broken(stage_sub=[]), r"^packed\.stage_sub: the stage table needs one entry per row, 1 .* got 0"),
        (broken(stage_pipeline=[3]), r"^packed\.stage_pipeline\[0\]: must index pipelines \(0\.\.0\), got 3"),
        (broken(stage_pass=[0]), r"^packed\.stage_pass\[0\]: must be one of PASS_FORWARD"),
        (broken(kinds=[pb.ACTION_KIND_COMPUTE, 9]), r"^packed\.kinds\[1\]: must be one of COMPUTE, COMM_BATCH"),
        (broken(args=[5, 0, 0]), r"^packed\.args\[0\]: the stage of action 0 must be a stage row \(0\.\.0\), got 5"),
        (broken(args=[0, 0, 2]), r"^packed\.args\[2\]: offload of action 0 must be 0 or 1, got 2"),
        (broken(args=[*op, 2, 0, 0, 0, 4]), r"^packed\.args\[9\]: op 0 of action 1 must name a row of tensor_lists"),
        (broken(args=[*op, 2, 0, 0, 3, 0]), r"^packed\.args\[8\]: dst of op 0 of action 1 must be a stage row"),
        (broken(args=[*op, 2, 0, 0]), r"^packed\.args: action 1 \(COMM_BATCH\) needs 5 value\(s\) from args\[5\]"),
        (broken(args=[*good.args, 0]), r"^packed\.args: 1 value\(s\) left after the 2 actions"),
        (broken(args=[*op, 7, 0, 0, 0, 0]), r"^packed\.args\[5\]: must be one of DIRECTION_SEND"),
    ]
    for msg, match in cases:
        with pytest.raises(SpecError, match=match):
            wire.packed_actions_from_proto(msg)
    both = pb.RankPlan(actions=[pb.Action(wait=pb.Wait(handle=0))], packed=good)
    with pytest.raises(SpecError, match=r"^rank_plan: set actions or packed, not both"):
        wire.rank_plan_from_proto(both)


def test_transfer_round_trips_every_direction() -> None:
    stage = StageKey("vit", 1, 2, 3, Pass.W)
    for direction in Direction:
        op = Transfer(direction, 0, stage, stage.with_pass(Pass.I), (TensorSpec((2,), "f32"),))
        batch: Action = CommBatch(5, (op,))
        assert_round_trips(batch, wire.action_to_proto, wire.action_from_proto)


# ---- import hygiene ----------------------------------------------------------------------------------------


def test_wire_imports_without_grpc_ortools_or_numba() -> None:
    """Worker processes and the trainer's data path use `wire`; it must not drag in the server's stack."""
    code = textwrap.dedent(
        """
        import sys

        HEAVY = {"grpc", "ortools", "numba"}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in HEAVY:
                    raise ImportError(f"blocked import of {name}")
                return None

        sys.meta_path.insert(0, Block())
        import pipeweaver.v1.planner_pb2
        import pipeweaver.wire

        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in HEAVY or m.endswith("_pb2_grpc"))
        print(loaded)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
