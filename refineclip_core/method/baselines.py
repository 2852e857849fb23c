"""Baselines: a Tip-Adapter-style training-free cache (the paper's Tables 1-2) and LTC, the
nearest published peer of identify-then-ablate (:class:`LocateThenCorrect`).

Tip-Adapter (Zhang et al., 2021) adds to CLIP's zero-shot logits a key-value cache built
from the few labelled samples: keys are their normalised image features ``F`` (n×d), values
their one-hot labels ``L`` (n×C), and

    logits(x) = s · f·Tᵀ + a · exp(−b · (1 − f·Fᵀ)) · L

with ``f`` the normalised feature of ``x`` (``a`` = residual ratio, ``b`` = sharpness; the
Tip-Adapter paper's defaults are a = 1, b = 5.5). The standard fine-tuning baseline lives in
:func:`refineclip_core.method.refinement.standard_finetune`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RefineClipError
from ..features.decomposition import HeadId
from ..features.zeroshot import normalize
from .ablation import AblationEngine
from .evaluation import block_argmax
from .selection import best_prefix


@dataclass
class TipAdapter:
    keys: np.ndarray        # (n, d) normalised
    values: np.ndarray      # (n, C) one-hot
    text: np.ndarray        # (C, d)
    logit_scale: float
    alpha: float = 1.0
    beta: float = 5.5

    @classmethod
    def build(cls, embeddings: np.ndarray, labels: np.ndarray, text: np.ndarray, logit_scale: float,
              alpha: float = 1.0, beta: float = 5.5) -> "TipAdapter":
        keys = normalize(np.asarray(embeddings, dtype=np.float64))
        values = np.eye(text.shape[0])[np.asarray(labels)]
        return cls(keys, values, np.asarray(text, dtype=np.float64), logit_scale, alpha, beta)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        f = normalize(np.asarray(embeddings, dtype=np.float64))
        affinity = f @ self.keys.T
        return self.logit_scale * f @ self.text.T + self.alpha * np.exp(-self.beta * (1 - affinity)) @ self.values

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The predicted classes, a block of images at a time (no whole ``(N, C)`` logit matrix)."""
        return block_argmax(self.logits, embeddings)


@dataclass
class LocateThenCorrect:
    """LTC (Yeo et al., 2025, "Debiasing CLIP: Interpreting and Correcting Bias in Attention Heads",
    arXiv 2505.17425), implemented here from the paper's description; the nearest published peer of
    RefineCLIP's identify-then-ablate, and like TextSpan it needs the spurious attribute named.

    *Locate.* Each labelled sample ``x`` of class ``y`` (an error pair's class, ``y'`` the pair's
    other class) gives every head a direct effect on the logit gap, ``v_h(x) = c_h(x)·(t_y − t_y')``,
    normalised to unit mass over the heads (``Σ_h |v_h(x)| = 1``). Contrasting correctly and
    wrongly classified samples of the same class, a head is *spurious* by how much more it pushes
    toward the wrong class on the errors, ``s_h = mean_C v_h − mean_W v_h``, and *salient* by how
    consistently it pushes toward the right class, ``mean_{C∪W} v_h``.
    *Correct.* The spurious heads (the best-utility prefix of the ``s_h`` ranking, Eq. 10, the size
    rule every head set here uses) are mean-ablated, then the embedding is projected away from the
    text-derived spurious direction ``u`` (e.g. "water background" − "land background"):
    ``E' = E_abl − (E_abl·u) u``. The paper's knowledge injection into the salient heads, which
    needs attribute texts from a language model, is not reproduced; the salient heads are reported.
    """

    spurious: list[HeadId]
    salient: list[HeadId]
    direction: np.ndarray
    engine: AblationEngine
    spurious_scores: dict[str, float]

    @classmethod
    def fit(cls, engine: AblationEngine, pairs: list[tuple[int, int, np.ndarray, np.ndarray]], labels: np.ndarray,
            direction: np.ndarray, sample_rows: np.ndarray, top_t: int = 15, n_salient: int = 5
            ) -> "LocateThenCorrect":
        """``pairs``: ``(y, y', W, C)`` with W (class y predicted y') and C (class y predicted y) as cache rows;
        ``engine`` carries the mean-ablation features; ``sample_rows`` the labelled samples (utility)."""
        ids = engine.head_ids()
        wrong, right = [], []
        for y, other, W, C in pairs:
            for rows, out in ((np.asarray(W, dtype=np.int64), wrong), (np.asarray(C, dtype=np.int64), right)):
                if len(rows):
                    ct = engine.projections(rows)                                          # (n, K, C)
                    v = ct[:, :, y] - ct[:, :, other]
                    out.append(v / np.maximum(np.abs(v).sum(1, keepdims=True), 1e-30))
        if not wrong or not right:
            raise RefineClipError("LTC contrasts wrongly and correctly classified samples of the same class; "
                                  "the labelled samples have none of one kind.")
        W, C = np.concatenate(wrong), np.concatenate(right)
        spurious_score = C.mean(0) - W.mean(0)
        salient_score = np.concatenate([W, C]).mean(0)
        ranked = [ids[i] for i in np.argsort(-spurious_score, kind="stable") if spurious_score[i] > 0][:top_t]
        t, _, _, _ = best_prefix(engine, ranked, sample_rows, labels)
        spurious = ranked[:t]
        salient = [ids[i] for i in np.argsort(-salient_score, kind="stable") if ids[i] not in spurious][:n_salient]
        u = np.asarray(direction, dtype=np.float64)
        return cls(spurious, salient, u / np.linalg.norm(u), engine,
                   {str(ids[i]): float(spurious_score[i]) for i in range(len(ids))})

    def embeddings(self, rows: np.ndarray | None = None) -> np.ndarray:
        e = self.engine.embeddings(self.spurious, "mean", rows)
        return e - np.outer(e @ self.direction, self.direction)

    def predict(self, rows: np.ndarray | None = None) -> np.ndarray:
        return (self.embeddings(rows) @ self.engine.text.astype(np.float64).T).argmax(1)
