"""``refineclip reproduce``: the paper's protocols (Tables 1-3, Fig. 2) as tables."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..errors import RefineClipError
from ..files import atomic_write_bytes, atomic_write_json
from ..features.extraction import ExtractionConfig, extract, init_distributed_from_env
from ..method.protocol import DEFAULT_PROTOCOL
from ..edit.config import DEFAULT_EDIT, STRATEGIES
from ..edit.reproduce import PAPER_WATERBIRDS, markdown_table, rows_csv, run_protocol, summarise
from .common import (add_json_arg, add_link_arg, add_paper_weights, add_model_args, add_template_args, dataset as load_data, emit,
                     layers_arg, load, note, positive_int, progress_bar, templates)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the paper's protocols and write tables",
                       description="Extract features once, then repeat identify-then-ablate and RefineCLIP phase 2 "
                                   "over sample sizes and seeds, with zero-shot, Tip-Adapter and standard fine-tuning "
                                   "for comparison, on the held-out split. Writes table.md, rows.csv, summary.json.")
    kinds = p.add_subparsers(dest="protocol", metavar="PROTOCOL")
    kinds.required = True
    wb = kinds.add_parser("waterbirds", help="Tables 1 and 3: Waterbirds (WILDS layout), avg/worst group")
    csvp = kinds.add_parser("csv", help="Table 2 style: a metadata.csv dataset with a target and a group column")
    loc = kinds.add_parser("locality", help="Fig. 2: edit two target classes, report the other classes")
    for q in (wb, csvp, loc):
        add_model_args(q)
        add_template_args(q)
        q.add_argument("--data", required=True, help="dataset folder")
        add_link_arg(q)
        q.add_argument("--out", help="output folder (default runs/reproduce-<protocol>)")
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
        q.add_argument("--samples-per-class", type=positive_int, nargs="+",
                       default=[4, 10] if q is loc else [10, 20, 30])
        q.add_argument("--layers", type=layers_arg, default=4, help="heads of the last K layers (paper: 4) or 'all'")
        q.add_argument("--top-t", type=positive_int, default=DEFAULT_PROTOCOL.top_t,
                       help="T of the defaults' protocol (the paper-faithful rows keep the paper's T = 15)")
        q.add_argument("--strategies", nargs="+", default=["diag"], choices=STRATEGIES,
                       help="the paper-faithful phase 2's maps")
        add_paper_weights(q, DEFAULT_EDIT.paper)
        q.add_argument("--steps", type=positive_int, default=DEFAULT_EDIT.paper.steps, help="paper phase 2: Adam steps")
        q.add_argument("--lr", type=float, default=DEFAULT_EDIT.paper.lr, help="paper phase 2: learning rate")
        q.add_argument("--batch-size", type=positive_int, default=64)
        add_json_arg(q, "the summary (every method, sample size and seed aggregated) and the configuration")
    csvp.add_argument("--target-column", required=True, help="CSV column with the class label")
    csvp.add_argument("--group-column", help="CSV column with the group (e.g. a spurious attribute)")
    csvp.add_argument("--path-column", default="path", help="CSV column with the image path")
    loc.add_argument("--targets", required=True, help="the two classes to edit, comma-separated (A,B)")
    for q in (wb, csvp, loc):
        q.set_defaults(func=run)


def _weights(loaded) -> str:
    spec = loaded.spec.resolved()
    return spec.pretrained or spec.checkpoint or "random weights"


def run(args: argparse.Namespace) -> int:
    init_distributed_from_env()
    out = Path(args.out or f"runs/reproduce-{args.protocol}")
    loaded = load(args)
    if args.protocol == "waterbirds":
        dataset = load_data(args, layout="waterbirds")
        pair = "both"
    elif args.protocol == "csv":
        dataset = load_data(args, layout="csv", columns={"path": args.path_column, "label": args.target_column,
                                                                  "group": args.group_column})
        pair = "both"
    else:
        dataset = load_data(args)
        names = [t.strip() for t in args.targets.split(",")]
        if len(names) != 2:
            raise RefineClipError("--targets takes exactly two class names, e.g. --targets waterbird,landbird")
        pair = f"{names[0]}:{names[1]},{names[1]}:{names[0]}"
    if args.class_names:
        dataset = dataset.renamed(args.class_names.split(","))
    cache = extract(loaded, dataset, out / "cache",
                    ExtractionConfig(layers=args.layers, batch_size=args.batch_size, templates=templates(args)),
                    progress=progress_bar("extract"))
    edit = replace(DEFAULT_EDIT, paper=replace(DEFAULT_EDIT.paper, success_weight=args.success_weight,
                                               locality_weight=args.locality_weight,
                                               steps=args.steps, lr=args.lr))
    rows = run_protocol(cache, args.samples_per_class, args.seeds, pair, edit, args.strategies,
                        replace(DEFAULT_PROTOCOL, top_t=args.top_t), log=note)
    summary = summarise(rows)
    paper = PAPER_WATERBIRDS.get(loaded.model_name) if args.protocol == "waterbirds" else None
    header = (f"# RefineCLIP reproduction: {args.protocol}\n\nModel `{loaded.model_name}` "
              f"({_weights(loaded)}), data `{args.data}`, "
              f"{len(cache)} images ({len(cache.skipped)} skipped), seeds {args.seeds}, layers {cache.manifest.layers}, "
              f"evaluated on held-out images (split 'test' when present). Accuracies in %, mean ± std over seeds; "
              f"group metrics over the edited classes' groups.\n\n")
    if paper is None and args.protocol == "waterbirds":
        header += "(No published numbers for this model in the paper's Table 1.)\n\n"
    table = header + markdown_table(summary, paper)
    record = {"summary": summary, "config": {k: v for k, v in vars(args).items() if k != "func"}}
    atomic_write_bytes(out / "table.md", table.encode())
    atomic_write_bytes(out / "rows.csv", rows_csv(rows).encode())
    atomic_write_json(out / "summary.json", record)
    emit(args, record, table.rstrip("\n").split("\n"),
         [("table", out / "table.md"), ("one row per run", out / "rows.csv"), ("summary", out / "summary.json")])
    return 0
