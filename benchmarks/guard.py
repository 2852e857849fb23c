"""The guard's own error rates: how often does it call a bad edit `verified`, and a good one?

For every *world seed* a fresh sample of the world is drawn with a large balanced test split, which
is cut in two, class × group stratified: the **truth half** (``--n-test``/2 images per group) and the
**held-out pool** (the other half). For every *sample seed* the default pipeline runs (``identify`` +
``fit_edit`` with the defaults every entry point uses) and four edits are built on the same draw:

* ``default edit``: the exported edit (RefineCLIP-fit with the default heads): good or not, the truth says;
* ``random heads``: RefineCLIP-fit with as many heads drawn at random from the cached ones;
* ``unrelated-class heads``: RefineCLIP-fit with as many heads, those that write most of an *other*
  class's logit (an edit aimed at the wrong class);
* ``trade (+10)``, ``trade (+25)``: zero-shot with a bias added to one edited class's logit, the smallest
  that lifts the worst group of the edited classes by about 10 or 25 points on the pool: it moves
  errors from that class's groups onto the other class's groups (an edit that trades one group for
  another; the small one is the hard case, a real gain bought with a modest loss elsewhere);
* ``fix (+10)``, ``fix (+25)``: constructed edits known to be good: zero-shot with a random share of every
  edited-class group's errors corrected and nothing broken, the share that lifts the worst group by about
  10 or 25 points (they measure how often the guard can say `verified` at all: its power).

**The truth** of each edit, for each acceptable drop ``--max-drops`` (points), is measured on the truth
half (hundreds of images per group): *bad* when what ``verified`` claims is false there: the group worst
before the edit did not gain (its change on the truth half ≤ 0) or some group or class dropped by more than
the acceptable drop (its change on the truth half); *worse within margin* when not bad but some group or
class is significantly worse there (exact McNemar, Holm); *good* when the guard at that size calls it
``verified``; *unclear* otherwise. Then ``--draws`` small
held-out sets of ``--per-group`` images per group (every group of the edited classes and every other
class; drawn from the pool, never from the truth half) are judged by the guard (``judge_edit`` with that
acceptable drop). *False approval* is a bad edit called ``verified`` (target ≤ 5% at every size and
margin); *power* is a good edit called ``verified``.

**The default demo run** (``--demo-worlds``, fresh seeds never used to choose a default): the embedded
demo exactly as the dashboard opens it (``session.demo.write_demo_data``: val 40, test ``DEMO_N_TEST`` per
group and unrelated class, drawn with that seed), extracted, then the defaults (``DEFAULT_PROTOCOL``,
``DEFAULT_EDIT``) and the guard's defaults: how often is the run ``verified``, ``not-verified``, ``harmful``?

Results go to ``benchmarks/RESULTS.md`` between the ``guard:start``/``guard:end`` markers:

    python benchmarks/guard.py [--world-seeds 151 152] [--sample-seeds 0 1 2] [--n-test 600]
                               [--per-group 40 100 150 250] [--max-drops 5 10] [--draws 40]
                               [--demo-worlds 401 402 403 404 405 406] [--model-dir assets/demo]

``--model-dir assets/digits`` runs it on the handwritten-digits world (the model's metadata names the world).
"""

from __future__ import annotations

import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.demo_world import draw_parser, replace_section, workdir, world_cache, world_model  # noqa: E402
from refineclip_core.edit.guard import HARMFUL, STATUSES, VERIFIED, GuardConfig, assess_edit, judge_edit  # noqa: E402
from refineclip_core.features.extraction import ExtractionConfig, extract  # noqa: E402
from refineclip_core.loading.confine import Confinement  # noqa: E402
from refineclip_core.loading.data import load_dataset  # noqa: E402
from refineclip_core.session.demo import DEMO_N_PER_GROUP, heldout_size, write_demo_data  # noqa: E402
from refineclip_core.features.cache import FeatureCache  # noqa: E402
from refineclip_core.loading.models import DEMO_DIR  # noqa: E402
from refineclip_core.method.protocol import DEFAULT_PROTOCOL, Identification, identify, make_engine
from refineclip_core.edit.compare import fit_edit
from refineclip_core.edit.config import DEFAULT_EDIT

KINDS = ("default edit", "random heads", "unrelated-class heads", "trade (+10)", "trade (+25)", "fix (+10)", "fix (+25)")
TRUTHS = ("bad", "worse within margin", "good", "unclear")
TRADES = {"trade (+10)": 0.10, "trade (+25)": 0.25}
"""The trade edits' bias lifts the worst group of the edited classes by about this much on the pool."""
FIXES = {"fix (+10)": 0.10, "fix (+25)": 0.25}
"""The constructed good edits correct about this share of the worst group's images (errors only, nothing broken)."""


@dataclass
class Edit:
    world: int
    seed: int
    kind: str
    after: np.ndarray
    truth: dict                 # acceptable drop (points) -> "bad" / "good" / "unclear"
    truth_worst: float          # change of the group worst before the edit, on the truth half (points)
    truth_min_unit: float       # the largest drop of any group or class on the truth half (points)


def split_test(cache: FeatureCache, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test rows cut in two halves, stratified by group (class where a row has no group)."""
    rows = np.flatnonzero(cache.splits == "test")
    key = strata(cache, rows)
    rng = np.random.default_rng([seed, 4_242])
    truth, pool = [], []
    for k in np.unique(key):
        r = rows[key == k][rng.permutation(int((key == k).sum()))]
        truth.append(r[: len(r) // 2])
        pool.append(r[len(r) // 2:])
    return np.sort(np.concatenate(truth)), np.sort(np.concatenate(pool))


def strata(cache: FeatureCache, rows: np.ndarray) -> np.ndarray:
    return np.where(cache.groups[rows] >= 0, cache.groups[rows], 10_000 + cache.labels[rows])


def small_set(cache: FeatureCache, pool: np.ndarray, per_group: int, rng: np.random.Generator) -> np.ndarray:
    """``per_group`` pool rows of every group (and of every class without groups), drawn without replacement."""
    key = strata(cache, pool)
    return np.sort(np.concatenate([rng.choice(pool[key == k], size=min(per_group, int((key == k).sum())),
                                              replace=False) for k in np.unique(key)]))


def judge(cache: FeatureCache, ident: Identification, after: np.ndarray, rows: np.ndarray, max_drop: float = 5.0):
    """The guard on ``rows`` of the test split. The world's train and val splits hold groups the test split never
    has (birds on sky, sand, indoors); the guard rightly refuses to verify an edit for a group with no held-out
    images, so outside the test split the rows are given no group: the universe here is the test split."""
    groups = None
    if cache.group_names:
        groups = np.where(cache.splits == "test", cache.groups, -1)
    return judge_edit(cache.labels, ident.base_predictions, after, rows, ident.target_classes, cache.classes,
                      groups, cache.group_names, "edit", GuardConfig(max_drop=max_drop / 100))


def truth_of(verdict) -> str:
    """The edit's truth on the truth half at the verdict's acceptable drop (module docstring)."""
    drop = min(u.change.value for u in verdict.units())
    if (verdict.worst is not None and verdict.worst.change.value <= 0) or -drop > verdict.config.max_drop:
        return "bad"
    if verdict.status == HARMFUL:
        return "worse within margin"
    return "good" if verdict.status == VERIFIED else "unclear"


def unrelated_heads(cache: FeatureCache, ident: Identification, k: int) -> list:
    """The ``k`` heads that write most of an *other* class's logit (mean direct contribution along its text
    embedding over its val images), for the other class with the most val images: heads of the wrong class."""
    val = np.flatnonzero(cache.splits == "val")
    others = [c for c in range(len(cache.classes)) if c not in ident.target_classes]
    u = max(others, key=lambda c: int((cache.labels[val] == c).sum()))
    rows = val[cache.labels[val] == u]
    contrib = np.asarray(cache.heads[rows], dtype=np.float64) @ cache.text[u].astype(np.float64)   # (n, L, H)
    order = np.argsort(-contrib.mean(0).ravel(), kind="stable")[:k]
    ids = cache.head_ids()
    return [ids[i] for i in order]


def trade_predictions(cache: FeatureCache, ident: Identification, pool: np.ndarray, target: float) -> np.ndarray:
    """Zero-shot plus a bias on one edited class's logit: the smallest bias (either class) that lifts the
    worst group of the edited classes by ``target`` on the pool (or the best lift found)."""
    logits = cache.embeddings.astype(np.float64) @ cache.text.astype(np.float64).T
    tmask = np.isin(cache.labels[pool], ident.target_classes)
    rows = pool[tmask]
    key = strata(cache, rows)

    def worst(pred: np.ndarray) -> float:
        ok = pred[rows] == cache.labels[rows]
        return min(float(ok[key == k].mean()) for k in np.unique(key))

    base = worst(ident.base_predictions)
    scale = float(np.std(logits[rows][:, ident.target_classes]))
    best, best_gain = ident.base_predictions, -1.0
    for c in ident.target_classes:
        for b in np.linspace(0, 3 * scale, 241)[1:]:
            shifted = logits.copy()
            shifted[:, c] += b
            pred = shifted.argmax(1)
            gain = worst(pred) - base
            if gain >= target:
                return pred
            if gain > best_gain:
                best, best_gain = pred, gain
    return best


def fix_predictions(cache: FeatureCache, ident: Identification, pool: np.ndarray, target: float,
                    seed: list[int]) -> np.ndarray:
    """A constructed edit known to be good: zero-shot with the same random share ``f`` of every edited-class
    group's errors corrected and nothing else changed, ``f`` such that the worst group (on the pool) gains about
    ``target``. No image gets worse, so a guard that never calls it `verified` has no power."""
    pred = ident.base_predictions.copy()
    edited = np.flatnonzero(np.isin(cache.labels, ident.target_classes))
    rows = np.intersect1d(edited, pool)
    key = strata(cache, rows)
    worst = min(float((pred[rows][key == k] == cache.labels[rows][key == k]).mean()) for k in np.unique(key))
    share = min(1.0, target / max(1.0 - worst, 1e-9))
    wrong = edited[pred[edited] != cache.labels[edited]]
    fixed = wrong[np.random.default_rng(seed).random(len(wrong)) < share]
    pred[fixed] = cache.labels[fixed]
    return pred


def main(argv: list[str] | None = None) -> int:
    ap = draw_parser(__doc__, [151, 152], n_fit=100, n_test=600)
    ap.set_defaults(sample_seeds=[0, 1, 2])
    ap.add_argument("--model-dir", default=str(DEMO_DIR), help="model folder (default: the embedded demo model)")
    ap.add_argument("--per-group", type=int, nargs="+", default=[40, 100, 150, 250],
                    help="held-out images per group of the small sets the guard judges")
    ap.add_argument("--max-drops", type=float, nargs="+", default=[5.0, 10.0],
                    help="acceptable drops (points) the guard is run with (the first is the default, 5)")
    ap.add_argument("--draws", type=int, default=40, help="small held-out sets per edit and size")
    ap.add_argument("--demo-worlds", type=int, nargs="*", default=[401, 402, 403, 404, 405, 406],
                    help="fresh seeds of the default demo run (none: skip it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    model_dir = Path(args.model_dir)
    edits: list[Edit] = []
    calls: dict[tuple, Counter] = defaultdict(Counter)     # (kind, truth, size, margin) -> status counts
    claims: dict[tuple, Counter] = defaultdict(Counter)    # (world, seed, kind, size, margin) -> sets, false claims
    demo_runs: list[tuple[int, str, str]] = []
    with workdir(args.workdir, "refineclip-guard-bench-") as work:
        world, loaded = world_model(model_dir)
        for w_seed in args.world_seeds:
            cache = world_cache(work, world, w_seed, args.n_fit, args.n_test, loaded)
            engine = make_engine(cache)
            truth_rows, pool = split_test(cache, w_seed)
            heads_all = cache.head_ids()
            for s in args.sample_seeds:
                ident = identify(cache, replace(DEFAULT_PROTOCOL, seed=s), engine)
                edit = replace(DEFAULT_EDIT, fit=replace(DEFAULT_EDIT.fit, seed=s))
                built = {"default edit": fit_edit(cache, ident, edit, engine=engine, baselines=False)}
                rng = np.random.default_rng([w_seed, s, 77])
                k = max(len(ident.heads), 3)
                rand = [heads_all[i] for i in rng.choice(len(heads_all), size=k, replace=False)]
                built["random heads"] = fit_edit(cache, ident, edit, heads=rand, engine=engine, baselines=False)
                built["unrelated-class heads"] = fit_edit(cache, ident, edit, heads=unrelated_heads(cache, ident, k),
                                                                engine=engine, baselines=False)
                preds = {kind: out.report.predictions[out.exported] for kind, out in built.items()}
                for kind, target in TRADES.items():
                    preds[kind] = trade_predictions(cache, ident, pool, target)
                for kind, target in FIXES.items():
                    preds[kind] = fix_predictions(cache, ident, pool, target, [w_seed, s, KINDS.index(kind)])
                for kind, after in preds.items():
                    verdicts = {m: judge(cache, ident, after, truth_rows, m) for m in args.max_drops}
                    v = verdicts[args.max_drops[0]]
                    e = Edit(w_seed, s, kind, after, {m: truth_of(verdicts[m]) for m in args.max_drops},
                             100 * (v.worst.change.value if v.worst else float("nan")),
                             100 * min(u.change.value for u in v.units()))
                    edits.append(e)
                    truth_change = {u.name: u.change.value for u in v.units()}
                    for size in args.per_group:
                        srng = np.random.default_rng([w_seed, s, KINDS.index(kind), size])
                        for _ in range(args.draws):
                            rows = small_set(cache, pool, size, srng)
                            for m in args.max_drops:
                                sv = judge(cache, ident, after, rows, m)
                                calls[(kind, e.truth[m], size, m)][sv.status] += 1
                                claims[(w_seed, s, kind, size, m)]["sets"] += 1
                                if sv.status == VERIFIED and false_claim(sv, truth_change, m):
                                    claims[(w_seed, s, kind, size, m)]["false"] += 1
                    print(f"world {w_seed} seed {s} {kind}: truth {e.truth} (worst group {e.truth_worst:+.1f}, "
                          f"largest drop {e.truth_min_unit:+.1f})", file=sys.stderr, flush=True)
        for d_seed in args.demo_worlds if world.kind == "birds" else []:
            status, sentence = demo_run(work, loaded, d_seed)
            demo_runs.append((d_seed, status, sentence))
            print(f"demo world {d_seed}: {sentence}", file=sys.stderr, flush=True)
        body = report(args, world, edits, calls, time.time() - t0, len(truth_rows), len(pool), demo_runs, claims)
    print(body)
    replace_section(Path(args.out), "guard" if world.kind == "birds" else f"guard-{world.kind}", body)
    return 0


def false_claim(verdict, truth_change: dict, max_drop: float) -> bool:
    """Is what a ``verified`` verdict claims false on the truth half: the group it names as worst before the
    edit did not gain there, or some group or class dropped there by more than ``max_drop`` points?"""
    named = truth_change.get(verdict.worst.before.name, float("nan")) if verdict.worst is not None else float("nan")
    return not named > 0 or min(truth_change.values()) < -max_drop / 100


def demo_run(work: Path, loaded, seed: int) -> tuple[str, str]:
    """The default demo run on a fresh draw of the demo's images (module docstring): its status and sentence."""
    data = write_demo_data(work / f"demo{seed}" / "data", seed=seed)
    with Confinement.of([data]).active():
        dataset = load_dataset(data)
    cache = extract(loaded, dataset, work / f"demo{seed}" / "cache", ExtractionConfig(layers=4, batch_size=64))
    engine = make_engine(cache)
    ident = identify(cache, DEFAULT_PROTOCOL, engine)
    out = fit_edit(cache, ident, DEFAULT_EDIT, engine=engine, baselines=False)
    preds = out.report.predictions
    v = assess_edit(cache, ident, preds["zero-shot"], preds[out.exported], out.exported)
    return v.status, v.sentence()


def _shown(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def _share(c: Counter, status: str) -> str:
    n = sum(c.values())
    return "–" if not n else f"{100 * c[status] / n:.1f}% ({c[status]}/{n})"


def report(args, world, edits: list[Edit], calls, seconds: float, n_truth: int, n_pool: int,
           demo_runs: list[tuple[int, str, str]] = (), claims=None) -> str:
    name = "demo (birds)" if world.kind == "birds" else world.kind
    margins = args.max_drops
    lines = [
        f"## The guard's own error rates ({name} world)",
        "",
        f"Written by `python benchmarks/guard.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}) in {seconds:.0f} s, model "
        f"`{_shown(Path(args.model_dir))}`. World seeds {args.world_seeds} × sample seeds {args.sample_seeds}; per world "
        f"{n_truth} test images in the truth half and {n_pool} in the pool the small held-out sets are drawn "
        f"from ({args.n_test} per group and per other class in all, cut in two). Per edit, size and acceptable "
        f"drop, {args.draws} small held-out sets with that many images per group (and per other class). The guard "
        f"is `refineclip_core.edit.guard.judge_edit` (min {GuardConfig().min_per_group} per group; verified = "
        f"the worst-before group's gain bound above zero and every drop bound within the acceptable drop, "
        f"bounds holding together at 95%; harmful = significantly worse, McNemar with Holm). Truth on the truth "
        f"half, per acceptable drop: *bad* = what `verified` claims is false there (the worst-before group did "
        f"not gain, or some group or class dropped by more than the acceptable drop: point estimates on the truth "
        f"half); *worse within margin* = not bad, but some group or class significantly worse there; *good* = "
        f"`verified` there; *unclear* = none of these.",
        "",
        "Edits and their truth (count of edits; " + ", ".join(f"acceptable drop {m:g} points" for m in margins) + "):",
        "",
        "| edit | " + " | ".join(f"{t} ({m:g})" for m in margins for t in TRUTHS) + " |",
        "|---|" + "---|" * (len(TRUTHS) * len(margins)),
    ]
    for kind in KINDS:
        if any(e.kind == kind for e in edits):
            lines.append(f"| {kind} | " + " | ".join(str(sum(e.kind == kind and e.truth[m] == t for e in edits))
                                                   for m in margins for t in TRUTHS) + " |")
    lines += ["", "**Headline**: share of small held-out sets the guard called `verified`, by the edit's truth "
                  "(false approval: bad edits called verified, target ≤ 5%; power: good edits called verified):", "",
              "| acceptable drop (points) | held-out images per group | false approval (bad → `verified`) | "
              "power (good → `verified`) | worse within margin → `verified` | unclear → `verified` |",
              "|---|---|---|---|---|---|"]
    for m in margins:
        for size in args.per_group:
            by_truth = {t: sum((calls[(k, t, size, m)] for k in KINDS), Counter()) for t in TRUTHS}
            lines.append(f"| {m:g} | {size} | {_share(by_truth['bad'], VERIFIED)} | {_share(by_truth['good'], VERIFIED)} "
                         f"| {_share(by_truth['worse within margin'], VERIFIED)} | {_share(by_truth['unclear'], VERIFIED)} |")
    if claims:
        lines += ["", "**False claims**: small held-out sets where the guard said `verified` and what it claimed is "
                      "false on the truth half (the group it named as worst before did not gain there, or some group "
                      "or class dropped there by more than the acceptable drop), over every edit, and for the edit "
                      "where it happened most (target: ≤ 5% for every edit; 40 sets per edit, so one edit's share "
                      "is itself uncertain by several points):", "",
                  "| acceptable drop (points) | held-out images per group | false claims, all edits | "
                  "most for one edit |", "|---|---|---|---|"]
        for m in margins:
            for size in args.per_group:
                cells = [c for k, c in claims.items() if k[3] == size and k[4] == m]
                total, bad = sum(c["sets"] for c in cells), sum(c["false"] for c in cells)
                worst = max(cells, key=lambda c: c["false"] / max(c["sets"], 1), default=Counter())
                lines.append(f"| {m:g} | {size} | {100 * bad / max(total, 1):.1f}% ({bad}/{total}) | "
                             f"{100 * worst['false'] / max(worst['sets'], 1):.1f}% ({worst['false']}/{worst['sets']}) |")
    lines += ["", "Full confusion table (truth × guard's call, share of small sets; n = sets judged):", "",
              "| edit | acceptable drop | truth | per group | n | " + " | ".join(f"`{s}`" for s in STATUSES) + " |",
              "|---|---|---|---|---|" + "---|" * len(STATUSES)]
    for kind in KINDS:
        for m in margins:
            for truth in TRUTHS:
                for size in args.per_group:
                    c = calls.get((kind, truth, size, m))
                    if not c:
                        continue
                    n = sum(c.values())
                    lines.append(f"| {kind} | {m:g} | {truth} | {size} | {n} | "
                                 + " | ".join(f"{100 * c[s] / n:.1f}%" for s in STATUSES) + " |")
    lines += ["", "What the edits did on the truth half (points; mean over draws, worst draw):", "",
              "| edit | change of the group worst before | largest drop of any group or class |", "|---|---|---|"]
    for kind in KINDS:
        es = [e for e in edits if e.kind == kind]
        if es:
            w = np.array([e.truth_worst for e in es])
            d = np.array([e.truth_min_unit for e in es])
            lines.append(f"| {kind} | {np.nanmean(w):+.1f} (min {np.nanmin(w):+.1f}) | {d.mean():+.1f} (min {d.min():+.1f}) |")
    if demo_runs:
        count = Counter(status for _, status, _ in demo_runs)
        n_test = heldout_size(DEMO_N_PER_GROUP)
        lines += ["", f"**The default demo run** on {len(demo_runs)} fresh draws of the demo's images (seeds "
                      f"{[d for d, _, _ in demo_runs]}, never used to choose a default; val {DEMO_N_PER_GROUP} and "
                      f"{n_test} held-out test images per group and unrelated class, as the dashboard draws them), "
                      f"defaults throughout, acceptable drop {GuardConfig().max_drop * 100:g} points: "
                      + ", ".join(f"`{s}` {count[s]}/{len(demo_runs)}" for s in STATUSES) + ".", "",
                  "| seed | verdict |", "|---|---|"]
        lines += [f"| {d} | {sentence.replace('|', '/')} |" for d, _, sentence in demo_runs]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
