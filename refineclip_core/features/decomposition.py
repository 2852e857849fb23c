"""Exact direct decomposition of an image embedding into per-head parts (paper Eq. 2-5).

The residual stream after the last block is the sum of the embedding input, every block's
attention output and every block's MLP output. Every LayerNorm after it is linear once its
per-image (per-token) standard deviation is fixed at its value from the real forward pass, a pool
that attends is linear once its attention weights are fixed, and projections are linear, so

    E = sum_terms Readout(term) + constants (+ the pool MLP's output, where there is one)   (Eq. 3)

Each attention output splits exactly into per-head parts; the output bias belongs to a per-layer
remainder. Hence (Eq. 4)

    E = sum_{l,h} c[l, h] + sum_r remainder[r]

with ``c[l, h] = P h^{l,h}`` in the paper's notation. :func:`decompose` returns all parts, and
:meth:`Decomposition.reconstruct` equals ``model.encode_image`` to float precision (relative error
<= 1e-5 in float32, <= 1e-10 in float64; ``tests/test_decomposition.py``, ``tests/test_backends.py``).

Which towers decompose, and how their readout is linearised (CLS row, average pooling, CoCa's
attentional pooler, SigLIP / PE-Core map pooling, EVA's inner LayerNorm, RoPE), is the business of
:mod:`refineclip_core.features.backends`, the one place that reads a tower's modules. When the
readout reads only the CLS row, the per-head computation never projects all tokens through
``W_K``/``W_V`` (``score_h[j] = (W_K,h^T q_h) . x_j + const``; ``A_h V_h = W_V,h (sum_j a_hj x_j) + b_V,h``).

Hooks follow TransformerLens' habit: named hook points (:data:`HOOK_POINTS`, resolved by
:func:`hook_modules`), registered in a context manager (:class:`HookSet`) and always removed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from ..errors import RefineClipError
from .backends import ArchitectureInfo, HookSet, backend_for
from .backends.base import HOOK_POINTS

__all__ = ["ArchitectureInfo", "Decomposition", "HOOK_POINTS", "HeadId", "HeadLike", "HookSet", "architecture_info",
           "decompose", "decompose_differentiable", "direct_ablation_forward", "heads_zeroed", "hook_modules",
           "parse_heads", "resolve_layers"]


#: What :meth:`HeadId.of` accepts: a head id, a ``(layer, head)`` pair, or text like ``L22.H0``.
HeadLike = Union["HeadId", Sequence[int], str]


@dataclass(frozen=True)
class HeadId:
    """A head named ``[layer, head]`` with 0-based absolute indices (paper: (L22,H0)).

    The one head-id type: pages, reports, the CLI and session state convert through
    :meth:`of` / :meth:`parse` and :meth:`as_list`, and :func:`parse_heads` reads a head set.
    """

    layer: int
    head: int

    def __str__(self) -> str:  # L22.H0
        return f"L{self.layer}.H{self.head}"

    def as_list(self) -> list[int]:
        return [self.layer, self.head]

    @classmethod
    def parse(cls, text: str) -> "HeadId":
        """``"L22.H0"``, ``"22.0"`` (any case, surrounding spaces ignored) into a head id."""
        cleaned = text.strip().upper().replace("L", "").replace("H", "")
        try:
            layer, head = (int(x) for x in cleaned.split("."))
        except ValueError as exc:
            raise RefineClipError(f"Head {text.strip()!r} is not LAYER.HEAD (e.g. 11.3 or L11.H3).") from exc
        return cls(layer, head)

    @classmethod
    def of(cls, value: HeadLike) -> "HeadId":
        """A head id from a :class:`HeadId`, a ``(layer, head)`` pair (a list from JSON, a
        point's ``customdata``) or text (:meth:`parse`)."""
        if isinstance(value, HeadId):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        layer, head = value
        return cls(int(layer), int(head))


def parse_heads(heads: str | Iterable[HeadLike], layers: Sequence[int] | None = None,
                n_heads: int | None = None) -> list[HeadId]:
    """A head set from ``"L.H,L.H"`` text (also ``L22.H0`` style) or any iterable of
    :data:`HeadLike`, duplicates dropped (first kept). With ``layers`` and ``n_heads``, every
    head must lie within that scope (the cache's), else :class:`RefineClipError`."""
    items = [t for t in heads.split(",") if t.strip()] if isinstance(heads, str) else list(heads)
    out = list(dict.fromkeys(HeadId.of(h) for h in items))
    if layers is not None and n_heads is not None:
        for h in out:
            if h.layer not in layers or not 0 <= h.head < n_heads:
                raise RefineClipError(f"Head {h} is outside the cached scope (layers {list(layers)}, {n_heads} heads).")
    return out


@dataclass
class Decomposition:
    """The parts of a batch of image embeddings (paper Eq. 4).

    Attributes:
        embedding: ``(B, d)`` the unnormalised ``encode_image`` output of the real forward pass.
        heads: ``(B, L_s, H, d)`` direct contribution ``c[l, h]`` of every head of the layers in
            ``layers`` (the paper's ``P h^{l,h}``).
        remainders: ``(B, R, d)`` everything else, named by ``remainder_names``: ``embed`` (or
            ``resid_pre.{l}``, the stream entering the first layer in scope, for readouts over every
            token), ``attn_bias.{l}`` (in-scope layers), ``attn.{l}`` (out-of-scope layers, whole),
            ``mlp.{l}``, then the readout's own terms (``ln_post_bias``, ``pool_bias``, ``pool_mlp``,
            ``head_bias``; see :mod:`.backends`).
        layers: absolute indices of the layers in ``heads``.
    """

    embedding: torch.Tensor
    heads: torch.Tensor
    remainders: torch.Tensor
    remainder_names: list[str]
    layers: tuple[int, ...]

    def reconstruct(self) -> torch.Tensor:
        """Sum of all parts; equals :attr:`embedding` up to float rounding."""
        return self.heads.sum(dim=(1, 2)) + self.remainders.sum(dim=1)


def architecture_info(visual: nn.Module) -> ArchitectureInfo:
    """The facts of ``visual`` if it decomposes exactly, else :class:`UnsupportedModelError`
    (one sentence saying why): see :func:`.backends.backend_for`."""
    return backend_for(visual).info


def resolve_layers(n_layers: int, layers: int | str | Sequence[int] | None = 4) -> tuple[int, ...]:
    """Layers in scope: the last ``k`` (paper default 4), ``"all"``, or explicit indices."""
    if layers is None or layers == "all":
        return tuple(range(n_layers))
    if isinstance(layers, str):
        layers = int(layers)
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers must be >= 1 or 'all', got {layers}")
        k = min(layers, n_layers)
        return tuple(range(n_layers - k, n_layers))
    out = tuple(sorted({int(l) for l in layers}))
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise ValueError(f"layer indices {list(layers)} out of range for a {n_layers}-layer ViT")
    return out


def hook_modules(visual: nn.Module, layer: int | None = None) -> dict[str, nn.Module]:
    """The module behind each named hook point of :data:`HOOK_POINTS` (``{l}`` filled with ``layer``)."""
    return backend_for(visual).hook_points(layer)


@torch.inference_mode()
def decompose(visual: nn.Module, images: torch.Tensor, layers: int | str | Sequence[int] | None = 4) -> Decomposition:
    """Run the image tower once on ``images`` and return the exact decomposition (Eq. 3-4)."""
    return decompose_differentiable(visual, images, layers)


def decompose_differentiable(visual: nn.Module, images: torch.Tensor,
                             layers: int | str | Sequence[int] | None = 4) -> Decomposition:
    """:func:`decompose` under the caller's autograd mode: the parts stay in the graph, so
    gradients flow from a head's contribution back to the images (Grad-CAM of a head set)."""
    backend = backend_for(visual)
    return backend.decompose(images, resolve_layers(backend.info.n_layers, layers))


@contextlib.contextmanager
def heads_zeroed(visual: nn.Module, heads: Sequence[HeadId]) -> Iterator[None]:
    """Temporarily zero the value path of ``heads`` in the real model (every token; the weights
    are restored on exit, also on error)."""
    with backend_for(visual).heads_zeroed(heads):
        yield


@torch.inference_mode()
def direct_ablation_forward(visual: nn.Module, images: torch.Tensor, heads: Sequence[HeadId]) -> torch.Tensor:
    """Paper Eq. (5) computed through the real model, independently of :func:`decompose`.

    Eq. (5) removes a head's *direct* path only. A clean forward pass records every block's
    sub-layer inputs and the readout's LayerNorm sigmas and pool attention; then the model runs
    with the heads' values zeroed, while later sub-layers read the clean inputs (path patching)
    and the readout runs frozen (:meth:`.backends.VisionBackend.direct_ablation`). The result is
    the model's own arithmetic with the heads' direct contribution removed, which must equal
    ``E - sum_{h in S} c[h]`` from the cached decomposition.
    """
    return backend_for(visual).direct_ablation(images, list(heads))
