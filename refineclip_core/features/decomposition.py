"""Exact direct decomposition of an open_clip ViT image embedding into per-head parts.

Paper Eq. (2)-(4): the class token after the last block is the sum of the embedding input,
every block's attention output and every block's MLP output. ``ln_post`` is linear once its
per-image mean and standard deviation are fixed (taken from the real forward pass), and the
projection ``P`` is linear, so

    E = sum_terms P . (gamma * (term - mean(term)) / sigma) + P . beta        (Eq. 3)

Each attention output splits exactly into per-head parts: head ``h`` of layer ``l``
contributes ``(A_h[CLS, :] V_h) W_O[:, h-slice]^T`` (times layer scale where present); the
output bias belongs to a per-layer remainder. Hence (Eq. 4)

    E = sum_{l,h} c[l, h] + sum_r remainder[r]

with ``c[l, h] = P h^{l,h}`` in the paper's notation. :func:`decompose` returns all parts,
and :meth:`Decomposition.reconstruct` must equal ``model.encode_image`` to float precision
(relative error <= 1e-5 in float32, <= 1e-10 in float64; see ``tests/test_decomposition.py``).

Only the CLS row is ever computed per head. The per-head computation never projects all
tokens through ``W_K``/``W_V``: with ``x`` the ``ln_1`` output of a block,

    score_h[j] = q_h . (W_K,h x_j + b_K,h) = (W_K,h^T q_h) . x_j + const
    A_h V_h    = W_V,h (sum_j a_hj x_j) + b_V,h          (attention rows sum to one)

so the work is O(B . H . N . D) per layer instead of O(B . N . D^2), which keeps extraction
within a few percent of a plain forward pass (``benchmarks/run.py``).

Hooks follow TransformerLens' habit: named hook points (:data:`HOOK_POINTS`), registered in
a context manager (:class:`HookSet`) and always removed, even on error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from ..errors import RefineClipError, UnsupportedModelError

#: Named hook points, one per place the decomposition reads the model.
HOOK_POINTS = (
    "embed",              # input of the transformer (after ln_pre): the embedding term
    "blocks.{l}.ln_1",    # attention input of block l: the per-head computation reads it
    "blocks.{l}.attn_out",  # attention output of block l, after layer scale
    "blocks.{l}.ln_2",    # MLP input of block l: Eq. 5's direct path reads it clean
    "blocks.{l}.mlp_out",   # MLP output of block l, after layer scale
    "ln_post.in",         # residual stream entering ln_post: its CLS row gives mean and sigma
)


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


@dataclass(frozen=True)
class ArchitectureInfo:
    """What the decomposition needs to know about a supported ViT."""

    n_layers: int
    n_heads: int
    width: int
    embed_dim: int
    n_tokens: int
    has_layer_scale: bool


@dataclass
class Decomposition:
    """The parts of a batch of image embeddings (paper Eq. 4).

    Attributes:
        embedding: ``(B, d)`` the unnormalised ``encode_image`` output of the real forward pass.
        heads: ``(B, L_s, H, d)`` direct contribution ``c[l, h]`` of every head of the layers in
            ``layers`` (the paper's ``P h^{l,h}``).
        remainders: ``(B, R, d)`` everything else, named by ``remainder_names``: ``embed``,
            ``attn_bias.{l}`` (in-scope layers), ``attn.{l}`` (out-of-scope layers, whole),
            ``mlp.{l}``, ``ln_post_bias``.
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
    """Check that ``visual`` is an open_clip ViT whose embedding decomposes exactly.

    Raises :class:`UnsupportedModelError` (one sentence saying why) for anything else:
    ResNet or timm towers, attentional / average pooling, ``final_ln_after_pool``, custom
    blocks (qk-norm, scaled cosine attention, head scaling) or non batch-first attention.
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    kind = type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"The image tower is a {kind}; only open_clip VisionTransformer towers (CLIP-ViT) decompose into heads."
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError("This ViT uses attentional pooling; the per-head decomposition needs CLS-token pooling.")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(
            f"This ViT pools with '{visual.pool_type}'; the per-head decomposition needs CLS-token ('tok') pooling."
        )
    if getattr(visual, "final_ln_after_pool", False):
        raise UnsupportedModelError("This ViT applies ln_post after pooling (final_ln_after_pool); not supported.")
    blocks = list(visual.transformer.resblocks)
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
            raise UnsupportedModelError(
                f"Block {i} is a {type(block).__name__}; only open_clip's standard ResidualAttentionBlock with "
                "nn.MultiheadAttention is supported (no qk-norm / scaled-cosine / head-scaling blocks)."
            )
        if not block.attn.batch_first or not block.attn._qkv_same_embed_dim or block.attn.in_proj_bias is None:
            raise UnsupportedModelError(f"Block {i}'s attention layout is not supported (needs batch_first, packed qkv, biases).")
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise UnsupportedModelError("ln_post is not a LayerNorm; the decomposition linearises a LayerNorm.")
    attn = blocks[0].attn
    embed_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    gh, gw = visual.grid_size
    return ArchitectureInfo(
        n_layers=len(blocks),
        n_heads=attn.num_heads,
        width=visual.transformer.width,
        embed_dim=embed_dim,
        n_tokens=gh * gw + 1,
        has_layer_scale=not isinstance(blocks[0].ls_1, nn.Identity),
    )


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


class HookSet(contextlib.AbstractContextManager):
    """Forward hooks registered on entry and removed on exit (also on exceptions)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def forward_pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def hook_modules(visual: nn.Module, layer: int | None = None) -> dict[str, nn.Module]:
    """The module behind each named hook point (``{l}`` filled with ``layer``)."""
    out: dict[str, nn.Module] = {"embed": visual.transformer, "ln_post.in": visual.ln_post}
    if layer is not None:
        block = visual.transformer.resblocks[layer]
        out[f"blocks.{layer}.ln_1"] = block.ln_1
        out[f"blocks.{layer}.attn_out"] = block.ls_1
        out[f"blocks.{layer}.ln_2"] = block.ln_2
        out[f"blocks.{layer}.mlp_out"] = block.ls_2
    return out


def head_outputs_cls(attn: nn.MultiheadAttention, x: torch.Tensor, layer_scale: torch.Tensor | None) -> torch.Tensor:
    """Per-head CLS-row outputs of one attention layer, in the residual stream's basis.

    ``x``: ``(B, N, D)`` attention input (``ln_1`` output). Returns ``(B, H, D)`` whose sum over
    heads plus ``out_proj.bias`` (times layer scale) equals the attention output's CLS row.
    """
    B, N, D = x.shape
    H = attn.num_heads
    dh = D // H
    w_q, w_k, w_v = attn.in_proj_weight.split(D, dim=0)
    b_q, b_k, b_v = attn.in_proj_bias.split(D, dim=0)
    q = (x[:, 0] @ w_q.T + b_q).view(B, H, dh) * dh ** -0.5            # (B, H, dh)
    q_in_x = torch.einsum("bhe,hed->bhd", q, w_k.view(H, dh, D))       # W_K,h^T q_h: (B, H, D)
    scores = torch.einsum("bhd,bnd->bhn", q_in_x, x)
    scores = scores + (q * b_k.view(H, dh)).sum(-1, keepdim=True)      # constant per row; kept for fidelity
    weights = scores.softmax(dim=-1)                                   # CLS row of A_h: (B, H, N)
    mixed = torch.einsum("bhn,bnd->bhd", weights, x)                  # sum_j a_hj x_j: (B, H, D)
    values = torch.einsum("bhd,hed->bhe", mixed, w_v.view(H, dh, D)) + b_v.view(H, dh)
    out = torch.einsum("bhe,dhe->bhd", values, attn.out_proj.weight.view(D, H, dh))
    if layer_scale is not None:
        out = out * layer_scale
    return out


def _layer_scale(module: nn.Module) -> torch.Tensor | None:
    return module.gamma if hasattr(module, "gamma") else None


@torch.inference_mode()
def decompose(visual: nn.Module, images: torch.Tensor, layers: int | str | Sequence[int] | None = 4) -> Decomposition:
    """Run the image tower once on ``images`` and return the exact decomposition (Eq. 3-4)."""
    return decompose_differentiable(visual, images, layers)


def decompose_differentiable(visual: nn.Module, images: torch.Tensor,
                             layers: int | str | Sequence[int] | None = 4) -> Decomposition:
    """:func:`decompose` under the caller's autograd mode: the parts stay in the graph, so
    gradients flow from a head's contribution back to the images (Grad-CAM of a head set)."""
    info = architecture_info(visual)
    scope = resolve_layers(info.n_layers, layers)
    in_scope = set(scope)
    blocks = visual.transformer.resblocks
    captured: dict[str, torch.Tensor] = {}
    head_parts: dict[int, torch.Tensor] = {}

    def keep_cls(name: str, pre: bool = False) -> Callable:
        # copy the (B, D) CLS row: a view would keep the whole (B, N, D) activation alive
        # until the end of the pass (2 per block), multiplying peak memory by the depth
        if pre:
            return lambda _m, args: captured.__setitem__(name, args[0][:, 0].clone())
        return lambda _m, _args, out: captured.__setitem__(name, out[:, 0].clone())

    def per_head(layer: int) -> Callable:
        def hook(_m, _args, out):
            head_parts[layer] = head_outputs_cls(blocks[layer].attn, out, _layer_scale(blocks[layer].ls_1))
        return hook

    with HookSet() as hooks:
        top = hook_modules(visual)
        hooks.forward_pre(top["embed"], keep_cls("embed", pre=True))
        hooks.forward_pre(top["ln_post.in"], keep_cls("ln_post.in", pre=True))
        for l in range(len(blocks)):
            points = hook_modules(visual, l)
            for name in (f"blocks.{l}.attn_out", f"blocks.{l}.mlp_out"):
                hooks.forward(points[name], keep_cls(name))
            if l in in_scope:
                hooks.forward(points[f"blocks.{l}.ln_1"], per_head(l))
        embedding = visual(images)

    return assemble(visual, captured, head_parts, scope, embedding)


def assemble(
    visual: nn.Module,
    captured: dict[str, torch.Tensor],
    head_parts: dict[int, torch.Tensor],
    scope: tuple[int, ...],
    embedding: torch.Tensor,
) -> Decomposition:
    """Map residual-stream parts through the frozen ``ln_post`` and ``P`` (Eq. 3)."""
    ln = visual.ln_post
    resid = captured["ln_post.in"]                                      # (B, D) CLS row
    sigma = (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    gamma = ln.weight if ln.weight is not None else torch.ones_like(resid[0])
    proj = visual.proj

    def linear(part: torch.Tensor) -> torch.Tensor:
        # part: (B, ..., D); sigma broadcast over the middle dims
        s = sigma.view(sigma.shape[0], *([1] * (part.dim() - 2)), 1)
        y = (part - part.mean(-1, keepdim=True)) * gamma / s
        return y @ proj if proj is not None else y

    names: list[str] = ["embed"]
    parts: list[torch.Tensor] = [captured["embed"]]
    blocks = visual.transformer.resblocks
    for l in range(len(blocks)):
        attn_out = captured[f"blocks.{l}.attn_out"]
        if l in head_parts:
            bias = blocks[l].attn.out_proj.bias
            ls = _layer_scale(blocks[l].ls_1)
            names.append(f"attn_bias.{l}")
            parts.append((bias * ls if ls is not None else bias).expand_as(attn_out))
        else:
            names.append(f"attn.{l}")
            parts.append(attn_out)
        names.append(f"mlp.{l}")
        parts.append(captured[f"blocks.{l}.mlp_out"])
    remainders = linear(torch.stack(parts, dim=1))                      # (B, R, d)
    beta = ln.bias if ln.bias is not None else torch.zeros_like(resid[0])
    beta_proj = (beta @ proj if proj is not None else beta).expand(resid.shape[0], -1)
    remainders = torch.cat([remainders, beta_proj.unsqueeze(1)], dim=1)
    names.append("ln_post_bias")
    if scope:
        heads = linear(torch.stack([head_parts[l] for l in scope], dim=1))  # (B, L_s, H, d)
    else:
        heads = remainders.new_zeros(resid.shape[0], 0, 0, remainders.shape[-1])
    return Decomposition(embedding=embedding, heads=heads, remainders=remainders, remainder_names=names, layers=scope)


@contextlib.contextmanager
def heads_zeroed(visual: nn.Module, heads: Sequence[HeadId]) -> Iterator[None]:
    """Temporarily zero the output-projection columns of ``heads`` in the real model.

    Inside the context the model's attention really runs without these heads (their value
    path is cut for every token). The weights are restored on exit, also on error.
    """
    blocks = visual.transformer.resblocks
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for hid in heads:
                attn = blocks[hid.layer].attn
                dh = attn.embed_dim // attn.num_heads
                cols = attn.out_proj.weight[:, hid.head * dh:(hid.head + 1) * dh]
                saved.append((cols, cols.clone()))
                cols.zero_()
        yield
    finally:
        with torch.no_grad():
            for cols, original in reversed(saved):
                cols.copy_(original)


@torch.inference_mode()
def direct_ablation_forward(visual: nn.Module, images: torch.Tensor, heads: Sequence[HeadId]) -> torch.Tensor:
    """Paper Eq. (5) computed through the real model, independently of :func:`decompose`.

    Eq. (5) removes a head's *direct* path only. A clean forward pass records every block's
    sub-layer inputs (``ln_1``/``ln_2`` outputs) and ``ln_post``'s statistics; then the model
    runs with the heads' output columns zeroed, while later sub-layers read the clean inputs
    (path patching) and ``ln_post`` divides by the clean standard deviation. The result is the model's own
    arithmetic with the heads' direct contribution removed, which must equal
    ``E - sum_{h in S} c[h]`` from the cached decomposition.
    """
    blocks = visual.transformer.resblocks
    clean: dict[str, torch.Tensor] = {}
    points = {l: hook_modules(visual, l) for l in range(len(blocks))}
    with HookSet() as hooks:
        for l, modules in points.items():
            for name in (f"blocks.{l}.ln_1", f"blocks.{l}.ln_2"):
                hooks.forward(modules[name], lambda _m, _a, out, name=name: clean.__setitem__(name, out))
        hooks.forward_pre(points[0]["ln_post.in"], lambda _m, args: clean.__setitem__("ln_post.in", args[0]))
        visual(images)
    resid = clean["ln_post.in"]
    var = resid.var(-1, unbiased=False, keepdim=True)
    ln = visual.ln_post
    first = min((h.layer for h in heads), default=len(blocks))

    def frozen_ln_post(_m, args, _out):
        # centring is linear and stays; only the standard deviation is frozen (Eq. 3)
        x = args[0]
        y = (x - x.mean(-1, keepdim=True)) / (var + ln.eps).sqrt()
        return y * ln.weight + ln.bias if ln.weight is not None else y

    with heads_zeroed(visual, heads), HookSet() as hooks:
        for l, modules in points.items():
            if l > first:  # later sub-layers read the clean stream: no indirect effects
                name = f"blocks.{l}.ln_1"
                hooks.forward(modules[name], lambda _m, _a, _o, name=name: clean[name])
            if l >= first:
                name = f"blocks.{l}.ln_2"
                hooks.forward(modules[name], lambda _m, _a, _o, name=name: clean[name])
        hooks.forward(ln, frozen_ln_post)
        return visual(images)
