"""Baselines the paper compares against (Tables 1-2): a Tip-Adapter-style training-free cache.

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

from ..features.zeroshot import normalize


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
        return self.logits(embeddings).argmax(1)
