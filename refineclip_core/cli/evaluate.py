"""``refineclip eval``: accuracy of a (possibly edited) checkpoint on a labelled folder."""

from __future__ import annotations

import argparse
import tempfile

from ..features.extraction import ExtractionConfig, extract
from ..features.zeroshot import predict
from ..method.evaluation import cache_report
from ..edit.record import held_out_only, read_run_report
from .common import (accuracy_lines, add_json_arg, add_link_arg, add_model_args, add_template_args, dataset as load_data,
                     emit, load, positive_int, progress_bar, templates)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot accuracy of a model/checkpoint on a labelled image folder",
                       description="Run the model on the images and report accuracy overall, per class, per "
                                   "group, average-group and worst-group, each with its 95% interval and image count.")
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="only this split")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--cache-dir", help="keep the feature cache here (default: a temporary folder)")
    add_link_arg(p)
    add_template_args(p)
    p.add_argument("--rows-from", metavar="RUN.json",
                   help="evaluate only the held-out images of a refine run (its run report: refineclip refine --json, "
                        "or the Refine page's JSON download), the very images its accuracies are measured on, so the "
                        "numbers compare; the run's prompt templates are used unless --template is given")
    add_json_arg(p, "every accuracy, interval and count")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    dataset = load_data(args, split=args.split)
    if args.class_names:
        dataset = dataset.renamed(args.class_names.split(","))
    run_templates = None
    if args.rows_from:
        run = read_run_report(args.rows_from)
        dataset = held_out_only(dataset, run, args.rows_from)
        run_templates = run.data.templates or None
    chosen = templates(args)
    if run_templates and not (args.templates or args.templates_file):
        chosen = run_templates
    cfg = ExtractionConfig(layers=1, batch_size=args.batch_size, templates=chosen)
    with tempfile.TemporaryDirectory(prefix="refineclip-eval-") as tmp:
        cache = extract(loaded, dataset, args.cache_dir or tmp, cfg, progress=progress_bar("eval"))
        pred, _ = predict(cache.embeddings, cache.text, cache.scoring)
        rep = cache_report(cache, pred)
        lines = [f"Zero-shot accuracy of {loaded.model_name} on {rep.n_images} images of {args.data}"
                 + (f" (split '{args.split}')" if args.split else "")
                 + (f" (the held-out images of {args.rows_from})" if args.rows_from else "")
                 + f", {len(cache.skipped)} skipped:",
                 *accuracy_lines(rep, predictions=pred, labels=cache.labels, classes=cache.classes)]
        n_skipped = len(cache.skipped)
    emit(args, {**rep.to_dict(), "n_skipped": n_skipped, "classes": dataset.classes,
                "config": {"model": loaded.spec.to_dict(), "data": str(args.data), "split": args.split,
                           "rows_from": args.rows_from, "templates": list(cfg.templates)}}, lines)
    return 0
