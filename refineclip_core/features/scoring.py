"""How a model turns cosine similarities into confidences: CLIP's softmax or SigLIP's sigmoid.

Zero-shot *predictions* are the argmax of ``cos(E, t_y)`` for every model (a positive scale and one
bias shared by all classes change no ranking). Confidences and the edit's KL terms use the scoring
the model was trained with:

* ``softmax`` (CLIP, contrastive loss): ``p(y | x) = softmax_y(s · cos(E, t_y))``, ``s`` the model's
  ``logit_scale.exp()`` — the paper's ``g`` (§3.3, Eq. 11-13);
* ``sigmoid`` (SigLIP, SigLIP 2 and every open_clip model with a ``logit_bias``; Zhai et al., 2023,
  the sigmoid loss): each class is its own yes/no question, ``p_y(x) = σ(s · cos(E, t_y) + b)``; the scores of
  an image need not sum to one. The paper's KL between two softmax distributions becomes the KL
  between the two products of independent Bernoullis, ``Σ_y KL(Bern(p_y) ‖ Bern(q_y))``, and its
  cross-entropy the sigmoid loss on the class prompts, ``−Σ_y [y log p_y + (1 − y) log(1 − p_y)]``.

:class:`Scoring` is built once per model (:meth:`Scoring.of_model`) and recorded in a cache's
manifest (``logit_scale``, ``logit_bias``); every place that turns similarities into confidences,
divergences or a cross-entropy goes through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RefineClipError

ScoringKind = Literal["softmax", "sigmoid"]


def uses_sigmoid_loss(model: torch.nn.Module) -> bool:
    """Whether ``model`` is trained with the sigmoid loss: open_clip gives exactly those models a logit bias
    (and a Hugging Face ``SiglipModel`` converted by :mod:`~refineclip_core.loading.hf_clip.siglip` keeps it)."""
    return getattr(model, "logit_bias", None) is not None


@dataclass(frozen=True)
class Scoring:
    """``kind``: softmax (CLIP) or per-class sigmoid (SigLIP); ``scale``: ``logit_scale.exp()``;
    ``bias``: the sigmoid's ``logit_bias`` (0 for softmax)."""

    kind: ScoringKind
    scale: float
    bias: float = 0.0

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "Scoring":
        """The scoring ``model`` was trained with (sigmoid exactly when it has a ``logit_bias``)."""
        scale = float(model.logit_scale.detach().exp().reshape(-1)[0])   # as LoadedModel.logit_scale
        if uses_sigmoid_loss(model):
            return cls("sigmoid", scale, float(model.logit_bias.detach().float().reshape(-1)[0]))
        return cls("softmax", scale)

    @classmethod
    def of(cls, scoring: "Scoring | float") -> "Scoring":
        """``scoring`` itself, or CLIP's softmax at the temperature ``scoring`` (a bare logit scale)."""
        return scoring if isinstance(scoring, Scoring) else cls("softmax", float(scoring))

    @property
    def sigmoid(self) -> bool:
        return self.kind == "sigmoid"

    def describe(self) -> str:
        """One phrase for captions and reports."""
        if self.sigmoid:
            sign = "+" if self.bias >= 0 else "−"
            return f"per-class sigmoid σ({self.scale:.4g}·cos {sign} {abs(self.bias):.4g}) (SigLIP)"
        return f"softmax over classes of {self.scale:.4g}·cos (CLIP)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: Any, source: str = "The run report") -> "Scoring":
        """:meth:`to_dict`'s form read back (e.g. a run report's ``scoring``), checked: one sentence if it is not."""
        ok = (isinstance(d, Mapping) and d.get("kind") in get_args(ScoringKind)
              and all(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool) and math.isfinite(d[k])
                      for k in ("scale", "bias")))
        if not ok:
            raise RefineClipError(f"{source} has a 'scoring' that is not {{'kind': 'softmax' or 'sigmoid', "
                                  f"'scale': a number, 'bias': a number}}.")
        return cls(d["kind"], float(d["scale"]), float(d["bias"]))

    # --- the model's logits ---------------------------------------------------------------------------
    def logits(self, cos):
        """``s · cos`` (softmax) or ``s · cos + b`` (sigmoid), for numpy arrays or tensors alike."""
        return self.scale * cos + self.bias if self.sigmoid else self.scale * cos

    def logits_of(self, v: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The logits of (unnormalised) embeddings ``v`` ``(n, d)`` against normalised ``text`` ``(C, d)``."""
        return self.logits(F.normalize(v, dim=-1) @ text.T)

    # --- confidences ----------------------------------------------------------------------------------
    def probabilities(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """``(N, C)`` confidences: ``softmax_y(s·cos)`` or ``σ(s·cos + b)`` per class, float64."""
        from .zeroshot import cosine_logits
        return self.probabilities_of_logits(self.logits(cosine_logits(image_emb, text_emb)))

    def probabilities_of_logits(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if self.sigmoid:   # σ(z) without overflow: exp of a non-positive number only
            e = np.exp(-np.abs(z))
            return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    # --- the edit's losses (torch, differentiable) ----------------------------------------------------
    def divergence(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Per row ``(n,)``: ``KL(p_teacher ‖ p_student)`` from the two logit matrices ``(n, C)``.

        softmax: ``Σ_y p_y (log p_y − log q_y)`` (the paper's KL of Eq. 11-12); sigmoid:
        ``Σ_y [p_y (log p_y − log q_y) + (1 − p_y)(log(1 − p_y) − log(1 − q_y))]``, the KL of the
        per-class Bernoullis the sigmoid model scores with (``log σ`` computed stably, ``1 − σ(z) = σ(−z)``).
        """
        if self.sigmoid:
            lp, lq = F.logsigmoid(teacher), F.logsigmoid(student)
            ln, lm = F.logsigmoid(-teacher), F.logsigmoid(-student)
            return (lp.exp() * (lp - lq) + ln.exp() * (ln - lm)).sum(-1)
        lp, lq = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
        return (lp.exp() * (lp - lq)).sum(-1)

    def mean_divergence(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Mean over rows of :meth:`divergence` (0 for no rows)."""
        if teacher.shape[0] == 0:
            return teacher.new_zeros(())
        return self.divergence(teacher, student).mean()

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over rows of the model's own loss on the class prompts: softmax cross-entropy, or the
        sigmoid loss with the true class the one positive, ``−Σ_y [1_y log σ(z_y) + (1 − 1_y) log σ(−z_y)]``."""
        if self.sigmoid:
            target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / max(len(labels), 1)
        return F.cross_entropy(logits, labels)
