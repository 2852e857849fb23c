"""Arguments and helpers shared by several sub-commands.

How a command talks to people (one way for all of them): :func:`add_json_arg` gives it ``--json
PATH`` (the full record as JSON; ``-`` prints the record alone on stdout, for piping), and
:func:`emit` prints a short human summary on stdout (at most :data:`SUMMARY_LINES` lines: tables
of accuracies with their 95% intervals and image counts, the chosen heads, where files were
written) unless the record goes to stdout. Progress bars (:func:`progress_bar`) and notes
(:func:`note`) go to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..files import atomic_write_bytes
from ..features.extraction import EXTRACT_STAGE
from ..features.zeroshot import DEFAULT_TEMPLATES, read_templates, validate_templates
from ..errors import OutsideRootsError, RefineClipError
from ..loading.budget import BUDGET_ENV
from ..loading.confine import Confinement, current
from ..loading.data import ImageDataset, load_dataset
from ..loading.hf_clip import find_hf_checkpoint
from ..loading.models import DEMO_MODEL, LoadedModel, ModelSpec, load_model
from ..method.errorsets import error_pairs
from ..names import visible
from ..method.evaluation import AccuracyReport
from ..method.intervals import Estimate
from ..progress import Progress, silent
from ..reporting.findings import accuracy_rows, cell_estimate, json_safe


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None if required else DEMO_MODEL,
                   help="open_clip architecture name (e.g. ViT-B-16), or 'demo' for the embedded demo model "
                        "('demo-map': the SigLIP-shaped one, map pooling)"
                        + ("; required unless --checkpoint is a Hugging Face CLIP, whose config.json names the "
                           "architecture" if required else ""))
    g.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai); downloads where possible")
    g.add_argument("--checkpoint", help="local weights: .pt/.bin/.safetensors state dict or open_clip checkpoint, or "
                                        "a Hugging Face transformers CLIP (the CLIPModel.save_pretrained folder, or "
                                        "its weights file with config.json beside it)")
    g.add_argument("--model-config", help="open_clip model config JSON for a custom architecture")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp64", "fp16", "bf16"],
                   help="model precision; fp32 (default) keeps the decomposition exact to ~1e-6")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help=f"refuse, before loading, a model estimated to need more memory than SIZE (e.g. 16GB); "
                        f"default: ${BUDGET_ENV}, else 75%% of the memory available")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    name = args.model
    if name is None:
        hf = find_hf_checkpoint(args.checkpoint)  # confined when REFINECLIP_ALLOWED_ROOTS is set
        if hf is None:
            raise RefineClipError("--model is required (an open_clip architecture such as ViT-B-16, or 'demo') "
                                  "unless --checkpoint is a Hugging Face CLIP folder.")
        name = hf.label
    return ModelSpec(name=name, pretrained=args.pretrained, checkpoint=args.checkpoint,
                     model_config=args.model_config, device=args.device, precision=args.precision)


def load(args: argparse.Namespace, spec: ModelSpec | None = None) -> LoadedModel:
    """The model of the ``--model`` flags (or ``spec``), within ``--memory-budget``."""
    return load_model(spec or model_spec(args), getattr(args, "memory_budget", None))


def add_link_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-follow-links", action="store_true",
                   help="read only images and metadata that resolve inside the --data folder, as the dashboard "
                        "does; by default symbolic links are followed wherever they point")


def dataset(args: argparse.Namespace, **kwargs) -> ImageDataset:
    """``load_dataset(args.data, ...)`` under the command's confinement; with ``--no-follow-links``
    confined to the data folder too (which must lie inside the command's confinement)."""
    confinement = current()
    if getattr(args, "no_follow_links", False):
        data = Path(args.data).expanduser()
        folder = (data.parent if data.is_file() else data).resolve()
        if not confinement.contains(folder):
            raise OutsideRootsError(f"Data path '{args.data}' is outside the allowed folders "
                                    f"({', '.join(confinement.folders or ())}); move the data below one of them.")
        confinement = Confinement.of([folder])
    with confinement.active():
        return load_dataset(args.data, **kwargs)


def add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                   help="prompt template with '{}' for the class name (repeatable); default: a small ensemble")
    p.add_argument("--templates-file", help="file with one template per line")
    p.add_argument("--class-names", help="comma-separated display names replacing the folder/CSV class names, in order")


def templates(args: argparse.Namespace) -> tuple[str, ...]:
    out: list[str] = []
    if getattr(args, "templates_file", None):
        out += read_templates(args.templates_file)
    if getattr(args, "templates", None):
        out += validate_templates(args.templates)
    return tuple(out) if out else DEFAULT_TEMPLATES


def layers_arg(value: str) -> int | str:
    """``--layers``: a positive K (the last K layers) or ``all``."""
    if value == "all":
        return "all"
    try:
        k = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers takes a positive integer or 'all', not {value!r}") from exc
    if k < 1:
        raise argparse.ArgumentTypeError("--layers must be >= 1")
    return k


class RenamedFlag(argparse.Action):
    """An option that also answers to its old names (``old``), kept for one release: using an old name
    works the same and prints a one-line note on stderr."""

    def __init__(self, option_strings, dest, old: Sequence[str] = (), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.old = tuple(old)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            print(f"refineclip: {option_string} is deprecated and will be removed; use {self.option_strings[0]} "
                  "(same meaning).", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_paper_weights(parser, paper) -> None:
    """The paper's loss weights of Eq. 13 (α, β: ``--success-weight``, ``--locality-weight``; the old
    ``--alpha``/``--beta`` still work, deprecated): one definition for ``refine`` and ``reproduce``."""
    parser.add_argument("--success-weight", "--alpha", dest="success_weight", type=float, action=RenamedFlag,
                        old=("--alpha",), default=paper.success_weight,
                        help="the paper's phase 2: weight of L_success (α of Eq. 13, Eq. 11; --alpha: deprecated)")
    parser.add_argument("--locality-weight", "--beta", dest="locality_weight", type=float, action=RenamedFlag,
                        old=("--beta",), default=paper.locality_weight,
                        help="the paper's phase 2: weight of L_locality (β of Eq. 13, Eq. 12; --beta: deprecated)")


def positive_int(value: str) -> int:
    try:
        k = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from exc
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {k}")
    return k


SUMMARY_LINES = 40
"""The most lines of a command's human summary; the full record is one ``--json`` away."""


def json_target(value: str) -> str:
    """``--json``: ``-`` or a file path; a folder is refused before the command runs."""
    if value != "-" and Path(value).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"'{terminal(value)}' is a folder; give a file path such as "
                                         f"'{terminal(Path(value) / 'record.json')}' (or '-' for stdout)")
    return value


def add_json_arg(p: argparse.ArgumentParser, what: str = "the full record") -> None:
    p.add_argument("--json", metavar="PATH", type=json_target,
                   help=f"write {what} as JSON to PATH; '-' prints it alone on stdout (no summary), for piping")


def terminal(text: object) -> str:
    """``text`` as the CLI may print it: the one sanitising function for the terminal. Control
    characters (escape sequences that would set the title, clear the screen or colour the
    text), bidi overrides, zero-width characters and undecodable bytes are shown as marked
    code points (:func:`refineclip_core.names.visible`), so a hostile folder name prints as text."""
    return visible(text)


def record_json(record: Mapping[str, Any]) -> str:
    """A command's record as JSON text (NaN and infinities as null)."""
    return json.dumps(json_safe(record), indent=1, default=str, allow_nan=False) + "\n"


def emit(args: argparse.Namespace, record: Mapping[str, Any], summary: Iterable[str],
         written: Sequence[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """Report a command's result: the full ``record`` to ``--json PATH``, or alone on stdout with
    ``--json -``; otherwise the human ``summary`` on stdout, cut to :data:`SUMMARY_LINES` lines,
    then one line per file written (``written``: ``(what, path)``; the JSON file is added)."""
    target = getattr(args, "json", None)
    if target == "-":
        sys.stdout.write(record_json(record))
        return
    files = [(what, path) for what, path in written if path is not None]
    if target:
        atomic_write_bytes(Path(target), record_json(record).encode())
        files.append(("full record (JSON)", target))
    tail = [f"wrote {what}: {path}" for what, path in files]
    lines = list(summary)
    room = SUMMARY_LINES - len(tail)
    if len(lines) > room:
        lines = lines[:room - 1] + [f"... {len(lines) - room + 1} more lines: --json PATH keeps everything"]
    print("\n".join(terminal(line) for line in lines + tail))


def note(message: str) -> None:
    """A progress note on stderr, shown only when stderr is a terminal (like the progress bars)."""
    if sys.stderr.isatty():
        print(terminal(message), file=sys.stderr)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "  ", align: str = "") -> list[str]:
    """Aligned text columns; ``align`` has one ``l``/``r`` per column (default: the first left, the
    rest right). A row with a single cell is a section title spanning the table."""
    body = [[str(c) for c in r] for r in rows]
    cols = list(zip(*([list(header)] + [r for r in body if len(r) > 1])))
    widths = [max(len(c) for c in col) for col in cols]
    align = align or "l" + "r" * (len(widths) - 1)

    def line(cells: Sequence[str]) -> str:
        if len(cells) == 1 and len(widths) > 1:
            return indent + cells[0]
        return indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))

    return [line(header).rstrip()] + [line(r).rstrip() for r in body]


def estimate_cells(est: Estimate | None) -> list[str]:
    """An accuracy as three table cells: ``62.0%``, ``[55.1, 68.4]`` (95% interval), ``200`` (images)."""
    if est is None:
        return ["–", "", "0"]
    return [f"{100 * est.value:.1f}%", f"[{100 * est.low:.1f}, {100 * est.high:.1f}]", str(est.n)]


ACCURACY_HEADER = ("accuracy", "95% interval", "images")


def accuracy_lines(rep: AccuracyReport, limit: int = 6, predictions: Any = None, labels: Any = None,
                   classes: Sequence[str] = (), rows: Any = None) -> list[str]:
    """An :class:`AccuracyReport` for people: overall, average-group and worst-group accuracy, then
    the ``limit`` lowest classes and groups (each with its 95% interval and image count) and, with
    ``predictions``/``labels``, the largest error pairs among ``rows``."""
    body = [["overall", *estimate_cells(rep.overall())]]
    if rep.per_group:
        body.append(["average group", *estimate_cells(rep.average())])
        body.append([f"worst group: {rep.worst_group_name}", *estimate_cells(rep.worst())])
    for by in ("class", "group"):
        found = sorted(accuracy_rows(rep, by), key=lambda r: (r["value"], r["name"]))
        if found:
            shown = found[:limit]
            body.append([f"per {by}" + (f" (lowest {len(shown)} of {len(found)})" if len(found) > len(shown) else "")
                         + ":"])
            body += [[f"  {r['name']}", *estimate_cells(Estimate(r["value"], r["low"], r["high"], r["n"]))]
                     for r in shown]
    out = table(("", *ACCURACY_HEADER), body)
    if predictions is not None:
        pairs = error_pairs(predictions, labels, rows)[:3]
        if pairs:
            out.append("Largest error pairs (true → predicted: images): "
                       + "; ".join(f"{p.label(list(classes))}: {p.count}" for p in pairs))
    return out


def cells_table(rows: Mapping[str, Mapping[str, Any]], columns: Mapping[str, str], first: str = "",
                text: Mapping[str, Mapping[str, str]] | None = None) -> list[str]:
    """A table of accuracy cells (:data:`~refineclip_core.reporting.findings.Cell`, e.g. the rows of
    :func:`~refineclip_core.reporting.findings.method_summary`; ``columns``: key → heading), each
    with its 95% interval, and its image count in the heading when the whole column shares it
    (else in the cell); ``text``: more columns of plain text, heading → {row: text}."""
    ests = {name: {c: cell_estimate(r.get(c)) for c in columns} for name, r in rows.items()}
    header, shared = [first], {}
    for c, label in columns.items():
        ns = {e.n for r in ests.values() if (e := r[c]) is not None}
        shared[c] = len(ns) == 1
        header.append(f"{label} (n={ns.pop()})" if shared[c] else label)
    header += list(text or {})
    body = [[name, *("–" if (e := r[c]) is None else e.format(count=not shared[c]) for c in columns),
             *(str(col.get(name, "")) for col in (text or {}).values())]
            for name, r in ests.items()]
    return table(header, body, align="l" + "r" * len(columns) + "l" * len(text or {}))


#: ``auto`` (default): progress bars only when stderr is a terminal; ``always``: also into logs and
#: pipes (e.g. each torchrun rank's share); ``never``.
PROGRESS_ENV = "REFINECLIP_PROGRESS"


def progress_bar(desc: str, unit: str = "img") -> Progress:
    """A :class:`~refineclip_core.progress.Progress` drawing one tqdm bar per stage on stderr, or
    nothing when stderr is not a terminal (a log file or a pipe gets no progress noise) unless
    :data:`PROGRESS_ENV` says ``always``."""
    mode = os.environ.get(PROGRESS_ENV, "auto")
    if mode == "never" or (mode != "always" and not sys.stderr.isatty()):
        return silent
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(stage: str, done: int, total: int, values: Mapping[str, float] | None = None) -> None:
        bar = state.get("bar")
        if bar is None or state.get("stage") != stage:
            if bar is not None:
                bar.close()
            label = desc if stage == EXTRACT_STAGE else f"{desc}: {stage}"
            bar = state["bar"] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, initial=0,
                                      leave=not sys.stderr.isatty())  # a log keeps each stage's final count
            state["stage"] = stage
        bar.update(done - bar.n)
        if values:
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if done >= total:
            bar.close()

    return update
