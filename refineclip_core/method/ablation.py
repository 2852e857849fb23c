"""Head ablation on cached features (paper Eq. 5), fast enough for live toggles.

Zero ablation removes a head set ``S``: ``E_abl = E − Σ_{h∈S} c_h``; mean ablation replaces
each head by its mean ``m_h``: ``E_abl = E − Σ_{h∈S} (c_h − m_h)``. No forward pass is
needed. :class:`AblationEngine` precomputes every head's projection on the class texts, so
predictions for any set cost ``O(N·|S|·C)``; cosine similarities (for the utility, Eq. 10)
additionally use the per-image Gram matrix of the head parts.

:func:`verify_ablation` checks the cached arithmetic against the real model, which runs with
the heads' output columns zeroed and the direct path isolated
(:func:`~refineclip_core.features.decomposition.direct_ablation_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Sequence

import numpy as np
import torch

from ..features.decomposition import HeadId, direct_ablation_forward
from ..features.extraction import load_batch
from ..loading.data import ImageRecord
from .evaluation import AccuracyReport, accuracy_report, rows_mask

Mode = Literal["zero", "mean"]


@dataclass
class AblationResult:
    """Predictions after removing ``heads``, and what changed."""

    heads: list[HeadId]
    mode: str
    predictions: np.ndarray
    report: AccuracyReport
    flipped: np.ndarray            # rows whose prediction changed
    fixed: np.ndarray              # rows that became correct
    broken: np.ndarray             # rows that became wrong


class AblationEngine:
    """Ablation arithmetic over a cache's ``E`` ``(N, d)``, ``c`` ``(N, L_s, H, d)`` and texts."""

    def __init__(self, embeddings: np.ndarray, heads: np.ndarray, text: np.ndarray, layers: Sequence[int],
                 mean_rows: np.ndarray | None = None, mean: np.ndarray | None = None) -> None:
        N, Ls, H, d = heads.shape
        self.layers = tuple(layers)
        self.n_heads = H
        self.E = np.asarray(embeddings, dtype=np.float32)
        self.c = np.asarray(heads, dtype=np.float32).reshape(N, Ls * H, d)
        self.text = np.asarray(text, dtype=np.float32)
        self.Et = self.E @ self.text.T                                   # (N, C)
        self.ct = np.einsum("nkd,cd->nkc", self.c, self.text)            # (N, K, C)
        if mean is None:
            rows = np.arange(N) if mean_rows is None else np.asarray(mean_rows)
            mean = self.c[rows].mean(0) if len(rows) else np.zeros_like(self.c[0])
        self.m = np.asarray(mean, dtype=np.float32).reshape(Ls * H, d)   # (K, d) mean-ablation feature
        self.mt = self.m @ self.text.T                                   # (K, C)
        self.base_predictions = self.Et.argmax(1)

    def with_mean_rows(self, rows: np.ndarray) -> "AblationEngine":
        """The same engine (arrays shared, nothing recomputed but the means) whose mean-ablation
        features ``m_h`` are the means over ``rows`` (e.g. the protocol's adaptation images)."""
        other = object.__new__(AblationEngine)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_gram"})
        rows = np.asarray(rows, dtype=np.int64)
        other.m = self.c[rows].mean(0) if len(rows) else np.zeros_like(self.c[0])
        other.mt = other.m @ self.text.T
        return other

    def subset(self, rows: np.ndarray) -> "AblationEngine":
        """An engine over ``rows`` only, with the same mean-ablation features."""
        Ls = len(self.layers)
        heads = self.c[rows].reshape(len(rows), Ls, self.n_heads, -1)
        return AblationEngine(self.E[rows], heads, self.text, self.layers, mean=self.m)

    # -- indexing ------------------------------------------------------------------------
    def flat_index(self, heads: Sequence[HeadId]) -> np.ndarray:
        return np.array([self.layers.index(h.layer) * self.n_heads + h.head for h in heads], dtype=np.int64)

    def head_ids(self) -> list[HeadId]:
        return [HeadId(l, h) for l in self.layers for h in range(self.n_heads)]

    # -- dot products and norms ------------------------------------------------------------
    def dots(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``E_abl · t_y`` for every row and class ``(n, C)``."""
        idx = self.flat_index(heads)
        r = slice(None) if rows is None else rows
        out = self.Et[r].astype(np.float64)
        if len(idx):
            out = out - self.ct[r][:, idx].sum(1)
            if mode == "mean":
                out = out + self.mt[idx].sum(0)[None]
        return out

    @cached_property
    def _gram(self) -> dict[str, np.ndarray]:
        """Per-image inner products among E, c_h and m_h (for norms of ablated embeddings)."""
        return {
            "EE": np.einsum("nd,nd->n", self.E, self.E).astype(np.float64),
            "Ec": np.einsum("nd,nkd->nk", self.E, self.c).astype(np.float64),
            "cc": np.einsum("nkd,njd->nkj", self.c, self.c).astype(np.float64),
            "Em": (self.E @ self.m.T).astype(np.float64),
            "cm": np.einsum("nkd,jd->nkj", self.c, self.m).astype(np.float64),
            "mm": (self.m @ self.m.T).astype(np.float64),
        }

    def norms(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``||E_abl||`` per row ``(n,)``."""
        g = self._gram
        idx = self.flat_index(heads)
        r = slice(None) if rows is None else rows
        n2 = g["EE"][r].copy()
        if len(idx):
            n2 += -2 * g["Ec"][r][:, idx].sum(1) + g["cc"][r][:, idx][:, :, idx].sum((1, 2))
            if mode == "mean":
                n2 += (2 * g["Em"][r][:, idx].sum(1) - 2 * g["cm"][r][:, idx][:, :, idx].sum((1, 2))
                       + g["mm"][np.ix_(idx, idx)].sum())
        return np.sqrt(np.maximum(n2, 0.0))

    def cosines(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``sim(E_abl, t_y)`` ``(n, C)``."""
        norms = self.norms(heads, mode, rows)
        return self.dots(heads, mode, rows) / np.maximum(norms, 1e-30)[:, None]

    def embeddings(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """The ablated embeddings themselves ``(n, d)`` (Eq. 5)."""
        idx = self.flat_index(heads)
        r = slice(None) if rows is None else rows
        out = self.E[r].astype(np.float64)
        if len(idx):
            out = out - self.c[r][:, idx].sum(1)
            if mode == "mean":
                out = out + self.m[idx].sum(0)
        return out

    def predict(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """Predicted classes after ablation (the norm does not change the argmax)."""
        return self.dots(heads, mode, rows).argmax(1)

    def ablate(self, heads: Sequence[HeadId], labels: np.ndarray, classes: Sequence[str],
               groups: np.ndarray | None = None, group_names: Sequence[str] = (),
               mode: Mode = "zero", mask: np.ndarray | None = None) -> AblationResult:
        """Predictions and accuracies for all cached images after removing ``heads``."""
        pred = self.predict(heads, mode)
        base = self.base_predictions
        sel = rows_mask(len(pred)) if mask is None else mask
        changed = (pred != base) & sel
        return AblationResult(
            heads=list(heads),
            mode=mode,
            predictions=pred,
            report=accuracy_report(pred, labels, classes, groups, group_names, mask),
            flipped=np.flatnonzero(changed),
            fixed=np.flatnonzero(changed & (pred == labels)),
            broken=np.flatnonzero(changed & (base == labels)),
        )


@dataclass
class VerificationResult:
    """Cached ablation vs the real model on the same images."""

    n_images: int
    max_rel_error: float
    predictions_agree: bool


def verify_ablation(loaded, images: torch.Tensor, engine: AblationEngine, rows: np.ndarray,
                    heads: Sequence[HeadId]) -> VerificationResult:
    """Run the real model with ``heads`` removed (direct path) on ``images`` (the cached rows
    ``rows``) and compare with :meth:`AblationEngine.embeddings` (zero ablation)."""
    real = direct_ablation_forward(loaded.visual, images, list(heads)).double().cpu().numpy()
    cached = engine.embeddings(heads, "zero", rows)
    rel = np.linalg.norm(real - cached, axis=1) / np.maximum(np.linalg.norm(real, axis=1), 1e-30)
    agree = bool(np.array_equal((real @ engine.text.T).argmax(1), engine.predict(heads, "zero", rows)))
    return VerificationResult(len(rows), float(rel.max()), agree)


def verify_on_images(loaded, records: Sequence[ImageRecord], engine: AblationEngine, rows: Sequence[int],
                     heads: Sequence[HeadId], max_images: int = 8,
                     roots: Sequence[str] | None = None) -> VerificationResult | None:
    """:func:`verify_ablation` on the first ``max_images`` of ``rows`` (cache rows; ``records``
    are the cache's), decoded again from disk (reads confined to ``roots``); None when none of
    them can be read any more."""
    rows = list(dict.fromkeys(int(r) for r in rows))[:max_images]
    batch, keep, _ = load_batch(loaded, [records[r] for r in rows], 0, roots)
    if batch is None:
        return None
    return verify_ablation(loaded, batch, engine, np.asarray([rows[k] for k in keep]), heads)
