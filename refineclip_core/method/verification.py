"""The cached ablation checked against the real model (paper Eq. 5 vs a forward pass).

The real model runs with the heads' output columns zeroed and the direct path isolated
(:func:`~refineclip_core.features.decomposition.direct_ablation_forward`); mean ablation adds each head's
mean contribution, as the Ablate page's ablation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..features.decomposition import HeadId, direct_ablation_forward
from ..features.extraction import load_batch
from ..loading.data import ImageRecord
from .ablation import AblationEngine, Mode


@dataclass
class VerificationResult:
    """Cached ablation vs the real model on the same images."""

    n_images: int
    max_rel_error: float
    predictions_agree: bool


def verify_ablation(loaded, images: torch.Tensor, engine: AblationEngine, rows: np.ndarray,
                    heads: Sequence[HeadId], mode: Mode = "zero") -> VerificationResult:
    """Run the real model with ``heads`` removed (direct path) on ``images`` (the cached rows
    ``rows``) and compare with :meth:`AblationEngine.embeddings` in ``mode``. Mean ablation is the
    real forward pass with the direct paths removed plus each head's mean contribution ``m_h`` (one
    vector per head, the same for every image): the model itself has no notion of a head's mean."""
    real = direct_ablation_forward(loaded.visual, images, list(heads)).double().cpu().numpy()
    idx = engine.flat_index(heads)
    if mode == "mean" and len(idx):
        real = real + engine.m[idx].sum(0)
    cached = engine.embeddings(heads, mode, rows)
    rel = np.linalg.norm(real - cached, axis=1) / np.maximum(np.linalg.norm(real, axis=1), 1e-30)
    agree = bool(np.array_equal((real @ engine.text.T).argmax(1), engine.predict(heads, mode, rows)))
    return VerificationResult(len(rows), float(rel.max()), agree)


def verify_on_images(loaded, records: Sequence[ImageRecord], engine: AblationEngine, rows: Sequence[int],
                     heads: Sequence[HeadId], max_images: int = 8, *, min_side: int | None = None,
                     mode: Mode = "zero") -> VerificationResult | None:
    """:func:`verify_ablation` on the first ``max_images`` of ``rows`` (cache rows; ``records``
    are the cache's), decoded again from disk as the cache decoded them (``min_side``: the cache's
    ``manifest.decode_min_side``; read under the confinement in force); None when none of them can be read
    any more."""
    rows = list(dict.fromkeys(int(r) for r in rows))[:max_images]
    batch, keep, _ = load_batch(loaded, [records[r] for r in rows], 0, min_side=min_side)
    if batch is None:
        return None
    return verify_ablation(loaded, batch, engine, np.asarray([rows[k] for k in keep]), heads, mode)
