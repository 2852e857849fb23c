"""The deployable edit: the ablated model distilled into ``visual.proj`` on unlabelled images.

Phase 1 (§3.1-3.2) finds heads whose removal fixes an error, but removing them needs an extra
step in the forward pass. The paper's phase 2 (§3.3, Eq. 11-13) therefore learns a map of the
image embedding that can be merged into the projection, from the few labelled samples alone.
Measured on fresh samples of the demo world, that map kept little of the ablation's gain and
often made the worst group worse: ~5 misclassified images cannot pin down which directions
of a 256-d (or 768-d) embedding the removed heads wrote.

**RefineCLIP-fit** keeps the paper's two distillation losses but evaluates them on every
*unlabelled* image available for adaptation (images that are never used for evaluation):

* success set Ŵ — images the original model predicts as one of the edited classes; teacher:
  ``E + s (E_abl − E)``, a share ``s`` (the strength, ``FitConfig.strength``, default 0.8) of the way to the ablated
  embedding ``E_abl`` (Eq. 5; zero or mean ablation of the chosen heads), i.e. each chosen head's
  centred contribution scaled by 1 − s instead of removed;
* locality set — every other image; teacher: the original embedding ``E``.

It learns a full linear map ``B`` of the embedding (``f(E) = E·B``; merged as ``P' = P·B``,
i.e. :class:`~refineclip_core.edit.paper.RefinedMap` with ``matrix = Bᵀ``) in two steps:

1. closed-form start (ridge least squares towards the identity)::

       B₀ = argmin_B Σ_x ‖E_x B − teacher_x‖² + λ‖B − I‖²_F,   λ = ridge · tr(EᵀE)/d

2. distillation with Adam from ``B₀``::

       min_B  mean_{x∈Ŵ} KL(g(E_abl(x)) ‖ g(E_x B)) · |Ŵ|/n + mean_{x∉Ŵ} KL(g(E_x) ‖ g(E_x B)) · (n−|Ŵ|)/n

   i.e. Eq. 11 and Eq. 12 averaged over all adaptation images (``g`` as in Eq. 11: CLIP's softmax, or a
   SigLIP-family model's own per-class sigmoid with its logit bias, KL then the sum of the classes'
   Bernoulli KLs; :class:`~refineclip_core.features.scoring.Scoring`).

No label is used here: labels only chose the heads. Which images are used for adaptation is
decided by :mod:`~refineclip_core.method.protocol` (never the evaluation rows).

Why s = 0.8 and not the whole removal: removing a shortcut also moves images that were right partly
because of it (the majority groups: landbirds on land, threes on red). On the development worlds (demo
7051-7054, digits 900-903, 3 samples each; ``benchmarks/edit_variants.py --teachers --variants strength``)
s = 1 cost those groups up to 8.2 (demo) and 12.1 (digits) points on average; s = 0.8 is the largest of
1, 0.9, 0.8, 0.7, 0.6 that kept every group of the edited classes within 5 points on average on both
worlds (worst-group gains +23.5 and +26.8 instead of +29.5 and +54.6). ``strength=1`` is the full removal.

"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import Cancelled, RefineClipError
from ..features.scoring import Scoring
from ..method.ablation import AblationEngine, Mode
from ..progress import CancelFn, Progress, never, silent
from .config import FitConfig
from .paper import RefinedMap, RefinementResult

KL_DTYPE = torch.float32
"""Precision of the KL distillation steps (the least-squares start is always float64). Measured on
20 development draws of the demo world: float64 gives the very same predictions at twice the time."""


def teacher_embeddings(engine: AblationEngine, heads: Sequence, mode: Mode, rows: np.ndarray,
                       edited_classes: Sequence[int], concept: Any = None,
                       strength: float = 1.0, success_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The teacher of every adaptation row, and which rows are in the success set Ŵ.

    Returns ``(teacher (n, d), in_success (n,) bool)`` for ``rows``: where the original model predicts
    one of ``edited_classes``, ``E + strength · (E_abl − E)`` (``strength`` 1: the ablated embedding of
    Eq. 5), projected off a concept's text directions when ``concept``, a
    :class:`~refineclip_core.edit.concept.ConceptRemoval`, is given; the original embedding elsewhere.
    ``success_only``: the teacher of the rows of Ŵ only ``(|Ŵ|, d)`` (the rest are their own embedding, which
    :func:`fit_ablation` reads from its ``embeddings``: no float64 copy of every row, 154 MB at 25,000 × 768).
    """
    rows = np.asarray(rows, dtype=np.int64)
    in_success = np.isin(engine.base_predictions[rows], np.asarray(list(edited_classes)))
    E = engine.E[rows[in_success]].astype(np.float64)
    inside = E + strength * (engine.embeddings(heads, mode, rows[in_success]).astype(np.float64) - E) \
        if in_success.any() else E
    if concept is not None and in_success.any():
        inside = concept.project(inside)
    if success_only:
        return inside, in_success
    teacher = engine.E[rows].astype(np.float64)
    teacher[in_success] = inside
    return teacher, in_success


def _teacher_rows(embeddings: np.ndarray, teacher: np.ndarray, in_success: np.ndarray, idx: np.ndarray | slice
                  ) -> np.ndarray:
    """The float64 teacher of rows ``idx``: from a teacher of every row ``(n, d)``, or from one of Ŵ's rows only
    ``(|Ŵ|, d)`` (the other rows' teacher is their embedding)."""
    if len(teacher) == len(embeddings):
        return np.asarray(teacher[idx], dtype=np.float64)
    out = np.asarray(embeddings[idx], dtype=np.float64)
    inside = np.asarray(in_success[idx], dtype=bool)
    out[inside] = teacher[(np.cumsum(in_success) - 1)[idx][inside]]
    return out


#: Rows per block of the least-squares sums and of the KL steps' forward and backward passes: at 1000
#: classes the KL of 8,192 rows held whole was about 0.5 GB of activations (one block below this: the
#: same arithmetic as one pass).
FIT_BLOCK = 2048


def least_squares_map(E: np.ndarray, teacher: np.ndarray, ridge: float, block: int | None = None,
                      in_success: np.ndarray | None = None) -> np.ndarray:
    """``B₀ = argmin ‖E B − teacher‖² + λ‖B − I‖²`` with ``λ = ridge · tr(EᵀE)/d`` ``(d, d)``; ``EᵀE`` and
    ``Eᵀ(E − teacher)`` summed in float64 over blocks of ``block`` rows (default :data:`FIT_BLOCK`, as the KL
    steps; no float64 copy of ``E``).
    ``teacher``: of every row, or of the rows ``in_success`` marks only (see :func:`teacher_embeddings`)."""
    d = E.shape[1]
    block = FIT_BLOCK if block is None else block
    G, R = np.zeros((d, d)), np.zeros((d, d))
    mark = np.ones(len(E), dtype=bool) if in_success is None else in_success
    for lo in range(0, len(E), block):
        Eb = np.asarray(E[lo:lo + block], dtype=np.float64)
        G += Eb.T @ Eb
        R += Eb.T @ (Eb - _teacher_rows(E, teacher, mark, slice(lo, lo + block)))
    lam = ridge * np.trace(G) / d if np.trace(G) > 0 else ridge
    # B₀ = (EᵀE + λI)⁻¹ (Eᵀ teacher + λI) = I − (EᵀE + λI)⁻¹ Eᵀ (E − teacher)
    return np.eye(d) - np.linalg.solve(G + lam * np.eye(d), R)


def fit_ablation(embeddings: np.ndarray, text: np.ndarray, scoring: Scoring | float, teacher: np.ndarray,
                 in_success: np.ndarray, cfg: FitConfig = FitConfig(), progress: Progress | None = None,
                 cancel: CancelFn | None = None) -> RefinementResult:
    """Learn ``B`` so that ``g(E·B)`` follows ``g(teacher)`` on the adaptation images.

    Args:
        embeddings: ``(n, d)`` E of the adaptation images; ``teacher``: their teachers ``(n, d)``, or
            only Ŵ's ``(|Ŵ|, d)`` (``success_only``), and ``in_success``: ``(n,)`` which of them are in Ŵ
            (see :func:`teacher_embeddings`).
        text: ``(C, d)`` normalised class texts; ``scoring``: the model's
            :class:`~refineclip_core.features.scoring.Scoring` (a float: CLIP's softmax at that ``logit_scale.exp()``).
        progress, cancel: :mod:`refineclip_core.progress` (losses reported as values every 10 steps).
    """
    progress, cancel = progress or silent, cancel or never
    scoring = Scoring.of(scoring)
    E = np.asarray(embeddings)
    in_success = np.asarray(in_success, dtype=bool)
    if len(E) == 0:
        raise RefineClipError("No images to fit the edit on: the adaptation set is empty.")
    progress("RefineCLIP-fit: least-squares start", 0, cfg.steps)
    B0 = least_squares_map(E, teacher, cfg.ridge, in_success=in_success)
    history: dict[str, list[float]] = {"total": [], "success": [], "locality": []}
    rows = np.arange(len(E))
    if len(rows) > cfg.max_rows:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(rows, cfg.max_rows, replace=False))
    X = torch.as_tensor(np.asarray(E[rows]), dtype=KL_DTYPE)
    T = torch.as_tensor(np.asarray(text), dtype=KL_DTYPE)
    succ = torch.as_tensor(in_success[rows])
    with torch.no_grad():
        target = scoring.logits_of(torch.as_tensor(_teacher_rows(E, teacher, in_success, rows), dtype=KL_DTYPE), T)
    del E, teacher                       # the KL steps need only their rows (X, target): memory at 1000 classes
    B = torch.nn.Parameter(torch.as_tensor(B0, dtype=KL_DTYPE).clone())
    opt = torch.optim.Adam([B], lr=cfg.lr)
    n = len(rows)
    n_s = int(succ.sum())
    w = n_s / n
    zero = torch.zeros((), dtype=KL_DTYPE)
    for step in range(cfg.steps):
        if cancel():
            raise Cancelled(f"RefineCLIP-fit: cancelled after {step} of {cfg.steps} steps.")
        opt.zero_grad()
        # loss = w · mean_Ŵ KL + (1 − w) · mean_rest KL, KL(p_teacher ‖ p_student) per row (Scoring.divergence);
        # a block of rows at a time, gradients accumulated (each mean a sum over blocks / its count)
        parts = {"total": 0.0, "success": 0.0, "locality": 0.0}
        for lo in range(0, n, FIT_BLOCK):
            b = slice(lo, lo + FIT_BLOCK)
            kl = scoring.divergence(target[b], scoring.logits_of(X[b] @ B, T))
            l_s = kl[succ[b]].sum() / n_s if n_s else zero
            l_l = kl[~succ[b]].sum() / (n - n_s) if n > n_s else zero
            loss = w * l_s + (1.0 - w) * l_l
            loss.backward()
            for k, v in (("total", loss), ("success", l_s), ("locality", l_l)):
                parts[k] += float(v.detach())
        opt.step()
        for k, v in parts.items():
            history[k].append(v)
        if step % 10 == 0 or step == cfg.steps - 1:
            progress("RefineCLIP-fit: distilling the ablated model", step + 1, cfg.steps, {k: v[-1] for k, v in history.items()})
    if history["total"] and not np.all(np.isfinite(history["total"])):
        raise RefineClipError("Fitting the edit diverged (loss became NaN/inf); lower the learning rate.")
    M = B.detach().double().numpy().T.copy()            # f(E) = E·B = (Bᵀ E)ᵀ: RefinedMap's matrix is Bᵀ
    return RefinementResult(RefinedMap("fit", matrix=M), history, cfg)
