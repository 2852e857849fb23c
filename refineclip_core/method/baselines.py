"""Baselines fitted on the labelled samples: a Tip-Adapter-style training-free cache (the paper's Tables 1-2)
and CoOp prompt learning. LTC and our head search with a typed-cue projection are in :mod:`.ltc`; the
registry of every compared row (what each needs, how it is fitted, when it is left out) is
:mod:`refineclip_core.edit.methods`.

Tip-Adapter (Zhang et al., 2021) adds to CLIP's zero-shot logits a key-value cache built
from the few labelled samples: keys are their normalised image features ``F`` (n×d), values
their one-hot labels ``L`` (n×C), and

    logits(x) = s · f·Tᵀ + a · exp(−b · (1 − f·Fᵀ)) · L

with ``f`` the normalised feature of ``x``, ``a`` the residual ratio (:attr:`TipAdapter.residual_ratio`: how
much the cache adds to the zero-shot logits) and ``b`` the sharpness (:attr:`TipAdapter.sharpness`: how fast a
key's weight falls with its distance); the Tip-Adapter paper calls them α and β, defaults 1 and 5.5. They are
not this project's loss weights (``PaperConfig.success_weight``/``locality_weight``) nor the guard's
significance level. :class:`CoOp` learns the prompts' context
words on the same labelled samples (prompt learning, text side). The standard fine-tuning baseline lives in
:func:`refineclip_core.edit.paper.standard_finetune`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import Cancelled, RefineClipError
from ..features.zeroshot import normalize
from ..progress import CancelFn, never
from .evaluation import block_argmax


@dataclass
class TipAdapter:
    """Tip-Adapter's training-free cache (module docstring's formula)."""

    keys: np.ndarray        # (n, d) normalised
    values: np.ndarray      # (n, C) one-hot
    text: np.ndarray        # (C, d)
    logit_scale: float
    residual_ratio: float = 1.0     # a (the Tip-Adapter paper's α)
    sharpness: float = 5.5          # b (the Tip-Adapter paper's β)

    @classmethod
    def build(cls, embeddings: np.ndarray, labels: np.ndarray, text: np.ndarray, logit_scale: float,
              residual_ratio: float = 1.0, sharpness: float = 5.5) -> "TipAdapter":
        keys = normalize(np.asarray(embeddings, dtype=np.float64))
        values = np.eye(text.shape[0])[np.asarray(labels)]
        return cls(keys, values, np.asarray(text, dtype=np.float64), logit_scale, residual_ratio, sharpness)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        f = normalize(np.asarray(embeddings, dtype=np.float64))
        affinity = f @ self.keys.T
        cache = np.exp(-self.sharpness * (1 - affinity)) @ self.values
        return self.logit_scale * f @ self.text.T + self.residual_ratio * cache

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The predicted classes, a block of images at a time (no whole ``(N, C)`` logit matrix)."""
        return block_argmax(self.logits, embeddings)


def _text_tower(model: Any) -> Any:
    """``model`` when it is an open_clip CLIP whose text tower CoOp can feed token embeddings to."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(model, a) for a in needed) or getattr(model, "text_pool_type", "argmax") != "argmax":
        raise RefineClipError("The CoOp baseline needs an open_clip CLIP text tower (token embeddings, argmax "
                              "pooling); this model has none, so the row is left out.")
    return model


def supports_coop(model: Any) -> bool:
    """Whether :class:`CoOp` can learn prompts for ``model``."""
    try:
        _text_tower(model)
        return True
    except RefineClipError:
        return False


def encode_from_token_embeddings(model: Any, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` from the token embeddings ``x`` ``(n, L, width)`` instead of the
    tokens (which still say where the end-of-text token is pooled); unnormalised ``(n, d)``. With a causal
    mask the padding after the longest prompt is cut off (exact: no position attends to a later one)."""
    m = _text_tower(model)
    cast = m.transformer.get_cast_dtype()
    mask = m.attn_mask
    if mask is not None:        # causal: positions after the last end-of-text token change nothing before it
        n = int(tokens.argmax(dim=-1).max()) + 1
        x, tokens, mask = x[:, :n], tokens[:, :n], mask[:n, :n]
    x = x.to(cast) + m.positional_embedding[: x.shape[1]].to(cast)
    x = m.transformer(x, attn_mask=mask)
    x = m.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if isinstance(m.text_projection, torch.nn.Linear):
        return m.text_projection(x)
    return x @ m.text_projection


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp's settings: Adam on the context vectors, cross-entropy on the labelled samples (deterministic:
    the context starts from the templates' own words and every step sees every sample)."""

    steps: int = 100
    lr: float = 2e-3
    #: Largest estimated cost (floating-point operations, :func:`coop_cost`) CoOp may take; beyond it the row is
    #: left out with the reason. CoOp runs the text tower over every class prompt at every step: at 1000 classes
    #: with a ViT-B/16 text tower that is about 2e14 operations (tens of minutes on a CPU, hours with templates).
    max_flops: float = 2e13

    def to_dict(self) -> dict:
        return asdict(self)


def coop_cost(loaded: Any, classes: Sequence[str], templates: Sequence[str], cfg: CoOpConfig = CoOpConfig()) -> float:
    """Estimated floating-point operations of :meth:`CoOp.fit`: ``steps`` forward and backward passes (about
    3 forward passes, 2 operations per parameter and token each) of the text transformer over every class
    prompt of every template, cut to its longest prompt as :func:`encode_from_token_embeddings` does."""
    from ..features.zeroshot import fill_template, validate_templates

    model = _text_tower(loaded.model)
    params = sum(p.numel() for p in model.transformer.parameters())
    tokens = sum(len(classes) * int(loaded.tokenizer([fill_template(t, str(c)) for c in classes]).argmax(-1).max() + 1)
                 for t in validate_templates(templates))
    return float(cfg.steps) * 6.0 * params * tokens


@dataclass
class CoOp:
    """CoOp-style prompt learning (Zhou et al., 2022, "Learning to Prompt for Vision-Language Models"),
    the prompt-learning baseline the paper's reviewers asked for, on the same labelled samples.

    Every prompt template's words before the class name ("a photo of a") become learned context
    vectors, initialised from their own token embeddings (CoOp's "a photo of a" initialisation, one
    context per template, shared by every class); the class texts are the templates' mean, renormalised,
    exactly as zero-shot builds them, so before any step CoOp *is* zero-shot. The context is trained with
    cross-entropy of ``logit_scale · normalise(E) · Tᵀ`` on the labelled samples' cached embeddings; the
    text tower runs for every step (frozen, only the context moves). Nothing on the image side changes:
    the edit is a new set of class texts, not a checkpoint of the image encoder."""

    text: np.ndarray                  # (C, d) learned class texts, normalised
    history: list[float]
    config: CoOpConfig

    @classmethod
    def fit(cls, loaded: Any, classes: Sequence[str], templates: Sequence[str], embeddings: np.ndarray,
            labels: np.ndarray, logit_scale: float, cfg: CoOpConfig = CoOpConfig(),
            cancel: CancelFn | None = None) -> "CoOp":
        from ..features.zeroshot import fill_template, validate_templates

        cancel = cancel or never
        model = _text_tower(loaded.model)
        templates = validate_templates(templates)
        if len(embeddings) == 0:
            raise RefineClipError("CoOp needs labelled samples; there are none.")
        device = loaded.device
        frozen = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            tokens, base, ctx, spans = [], [], [], []
            for t in templates:
                prefix = t.split("{}", 1)[0].strip()
                n_ctx = int((loaded.tokenizer([prefix])[0] != 0).sum()) - 2 if prefix else 0   # minus start/end tokens
                tok = loaded.tokenizer([fill_template(t, str(c)) for c in classes]).to(device)
                with torch.no_grad():
                    emb = model.token_embedding(tok).detach()
                tokens.append(tok)
                base.append(emb)
                ctx.append(torch.nn.Parameter(emb[0, 1:1 + n_ctx].clone()))   # the template's words, shared by classes
                spans.append(n_ctx)
            params = [c for c in ctx if c.numel()]
            X = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32,
                                                              device=device), dim=-1)
            y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)

            def class_texts() -> torch.Tensor:
                per = []
                for tok, emb, c, n in zip(tokens, base, ctx, spans):
                    x = torch.cat([emb[:, :1], c.unsqueeze(0).expand(len(emb), -1, -1), emb[:, 1 + n:]], dim=1) if n \
                        else emb
                    per.append(torch.nn.functional.normalize(encode_from_token_embeddings(model, x, tok).float(), dim=-1))
                return torch.nn.functional.normalize(torch.stack(per).mean(0), dim=-1)

            history: list[float] = []
            if params and cfg.steps > 0:
                opt = torch.optim.Adam(params, lr=cfg.lr)
                for step in range(cfg.steps):
                    if cancel():
                        raise Cancelled(f"CoOp: cancelled after {step} of {cfg.steps} steps.")
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(logit_scale * X @ class_texts().T, y)
                    loss.backward()
                    opt.step()
                    history.append(float(loss.detach()))
                if not np.all(np.isfinite(history)):
                    raise RefineClipError("CoOp diverged (loss became NaN/inf); lower its learning rate.")
            with torch.no_grad():
                text = class_texts().cpu().double().numpy()
        finally:
            for p, f in zip(model.parameters(), frozen):
                p.requires_grad_(f)
        return cls(text, history, cfg)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The predicted classes under the learned class texts (a block of images at a time)."""
        return block_argmax(lambda x: normalize(np.asarray(x, dtype=np.float64)) @ self.text.T, embeddings)
