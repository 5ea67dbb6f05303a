"""Calibration: fit SEMU's efficiency factors to measured layer and transfer times.

A layer profile (written by `benchmarks/gpu/profile_layers.py`) holds, per layer kind, one block's forward and
backward times over a sweep of token counts at tp = 1. For each (layer kind, direction) the fit finds

    device(row) = a_gemm * (G1 + half_gemm * G2) + a_attn * (A1 + half_attn * A2) + a_elem * E + overhead * N
    time(row)   = (device(row)^p + host^p)^(1/p)          (p = costmodel.HOST_OVERLAP_P = 4)

where G1 = sum of GEMM flops / peak, G2 = sum of GEMM flops / (peak * rows), A1, A2 the same for attention, E the
elementwise bytes / HBM bandwidth and N the operator count: exactly `CostModel`'s roofline with those factors
(checked after fitting, with the binding roofline term re-chosen per operator). It is linear in
(a_gemm, a_gemm * half_gemm, a_attn, a_attn * half_attn, a_elem, overhead): relative-error least squares with a
light ridge toward the prior factors (collinear columns, e.g. a ViT whose images all have 2,704 patches, then
keep prior proportions) and non-negativity. The host time (CPU dispatch, which bounds small eager-mode blocks)
is chosen on a grid of fractions of the fastest row, the device part fitted on what remains of the others; the
candidate with the least relative error wins. Transfers fit overhead + a_net * bytes / bandwidth per class.
The host time of building a sub-microbatch's inputs (`CostModel.input_build_ms`) is fitted from a traced
iteration's forward times instead (`fit_input_build_ms`): no layer profile runs the executor's input building.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeweaver.plan.ir import Pass, Recompute
from pipeweaver.simulator.costmodel import (
    ANY,
    HOST_OVERLAP_P,
    ClassFactors,
    EfficiencyFactors,
    FactorKey,
    direction,
    ops_time_s,
)
from pipeweaver.simulator.ops import Op, OpClass, layer_ops
from pipeweaver.spec.batch import Instance
from pipeweaver.spec.hardware import H20, H100_SXM, HARDWARE_PRESETS, HardwareSpec
from pipeweaver.spec.model import ImageGeometry, LayerKind, Modality, ModuleSpec, VideoGeometry

PROFILE_FORMAT = "pipeweaver.layer_profile/1"
FITTED_CLASSES = (OpClass.GEMM, OpClass.ATTENTION, OpClass.ELEMENTWISE)

F64 = npt.NDArray[np.float64]


# ---- profiles --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerDims:
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int

    def to_json(self) -> dict[str, int]:
        return {"hidden": self.hidden, "ffn_hidden": self.ffn_hidden, "heads": self.heads, "kv_heads": self.kv_heads}

    @staticmethod
    def of(module: ModuleSpec) -> LayerDims:
        return LayerDims(module.hidden, module.ffn_hidden, module.heads, module.kv_heads)


@dataclass(frozen=True, slots=True)
class LayerProfile:
    """One measured block time: `kind` at `dims` on a packed sequence of `spans` (tp = 1)."""

    kind: LayerKind
    dims: LayerDims
    tokens: int
    spans: tuple[int, ...]
    """Attention blocks: images (ViT), documents of one packed sequence (decoder), clips (DiT)."""
    context_tokens: int
    """Caption tokens each DiT clip cross-attends to (0 otherwise)."""
    pass_: Pass
    """F or B (full backward)."""
    measured_ms: float
    card: str = ""
    torch_version: str = ""

    def module(self) -> ModuleSpec:
        """A one-layer module with these dims (what the cost model evaluates)."""
        d = self.dims
        common: dict[str, Any] = {
            "name": "layer",
            "kind": self.kind,
            "layers": 1,
            "hidden": d.hidden,
            "ffn_hidden": d.ffn_hidden,
            "heads": d.heads,
            "kv_heads": d.kv_heads,
        }
        if self.kind is LayerKind.VIT_BLOCK:
            return ModuleSpec(**common, input=Modality.IMAGE, image=ImageGeometry())
        if self.kind is LayerKind.DIT_BLOCK:
            return ModuleSpec(**common, input=Modality.VIDEO, video=VideoGeometry())
        return ModuleSpec(**common, input=Modality.TEXT)

    def instances(self) -> tuple[Instance, ...]:
        """Decoder: one packed sequence of documents; ViT / DiT: one instance per image / clip."""
        if self.kind is LayerKind.DECODER_BLOCK:
            return (Instance(tokens=self.tokens, attention_spans=self.spans, output_tokens=self.tokens),)
        return tuple(
            Instance(tokens=s, attention_spans=(s,), context_tokens=self.context_tokens, output_tokens=s)
            for s in self.spans
        )

    def ops(self, dtype_bytes: int) -> tuple[Op, ...]:
        return layer_ops(
            self.module(), self.instances(), tp=1, pass_=self.pass_, recompute=Recompute.NONE, dtype_bytes=dtype_bytes
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "dims": self.dims.to_json(),
            "tokens": self.tokens,
            "spans": list(self.spans),
            "context_tokens": self.context_tokens,
            "pass": self.pass_.value,
            "measured_ms": self.measured_ms,
        }


@dataclass(frozen=True, slots=True)
class TransferProfile:
    """One measured transfer (or collective) time."""

    op_class: OpClass
    num_bytes: float
    """Bytes one GPU sends (for all-reduces: the ring's 2 (n-1)/n of the buffer)."""
    link_bandwidth: float
    """Datasheet bandwidth of the link used, bytes/s."""
    measured_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "op_class": self.op_class.value,
            "bytes": self.num_bytes,
            "link_bandwidth": self.link_bandwidth,
            "measured_ms": self.measured_ms,
        }


@dataclass(frozen=True, slots=True)
class Profile:
    rows: tuple[LayerProfile, ...]
    transfers: tuple[TransferProfile, ...] = ()
    meta: Mapping[str, Any] | None = None


def load_profile(path: str | Path, hardware: HardwareSpec | None = None) -> Profile:
    """Read a `profile_layers.py` JSON file. Transfers that name a link ("nvlink", "internode") get its
    bandwidth from `hardware`."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: format is {data.get('format')!r}, expected {PROFILE_FORMAT!r}")
    card, version = str(data.get("card", "")), str(data.get("torch_version", ""))
    rows = tuple(
        LayerProfile(
            kind=LayerKind(r["kind"]),
            dims=LayerDims(**{k: int(v) for k, v in r["dims"].items()}),
            tokens=int(r["tokens"]),
            spans=tuple(int(s) for s in r["spans"]),
            context_tokens=int(r.get("context_tokens", 0)),
            pass_=Pass(r["pass"]),
            measured_ms=float(r["measured_ms"]),
            card=str(r.get("card", card)),
            torch_version=str(r.get("torch_version", version)),
        )
        for r in data["rows"]
    )
    transfers: list[TransferProfile] = []
    for t in data.get("transfers", []):
        bw = t.get("link_bandwidth")
        if bw is None:
            if hardware is None:
                continue
            bw = hardware.nvlink_bandwidth if t.get("link", "nvlink") == "nvlink" else hardware.internode_bandwidth
        transfers.append(TransferProfile(OpClass(t["op_class"]), float(t["bytes"]), float(bw), float(t["measured_ms"])))
    meta = {k: v for k, v in data.items() if k not in ("rows", "transfers")}
    return Profile(rows=rows, transfers=tuple(transfers), meta=meta)


def save_profile(
    path: str | Path,
    rows: Sequence[LayerProfile],
    transfers: Sequence[TransferProfile] = (),
    meta: Mapping[str, Any] | None = None,
) -> None:
    cards = {r.card for r in rows}
    versions = {r.torch_version for r in rows}
    data: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "card": cards.pop() if len(cards) == 1 else "mixed",
        "torch_version": versions.pop() if len(versions) == 1 else "mixed",
        **(dict(meta) if meta else {}),
        "rows": [
            r.to_json() | ({"card": r.card, "torch_version": r.torch_version} if len(cards) > 1 else {}) for r in rows
        ],
        "transfers": [t.to_json() for t in transfers],
    }
    data["format"] = PROFILE_FORMAT
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def hardware_for_card(card: str) -> HardwareSpec:
    """The hardware preset whose datasheet numbers a profile from `card` is fitted against.

    H200s (and unknown cards) use the H100's: its peak FLOP/s is the same and the fitted factors absorb the rest.
    """
    name = card.lower()
    if name == "cpu":
        return HARDWARE_PRESETS["cpu"]
    for key, preset in (("h800", "h800"), ("a100", "a100-80gb")):
        if key in name:
            return HARDWARE_PRESETS[preset]
    if "h20" in name and "h200" not in name:
        return H20
    return H100_SXM


# ---- prediction and error ----------------------------------------------------------------------------------------


def predict_ms(row: LayerProfile, hardware: HardwareSpec, factors: EfficiencyFactors) -> float:
    """What the cost model says `row` takes (one block, tp = 1)."""
    return ops_time_s(row.ops(hardware.dtype_bytes), hardware, factors, kind=row.kind) * 1e3


def predict_transfer_ms(row: TransferProfile, factors: EfficiencyFactors) -> float:
    cf = factors.lookup(row.op_class)
    return (cf.a_net * row.num_bytes / row.link_bandwidth + cf.overhead_s) * 1e3


def mape(predicted: Iterable[float], measured: Iterable[float]) -> float:
    """Mean absolute percentage error, as a fraction (0.03 is 3%)."""
    p = np.asarray(list(predicted), dtype=np.float64)
    m = np.asarray(list(measured), dtype=np.float64)
    if p.shape != m.shape or m.size == 0:
        raise ValueError(f"mape needs two equally long, non-empty sequences (got {p.size} and {m.size})")
    return float(np.mean(np.abs(p - m) / m))


def profile_mape(rows: Sequence[LayerProfile], hardware: HardwareSpec, factors: EfficiencyFactors) -> float:
    return mape((predict_ms(r, hardware, factors) for r in rows), (r.measured_ms for r in rows))


def holdout_split(rows: Sequence[LayerProfile], every: int = 3) -> tuple[list[LayerProfile], list[LayerProfile]]:
    """(fit, held out): per (kind, pass), sorted by tokens, every `every`-th interior row is held out."""
    groups: dict[tuple[LayerKind, Pass], list[LayerProfile]] = defaultdict(list)
    for r in rows:
        groups[(r.kind, r.pass_)].append(r)
    fit: list[LayerProfile] = []
    held: list[LayerProfile] = []
    for key in sorted(groups, key=lambda k: (k[0].value, k[1].value)):
        g = sorted(groups[key], key=lambda r: (r.tokens, r.spans, r.context_tokens))
        for i, r in enumerate(g):
            (held if 0 < i < len(g) - 1 and i % every == 1 else fit).append(r)
    return fit, held


# ---- fitting -------------------------------------------------------------------------------------------------------

_N_PARAMS = 6  # a_gemm, a_gemm*half_gemm, a_attn, a_attn*half_attn, a_elem, overhead


def _theta_of(gemm: ClassFactors, attn: ClassFactors, elem: ClassFactors) -> F64:
    return np.array(
        [
            gemm.a_flop,
            gemm.a_flop * gemm.half_rows,
            attn.a_flop,
            attn.a_flop * attn.half_rows,
            elem.a_mem,
            gemm.overhead_s,
        ]
    )


def _features(
    ops: Sequence[Op], theta: F64, prior: Mapping[OpClass, ClassFactors], hardware: HardwareSpec
) -> tuple[F64, float]:
    """(feature row, constant seconds) of one measured block under the binding roofline terms of `theta`."""
    x = np.zeros(_N_PARAMS)
    const = 0.0
    peak, hbm = hardware.peak_flops, hardware.hbm_bandwidth
    for op in ops:
        c = op.op_class
        if c in (OpClass.GEMM, OpClass.ATTENTION):
            i = 0 if c is OpClass.GEMM else 2
            u1 = op.flops / peak
            u2 = op.flops / (peak * op.rows)
            mem = prior[c].a_mem * op.mem_bytes / hbm
            if theta[i] * u1 + theta[i + 1] * u2 >= mem:
                x[i] += u1
                x[i + 1] += u2
            else:
                const += mem
            x[5] += 1
        elif c is OpClass.ELEMENTWISE:
            x[4] += op.mem_bytes / hbm
            x[5] += 1
        else:
            cf = prior[c]
            const += max(cf.a_net * op.net_bytes / hardware.nvlink_bandwidth, cf.a_mem * op.mem_bytes / hbm)
            const += cf.overhead_s
    return x, const


def _solve(x: F64, const: F64, y: F64, theta0: F64, ridge: float) -> F64:
    """Relative-error least squares with a ridge toward theta0 and theta >= 0 (active set)."""
    scale = np.where(theta0 > 0, theta0, 1.0)
    w = 1.0 / y
    a = (x * scale) * w[:, None]  # in units of the prior: theta = scale * z
    b = (y - const) * w
    n = x.shape[1]
    free = np.ones(n, dtype=bool)
    z = np.zeros(n)
    z0 = theta0 / scale
    lam = math.sqrt(ridge)
    for _ in range(n + 1):
        idx = np.flatnonzero(free)
        a_aug = np.vstack([a[:, idx], lam * np.eye(len(idx))])
        b_aug = np.concatenate([b, lam * z0[idx]])
        sol, *_ = np.linalg.lstsq(a_aug, b_aug, rcond=None)
        z = np.zeros(n)
        z[idx] = sol
        if (z >= 0).all():
            break
        free &= z > 0
    result: F64 = np.maximum(z, 0.0) * scale
    return result


def _fit_device(
    ops_rows: Sequence[Sequence[Op]],
    y: F64,
    prior: Mapping[OpClass, ClassFactors],
    hardware: HardwareSpec,
    ridge: float,
) -> F64:
    theta0 = _theta_of(prior[OpClass.GEMM], prior[OpClass.ATTENTION], prior[OpClass.ELEMENTWISE])
    theta = theta0.copy()
    for _ in range(4):  # re-choose each operator's binding roofline term under the new factors
        feats = [_features(ops, theta, prior, hardware) for ops in ops_rows]
        x = np.array([f[0] for f in feats])
        const = np.array([f[1] for f in feats])
        new = _solve(x, const, y, theta0, ridge)
        if np.allclose(new, theta, rtol=1e-9, atol=0):
            break
        theta = new
    return theta


def _class_factors(theta: F64, prior: Mapping[OpClass, ClassFactors], host_s: float) -> dict[OpClass, ClassFactors]:
    a_g, ah_g, a_a, ah_a, a_e, ovh = (float(v) for v in theta)
    g, a, e = prior[OpClass.GEMM], prior[OpClass.ATTENTION], prior[OpClass.ELEMENTWISE]
    return {
        OpClass.GEMM: ClassFactors(
            a_flop=a_g,
            a_mem=g.a_mem,
            a_net=g.a_net,
            half_rows=ah_g / a_g if a_g > 0 else 0.0,
            overhead_s=ovh,
            host_s=host_s,
        ),
        OpClass.ATTENTION: ClassFactors(
            a_flop=a_a,
            a_mem=a.a_mem,
            a_net=a.a_net,
            half_rows=ah_a / a_a if a_a > 0 else 0.0,
            overhead_s=ovh,
            host_s=host_s,
        ),
        OpClass.ELEMENTWISE: ClassFactors(a_flop=e.a_flop, a_mem=a_e, a_net=e.a_net, overhead_s=ovh, host_s=host_s),
    }


def _group_error(
    rows: Sequence[LayerProfile],
    kind: LayerKind,
    backward: bool,
    cfs: Mapping[OpClass, ClassFactors],
    base: EfficiencyFactors,
    hardware: HardwareSpec,
) -> float:
    d = direction(backward)
    trial = base.with_entries({(kind.value, d, c): f for c, f in cfs.items()})
    err = [(predict_ms(r, hardware, trial) - r.measured_ms) / r.measured_ms for r in rows]
    return float(np.sum(np.square(err)))


def _fit_group(
    rows: Sequence[LayerProfile],
    kind: LayerKind,
    backward: bool,
    base: EfficiencyFactors,
    hardware: HardwareSpec,
    ridge: float,
) -> dict[OpClass, ClassFactors]:
    prior = {c: base.lookup(c, kind=kind, backward=backward) for c in OpClass}
    order = sorted(rows, key=lambda r: r.measured_ms)
    ops_rows = [r.ops(hardware.dtype_bytes) for r in order]
    y = np.array([r.measured_ms for r in order]) * 1e-3
    n_ops = len(ops_rows[0])
    p = HOST_OVERLAP_P
    best: tuple[float, dict[OpClass, ClassFactors]] | None = None
    # Host floor candidates: none, or a fraction of the fastest row; the device part is what remains of each
    # row once the host's share is taken out, fitted on the rows the host does not dominate.
    for frac in (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0):
        floor = frac * float(y[0])
        keep = y > floor * 1.05 if floor else np.ones(len(y), dtype=bool)
        if keep.sum() < min(3, len(y)):
            continue
        yk = y[keep]
        dev = (yk**p - floor**p) ** (1.0 / p) if floor and math.isfinite(p) else yk
        theta = _fit_device([o for o, k in zip(ops_rows, keep, strict=True) if k], dev, prior, hardware, ridge)
        cfs = _class_factors(theta, prior, floor / n_ops)
        err = _group_error(order, kind, backward, cfs, base, hardware)
        if best is None or err < best[0] - 1e-12:
            best = (err, cfs)
    assert best is not None
    return best[1]


def fit_layer_factors(
    rows: Sequence[LayerProfile],
    hardware: HardwareSpec,
    *,
    base: EfficiencyFactors | None = None,
    ridge: float = 1e-3,
) -> EfficiencyFactors:
    """Factors per (layer kind, direction) for GEMM, attention and elementwise operators, fitted on `rows`.

    B rows calibrate every backward pass (B, I, W); pre/post parts (kind ANY) take the decoder's fit when the
    profile has decoder rows (its GEMMs are the most general), else the kind with the most rows.
    """
    factors = base if base is not None else EfficiencyFactors.uncalibrated()
    groups: dict[tuple[LayerKind, bool], list[LayerProfile]] = defaultdict(list)
    for r in rows:
        if r.pass_ not in (Pass.F, Pass.B):
            raise ValueError(f"profile rows are F or B passes, got {r.pass_.value} ({r.kind.value}, {r.tokens})")
        groups[(r.kind, r.pass_ is Pass.B)].append(r)
    updates: dict[FactorKey, ClassFactors] = {}
    fitted: dict[tuple[LayerKind, bool], dict[OpClass, ClassFactors]] = {}
    for (kind, backward), g in sorted(groups.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        cfs = _fit_group(g, kind, backward, factors, hardware, ridge)
        fitted[(kind, backward)] = cfs
        for c, f in cfs.items():
            updates[(kind.value, direction(backward), c)] = f
    for backward in (False, True):
        candidates = [k for (k, b) in fitted if b == backward]
        if not candidates:
            continue
        pick = (
            LayerKind.DECODER_BLOCK
            if LayerKind.DECODER_BLOCK in candidates
            else max(candidates, key=lambda k: len(groups[(k, backward)]))
        )
        for c, f in fitted[(pick, backward)].items():
            updates[(ANY, direction(backward), c)] = f
    return factors.with_entries(updates)


def fit_transfer_factors(
    transfers: Sequence[TransferProfile], *, base: EfficiencyFactors | None = None
) -> EfficiencyFactors:
    """Per communication class: time = overhead + a_net * bytes / bandwidth (relative least squares, >= 0)."""
    factors = base if base is not None else EfficiencyFactors.uncalibrated()
    groups: dict[OpClass, list[TransferProfile]] = defaultdict(list)
    for t in transfers:
        groups[t.op_class].append(t)
    updates: dict[FactorKey, ClassFactors] = {}
    for c, g in groups.items():
        prior = factors.lookup(c)
        x = np.array([[t.num_bytes / t.link_bandwidth, 1.0] for t in g])
        y = np.array([t.measured_ms * 1e-3 for t in g])
        theta = _solve(x, np.zeros(len(g)), y, np.array([prior.a_net, max(prior.overhead_s, 1e-6)]), 1e-6)
        updates[(ANY, ANY, c)] = ClassFactors(
            a_flop=prior.a_flop,
            a_mem=prior.a_mem,
            a_net=float(theta[0]),
            half_rows=prior.half_rows,
            overhead_s=float(theta[1]),
            host_s=prior.host_s,
        )
    return factors.with_entries(updates)


@dataclass(frozen=True, slots=True)
class ForwardTiming:
    """One forward compute of a traced iteration: the executor's measured time (CUDA events around the action, as
    `--report-timings` sends the service) beside SEMU's calibrated prediction of the same stage."""

    module: str
    starts_module: bool
    """Whether the chunk holds the module's first layer, where the executor builds the sub-microbatch's inputs."""
    measured_ms: float
    predicted_ms: float


def fit_input_build_ms(forwards: Iterable[ForwardTiming]) -> dict[str, float]:
    """Per module, the host ms of building a sub-microbatch's inputs (`CostModel.input_build_ms`).

    The forwards of the module's other chunks give its device-time scale s = sum of measured / sum of predicted
    (what the service's stage scales learn); the input building is what the forwards that start the module take
    beyond s times their prediction, averaged (never below 0). A module without both kinds of forwards in the
    trace gets no entry: nothing separates its input building from its compute."""
    starts: dict[str, list[ForwardTiming]] = defaultdict(list)
    others: dict[str, list[ForwardTiming]] = defaultdict(list)
    for f in forwards:
        (starts if f.starts_module else others)[f.module].append(f)
    out: dict[str, float] = {}
    for module, first in starts.items():
        rest = others.get(module)
        predicted = sum(f.predicted_ms for f in rest) if rest else 0.0
        if not rest or predicted <= 0.0:
            continue
        scale = sum(f.measured_ms for f in rest) / predicted
        out[module] = max(0.0, sum(f.measured_ms - scale * f.predicted_ms for f in first) / len(first))
    return out


def fit_factors(
    profile_rows: Sequence[LayerProfile],
    hardware: HardwareSpec,
    *,
    transfers: Sequence[TransferProfile] = (),
    base: EfficiencyFactors | None = None,
    ridge: float = 1e-3,
) -> EfficiencyFactors:
    """Calibrated factors: layer kinds from `profile_rows` (F and B separately), links from `transfers`."""
    factors = fit_layer_factors(profile_rows, hardware, base=base, ridge=ridge)
    if transfers:
        factors = fit_transfer_factors(transfers, base=factors)
    return factors
