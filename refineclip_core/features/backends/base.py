"""The vision-backend seam: what every image-tower family tells the decomposition, and the one
engine that turns it into the exact per-head split (paper Eq. 2-5).

Every supported tower is a stack of pre-norm blocks ``r <- r + ls_1 * attn(ln_1(r))``,
``r <- r + ls_2 * mlp(ln_2(r))`` followed by a *readout* (LayerNorms, a pool, linear layers).
Holding each LayerNorm's standard deviation and each pool's attention weights at their values
from the real forward pass makes the readout affine in the residual stream (the rule the paper
uses for ``ln_post``, Eq. 3):

    E = sum_g F_g( sum_i w[g, i] * t_i ) + constants + extras                 (Eq. 3, generalised)

for every additive term ``t`` of the stream (``t_i`` its value at token ``i``). ``w[g, i]`` are the
readout's token weights (the CLS row: ``1/sigma_0``; average pooling: ``1/(N sigma)``; a pool that
attends: its head ``g``'s attention over the tokens divided by the LayerNorm's per-token sigma),
``F_g`` the linear map behind them, ``extras`` terms the readout adds that are not linear in the
stream (map pooling's MLP branch), taken as they are from the real forward pass. A head's direct
contribution is then ``F`` applied to the head's output weighted over the tokens, and since an
attention head is linear in its values once its attention weights are fixed,

    sum_i w[g, i] o_h,i = W_O,h W_V,h sum_j (sum_i w[g, i] A_h[i, j]) x_j + (sum_i w[g, i]) W_O,h b_V,h

so no per-token head output is ever materialised (Eq. 4). A LayerNorm inside the attention (EVA's
``scale_attn_inner``) is linearised the same way: its per-token sigma divides ``w``, its centring
gives each head a share ``-(sum of the head's values)/width * W_O gamma``, and its bias joins the
layer's ``attn_bias`` remainder.

A family implements :class:`VisionBackend` (facts, blocks, attention weights, readout); the
engine here (:meth:`VisionBackend.decompose`, :meth:`VisionBackend.direct_ablation`) is shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


#: Named hook points, one per place the decomposition reads the model (:meth:`VisionBackend.hook_points`).
HOOK_POINTS = (
    "embed",                # input of the first block (after ln_pre): the embedding term
    "blocks.{l}.ln_1",      # attention input of block l: the per-head computation and Grad-CAM read it
    "blocks.{l}.attn_out",  # attention output of block l (its module; ``Block.attn_post`` adds layer scale)
    "blocks.{l}.ln_2",      # MLP input of block l: Eq. 5's direct path reads it clean
    "blocks.{l}.mlp_out",   # MLP output of block l (its module; ``Block.mlp_post`` adds layer scale)
    "ln_post.in",           # the module whose input is the residual stream after the last block
)


class HookSet(contextlib.AbstractContextManager):
    """Forward hooks registered on entry and removed on exit (also on exceptions)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def forward_pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True)
class ArchitectureInfo:
    """The facts of a tower the decomposition, the cache and the pages use."""

    n_layers: int
    n_heads: int
    width: int
    embed_dim: int
    n_tokens: int
    n_prefix_tokens: int = 1            # class + register tokens before the patch tokens
    grid: tuple[int, int] = (0, 0)      # patch grid (rows, columns)
    family: str = "open_clip ViT"
    pool: str = "tok"                   # tok, avg, avg+ln, attn (CoCa), map


@dataclass
class Block:
    """One transformer block as the engine sees it (modules are the real ones, hooked)."""

    ln_1: nn.Module                      # output: the attention's input x
    ln_2: nn.Module                      # output: the MLP's input
    attn: nn.Module                      # forward hook gets x (and RoPE) and runs after attention
    attn_out: nn.Module                  # output (after ``attn_post``): the attention branch's term
    mlp_out: nn.Module                   # output (after ``mlp_post``): the MLP branch's term
    attn_post: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    mlp_post: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    inner_norm: nn.Module | None = None  # LayerNorm / RMSNorm over the heads' concatenated output


@dataclass
class AttnWeights:
    """One attention layer's value path: ``o = ls * (W_O (norm(concat_h z_h)) + b_O)``."""

    w_v: torch.Tensor                    # (H, dh, D)
    b_v: torch.Tensor | None             # (H, dh)
    w_o: torch.Tensor                    # (Dout, H, dh)
    b_o: torch.Tensor | None             # (Dout,)
    scale: torch.Tensor | None           # layer scale (Dout,)
    inner: nn.Module | None = None       # scale_attn_inner norm over H*dh

    def bias(self) -> torch.Tensor:
        """The layer's per-token constant (``attn_bias.{l}``): ``b_O + W_O beta`` times layer scale."""
        out = self.b_o if self.b_o is not None else self.w_o.new_zeros(self.w_o.shape[0])
        if self.inner is not None:
            out = out + self.w_o.flatten(1) @ ln_beta(self.inner, out)
        return out * self.scale if self.scale is not None else out


@dataclass
class Readout:
    """The linearised last stage (see the module docstring): ``E = apply(sum_i w t_i) + ...``."""

    weights: torch.Tensor                                   # (B, G, N_read) over the captured rows
    apply: Callable[[torch.Tensor], torch.Tensor]           # (B, G, *, D) -> (B, *, d), summed over G
    constants: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (B, d) each
    extras: list[tuple[str, torch.Tensor]] = field(default_factory=list)     # (B, d) each


def is_norm(m: nn.Module | None) -> bool:
    """Whether ``m`` is a norm the readout rule linearises: a LayerNorm or an RMSNorm (torch's or
    timm's ``RmsNorm``, e.g. timm ``test_vit4``). Both are ``gamma * c(x) / sigma(x) (+ beta)``
    with ``c`` linear (centring, or the identity for RMSNorm); holding ``sigma`` at its value from
    the real forward pass makes them affine."""
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return True
    from timm.layers import RmsNorm

    return isinstance(m, RmsNorm)


def ln_sigma(x: torch.Tensor, ln: nn.Module | None) -> torch.Tensor:
    """A norm's per-row divisor of its input ``x`` (keepdim): ``sqrt(var + eps)`` for a LayerNorm,
    ``sqrt(mean(x^2) + eps)`` for an RMSNorm (the standard deviation, eps 0, for no norm)."""
    if is_norm(ln) and not isinstance(ln, nn.LayerNorm):
        eps = ln.eps if ln.eps is not None else torch.finfo(x.dtype).eps      # nn.RMSNorm's eps=None default
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    eps = ln.eps if isinstance(ln, nn.LayerNorm) else 0.0
    return (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()


def ln_linear(v: torch.Tensor, ln: nn.Module | None) -> torch.Tensor:
    """The linear part of a frozen norm without the division: ``gamma * (v - mean(v))`` for a
    LayerNorm, ``gamma * v`` for an RMSNorm (identity for a missing norm)."""
    if not is_norm(ln):
        return v
    if isinstance(ln, nn.LayerNorm):
        v = v - v.mean(-1, keepdim=True)
    return v * ln.weight if ln.weight is not None else v


def ln_beta(ln: nn.Module | None, like: torch.Tensor) -> torch.Tensor:
    """A norm's additive constant ``beta`` (zeros for an RMSNorm or a norm without bias)."""
    if isinstance(ln, nn.LayerNorm) and ln.bias is not None:
        return ln.bias
    return like.new_zeros(like.shape[-1])


def head_parts(spec: AttnWeights, scores: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
               inner_sigma: torch.Tensor | None) -> torch.Tensor:
    """Per-head direct outputs of one attention layer, weighted over its rows (Eq. 4).

    ``scores``: ``(B, H, R, N)`` pre-softmax attention of the read rows; ``x``: ``(B, N, D)`` the
    layer's input; ``weights``: ``(B, G, R)`` row weights; ``inner_sigma``: ``(B, R)`` the inner
    norm's sigma at those rows. Returns ``(B, G, H, Dout)``: ``sum_r w[g, r] o_h,r``.
    """
    probs = scores.softmax(dim=-1)
    if inner_sigma is not None:
        weights = weights / inner_sigma[:, None, :]
    u = torch.einsum("bgr,bhrn->bghn", weights, probs)
    mixed = torch.einsum("bghn,bnd->bghd", u, x)
    vals = torch.einsum("bghd,hed->bghe", mixed, spec.w_v)
    if spec.b_v is not None:
        vals = vals + u.sum(-1, keepdim=True) * spec.b_v
    if spec.inner is not None:
        H, dh = spec.w_v.shape[:2]
        gamma = spec.inner.weight.view(H, dh) if spec.inner.weight is not None else torch.ones_like(spec.w_v[:, :, 0])
        out = torch.einsum("bghe,ohe->bgho", vals * gamma, spec.w_o)
        if isinstance(spec.inner, nn.LayerNorm):                 # an RMSNorm does not centre
            share = vals.sum(-1, keepdim=True) / (H * dh)       # the head's part of the centring
            out = out - share * (spec.w_o * gamma).sum((1, 2))
    else:
        out = torch.einsum("bghe,ohe->bgho", vals, spec.w_o)
    return out * spec.scale if spec.scale is not None else out


class VisionBackend:
    """A family's adapter. Subclasses set :attr:`info`, :attr:`rows` and implement the hooks."""

    visual: nn.Module
    info: ArchitectureInfo
    #: Token rows the readout reads (``(0,)``: the CLS row), or None: every token.
    rows: tuple[int, ...] | None = (0,)

    # ---- the family's part -------------------------------------------------------------
    def blocks(self) -> list[Block]:
        raise NotImplementedError

    def attn_weights(self, layer: int) -> AttnWeights:
        raise NotImplementedError

    def scores(self, layer: int, x: torch.Tensor, rows: tuple[int, ...] | None, ctx: dict) -> torch.Tensor:
        """Pre-softmax attention scores ``(B, H, R, N)`` of ``rows`` (None: all) from the input ``x``."""
        raise NotImplementedError

    def final_module(self) -> nn.Module | None:
        """The module whose input is the residual stream after the last block (None: no such module)."""
        raise NotImplementedError

    def readout_hooks(self, hooks: HookSet, cap: dict) -> None:
        """Capture what :meth:`readout` needs from the real forward pass into ``cap``."""
        raise NotImplementedError

    def readout(self, cap: dict) -> Readout:
        raise NotImplementedError

    def freeze_readout(self, hooks: HookSet, clean: dict) -> None:
        """For :meth:`direct_ablation`: hooks that hold the readout's sigmas and pool attention at
        ``clean`` (captured by :meth:`readout_hooks` in a clean pass) in the real model."""
        raise NotImplementedError

    def value_rows(self, layer: int, head: int) -> list[tuple[torch.Tensor, slice]]:
        """Parameter slices that carry head ``head``'s values (zeroed: the head writes nothing)."""
        raise NotImplementedError

    def merge_target(self) -> tuple[str, str | None, bool]:
        """``(weight key, bias key or None, weight is (in, out))`` of the last linear layer, in the
        model's state dict, that an edit ``E' = M E`` merges into; ``("", None, False)`` when there
        is none (the tower ends in a nonlinearity)."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``encode_image`` (unnormalised) through the tower itself."""
        out = self.visual(images)
        return out[0] if isinstance(out, tuple) else out

    # ---- Grad-CAM ------------------------------------------------------------------------
    def gradcam_target(self, layer: int) -> nn.Module:
        """The module whose output Grad-CAM reads for ``layer``: the attention's input (``ln_1``)."""
        return self.blocks()[layer].ln_1

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tokens -> ``(B, D, gh, gw)`` float32: prefix (class, register) tokens dropped."""
        return tokens_to_grid(tokens, self.info.grid, self.info.n_prefix_tokens)

    # ---- the shared engine ----------------------------------------------------------------
    def hook_points(self, layer: int | None = None) -> dict[str, nn.Module]:
        """The module behind each named hook point (see ``decomposition.HOOK_POINTS``)."""
        blocks = self.blocks()
        modules = {"embed": blocks[0].ln_1, "ln_post.in": self.final_module()}
        if layer is not None:
            b = blocks[layer]
            modules.update({"blocks.{l}.ln_1": b.ln_1, "blocks.{l}.attn_out": b.attn_out,
                            "blocks.{l}.ln_2": b.ln_2, "blocks.{l}.mlp_out": b.mlp_out})
        return {p.replace("{l}", str(layer)): modules[p] for p in HOOK_POINTS
                if modules.get(p) is not None}

    def decompose(self, images: torch.Tensor, scope: tuple[int, ...]):
        """The exact split of ``encode_image(images)`` (Eq. 4) under the caller's autograd mode."""
        from ..decomposition import Decomposition

        blocks = self.blocks()
        rows = self.rows
        pick = (lambda t: t[:, list(rows)].clone()) if rows is not None else (lambda t: t)
        start = 0 if rows is not None else (scope[0] if scope else len(blocks) - 1)
        cap: dict = {}
        per_row: dict[int, torch.Tensor] = {}
        names: list[str] = []

        def keep(name: str, post: Callable = lambda t: t) -> Callable:
            return lambda _m, _a, out: cap.__setitem__(name, pick(post(out)))

        def inner_pre(layer: int) -> Callable:
            return lambda _m, args: cap.__setitem__(f"inner.{layer}", ln_sigma(args[0], blocks[layer].inner_norm)[..., 0])

        def on_attn(layer: int) -> Callable:
            def hook(_m, args, kwargs, _out):
                x = args[0] if args else kwargs["query"]
                ctx = {"rope": kwargs.get("rope")}
                if rows is None:
                    cap[f"x.{layer}"], cap[f"ctx.{layer}"] = x, ctx
                    return
                R = len(rows)
                eye = torch.eye(R, dtype=x.dtype, device=x.device).expand(x.shape[0], R, R)
                sig = cap.get(f"inner.{layer}")
                per_row[layer] = head_parts(self.attn_weights(layer), self.scores(layer, x, rows, ctx), x, eye,
                                            sig[:, list(rows)] if sig is not None else None)
            return hook

        with HookSet() as hooks:
            hooks.forward_pre(blocks[start].ln_1, lambda _m, args: cap.__setitem__("stream", pick(args[0])))
            for l in range(start, len(blocks)):
                b = blocks[l]
                if l not in scope:
                    hooks.forward(b.attn_out, keep(f"attn.{l}", b.attn_post))
                else:
                    if b.inner_norm is not None:
                        hooks.forward_pre(b.inner_norm, inner_pre(l))
                    hooks.forward(b.attn, on_attn(l), with_kwargs=True)
                hooks.forward(b.mlp_out, keep(f"mlp.{l}", b.mlp_post))
            self.readout_hooks(hooks, cap)
            embedding = self.embed(images)

        held = {id(t): t for t in [*cap.values(), *per_row.values()] if isinstance(t, torch.Tensor)}
        #: bytes this call held after the forward pass (what :meth:`capture_bytes_per_image` estimates)
        self.last_capture_bytes = sum(t.numel() * t.element_size() for t in held.values())
        ro = self.readout(cap)
        w = ro.weights
        terms = [cap["stream"]]
        names.append("embed" if start == 0 else f"resid_pre.{start}")
        wsum = w.sum(-1)                                            # (B, G)
        for l in range(start, len(blocks)):
            if l in scope:
                names.append(f"attn_bias.{l}")
                terms.append(self.attn_weights(l).bias())
            else:
                names.append(f"attn.{l}")
                terms.append(cap[f"attn.{l}"])
            names.append(f"mlp.{l}")
            terms.append(cap[f"mlp.{l}"])
        read = [torch.einsum("bgr,brd->bgd", w, t) if t.dim() == 3 else wsum[..., None] * t for t in terms]
        remainders = ro.apply(torch.stack(read, dim=2))             # (B, R, d)
        extra = ro.constants + ro.extras
        if extra:
            remainders = torch.cat([remainders, torch.stack([v for _, v in extra], dim=1)], dim=1)
            names += [n for n, _ in extra]
        if scope:
            parts = []
            for l in scope:
                if rows is not None:
                    parts.append(torch.einsum("bgr,brhd->bghd", w, per_row[l]))
                else:
                    x, sig = cap[f"x.{l}"], cap.get(f"inner.{l}")
                    parts.append(head_parts(self.attn_weights(l), self.scores(l, x, None, cap[f"ctx.{l}"]), x, w, sig))
            heads = ro.apply(torch.stack(parts, dim=2))             # (B, L_s, H, d)
        else:
            heads = remainders.new_zeros(remainders.shape[0], 0, 0, remainders.shape[-1])
        return Decomposition(embedding=embedding, heads=heads, remainders=remainders, remainder_names=names,
                             layers=tuple(scope))

    def capture_bytes_per_image(self, scope: tuple[int, ...], itemsize: int = 4) -> int:
        """What :meth:`decompose` holds per image beyond a plain forward pass: the captured terms and
        attention inputs (every token for a readout over all tokens, the read rows otherwise), the
        readout's captures and one layer's attention matrix while the heads are computed."""
        i = self.info
        N, D, H, L = i.n_tokens, i.width, i.n_heads, i.n_layers
        if self.rows is not None:
            R = len(self.rows)
            floats = (1 + 2 * L) * R * D + len(scope) * R * H * D + N * D
        else:
            start = scope[0] if scope else 0
            per_layer = 2 * (L - start)                             # the MLP term, and attn term or attn input
            floats = (1 + per_layer) * N * D + 2 * N * D + H * N * N
        return int(floats * itemsize)

    @contextlib.contextmanager
    def heads_zeroed(self, heads: Sequence) -> Iterator[None]:
        """Temporarily zero the value path of ``heads`` in the real model (restored on exit)."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for hid in heads:
                    for tensor, sl in self.value_rows(hid.layer, hid.head):
                        view = tensor[sl]
                        saved.append((view, view.clone()))
                        view.zero_()
            yield
        finally:
            with torch.no_grad():
                for view, original in reversed(saved):
                    view.copy_(original)

    def direct_ablation(self, images: torch.Tensor, heads: Sequence) -> torch.Tensor:
        """Paper Eq. (5) through the real model, independently of :meth:`decompose`: a clean pass
        records every sub-layer's input, every inner LayerNorm's sigma and the readout's frozen
        state; then the model runs with the heads' values zeroed, later sub-layers reading the
        clean inputs (path patching), LayerNorms dividing by their clean sigma and pools attending
        with their clean weights. The result must equal ``E - sum_{h in S} c[h]``."""
        blocks = self.blocks()
        clean: dict = {}
        with HookSet() as hooks:
            for l, b in enumerate(blocks):
                hooks.forward(b.ln_1, lambda _m, _a, out, l=l: clean.__setitem__(f"ln_1.{l}", out))
                hooks.forward(b.ln_2, lambda _m, _a, out, l=l: clean.__setitem__(f"ln_2.{l}", out))
                if b.inner_norm is not None:
                    hooks.forward_pre(b.inner_norm, lambda _m, a, l=l: clean.__setitem__(f"inner.{l}", a[0]))
            self.readout_hooks(hooks, clean)
            self.embed(images)
        first = min((h.layer for h in heads), default=len(blocks))
        with self.heads_zeroed(heads), HookSet() as hooks:
            for l, b in enumerate(blocks):
                if l > first:
                    hooks.forward(b.ln_1, lambda _m, _a, _o, l=l: clean[f"ln_1.{l}"])
                if l >= first:
                    hooks.forward(b.ln_2, lambda _m, _a, _o, l=l: clean[f"ln_2.{l}"])
                if b.inner_norm is not None and l >= first:
                    freeze_ln(hooks, b.inner_norm, clean[f"inner.{l}"])
            self.freeze_readout(hooks, clean)
            return self.embed(images)


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
    """``(B, N, D)`` tokens, ``n_prefix`` class/register tokens first, then the patch tokens in
    row-major order -> ``(B, D, gh, gw)`` float32 (the layout of a convolutional feature map)."""
    gh, gw = grid
    if tokens.ndim != 3:
        raise ValueError(f"expected ViT tokens (B, N, D), got shape {tuple(tokens.shape)}")
    B, N, D = tokens.shape
    if N - n_prefix != gh * gw:
        raise ValueError(f"{N} tokens do not make {n_prefix} prefix tokens plus a {gh}x{gw} patch grid")
    return tokens[:, n_prefix:, :].float().reshape(B, gh, gw, D).permute(0, 3, 1, 2)


def freeze_ln(hooks: HookSet, ln: nn.Module, clean_input: torch.Tensor) -> None:
    """Make ``ln`` divide by the standard deviation of ``clean_input`` (its input in a clean pass);
    its centring stays (linear). No-op for a module that is not a LayerNorm or an RMSNorm."""
    if not is_norm(ln):
        return
    sigma = ln_sigma(clean_input, ln)

    def hook(_m, args, _out):
        x = args[0]
        return ln_linear(x, ln) / sigma + ln_beta(ln, x)

    hooks.forward(ln, hook)
