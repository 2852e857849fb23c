"""Does the diagnosis say the cue that was planted? The checked-where-the-truth-is-known benchmark (issue 17).

The demo world knows every image's background and body colour. For every model given (the
embedded demo model, trained with the background as the shortcut, and optionally a model trained
on a world whose shortcut is the body colour, ``python -m refineclip_core.demo.train --cue color``),
for every *world seed* a fresh sample of that model's own world is drawn and extracted, and for
every *sample seed* the protocol (``DEFAULT_PROTOCOL``) picks its heads and
:func:`~refineclip_core.inspection.diagnosis.diagnose` says why. Per draw it records:

* whether the sentence's concept names the planted cue (:data:`~refineclip_core.demo.world.CUE_WORDS`),
  the other cue, or bird parts (:data:`~refineclip_core.demo.world.BIRD_PART_WORDS`), and the verdict;
* on held-out bird images, how well the blamed heads' part along that concept separates the planted
  cue (AUC: water vs land, or white vs brown) and the bird type (waterbird vs landbird);
* the control: ``--random-sets`` random head sets of the same size, from every head in scope and
  from the heads not blamed, each diagnosed the same way ("same diagnosis" = verdict *shortcut*
  with a concept naming the planted cue).

    python benchmarks/diagnosis.py [--world-seeds 201 202 203] [--sample-seeds 0 1 2 3 4]
                                   [--color-model-dir DIR] [--out benchmarks/RESULTS.md]

Results go to ``--out`` between the ``diagnosis:start``/``diagnosis:end`` markers.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo_world import draw_parser, replace_section, workdir, world_cache  # noqa: E402
from refineclip_core.demo.train import MODEL_NAME  # noqa: E402
from refineclip_core.demo.world import BIRD_PART_WORDS, CUE_WORDS, WorldConfig, names_cue  # noqa: E402
from refineclip_core.inspection.diagnosis import diagnose, load_vocabulary, separation_auc  # noqa: E402
from refineclip_core.loading.models import DEMO_DIR, ModelSpec, load_model  # noqa: E402
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, identify, make_engine  # noqa: E402


@dataclass
class Row:
    """One model's draws."""

    label: str
    cue: str
    draws: int = 0
    names_cue: int = 0
    names_other_cue: int = 0
    names_parts: int = 0
    shortcut: int = 0
    shares: list[float] = field(default_factory=list)
    p_random: list[float] = field(default_factory=list)
    auc_cue: list[float] = field(default_factory=list)
    auc_bird: list[float] = field(default_factory=list)
    random_same: list[bool] = field(default_factory=list)
    random_auc_cue: list[float] = field(default_factory=list)
    disjoint_same: list[bool] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


def named_words(pair) -> list[str]:
    """The words of the concepts the sentence names (the lead, and what pushes toward the wrong class
    instead when the lead goes against it)."""
    return [w for c in pair.named for w in c.words]


def same_diagnosis(pair, cue: str) -> bool:
    return pair.verdict == "shortcut" and names_cue(named_words(pair), CUE_WORDS[cue])


def separations(cache, engine, ident, heads, direction, world: WorldConfig) -> tuple[float, float]:
    """AUC of the heads' part along ``direction`` on held-out bird images: planted cue, bird type."""
    rows = ident.eval_rows[np.isin(cache.labels[ident.eval_rows], ident.target_classes)]
    values = engine.contributions(rows, heads).sum(1, dtype=np.float64) @ direction
    groups = [cache.records[r].group for r in rows]
    cue = np.array([g.endswith("on water") if world.cue == "background" else g.endswith("in white") for g in groups])
    bird = np.array([g.startswith("waterbird") for g in groups])
    return separation_auc(values, cue), separation_auc(values, bird)


def run_model(label: str, model_dir: Path, args, work: Path, layers: int | str = 4) -> Row:
    world = WorldConfig.from_dict(json.loads((model_dir / "metadata.json").read_text())["train_config"]["world"])
    loaded = load_model(ModelSpec(MODEL_NAME, checkpoint=str(model_dir / f"{MODEL_NAME}.safetensors"),
                                  model_config=str(model_dir / f"{MODEL_NAME}.json")))
    vocab = load_vocabulary(loaded, cache_path=work)
    other = "color" if world.cue == "background" else "background"
    row = Row(label, world.cue)
    rng = np.random.default_rng(0)
    for w_seed in args.world_seeds:
        cache = world_cache(work / label, world, w_seed, args.n_fit, args.n_test, loaded, layers)
        engine = make_engine(cache)
        ids = engine.head_ids()
        for s in args.sample_seeds:
            ident = identify(cache, replace(DEFAULT_PROTOCOL, seed=s, pair=args.pair), engine)
            diag = diagnose(cache, ident, vocab, None, engine)
            pair, heads = diag.pairs[0], diag.heads          # the protocol's set, or its top-ranked heads
            row.draws += 1
            if len(row.examples) < 2 and s == args.sample_seeds[0]:
                row.examples.append(pair.sentence)
            if not pair.lead:
                continue
            lead = pair.concepts[pair.lead[0]]
            words = named_words(pair)
            row.names_cue += names_cue(words, CUE_WORDS[world.cue])
            row.names_other_cue += names_cue(words, CUE_WORDS[other])
            row.names_parts += names_cue(words, BIRD_PART_WORDS)
            row.shortcut += pair.verdict == "shortcut"
            row.shares.append(lead.share)
            row.p_random.append(pair.gap_p_random)
            a_cue, a_bird = separations(cache, engine, ident, heads, lead.direction, world)
            row.auc_cue.append(a_cue)
            row.auc_bird.append(a_bird)
            rest = [h for h in ids if h not in heads]
            for _ in range(args.random_sets):
                others = [ids[i] for i in rng.choice(len(ids), len(heads), replace=False)]
                p = diagnose(cache, ident, vocab, others, engine).pairs[0]
                row.random_same.append(same_diagnosis(p, world.cue))
                if p.lead:
                    row.random_auc_cue.append(separations(cache, engine, ident, others,
                                                          p.concepts[p.lead[0]].direction, world)[0])
                if len(rest) >= len(heads):
                    others = [rest[i] for i in rng.choice(len(rest), len(heads), replace=False)]
                    row.disjoint_same.append(same_diagnosis(diagnose(cache, ident, vocab, others, engine).pairs[0],
                                                            world.cue))
            print(f"{label} world {w_seed} seed {s}: {pair.sentence}", file=sys.stderr, flush=True)
    return row


def _mean(x) -> str:
    return f"{np.mean(x):.2f}" if len(x) else "–"


def report(rows: list[Row], args, seconds: float) -> str:
    lines = [
        "## Diagnosis: does the sentence say the cue that was planted?",
        "",
        f"Written by `python benchmarks/diagnosis.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}) in {seconds:.0f} s. Per model: "
        f"world seeds {args.world_seeds} × sample seeds {args.sample_seeds} (fresh samples of the model's own world, "
        f"{args.n_fit} val images per group to draw 10 labelled samples per bird class from, {args.n_test} test "
        f"images per group held out); heads: the protocol's choice (`DEFAULT_PROTOCOL`, pair {args.pair}; its "
        f"top-ranked heads when no set beats removing nothing); the "
        f"concept is the one the sentence names (first error pair). AUCs on held-out bird images, the blamed heads' "
        f"part along that concept (0.5 = no separation). Control: {args.random_sets} random head sets of the same "
        f"size per draw, from every head in scope and from the heads not blamed; \"same diagnosis\" = verdict "
        f"*shortcut* with a concept naming the planted cue.",
        "",
        "| model (planted cue) | draws | names the planted cue | names the other cue | names bird parts | "
        "verdict *shortcut* | share of removed variance | random sets holding as much of the gap | AUC planted cue | "
        "AUC bird type | random sets: same diagnosis | random sets: AUC cue | disjoint random: same diagnosis |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} ({r.cue}) | {r.draws} | {r.names_cue}/{r.draws} | {r.names_other_cue}/{r.draws} | "
            f"{r.names_parts}/{r.draws} | {r.shortcut}/{r.draws} | {_mean(r.shares)} | {_mean(r.p_random)} | "
            f"{_mean(r.auc_cue)} | {_mean(r.auc_bird)} | {100 * np.mean(r.random_same):.0f}% "
            f"({len(r.random_same)} sets) | {_mean(r.random_auc_cue)} | "
            f"{100 * np.mean(r.disjoint_same) if r.disjoint_same else float('nan'):.0f}% ({len(r.disjoint_same)} sets) |")
    lines.append("")
    if args.color_model_dir:
        meta = json.loads((Path(args.color_model_dir) / "metadata.json").read_text())
        lines.append(f"- The colour-cue model is not shipped (16 MB): `python -m refineclip_core.demo.train --out DIR "
                     f"--cue color` trains it (the embedded model's recipe with body colour as the shortcut; seed "
                     f"{meta['train_config'].get('seed', 0)}, about an hour on 2 cores), then "
                     f"`python benchmarks/diagnosis.py --color-model-dir DIR`.")
    for r in rows:
        for e in r.examples:
            lines.append(f"- {r.label}: “{e}”")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = draw_parser(__doc__, [201, 202, 203], n_fit=60, n_test=100)
    ap.add_argument("--pair", default=DEFAULT_PROTOCOL.pair, help="error pair (default: the protocol's)")
    ap.add_argument("--random-sets", type=int, default=4, help="random head sets per draw and kind")
    ap.add_argument("--model-dir", default=str(DEMO_DIR), help="the background-cue model (default: the embedded one)")
    ap.add_argument("--color-model-dir", help="a model trained with --cue color (skipped when not given)")
    ap.add_argument("--color-layers", default="all",
                    help="heads of the last K layers for the colour-cue model ('all', the default: its shortcut is "
                         "written early; the background model uses the protocol's 4)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    with workdir(args.workdir, "refineclip-diagnosis-bench-") as work:
        rows = [run_model("embedded demo model", Path(args.model_dir), args, work)]
        if args.color_model_dir:
            layers = args.color_layers if args.color_layers == "all" else int(args.color_layers)
            rows.append(run_model(f"colour-cue model (heads of {layers} layers)", Path(args.color_model_dir), args, work,
                                  layers))
        body = report(rows, args, time.time() - t0)
        print(body)
        replace_section(Path(args.out), "diagnosis", body)
        return 0


if __name__ == "__main__":
    sys.exit(main())
