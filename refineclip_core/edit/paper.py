"""Phase 2: refine CLIP through representation adapting (paper §3.3, Eq. 11-13).

A map ``f`` of the image embedding is learned on cached embeddings only:

* ``diag`` (the paper's ``diag(θ)``, θ ∈ R^d initialised to ones),
* ``full`` (a d×d matrix initialised to the identity),
* ``lora`` (identity + B·A of rank r, B initialised to zero).

With ``g(v) = softmax(logit_scale · normalise(v) · Tᵀ)``:

    L_success  = mean_{x∈W}     KL( g(E_abl(x)) ‖ g(f(E(x))) )                    (Eq. 11)
    L_locality = mean_{x∈C∪A}   KL( g(E(x))     ‖ g(f(E(x))) )                    (Eq. 12)
    L_CE       = mean_{x∈W∪C∪A} CE( g(f(E(x))), y_x )
    θ* = argmin α·L_success + β·L_locality + L_CE                                  (Eq. 13)

For a SigLIP-family model ``g`` is the model's own per-class sigmoid ``σ(logit_scale · cos + logit_bias)``,
KL the sum over classes of the Bernoulli KLs and CE the sigmoid loss on the class prompts
(:class:`~refineclip_core.features.scoring.Scoring`, one place for both).

``standard_finetune`` is the paper's baseline: the same parameters and samples, CE only.

Merging (:func:`merge_into_projection`): ``f(E) = E ⊙ θ`` becomes ``P' = P·diag(θ)`` in
open_clip's ``visual.proj`` (width × embed_dim, columns scaled); a matrix ``M`` becomes
``P' = P·Mᵀ``. :func:`export_checkpoint` writes a checkpoint that plain
``open_clip.create_model(name, pretrained=FILE)`` loads and that reproduces ``f(E)`` — or, for a
model read from a Hugging Face ``transformers`` folder (or on request), a folder that
``CLIPModel.from_pretrained`` loads, with ``visual_projection.weight = P'ᵀ``.

"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import Cancelled, RefineClipError
from ..features.scoring import Scoring
from ..progress import CancelFn, Progress, never, silent
from .config import FitConfig, PaperConfig, Strategy


@dataclass
class RefinedMap:
    """The learned map of the image embedding: ``theta`` (diag) or ``matrix`` (full/LoRA)."""

    strategy: str
    theta: np.ndarray | None = None
    matrix: np.ndarray | None = None

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """``f(E)`` for rows of ``embeddings``."""
        E = np.asarray(embeddings, dtype=np.float64)
        if self.theta is not None:
            return E * self.theta[None, :].astype(np.float64)
        return E @ self.matrix.astype(np.float64).T


@dataclass
class RefinementResult:
    refined: RefinedMap
    history: dict[str, list[float]] = field(default_factory=dict)   # total, success, locality, ce
    config: "PaperConfig | FitConfig" = PaperConfig()   # FitConfig for RefineCLIP-fit (edit.fit)


class _Map(torch.nn.Module):
    def __init__(self, d: int, strategy: Strategy, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.strategy = strategy
        if strategy == "diag":
            self.theta = torch.nn.Parameter(torch.ones(d, dtype=torch.float64))
        elif strategy == "full":
            self.M = torch.nn.Parameter(torch.eye(d, dtype=torch.float64))
        elif strategy == "lora":
            self.A = torch.nn.Parameter(torch.randn(rank, d, generator=generator, dtype=torch.float64) / np.sqrt(d))
            self.B = torch.nn.Parameter(torch.zeros(d, rank, dtype=torch.float64))
        else:
            raise RefineClipError(f"Unknown strategy '{strategy}'; use diag, full or lora.")

    def matrix(self) -> torch.Tensor:
        if self.strategy == "full":
            return self.M
        return torch.eye(self.A.shape[1], dtype=torch.float64) + self.B @ self.A

    def forward(self, E: torch.Tensor) -> torch.Tensor:
        if self.strategy == "diag":
            return E * self.theta
        return E @ self.matrix().T

    def export(self) -> RefinedMap:
        with torch.no_grad():
            if self.strategy == "diag":
                return RefinedMap("diag", theta=self.theta.detach().numpy().copy())
            return RefinedMap(self.strategy, matrix=self.matrix().detach().numpy().copy())


def paper_phase2(
    embeddings: np.ndarray,
    labels: np.ndarray,
    text: np.ndarray,
    scoring: Scoring | float,
    W: np.ndarray,
    locality_rows: np.ndarray,
    ablated_W: np.ndarray,
    cfg: PaperConfig = PaperConfig(),
    train_rows: np.ndarray | None = None,
    progress: Progress | None = None,
    cancel: CancelFn | None = None,
    stage: str | None = None,
) -> RefinementResult:
    """The paper's phase 2: learn ``f`` by minimising Eq. (13) with Adam (RefineCLIP-fit, the project's
    default edit, is :mod:`~refineclip_core.edit.fit`).

    Args:
        embeddings: ``(N, d)`` E; labels ``(N,)``; text ``(C, d)`` normalised; ``scoring``: the model's
            :class:`~refineclip_core.features.scoring.Scoring` (a float: CLIP's softmax at that
            ``logit_scale.exp()``), which gives ``g``, the KLs and the cross-entropy.
        W: rows of the misclassified samples; ``ablated_W``: their ``E_abl`` (teacher of Eq. 11).
        locality_rows: rows of C ∪ A (teacher: the original model, Eq. 12).
        train_rows: rows for L_CE (default W ∪ C ∪ A).
        progress, cancel: :mod:`refineclip_core.progress`; ``progress(stage, step, steps, losses)``
            every 10 steps (``stage`` defaults to "RefineCLIP (<strategy>)"), ``cancel`` polled every
            step (:class:`~refineclip_core.errors.Cancelled`; nothing is returned).
    """
    progress, cancel = progress or silent, cancel or never
    scoring = Scoring.of(scoring)
    stage = stage or f"RefineCLIP ({cfg.strategy})"
    W = np.asarray(W, dtype=np.int64)
    locality_rows = np.asarray(locality_rows, dtype=np.int64)
    if train_rows is None:
        train_rows = np.unique(np.concatenate([W, locality_rows]))
    if len(train_rows) == 0:
        raise RefineClipError("No training samples: the error pair has no images in W, C or A.")
    gen = torch.Generator().manual_seed(cfg.seed)  # the only randomness (LoRA's A); torch's global RNG is left alone
    # W and C ∪ A are rows of the cache; find them inside the training batch (E_tr = E[train_rows])
    pos = {int(r): i for i, r in enumerate(train_rows)}
    extra = [int(r) for r in np.concatenate([W, locality_rows]) if int(r) not in pos]
    if extra:
        raise RefineClipError("W and C ∪ A must be among the training rows.")
    idx_W = torch.as_tensor([pos[int(r)] for r in W], dtype=torch.long)
    idx_L = torch.as_tensor([pos[int(r)] for r in locality_rows], dtype=torch.long)
    tr = np.asarray(train_rows, dtype=np.int64)
    E_tr = torch.as_tensor(np.asarray(np.asarray(embeddings)[tr], dtype=np.float64))   # only the rows trained on
    y_tr = torch.as_tensor(np.asarray(labels, dtype=np.int64)[tr])
    T = torch.as_tensor(np.asarray(text, dtype=np.float64))
    fmap = _Map(E_tr.shape[1], cfg.strategy, cfg.rank, gen)
    opt = torch.optim.Adam(fmap.parameters(), lr=cfg.lr)
    with torch.no_grad():
        teacher_success = scoring.logits_of(torch.as_tensor(np.asarray(ablated_W, dtype=np.float64)), T)
        teacher_local = scoring.logits_of(E_tr[idx_L], T)
    history: dict[str, list[float]] = {"total": [], "success": [], "locality": [], "ce": []}
    for step in range(cfg.steps):
        if cancel():
            raise Cancelled(f"{stage}: cancelled after {step} of {cfg.steps} steps.")
        opt.zero_grad()
        z = scoring.logits_of(fmap(E_tr), T)
        l_s = scoring.mean_divergence(teacher_success, z[idx_W])
        l_l = scoring.mean_divergence(teacher_local, z[idx_L])
        l_ce = scoring.cross_entropy(z, y_tr)
        loss = cfg.success_weight * l_s + cfg.locality_weight * l_l + cfg.weight_ce * l_ce
        loss.backward()
        opt.step()
        for k, v in (("total", loss), ("success", l_s), ("locality", l_l), ("ce", l_ce)):
            history[k].append(float(v.detach()))
        if step % 10 == 0 or step == cfg.steps - 1:
            progress(stage, step + 1, cfg.steps, {k: v[-1] for k, v in history.items()})
    if not all(np.isfinite(history["total"])):
        raise RefineClipError("Refinement diverged (loss became NaN/inf); lower the learning rate or the loss weights.")
    return RefinementResult(fmap.export(), history, cfg)


def standard_finetune(embeddings, labels, text, scoring: Scoring | float, train_rows, cfg: PaperConfig = PaperConfig(),
                      progress: Progress | None = None, cancel: CancelFn | None = None) -> RefinementResult:
    """The paper's baseline: the same parameters and samples, cross-entropy only."""
    ce_only = replace(cfg, success_weight=0.0, locality_weight=0.0)
    empty = np.zeros(0, dtype=np.int64)
    d = np.asarray(embeddings).shape[1]
    return paper_phase2(embeddings, labels, text, scoring, empty, empty, np.zeros((0, d)), ce_only,
                        train_rows=np.asarray(train_rows), progress=progress, cancel=cancel,
                        stage="Standard fine-tuning (baseline, L_CE only)")
