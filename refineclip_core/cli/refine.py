"""``refineclip refine``: phase 2 (Eq. 11-13), comparisons, the merged checkpoint and the run report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo.world import on_demo_world
from ..edit.concept import ConceptConfig
from ..edit.guard import HARMFUL, MAX_DROP, VERIFIED, EditVerdict, GuardConfig
from ..files import atomic_write_bytes
from ..features.decomposition import parse_heads
from ..inspection.diagnosis import diagnose, load_vocabulary
from ..session.caches import cache_model
from ..loading.models import load_model
from ..edit.config import EXPORT_KINDS, STRATEGIES, FitConfig
from ..method.protocol import identify, make_engine
from ..edit.config import DEFAULT_EDIT, EditConfig
from ..edit.config import PaperConfig
from ..edit.export import EXPORT_FORMATS
from ..method.ltc import PeersConfig
from ..reporting.findings import labels_used_column, method_summary
from ..reporting.report_schema import RunReport
from ..reporting.tables import shown_points
from ..reporting.run_report import per_image_csv, render_html
from ..edit.run import EditRun, compare_run, run_edit
from . import EXIT_NOT_VERIFIED, EXIT_WORSE
from .common import add_json_arg, add_paper_weights, cells_table, emit, note, positive_int, progress_bar, table, terminal
from .score import add_protocol_args, heads_text, open_cache, protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="fit the deployable edit (RefineCLIP-fit, or the paper's phase 2) and export it",
                       description="Phase 2: turn the removal of the chosen heads into an ordinary checkpoint. The "
                                   "default edit, RefineCLIP-fit, distils the ablated model into visual.proj on the "
                                   "unlabelled adaptation images (least squares, then the KL terms of Eq. 11-12); "
                                   "--method paper learns diag(θ) (or full/LoRA) by Eq. 13 on the labelled samples. "
                                   "Every method is compared with zero-shot, the ablated model, standard fine-tuning "
                                   "and a Tip-Adapter cache on held-out images, the exported edit is checked against "
                                   "zero-shot with 95% intervals (the guard), and the merged checkpoint and the run "
                                   "report (the same report the dashboard's Refine page offers) are written.")
    add_protocol_args(p)
    fit, paper = DEFAULT_EDIT.fit, DEFAULT_EDIT.paper
    p.add_argument("--heads", default="auto", help="'auto' (the protocol's choice) or a list like 11.3,10.7")
    p.add_argument("--method", default=DEFAULT_EDIT.method, choices=EXPORT_KINDS,
                   help="the exported edit: 'fit' (RefineCLIP-fit, the default) or 'paper' (Eq. 13)")
    g = p.add_argument_group("RefineCLIP-fit (--method fit)")
    g.add_argument("--ridge", type=float, default=fit.ridge, help="ridge of the least-squares start (relative)")
    g.add_argument("--fit-steps", type=int, default=fit.steps, help="Adam steps of the KL distillation (0: none)")
    g.add_argument("--strength", type=float, default=fit.strength,
                   help="share of the heads' removal the edit applies, in (0, 1] (1: all of it; the default, "
                        "%(default)s, keeps the groups the shortcut helped within 5 points on the development worlds; "
                        "docs/edit.md)")
    g.add_argument("--fit-lr", type=float, default=fit.lr, help="learning rate of the KL distillation")
    g.add_argument("--max-rows", type=positive_int, default=fit.max_rows,
                   help="adaptation images used by the KL steps (a seeded subsample above this)")
    g = p.add_argument_group("concept removal (RefineCLIP-fit): also remove a named concept")
    con = DEFAULT_EDIT.concept
    g.add_argument("--remove-concept", action="append", default=list(con.texts), metavar="TEXT",
                   help="a concept the edit also removes (repeatable; words joined by '/' are one concept): its text "
                        "direction is projected out of the ablated embeddings RefineCLIP-fit distils; 'diagnosed' "
                        "stands for the concepts the diagnosis names. The run report compares the edit with and "
                        "without it")
    g.add_argument("--concept-versus", action="append", default=list(con.versus), metavar="TEXT",
                   help="what the concept is taken against (repeatable; e.g. 'land' for 'water'; default: the mean "
                        "of the class texts)")
    g.add_argument("--concept-words", type=positive_int, default=con.words,
                   help="words of each diagnosed concept used (its name first, then near-duplicates)")
    g.add_argument("--concept-strength", type=float, default=con.strength,
                   help="share of the concept's span removed, 0..1")
    g = p.add_argument_group("the paper's phase 2 (--method paper, and its baseline row)")
    g.add_argument("--strategy", default=paper.strategy, choices=STRATEGIES,
                   help="what Eq. 13 learns: 'diag' (the paper's diag(θ) on visual.proj, the default), 'full' (the "
                        "whole projection) or 'lora' (a low-rank update of rank --rank)")
    g.add_argument("--rank", type=positive_int, default=paper.rank, help="LoRA rank")
    add_paper_weights(g, paper)
    g.add_argument("--steps", type=positive_int, default=paper.steps,
                   help="optimisation steps of Eq. 13 (default: %(default)s, the paper's)")
    g.add_argument("--lr", type=float, default=paper.lr, help="learning rate of Eq. 13 (default: %(default)s)")
    g = p.add_argument_group("the compared LTC rows: text you type (left out, with the reason, when not given)")
    g.add_argument("--cue", action="append", default=[], metavar="TEXT",
                   help="the spurious attribute in words (repeatable), e.g. 'a water background': head search + "
                        "typed-cue projection projects the embedding off it")
    g.add_argument("--cue-versus", action="append", default=[], metavar="TEXT",
                   help="what --cue is taken against (repeatable), e.g. 'a land background'")
    g.add_argument("--ltc-pair", action="append", nargs=2, default=[], metavar=("TEXT_A", "TEXT_B"),
                   help="an attribute pair for LTC (as released): a true difference between the classes, one text "
                        "per class, e.g. 'a bird with webbed feet' 'a bird with thin toes' (repeatable)")
    g.add_argument("--ltc-minority", action="append", default=[], metavar="GROUP",
                   help="a minority group LTC locates its heads on (repeatable; default: per class, the groups whose "
                        "zero-shot accuracy on the labelled images is below the class's best group)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the compared methods (the other edit method, standard fine-tuning, Tip-Adapter and "
                        "CoOp): only the exported edit is fitted and judged")
    p.add_argument("--max-drop", type=float, default=MAX_DROP * 100, metavar="POINTS",
                   help="the acceptable drop of any group or class, in accuracy points (default: %(default)g): the "
                        "guard verifies an edit only when no group or class can have lost more (bounds holding "
                        "together at 95%%), and --fail-if-worse fails on a measured drop above it")
    p.add_argument("--fail-if-worse", action="store_true",
                   help=f"exit with status {EXIT_WORSE} (after writing everything) when the guard calls the exported edit "
                        "'harmful' (some group or class significantly worse on held-out images: exact McNemar tests, "
                        "Holm's correction) or any group or class measurably dropped by more than --max-drop points; "
                        "the reason goes to stderr")
    p.add_argument("--require-verified", action="store_true",
                   help=f"exit with status {EXIT_NOT_VERIFIED} (after writing everything) when the guard does not call "
                        f"the exported edit 'verified' (worst group's gain bounded above zero and every drop bounded "
                        f"within --max-drop); the reason goes to stderr. With --fail-if-worse a failing edit exits "
                        f"{EXIT_WORSE} first")
    p.add_argument("--no-diagnosis", action="store_true",
                   help="skip the diagnosis that leads the run report (it loads the model to embed the text pool)")
    p.add_argument("--text-pool", help="descriptions for the diagnosis, one per line (default: the shipped pool)")
    p.add_argument("--out", help="write the merged checkpoint here: a .safetensors/.pt file (open_clip format) or a "
                                 "folder (Hugging Face format)")
    p.add_argument("--format", default="auto", choices=list(EXPORT_FORMATS),
                   help="format of --out: 'auto' (default) keeps the model's own, i.e. a Hugging Face transformers "
                        "folder (config.json + model.safetensors, loads with CLIPModel.from_pretrained) for a model "
                        "loaded from one, else an open_clip state dict; 'hf' writes a transformers folder for any "
                        "plain CLIP ViT; 'open_clip' writes a state dict (from a transformers model, with its "
                        "open_clip config JSON beside it for --model-config)")
    add_json_arg(p, "the run report (every method's accuracies, the scores, the selection, the configuration)")
    p.add_argument("--html", help="also write the run report as a self-contained HTML page here")
    p.add_argument("--csv", metavar="PATH",
                   help="also write the per-image predictions here (file, true class, group, zero-shot and edited "
                        "prediction, held out or not); cells a spreadsheet would run as formulas are escaped")
    p.set_defaults(func=run)


def guard_config(args: argparse.Namespace) -> GuardConfig:
    """The guard the options ask for: ``--max-drop`` points (``--min-heldout`` comes with the protocol)."""
    return GuardConfig(max_drop=args.max_drop / 100.0)


def edit_config(args: argparse.Namespace) -> EditConfig:
    """The edit the options ask for (the seed is the protocol's)."""
    return EditConfig(
        method=args.method,
        fit=FitConfig(ridge=args.ridge, steps=args.fit_steps, lr=args.fit_lr, max_rows=args.max_rows, seed=args.seed,
                      strength=args.strength),
        paper=PaperConfig(strategy=args.strategy, success_weight=args.success_weight, locality_weight=args.locality_weight, steps=args.steps, lr=args.lr,
                           seed=args.seed, rank=args.rank),
        concept=ConceptConfig(tuple(args.remove_concept), tuple(args.concept_versus), args.concept_words,
                              args.concept_strength),
        peers=PeersConfig(tuple(args.cue), tuple(args.cue_versus), tuple(tuple(p) for p in args.ltc_pair),
                          tuple(args.ltc_minority)))


#: The columns of the methods table the summary prints (the rest is in the run report).
SUMMARY_COLUMNS = {"overall": "overall", "worst group": "worst group", "error-pair classes": "pair classes",
                   "other classes (locality)": "other classes"}


def edit_lines(edit: EditRun) -> list[str]:
    """One phase-2 run for people: the pairs and heads, every method on held-out images, the guard."""
    out, rep = edit.outcome, edit.report
    lines = [f"Error pair(s): {', '.join(f'{a} → {b}' for a, b in rep.pairs)}; heads removed: "
             f"{heads_text(out.heads)} ({out.identification.config.ablation} ablation).",
             *([rep.head_stability.summary] if rep.head_stability is not None else []),
             *([f"Why: {rep.diagnosis.sentence}"] if rep.diagnosis is not None and rep.diagnosis.sentence else []),
             *([rep.concept_removal.sentence] if rep.concept_removal is not None else []),
             f"Accuracy on {rep.n_eval} held-out images (edit fitted on {rep.n_adapt} unlabelled, heads chosen on "
             f"{rep.n_samples} labelled; 95% intervals):"]
    lines += cells_table(method_summary(out.report), SUMMARY_COLUMNS, "method",
                         text={"labels used": labels_used_column(out.report)})
    lines += list(out.left_out.values())
    warnings = [f"Warning ({w.kind}): {w.text}" for w in rep.warnings]
    v = edit.verdict
    return [f"Guard: {v.status} — {out.exported} (exported). {v.sentence()}", *(f"  {d}" for d in v.details()), *warnings,
            *lines, *guard_lines(v)]


def guard_lines(verdict: EditVerdict) -> list[str]:
    """The guard's table: every group of the edited classes, the classes, the other classes together
    (classes that are not edited and not worse are left to the JSON record when there are many)."""
    rows = verdict.rows()
    keep = [r for r in rows if r[""].startswith("edited") or r["worse (Holm)"] == "yes" or r[""] == "classes"]
    shown = rows if len(rows) <= 16 else keep
    lines = ["The guard, zero-shot (before) vs the edit (after) on the same held-out images (95% intervals):",
             *table(list(rows[0]), [list(r.values()) for r in shown], align="ll" + "r" * (len(rows[0]) - 2))] if rows else []
    if len(shown) < len(rows):
        lines.append(f"  ({len(rows) - len(shown)} other groups and classes, none significantly worse: --json keeps them)")
    return lines


def gate(verdict: EditVerdict, fail_if_worse: bool, require_verified: bool) -> tuple[int, str | None]:
    """The refine command's exit status for the guard's verdict (documented in ``refineclip --help``) and
    the one-sentence reason printed on stderr when it is not 0: ``--fail-if-worse`` fails on a harmful edit
    or on a measured drop above the acceptable one, ``--require-verified`` on anything not verified."""
    if fail_if_worse:
        if verdict.status == HARMFUL:
            return EXIT_WORSE, f"--fail-if-worse: {verdict.sentence()}"
        u = verdict.largest_estimated_drop()
        if u is not None and -shown_points(u.before.value, u.after.value) > verdict.config.max_drop * 100 + 1e-9:
            return EXIT_WORSE, (f"--fail-if-worse: {u.name} dropped {u.change_text()} ({u.before.value * 100:.1f}% → "
                                f"{u.after.value * 100:.1f}%, n={u.n}), more than the acceptable "
                                f"{verdict.config.max_drop * 100:g} points (--max-drop).")
    if require_verified and verdict.status != VERIFIED:
        return EXIT_NOT_VERIFIED, f"--require-verified: {verdict.sentence()}"
    return 0, None


def exit_status(verdict: EditVerdict, fail_if_worse: bool, require_verified: bool) -> int:
    """:func:`gate`'s status, its reason printed on stderr."""
    status, reason = gate(verdict, fail_if_worse, require_verified)
    if reason:
        print(terminal(reason), file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    engine = make_engine(cache)
    ident = identify(cache, protocol(args), engine)
    heads = None if args.heads == "auto" else parse_heads(args.heads, cache.manifest.layers, cache.manifest.n_heads)
    spec = cache_model(cache.manifest, cache.root)  # sources confined, fingerprint checked
    loaded = diagnosis = None
    if not args.no_diagnosis:
        loaded = load_model(spec)
        diagnosis = diagnose(cache, ident, load_vocabulary(loaded, args.text_pool), heads, engine)
    bar = progress_bar("refine", unit="step")
    edit = run_edit(cache, ident, engine, edit_config(args), heads, spec=spec, loaded=loaded, guard=guard_config(args),
                    export_to=args.out, export_format=args.format, baselines=False, progress=bar,
                    extra={"heads_arg": args.heads}, diagnosis=diagnosis, demo_data=on_demo_world(cache.classes))
    if not args.no_baselines:    # the fix first: its verdict now (on a terminal), the compared methods after
        note(f"Guard: {edit.verdict.status} — {edit.outcome.exported} (exported). {edit.verdict.sentence()} "
             "Fitting the compared methods next.")
        edit = compare_run(edit, cache, ident, engine, spec=spec, loaded=loaded, progress=bar)
    if args.html:
        atomic_write_bytes(Path(args.html), render_html(edit.report).encode())
    if args.csv:
        atomic_write_bytes(Path(args.csv), per_image_csv(edit.report).encode())
    emit(args, edit.report.to_dict(), edit_lines(edit),
         [(_checkpoint_label(edit.report), edit.checkpoint), ("HTML run report", args.html),
          ("per-image predictions (CSV)", args.csv)])
    return exit_status(edit.verdict, args.fail_if_worse, args.require_verified)


def _checkpoint_label(report: RunReport) -> str:
    """What the CLI prints before the checkpoint's path: which layer(s) the edit was merged into."""
    ckpt = report.checkpoint
    return "merged checkpoint" + (f" ({ckpt.merged_into})" if ckpt is not None else "")
