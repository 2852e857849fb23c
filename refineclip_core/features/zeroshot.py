"""Zero-shot classification: class names and prompt templates to text embeddings.

``E_text(y)`` (paper §2.1) is the L2-normalised mean of the normalised embeddings of the
class name put into each template. Templates and class names are data, never format strings:
:func:`fill_template` puts the name in place of the template's one ``{}``, literally, and
keeps every other brace as written. Predictions are the argmax of cosine similarity for every
model; confidences use the model's own scoring (:class:`~refineclip_core.features.scoring.Scoring`:
CLIP's softmax of ``logit_scale.exp() · cos``, SigLIP's per-class sigmoid with its logit bias).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import RefineClipError
from ..loading.data import check_class_name_lengths
from ..loading.models import LoadedModel
from .scoring import Scoring

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
)


def read_templates(path: str | Path) -> list[str]:
    """One template per line; blank lines and ``#`` comments ignored; each needs ``{}``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RefineClipError(f"Cannot read templates file '{path}' ({exc}).") from exc
    return validate_templates([l.strip() for l in lines if l.strip() and not l.strip().startswith("#")])


#: Longest prompt template accepted (characters); see :data:`~refineclip_core.loading.data.MAX_CLASS_NAME_CHARS`.
MAX_TEMPLATE_CHARS = 300


def validate_templates(templates: Sequence[str]) -> list[str]:
    """The non-blank templates, each with exactly one ``{}`` (other braces are kept as written)."""
    if isinstance(templates, str) or any(not isinstance(t, str) for t in templates):
        raise RefineClipError("Give the prompt templates as a list of strings, e.g. ['a photo of a {}.'].")
    templates = [t for t in templates if t.strip()]
    if not templates:
        raise RefineClipError("Give at least one prompt template, e.g. 'a photo of a {}.'.")
    long = [t for t in templates if len(t) > MAX_TEMPLATE_CHARS]
    if long:
        raise RefineClipError(f"The template '{long[0][:40]}...' is {len(long[0]):,} characters long; templates are "
                              f"limited to {MAX_TEMPLATE_CHARS} characters (CLIP reads at most 77 tokens).")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        shown = bad[0] if len(bad[0]) <= 80 else bad[0][:60] + "..."
        raise RefineClipError(f"Each template needs exactly one '{{}}' for the class name; check {shown!r}.")
    return list(templates)


def fill_template(template: str, name: str) -> str:
    """The prompt for class ``name``: ``template`` with its first ``{}`` replaced by ``name``
    literally (no ``str.format``: ``'a {} {0}'`` gives ``'a cat {0}'``, a name ``'{}'`` stays ``'{}'``)."""
    head, found, tail = template.partition("{}")
    if not found:
        raise RefineClipError(f"The template {template[:80]!r} has no '{{}}' for the class name.")
    return head + name + tail


@torch.inference_mode()
def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings ``(len(texts), d)`` in float32 on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(list(texts[start:start + batch_size])).to(loaded.device)
        emb = loaded.model.encode_text(tokens).float()
        out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def class_text_embeddings(loaded: LoadedModel, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``E_text(y)`` for every class: mean over templates, renormalised. ``(C, d)`` float32."""
    templates = validate_templates(templates)
    if not classes:
        raise RefineClipError("No class names to build a zero-shot classifier from.")
    check_class_name_lengths(classes)  # every path to the tokenizer: a huge name costs it quadratic time
    prompts = [fill_template(t, str(c)) for c in classes for t in templates]
    emb = encode_texts(loaded, prompts).view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float32).tiny)


def cosine_logits(embeddings: np.ndarray, text: np.ndarray) -> np.ndarray:
    """``sim(E, t_y)`` for all images and classes: ``(N, C)``."""
    return normalize(np.asarray(embeddings, dtype=np.float64)) @ np.asarray(text, dtype=np.float64).T


def prediction_confidence(embeddings: np.ndarray, text: np.ndarray, scoring: Scoring | float, predictions: np.ndarray,
                          block: int = 4096) -> np.ndarray:
    """The model's confidence in the class it is shown to predict, per image: ``softmax(s · cos(E_i, t))``
    (CLIP) or ``σ(s · cos(E_i, t) + b)`` (SigLIP) read at ``predictions[i]`` (:class:`Scoring`; a bare
    float is CLIP's ``logit_scale``). Computed a block of rows at a time and only one number per image
    is kept (an ``(N, C)`` probability matrix is 2 GB at 50,000 images x 10,000 classes)."""
    scoring = Scoring.of(scoring)
    E = np.asarray(embeddings)
    out = np.empty(len(E), dtype=np.float32)
    for start in range(0, len(E), block):
        probs = scoring.probabilities(E[start:start + block], text)
        out[start:start + block] = probs[np.arange(len(probs)), predictions[start:start + block]]
    return out


def predict(embeddings: np.ndarray, text: np.ndarray, scoring: Scoring | float) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (argmax of ``cos``, every model) and class confidences (:meth:`Scoring.probabilities`)."""
    scoring, cos = Scoring.of(scoring), cosine_logits(embeddings, text)
    return cos.argmax(1), scoring.probabilities_of_logits(scoring.logits(cos))
