"""The one registry of compared methods: every row of the comparison, in order.

Each :class:`Method` carries its key (the row's name in every table and record), label, colour, what it
needs (:class:`Needs`: class labels, group labels, typed text, unlabelled images, the model), how to fit it
(``fit(ctx) -> Fitted``, one call shape for all) and when it is left out and why (``skip(ctx)``: a
sentence, shown where the row would be; a method is never run on something other than what it needs).
Every fitted row also records the labels it used (:class:`LabelsUsed`: how many class labels, how many
group labels and of which groups, the typed text, how many unlabelled images).

:func:`~refineclip_core.edit.compare.fit_edit` fits the exported edit,
:func:`~refineclip_core.edit.compare.fit_compared` every other row one at a time; the Refine page, the CLI,
the run report, the reproduction harness (:mod:`.reproduce`) and the benchmarks read keys, labels, colours
and order from here. A new baseline is one module (its algorithm) plus one entry here and one test
(CONTRIBUTING.md, "Adding a compared method").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import RefineClipError
from ..method.protocol import CONCEPT_KEPT

#: Key of the paper's phase 2 for each strategy.
PAPER_KEYS = {"diag": "refineclip-diag", "full": "refineclip-full", "lora": "refineclip-lora"}


@dataclass(frozen=True)
class Needs:
    """What a method needs besides the cached images and class names."""

    class_labels: bool = False    # the labelled images' classes
    group_labels: bool = False    # the labelled images' groups
    text: bool = False            # text the user types
    images: bool = False          # unlabelled adaptation images
    model: bool = False           # the loaded model (its text tower)

    def words(self) -> str:
        parts = [name for flag, name in ((self.class_labels, "class labels"), (self.group_labels, "group labels"),
                                         (self.text, "typed text"), (self.images, "unlabelled images"),
                                         (self.model, "the model's text tower")) if flag]
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class LabelsUsed:
    """The supervision one fitted row used (issue 35): counts, the groups, the typed text."""

    class_labels: int = 0
    group_labels: int = 0
    groups: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    unlabelled: int = 0

    def sentence(self) -> str:
        """``"20 class labels · 20 group labels (minority: a, b) · typed: 'x' · 600 unlabelled images"``."""
        parts = []
        if self.class_labels:
            parts.append(f"{self.class_labels} class labels")
        if self.group_labels:
            parts.append(f"{self.group_labels} group labels" + (f" ({', '.join(self.groups)})" if self.groups else ""))
        if self.text:
            parts.append("typed: " + ", ".join(f"“{t}”" for t in self.text))
        if self.unlabelled:
            parts.append(f"{self.unlabelled} unlabelled images")
        return " · ".join(parts) or "none (class names only)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups": list(self.groups), "text": list(self.text), "sentence": self.sentence()}


@dataclass
class Context:
    """What every fit and skip rule reads: the cache, the identification, the engine (mean-ablation
    features over the adaptation rows), the edit's configuration and heads, the model when loaded."""

    cache: Any
    ident: Any
    engine: Any
    cfg: Any
    heads: list
    loaded: Any = None
    concept: Any = None
    progress: Any = None
    cancel: Any = None

    @property
    def mode(self) -> str:
        return self.ident.config.ablation

    @property
    def n_labelled(self) -> int:
        return int(len(self.ident.sample_rows))

    @property
    def n_unlabelled(self) -> int:
        return int(len(self.ident.adapt_rows))


@dataclass
class Fitted:
    """A fitted row: its predictions for every cached image, the labels it used, and its map when it is an
    edit of ``visual.proj`` (kept on the outcome)."""

    predictions: np.ndarray
    used: LabelsUsed
    result: Any = None


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    colour: str
    needs: Needs
    what: str                                                  # one sentence: what the row is
    fit: Callable[[Context], Fitted] | None = None
    skip: Callable[[Context], str | None] = lambda ctx: None
    applies: Callable[[Any, Any], bool] = lambda cfg, concept: True    # (EditConfig, concept) -> in this run?
    compared: bool = True                                      # fitted by fit_compared (not by fit_edit itself)


def predictions_of(cache, result) -> np.ndarray:
    """Class predictions of every cached image under a fitted map (a block of images at a time)."""
    from ..method.evaluation import block_argmax

    text = cache.text.astype(np.float64).T
    return block_argmax(lambda x: result.refined.apply(x) @ text, cache.embeddings)


def _used(ctx: Context, unlabelled: bool = False, text: Sequence[str] = ()) -> LabelsUsed:
    return LabelsUsed(class_labels=ctx.n_labelled, text=tuple(text), unlabelled=ctx.n_unlabelled if unlabelled else 0)


# -- fits (one call shape) -----------------------------------------------------------------------

def _zero_shot(ctx: Context) -> Fitted:
    return Fitted(ctx.engine.base_predictions, LabelsUsed())


def _ablated(ctx: Context) -> Fitted:
    return Fitted(ctx.engine.predict(ctx.heads, ctx.mode), _used(ctx, unlabelled=ctx.mode == "mean"))


def _refineclip_fit(removed) -> Callable[[Context], Fitted]:
    def fit(ctx: Context) -> Fitted:
        from .fit import fit_ablation, teacher_embeddings

        concept = ctx.concept if removed else None
        teacher, in_success = teacher_embeddings(ctx.engine, ctx.heads, ctx.mode, ctx.ident.adapt_rows,
                                                 ctx.ident.target_classes, concept, ctx.cfg.fit.strength,
                                                 success_only=True)
        result = fit_ablation(ctx.cache.embeddings[ctx.ident.adapt_rows], ctx.cache.text, ctx.cache.scoring,
                              teacher, in_success, ctx.cfg.fit, progress=ctx.progress, cancel=ctx.cancel)
        text = tuple(concept.texts) + tuple(concept.versus) if concept is not None else ()
        return Fitted(predictions_of(ctx.cache, result), _used(ctx, unlabelled=True, text=text), result)
    return fit


def _paper(ctx: Context) -> Fitted:
    from .paper import paper_phase2

    ident, cache = ctx.ident, ctx.cache
    W = np.unique(np.concatenate([s.W for s in ident.sets.values()]))
    local = np.setdiff1d(np.unique(np.concatenate([np.concatenate([s.C, s.A]) for s in ident.sets.values()])), W)
    result = paper_phase2(cache.embeddings, cache.labels, cache.text, cache.scoring, W, local,
                          ctx.engine.embeddings(ctx.heads, ctx.mode, W), ctx.cfg.paper, train_rows=ident.sample_rows,
                          progress=ctx.progress, cancel=ctx.cancel)
    return Fitted(predictions_of(cache, result), _used(ctx, unlabelled=ctx.mode == "mean"), result)


def _finetune(ctx: Context) -> Fitted:
    from .paper import standard_finetune

    c = ctx.cache
    result = standard_finetune(c.embeddings, c.labels, c.text, c.scoring, ctx.ident.sample_rows, ctx.cfg.paper,
                               progress=ctx.progress, cancel=ctx.cancel)
    return Fitted(predictions_of(c, result), _used(ctx), result)


def _tip(ctx: Context) -> Fitted:
    from ..method.baselines import TipAdapter

    c, rows = ctx.cache, ctx.ident.sample_rows
    return Fitted(TipAdapter.build(c.embeddings[rows], c.labels[rows], c.text, c.logit_scale).predict(c.embeddings),
                  _used(ctx))


def _coop_skip(ctx: Context) -> str | None:
    from ..method.baselines import coop_cost, supports_coop

    if ctx.loaded is None:
        return "CoOp is left out: it trains the prompts through the model's text tower, and no model is loaded."
    if not supports_coop(ctx.loaded.model):
        return "CoOp is left out: it needs an open_clip CLIP text tower (token embeddings, argmax pooling)."
    cfg = ctx.cfg.coop
    cost = coop_cost(ctx.loaded, ctx.cache.classes, ctx.cache.manifest.templates, cfg)
    if cost > cfg.max_flops:
        return (f"CoOp is left out: its {cfg.steps} steps run the text tower over all {len(ctx.cache.classes):,} "
                f"class prompts each, about {cost:.1e} operations (its budget is {cfg.max_flops:.0e}; minutes per "
                "1e13 on a CPU).")
    return None


def _coop(ctx: Context) -> Fitted:
    from ..method.baselines import CoOp
    from ..progress import silent

    c, rows = ctx.cache, ctx.ident.sample_rows
    (ctx.progress or silent)("CoOp: learning the prompts' context", 0, ctx.cfg.coop.steps)
    coop = CoOp.fit(ctx.loaded, c.classes, c.manifest.templates, c.embeddings[rows], c.labels[rows], c.logit_scale,
                    ctx.cfg.coop, cancel=ctx.cancel)
    return Fitted(coop.predict(c.embeddings), _used(ctx))


def _cue_skip(ctx: Context) -> str | None:
    p = ctx.cfg.peers
    if not p.cue or not p.cue_versus:
        return ("Head search + typed-cue projection is left out: it projects the embedding off a spurious attribute "
                "typed in words (the cue and what it is taken against), and none was typed.")
    if ctx.loaded is None:
        return "Head search + typed-cue projection is left out: it embeds the typed cue, and no model is loaded."
    return None


def _cue(ctx: Context) -> Fitted:
    from ..inspection.diagnosis import attribute_direction
    from ..method.ltc import HeadSearchCueProjection

    p, ident, c = ctx.cfg.peers, ctx.ident, ctx.cache
    pairs = [(a, b, ident.sets[(a, b)].W, ident.sets[(a, b)].C) for a, b in ident.pairs]
    fitted = HeadSearchCueProjection.fit(ctx.engine, pairs, c.labels, attribute_direction(ctx.loaded, p.cue,
                                                                                          p.cue_versus),
                                         ident.sample_rows)
    return Fitted(fitted.predict(), _used(ctx, unlabelled=True, text=tuple(p.cue) + tuple(p.cue_versus)))


def ltc_rows(ctx: Context) -> tuple[np.ndarray, list[str], int]:
    """Where LTC locates: the labelled images of its minority groups, the groups' names and how many labelled
    images' groups were read to find them (:func:`~refineclip_core.method.ltc.minority_groups`)."""
    from ..method.ltc import minority_groups

    c, rows = ctx.cache, np.asarray(ctx.ident.sample_rows, dtype=np.int64)
    grouped = rows[c.groups[rows] >= 0]
    correct = ctx.engine.base_predictions[grouped] == c.labels[grouped]
    names = minority_groups(c.groups[grouped], c.labels[grouped], correct, c.group_names, ctx.cfg.peers.minority)
    ids = [c.group_names.index(g) for g in names]
    return grouped[np.isin(c.groups[grouped], ids)], names, int(len(grouped))


def _ltc_skip(ctx: Context) -> str | None:
    lead = "LTC (as released) is left out: "
    if not ctx.cfg.peers.accept:
        return (lead + "it corrects its salient heads with attribute pairs typed in words (true differences "
                "between the classes; the paper has a language model write them), and none were typed.")
    if ctx.loaded is None:
        return lead + "it embeds the typed attribute pairs, and no model is loaded."
    rows = np.asarray(ctx.ident.sample_rows, dtype=np.int64)
    if not (ctx.cache.groups[rows] >= 0).any():
        return (lead + "it locates its heads on the minority groups of group-labelled images, and the labelled "
                "images have no group labels.")
    try:
        located, names, _ = ltc_rows(ctx)
    except RefineClipError as exc:
        return lead + str(exc)
    if not names or not len(located):
        return (lead + "it locates its heads on the minority groups, and among the labelled images no group of a "
                "class does worse than another (no minority group to locate on).")
    return None


def _ltc(ctx: Context) -> Fitted:
    import torch

    from ..method.ltc import LocateThenCorrect

    located, names, n_grouped = ltc_rows(ctx)
    texts = [t for pair in ctx.cfg.peers.accept for t in pair]
    with torch.no_grad():
        emb = ctx.loaded.model.encode_text(ctx.loaded.tokenizer(texts).to(ctx.loaded.device)).float().cpu().numpy()
    fitted = LocateThenCorrect.fit(ctx.engine, located, ctx.cache.labels, emb.reshape(len(texts) // 2, 2, -1),
                                   mean_rows=ctx.ident.adapt_rows)
    used = LabelsUsed(class_labels=int(len(located)), group_labels=n_grouped, groups=tuple(names),
                      text=tuple(texts), unlabelled=ctx.n_unlabelled)
    return Fitted(fitted.predict(), used)


def _paper_applies(strategy: str) -> Callable[[Any, Any], bool]:
    return lambda cfg, concept: cfg.paper.strategy == strategy


METHODS: tuple[Method, ...] = (
    Method("zero-shot", "zero-shot", "#7f7f7f", Needs(), "the model as it is", _zero_shot, compared=False),
    Method("ablated", "ablation of the chosen heads", "#ff7f0e", Needs(class_labels=True, images=True),
           "the chosen heads removed (Eq. 5; not a checkpoint)", _ablated, compared=False),
    Method("refineclip-fit", "RefineCLIP-fit", "#2e7d32", Needs(class_labels=True, images=True),
           "the ablated model distilled into visual.proj on the unlabelled images", _refineclip_fit(True)),
    Method(CONCEPT_KEPT, "RefineCLIP-fit, concept kept", "#81c784", Needs(class_labels=True, images=True),
           "the same fit without the concept removal", _refineclip_fit(False),
           applies=lambda cfg, concept: concept is not None),
    *(Method(key, f"paper phase 2 ({s})", "#c2185b", Needs(class_labels=True, images=True),
             f"the paper's Eq. 13 ({s}) on the labelled samples", _paper, applies=_paper_applies(s))
      for s, key in PAPER_KEYS.items()),
    Method("standard-finetune", "standard fine-tuning (CE only)", "#1f77b4", Needs(class_labels=True),
           "visual.proj fine-tuned with cross-entropy on the labelled samples", _finetune),
    Method("tip-adapter", "Tip-Adapter (training-free)", "#9467bd", Needs(class_labels=True),
           "a key-value cache of the labelled samples added to the zero-shot logits", _tip),
    Method("coop", "CoOp (prompt learning)", "#8c564b", Needs(class_labels=True, model=True),
           "the prompts' context words learned on the labelled samples (text side)", _coop, _coop_skip),
    Method("cue-projection", "head search + typed-cue projection", "#17becf",
           Needs(class_labels=True, text=True, images=True, model=True),
           "our LTC-like variant: heads by their share of the logit gap, mean-ablated, then the embedding "
           "projected off the typed cue", _cue, _cue_skip),
    Method("ltc", "LTC (as released)", "#bcbd22",
           Needs(class_labels=True, group_labels=True, text=True, images=True, model=True),
           "LTC as released: heads located on the minority groups, spurious ones mean-ablated, salient ones "
           "corrected by RoboShot's accept step with the typed attribute pairs", _ltc, _ltc_skip),
)

BY_KEY: dict[str, Method] = {m.key: m for m in METHODS}
ORDER: tuple[str, ...] = tuple(m.key for m in METHODS)


def order_key(name: str) -> tuple[int, str]:
    """Sort key of a row name: registry order (a ``prefix:`` such as ``paper:`` sorts with its method), then
    unknown names alphabetically."""
    base = name.split(":", 1)[1] if ":" in name and name.split(":", 1)[1] in BY_KEY else name
    return (ORDER.index(base) if base in BY_KEY else len(ORDER), name)


def label_of(name: str) -> str:
    """A row's label (``paper:ablated`` → ``paper: ablation of the chosen heads``)."""
    prefix, _, base = name.rpartition(":")
    if base not in BY_KEY:
        return name
    return (f"{prefix}: " if prefix else "") + BY_KEY[base].label


def about(key: str) -> dict[str, Any]:
    """A row's registry entry as data (recorded with its accuracies, so a report rendered from JSON labels
    and colours it without this module): label, colour, what it is, what it needs."""
    m = BY_KEY[key]
    return {"label": m.label, "colour": m.colour, "what": m.what, "needs": m.needs.words()}
