"""The `pipeweaver` command: a thin argparse front over the library, one small function per subcommand.

To add a subcommand, write `_<name>_args(parser)` and `_<name>(args) -> int`, and add a row to `COMMANDS`.
Errors a user can fix print one line, ``pipeweaver: error: ...``, and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from pipeweaver import bench, cli_plan, presets
from pipeweaver.datagen import describe, dynamic_batch, dynamic_bounds, sample_batch
from pipeweaver.errors import PipeWeaverError
from pipeweaver.spec import BatchMetadata, Modality, Workload

if TYPE_CHECKING:
    from rich.table import Table

PROG = "pipeweaver"
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line; `main` prints it as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: its help line, its arguments and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _workload(name: str) -> Workload:
    if name not in presets.WORKLOADS:
        raise UsageError(f"unknown workload '{name}'; choose one of {', '.join(presets.WORKLOADS)}")
    return presets.workload(name)


def _table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    """A rich table whose cells never wrap or ellipsize (on narrow terminals the headers shrink instead).

    A header ending in '>' is right-aligned; one starting with '~' (free text) may wrap. An empty row ends a
    section.
    """
    from rich.table import Table

    table = Table(title=title)
    for i, header in enumerate(headers):
        name = header.strip("~>")
        if header.startswith("~"):
            table.add_column(name)
        else:
            width = max((len(row[i]) for row in rows if row), default=0)
            table.add_column(name, justify="right" if header.endswith(">") else "left", no_wrap=True, min_width=width)
    for row in rows:
        if row:
            table.add_row(*row)
        else:
            table.add_section()
    return table


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# ---- pipeweaver workloads ----------------------------------------------------------------------------------


def workload_summary(w: Workload) -> dict[str, Any]:
    """A JSON-ready description of a workload: modules, parallelism, hardware, dataset."""
    p = w.parallel
    return {
        "name": w.name,
        "description": w.description,
        "modules": [
            {
                "name": m.name,
                "display_name": m.display_name,
                "kind": m.kind.value,
                "input": m.input.value,
                "layers": m.layers,
                "hidden": m.hidden,
                "params": m.total_params(),
            }
            for m in w.model.modules
        ],
        "total_params": w.model.total_params(),
        "parallel": {
            "pp": p.pp,
            "tp": p.tp,
            "dp": p.dp,
            "microbatches": p.microbatches,
            "seq_len": p.seq_len,
        },
        "gpus": p.gpus,
        "hardware": w.hardware.name,
        "dataset": w.dataset.value,
    }


def _params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}K"


def _workloads_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _workloads(args: argparse.Namespace) -> int:
    summaries = [workload_summary(make()) for make in presets.WORKLOADS.values()]
    if args.json:
        _print_json(summaries)
        return 0
    from rich.console import Console

    workload_rows, module_rows = [], []
    for s in summaries:
        p = s["parallel"]
        workload_rows.append(
            [
                s["name"],
                _params(s["total_params"]),
                f"{p['pp']}/{p['tp']}/{p['dp']}",
                str(p["microbatches"]),
                str(p["seq_len"]),
                str(s["gpus"]),
                s["hardware"],
                s["dataset"],
            ]
        )
        module_rows += [
            [
                s["name"] if i == 0 else "",
                m["name"],
                m["display_name"],
                m["kind"].removesuffix("_block"),
                str(m["layers"]),
                str(m["hidden"]),
                _params(m["params"]),
            ]
            for i, m in enumerate(s["modules"])
        ]
        module_rows.append([])
    workloads = _table(
        "Preset workloads",
        ["workload", "params>", "pp/tp/dp>", "mb>", "seq>", "GPUs>", "hw", "dataset"],
        workload_rows,
    )
    modules = _table(
        "Their modules",
        ["workload", "module", "~name", "block", "layers>", "hidden>", "params>"],
        module_rows,
    )
    console = Console()
    console.print(workloads)
    console.print(modules)
    return 0


# ---- pipeweaver batch --------------------------------------------------------------------------------------


def batch_to_dict(batch: BatchMetadata) -> dict[str, Any]:
    """A JSON-ready form of batch metadata: microbatches of documents of media."""
    return {
        "iteration": batch.iteration,
        "dp_replica": batch.dp_replica,
        "microbatches": [
            {
                "documents": [
                    {
                        "text_tokens": d.text_tokens,
                        "media": [
                            {
                                "modality": m.modality.value,
                                "tokens": m.tokens,
                                "merged_tokens": m.merged_tokens,
                            }
                            for m in d.media
                        ],
                    }
                    for d in mb.documents
                ]
            }
            for mb in batch.microbatches
        ],
    }


def _batch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True, help=f"preset name ({', '.join(presets.WORKLOADS)})")
    parser.add_argument("--seed", required=True, type=_non_negative_int, help="random seed")
    parser.add_argument("--iteration", type=_non_negative_int, default=0, help="iteration to sample (default 0)")
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="use the dynamic trace's media bounds for this iteration (paper Fig. 8b)",
    )
    parser.add_argument("--json", action="store_true", help="print the full batch metadata as JSON")


def _batch(args: argparse.Namespace) -> int:
    w = _workload(args.workload)
    if args.dynamic:
        batch = dynamic_batch(w, seed=args.seed, iteration=args.iteration)
        bounds = dynamic_bounds(w, args.iteration)
    else:
        batch = sample_batch(w, seed=args.seed, iteration=args.iteration)
        bounds = None
    summary = describe(batch)
    if args.json:
        out: dict[str, Any] = {"workload": w.name, "seed": args.seed, "dynamic": args.dynamic}
        if bounds is not None:
            out["bounds"] = {"low": bounds.low, "high": bounds.high, "unit": bounds.unit}
        out["summary"] = summary
        out.update(batch_to_dict(batch))
        _print_json(out)
        return 0
    from rich.console import Console

    video = any(m.input is Modality.VIDEO for m in w.model.modules)
    modality, media, media_tokens = (
        (Modality.VIDEO, "clips", "DiT tokens") if video else (Modality.IMAGE, "images", "ViT tokens")
    )
    title = f"{w.name}: seed {args.seed}, iteration {args.iteration}"
    if bounds is not None:
        title += f", dynamic bounds {bounds.low:.3g}..{bounds.high:.3g} {bounds.unit} per microbatch"
    rows = []
    for i, mb in enumerate(batch.microbatches):
        items = mb.media(modality)
        rows.append(
            [
                str(i),
                str(len(mb.documents)),
                str(len(items)),
                str(mb.text_tokens),
                str(mb.language_tokens()),
                str(sum(m.tokens for m in items)),
            ]
        )
    rows += [
        [],
        [
            "total",
            str(summary["documents"]),
            str(summary["clips"] if video else summary["images"]),
            str(summary["text_tokens"]),
            str(sum(summary["language_tokens_per_microbatch"])),
            str(summary["video_tokens"] if video else summary["image_tokens"]),
        ],
    ]
    headers = ["microbatch", "documents", media, "text tokens", "LM tokens", media_tokens]
    table = _table(title, [h + ">" for h in headers], rows)
    console = Console()
    console.print(table)
    console.print(f"{summary['text_only_microbatches']} of {summary['microbatches']} microbatches carry no {media}")
    return 0


# ---- pipeweaver serve --------------------------------------------------------------------------------------


def _serve_args(parser: argparse.ArgumentParser) -> None:
    from pipeweaver.server.config import add_arguments

    add_arguments(parser)


def _serve(args: argparse.Namespace) -> int:
    # Imported here: grpc and the server load only for this subcommand (and never in spawned workers).
    from pipeweaver.server.app import run
    from pipeweaver.server.config import from_args

    return run(from_args(args))


# ---- pipeweaver demo ---------------------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
    from pipeweaver.demo import default_ranks

    parser.add_argument("--iterations", type=_non_negative_int, default=20, help="iterations of each run (default 20)")
    parser.add_argument(
        "--ranks",
        type=_non_negative_int,
        default=None,
        help=f"pipeline ranks (default: cores up to 4, here {default_ranks()})",
    )
    parser.add_argument("--out", default="out/demo", help="folder for the timeline picture (default out/demo)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="data and initialisation seed (default 0)")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="planning budget per batch (default 100)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the layer profile (uncalibrated SEMU)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeweaver.demo import DemoConfig, DemoError, default_ranks, format_report, run_demo

    try:
        cfg = DemoConfig(
            iterations=args.iterations,
            ranks=args.ranks if args.ranks is not None else default_ranks(),
            out_dir=Path(args.out),
            seed=args.seed,
            planning_budget_ms=args.budget_ms,
            calibrate=not args.no_calibrate,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def progress(msg: str) -> None:
        sys.stderr.write(f"demo: {msg}\n")

    try:
        result = run_demo(cfg, progress=progress)
    except DemoError as exc:
        sys.stderr.write(f"{PROG} demo: failed: {exc}\n")
        return 1
    if args.json:
        _print_json(result)
    else:
        for line in format_report(result):
            sys.stdout.write(line + "\n")
    return 0 if result["parameters"]["equal"] else 1


# ---- entry point -------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "workloads": Command("list the preset workloads", _workloads_args, _workloads),
    "batch": Command("sample one iteration's batch metadata", _batch_args, _batch),
    "simulate": Command("simulate one iteration of a schedule with SEMU", cli_plan.simulate_args, cli_plan.simulate),
    "plan": Command("search a plan for one sampled iteration", cli_plan.plan_args, cli_plan.plan),
    "bench": Command("plan sampled iterations and compare with every baseline", bench.bench_args, bench.bench),
    "serve": Command("run the planner service (gRPC sidecar)", _serve_args, _serve),
    "demo": Command("train tiny-vlm on gloo ranks with the planner, against 1F1B", _demo_args, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Per-batch pipeline schedule planner for multimodal model training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except (UsageError, PipeWeaverError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except BrokenPipeError:
        # `pipeweaver batch ... | head`: the reader left. Point stdout at devnull so the interpreter's final
        # flush does not fail again (the recipe in Python's signal documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
