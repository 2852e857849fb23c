"""Fit the edit and every method it is compared with (ablation, the paper's map, fine-tuning,
Tip-Adapter, LTC) on the cached embeddings, predict the evaluation rows, and judge the exported
edit with the guard (:mod:`~refineclip_core.edit.guard`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RefineClipError
from ..features.cache import FeatureCache
from ..features.decomposition import HeadId
from ..method.ablation import AblationEngine
from ..method.baselines import CoOp, TipAdapter, coop_cost, supports_coop
from ..method.comparison import MethodReport, evaluate_methods
from .concept import ConceptRemoval
from ..method.evaluation import block_argmax
from ..method.protocol import CONCEPT_KEPT, Identification, make_engine
from ..progress import CancelFn, Progress, silent
from .config import DEFAULT_EDIT, EditConfig
from .fit import fit_ablation, teacher_embeddings
from .paper import RefinementResult, refine, standard_finetune


@dataclass
class EditOutcome:
    """Phase 2's outcome: every fitted map by method name (``results``), every compared method as
    data (``report``: name → predictions and accuracies) and which one an exported checkpoint carries
    (``exported``; its map is ``refinement.refined``). The guard's verdict on it is
    :func:`refineclip_core.edit.guard.assess_edit` (``run_edit`` makes it)."""

    identification: Identification
    results: dict[str, RefinementResult]     # method name -> fitted map (exported, paper phase 2, fine-tune)
    exported: str
    report: MethodReport
    heads: list[HeadId]
    config: EditConfig = DEFAULT_EDIT
    concept: ConceptRemoval | None = None    # the concept the exported edit's teacher also removed
    left_out: dict[str, str] = field(default_factory=dict)   # method -> why it is not in the comparison

    @property
    def refinement(self) -> RefinementResult:
        """The exported edit's fitted map."""
        return self.results[self.exported]

    @property
    def finetune(self) -> RefinementResult | None:
        return self.results.get("standard-finetune")


def predictions_of(cache: FeatureCache, result: RefinementResult) -> np.ndarray:
    """Class predictions of every cached image under a fitted map (a block of images at a time)."""
    text = cache.text.astype(np.float64).T
    return block_argmax(lambda x: result.refined.apply(x) @ text, cache.embeddings)


def fit_edit(cache: FeatureCache, ident: Identification, cfg: EditConfig = DEFAULT_EDIT,
                   heads: list[HeadId] | None = None, engine: AblationEngine | None = None,
                   baselines: bool = True, progress: Progress | None = None,
                   cancel: CancelFn | None = None, concept: ConceptRemoval | None = None,
                   loaded: Any = None) -> EditOutcome:
    """Phase 2 with the chosen heads: fit the exported edit (``cfg.method``), with ``baselines``
    also the other kind of edit, standard fine-tuning, Tip-Adapter and (given the ``loaded`` model
    whose text tower it trains) CoOp, and compare them all with zero-shot and the ablated model on
    the evaluation rows. ``concept`` (``cfg.concept`` resolved by
    :func:`~refineclip_core.edit.concept.resolve_concept`) is projected out of RefineCLIP-fit's teacher;
    with ``baselines`` the same fit without it is the row :data:`CONCEPT_KEPT`."""
    if cfg.concept.active and concept is None:
        raise RefineClipError("The edit removes a concept but none was resolved; embed its texts first "
                              "(refineclip_core.edit.concept.resolve_concept).")
    engine = ident.ablation_engine(engine or make_engine(cache))
    heads = ident.heads if heads is None else list(heads)
    mode = ident.config.ablation
    labels = cache.labels
    preds = {"zero-shot": engine.base_predictions, "ablated": engine.predict(heads, mode)}
    left_out: dict[str, str] = {}
    results: dict[str, RefinementResult] = {}
    kinds = ["fit", "paper"] if cfg.method == "fit" else ["paper", "fit"]
    if concept is not None and baselines:
        kinds.append("fit-kept")
    for kind in kinds if baselines else kinds[:1]:
        if kind in ("fit", "fit-kept"):
            removed = concept if kind == "fit" else None
            teacher, in_success = teacher_embeddings(engine, heads, mode, ident.adapt_rows, ident.target_classes,
                                                     removed, cfg.fit.strength, success_only=True)
            result = fit_ablation(cache.embeddings[ident.adapt_rows], cache.text, cache.logit_scale, teacher,
                                  in_success, cfg.fit, progress=progress, cancel=cancel)
            name = "refineclip-fit" if kind == "fit" else CONCEPT_KEPT
        else:
            W = np.unique(np.concatenate([s.W for s in ident.sets.values()]))
            local = np.unique(np.concatenate([np.concatenate([s.C, s.A]) for s in ident.sets.values()]))
            local = np.setdiff1d(local, W)
            result = refine(cache.embeddings, labels, cache.text, cache.logit_scale, W, local,
                            engine.embeddings(heads, mode, W), cfg.paper, train_rows=ident.sample_rows,
                            progress=progress, cancel=cancel)
            name = f"refineclip-{cfg.paper.strategy}"
        results[name] = result
        preds[name] = predictions_of(cache, result)
    if baselines:
        results["standard-finetune"] = standard_finetune(cache.embeddings, labels, cache.text, cache.logit_scale,
                                                         ident.sample_rows, cfg.paper, progress=progress,
                                                         cancel=cancel)
        preds["standard-finetune"] = predictions_of(cache, results["standard-finetune"])
        tip = TipAdapter.build(cache.embeddings[ident.sample_rows], labels[ident.sample_rows], cache.text,
                               cache.logit_scale)
        preds["tip-adapter"] = tip.predict(cache.embeddings)
        if loaded is not None and supports_coop(loaded.model):
            cost = coop_cost(loaded, cache.classes, cache.manifest.templates, cfg.coop)
            if cost > cfg.coop.max_flops:
                left_out["coop"] = (f"CoOp is left out: its {cfg.coop.steps} steps run the text tower over all "
                                    f"{len(cache.classes):,} class prompts each, about {cost:.1e} operations "
                                    f"(its budget is {cfg.coop.max_flops:.0e}; minutes per 1e13 on a CPU).")
            else:
                (progress or silent)("CoOp: learning the prompts' context", 0, cfg.coop.steps)
                coop = CoOp.fit(loaded, cache.classes, cache.manifest.templates,
                                cache.embeddings[ident.sample_rows], labels[ident.sample_rows], cache.logit_scale,
                                cfg.coop, cancel=cancel)
                preds["coop"] = coop.predict(cache.embeddings)
    return EditOutcome(ident, results, cfg.exported, evaluate_methods(cache, ident, preds), heads, cfg, concept,
                       left_out)
