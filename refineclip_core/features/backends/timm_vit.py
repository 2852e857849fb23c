"""timm trunks behind open_clip's ``TimmModel``: ``VisionTransformer`` (SigLIP / SigLIP 2: no class
token, attention-map ("map") pooling over every token, usually no projection) and ``Eva``
(EVA-01 / EVA-02: class token, SwiGLU, a LayerNorm inside the attention; PE-Core: RoPE, map
pooling). RoPE rotates queries and keys only, so it changes the attention weights, never the
value path the decomposition splits. The readout ``norm -> pool -> fc_norm -> head (-> proj)`` is
linear once every norm's divisor (LayerNorm, or RMSNorm as in timm's ``test_vit4``) and the map pool's
attention are held at their real values; the map pool's MLP branch (``y + mlp(norm(y))``) is nonlinear
and enters as the remainder ``pool_mlp``, taken from the real forward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedModelError
from .base import (ArchitectureInfo, AttnWeights, Block, HookSet, Readout, VisionBackend, freeze_ln, is_norm, ln_beta,
                   ln_linear, ln_sigma)


def _qkv(attn: nn.Module) -> tuple[torch.Tensor, ...]:
    """``(w_q, b_q, w_k, b_k, w_v, b_v)`` of a timm attention (fused ``qkv`` or separate projections)."""
    if getattr(attn, "qkv", None) is not None:
        A = attn.qkv.weight.shape[0] // 3
        w_q, w_k, w_v = attn.qkv.weight.split(A)
        if getattr(attn, "q_bias", None) is not None:
            return w_q, attn.q_bias, w_k, attn.k_bias, w_v, attn.v_bias
        b = attn.qkv.bias.split(A) if attn.qkv.bias is not None else (None, None, None)
        return w_q, b[0], w_k, b[1], w_v, b[2]
    return (attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
            attn.v_proj.weight, attn.v_proj.bias)


class TimmViT(VisionBackend):
    """Backend for open_clip's ``TimmModel`` with a timm ``VisionTransformer`` or ``Eva`` trunk."""

    def __init__(self, visual: nn.Module) -> None:
        from timm.models.eva import Eva, EvaBlock
        from timm.models.vision_transformer import Block as VitBlock, VisionTransformer

        self.visual = visual
        trunk = self.trunk = visual.trunk
        self.is_eva = isinstance(trunk, Eva)
        if not (self.is_eva or isinstance(trunk, VisionTransformer)):
            raise UnsupportedModelError(f"The image tower is timm's {type(trunk).__name__}; only timm VisionTransformer "
                                        "and Eva trunks decompose into heads.")
        kinds = (EvaBlock,) if self.is_eva else (VitBlock,)
        for i, b in enumerate(trunk.blocks):
            attn = b.attn
            if type(b) not in kinds or getattr(attn, "gate", None) is not None \
                    or getattr(attn, "num_kv_groups", 1) != 1 or not hasattr(attn, "proj"):
                raise UnsupportedModelError(f"Block {i} is a {type(b).__name__} whose layout (post-norm, parallel, "
                                            "gated or grouped-query attention) does not decompose into heads.")
            if not is_norm(b.norm1) or not is_norm(b.norm2):
                raise UnsupportedModelError(f"Block {i}'s norms are not LayerNorms or RMSNorms.")
        self.pool = "map" if trunk.attn_pool is not None else trunk.global_pool
        if self.pool not in ("token", "avg", "map"):
            raise UnsupportedModelError(f"The trunk pools with '{trunk.global_pool}'; only token, avg and map pooling "
                                        "decompose into heads.")
        ap = trunk.attn_pool
        if ap is not None and (ap.pos_embed is not None or ap.latent_len != 1 or type(ap).__name__ != "AttentionPoolLatent"):
            raise UnsupportedModelError("The trunk's attention pool has position embeddings or several latents.")
        for name in ("norm", "fc_norm"):
            if not (is_norm(getattr(trunk, name)) or isinstance(getattr(trunk, name), nn.Identity)):
                raise UnsupportedModelError(f"The trunk's {name} is not a LayerNorm or an RMSNorm.")
        self.linears = [m for m in (trunk.head, *visual.head.children()) if not isinstance(m, (nn.Identity, nn.Dropout))]
        if any(not isinstance(m, nn.Linear) for m in self.linears):
            raise UnsupportedModelError("The tower ends in an MLP projection (timm_proj 'mlp'), which is not linear.")
        self.rows = (0,) if self.pool == "token" else None
        gh, gw = trunk.patch_embed.grid_size
        size = getattr(visual, "image_size", None)
        if getattr(trunk, "dynamic_img_size", False) and size is not None:
            # a trunk that resizes its position embeddings sees the tower's input size, not timm's default
            (ih, iw), (ph, pw) = (size, size) if isinstance(size, int) else size, trunk.patch_embed.patch_size
            gh, gw = int(ih) // ph, int(iw) // pw
        npre = trunk.num_prefix_tokens
        attn = trunk.blocks[0].attn
        self.info = ArchitectureInfo(
            n_layers=len(trunk.blocks), n_heads=attn.num_heads, width=trunk.embed_dim,
            embed_dim=self.linears[-1].out_features if self.linears else trunk.embed_dim,
            n_tokens=gh * gw + npre, n_prefix_tokens=npre,
            grid=(gh, gw), family="timm Eva" if self.is_eva else "timm VisionTransformer", pool=self.pool)

    def _scale(self, layer: int, mlp: bool = False) -> torch.Tensor | None:
        b = self.trunk.blocks[layer]
        if self.is_eva:
            return b.gamma_2 if mlp else b.gamma_1
        ls = b.ls2 if mlp else b.ls1
        return ls.gamma if hasattr(ls, "gamma") else None

    def blocks(self) -> list[Block]:
        out = []
        for l, b in enumerate(self.trunk.blocks):
            inner = b.attn.norm if is_norm(getattr(b.attn, "norm", None)) else None
            if self.is_eva:
                ga, gm = self._scale(l), self._scale(l, True)
                out.append(Block(ln_1=b.norm1, ln_2=b.norm2, attn=b.attn, attn_out=b.attn, mlp_out=b.mlp,
                                 attn_post=(lambda t, g=ga: t * g) if ga is not None else (lambda t: t),
                                 mlp_post=(lambda t, g=gm: t * g) if gm is not None else (lambda t: t),
                                 inner_norm=inner))
            else:
                out.append(Block(ln_1=b.norm1, ln_2=b.norm2, attn=b.attn, attn_out=b.ls1, mlp_out=b.ls2,
                                 inner_norm=inner))
        return out

    def attn_weights(self, layer: int) -> AttnWeights:
        attn = self.trunk.blocks[layer].attn
        H, dh = attn.num_heads, attn.head_dim
        _, _, _, _, w_v, b_v = _qkv(attn)
        inner = attn.norm if is_norm(getattr(attn, "norm", None)) else None
        return AttnWeights(w_v=w_v.view(H, dh, -1), b_v=b_v.view(H, dh) if b_v is not None else None,
                           w_o=attn.proj.weight.view(-1, H, dh), b_o=attn.proj.bias, scale=self._scale(layer),
                           inner=inner)

    def scores(self, layer, x, rows, ctx):
        attn = self.trunk.blocks[layer].attn
        B, N, _ = x.shape
        H, dh = attn.num_heads, attn.head_dim
        w_q, b_q, w_k, b_k, _, _ = _qkv(attn)
        q = F.linear(x, w_q, b_q).view(B, N, H, dh).transpose(1, 2)
        k = F.linear(x, w_k, b_k).view(B, N, H, dh).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = ctx.get("rope")
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(x)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(x)
        if rows is not None:
            q = q[:, :, list(rows)]
        return (q * attn.scale) @ k.transpose(-1, -2)

    def final_module(self) -> nn.Module | None:
        return self.trunk.norm

    # ---- readout ------------------------------------------------------------------------------
    def readout_hooks(self, hooks: HookSet, cap: dict) -> None:
        t = self.trunk
        hooks.forward_pre(t.norm, lambda _m, args: cap.__setitem__("final", args[0]))
        hooks.forward_pre(t.fc_norm, lambda _m, args: cap.__setitem__("post", args[0]))
        if t.attn_pool is not None:
            hooks.forward_pre(t.attn_pool, lambda _m, args: cap.__setitem__("pool_in", args[0]))
            hooks.forward(t.attn_pool.mlp, lambda _m, _a, out: cap.__setitem__("pool_mlp", out))

    def _pool_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The map pool's attention over its input tokens, per pool head: ``(B, G, N_pool)``."""
        ap = self.trunk.attn_pool
        G, dh = ap.num_heads, ap.head_dim
        q = ap.q(ap.latent).view(1, 1, G, dh).transpose(1, 2)               # (1, G, 1, dh)
        k = F.linear(x, *[p.split(G * dh)[0] if p is not None else None for p in (ap.kv.weight, ap.kv.bias)])
        k = k.view(x.shape[0], x.shape[1], G, dh).transpose(1, 2)
        q, k = ap.q_norm(q), ap.k_norm(k)
        return ((q * ap.scale) @ k.transpose(-1, -2))[:, :, 0].softmax(-1)

    def _tail(self, z: torch.Tensor, post_sigma: torch.Tensor | None) -> torch.Tensor:
        """The linear part after the pool: frozen ``fc_norm``, then every linear layer without bias."""
        if post_sigma is not None:
            z = ln_linear(z, self.trunk.fc_norm) / post_sigma.view(z.shape[0], *([1] * (z.dim() - 1)))
        for lin in self.linears:
            z = z @ lin.weight.T
        return z

    def _tail_bias(self, like: torch.Tensor) -> torch.Tensor:
        z = ln_beta(self.trunk.fc_norm, like)
        for lin in self.linears:
            z = z @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        return z

    def readout(self, cap: dict) -> Readout:
        t = self.trunk
        final = cap["final"]
        B, N, D = final.shape
        has_post = is_norm(t.fc_norm)
        post_sigma = ln_sigma(cap["post"], t.fc_norm)[..., 0] if has_post else None   # (B,)
        tail = lambda z: self._tail(z, post_sigma)  # noqa: E731
        sigma = ln_sigma(final, t.norm)[..., 0] if is_norm(t.norm) else final.new_ones(B, N)
        consts: list[tuple[str, torch.Tensor]] = []
        norm_beta = ln_beta(t.norm, final)
        if self.pool == "token":
            w = 1.0 / sigma[:, None, :1]
            pool_lin = lambda u: u[:, 0]  # noqa: E731
        elif self.pool == "avg":
            npre = t.num_prefix_tokens if not getattr(t, "pool_include_prefix", False) else 0
            w = final.new_zeros(B, 1, N)
            w[:, 0, npre:] = 1.0 / (N - npre) / sigma[:, npre:]
            pool_lin = lambda u: u[:, 0]  # noqa: E731
        else:
            ap = t.attn_pool
            G, dh = ap.num_heads, ap.head_dim
            a = self._pool_attention(cap["pool_in"])
            off = N - a.shape[-1]                                             # prefix tokens left out of the pool
            w = final.new_zeros(B, G, N)
            w[:, :, off:] = a / sigma[:, None, off:]
            w_v = ap.kv.weight[G * dh:].view(G, dh, -1)
            w_p = ap.proj.weight.view(-1, G, dh)

            def pool_lin(u: torch.Tensor) -> torch.Tensor:
                return torch.einsum("bg...e,oge->b...o", torch.einsum("bg...d,ged->bg...e", u, w_v), w_p)

            b_v = ap.kv.bias[G * dh:] if ap.kv.bias is not None else 0
            pool_bias = ap.proj.weight @ (w_v.flatten(0, 1) @ norm_beta + b_v) + ap.proj.bias
            consts.append(("pool_bias", tail(pool_bias.expand(B, -1))))
            norm_beta = None                                                  # inside pool_bias
        if norm_beta is not None:
            consts.append(("ln_post_bias", tail(norm_beta.expand(B, -1))))
        consts.append(("head_bias", self._tail_bias(final).expand(B, -1)))
        extras = [("pool_mlp", tail(cap["pool_mlp"][:, 0]))] if self.pool == "map" else []
        return Readout(w, lambda u: tail(pool_lin(ln_linear(u, t.norm))), consts, extras)

    def freeze_readout(self, hooks: HookSet, clean: dict) -> None:
        t = self.trunk
        freeze_ln(hooks, t.norm, clean["final"])
        freeze_ln(hooks, t.fc_norm, clean["post"])
        if t.attn_pool is None:
            return
        ap = t.attn_pool
        G, dh = ap.num_heads, ap.head_dim
        weights = self._pool_attention(clean["pool_in"])

        def hook(_m, args, _out):
            x = args[0]
            vals = F.linear(x, ap.kv.weight[G * dh:], ap.kv.bias[G * dh:] if ap.kv.bias is not None else None)
            z = torch.einsum("bgn,bnge->bge", weights, vals.view(x.shape[0], x.shape[1], G, dh))
            return ap.proj(z.flatten(1)) + clean["pool_mlp"][:, 0]

        hooks.forward(ap, hook)

    def value_rows(self, layer: int, head: int):
        attn = self.trunk.blocks[layer].attn
        dh = attn.head_dim
        sl = slice(head * dh, (head + 1) * dh)
        if getattr(attn, "qkv", None) is not None:
            A = attn.qkv.weight.shape[0] // 3
            out = [(attn.qkv.weight, slice(2 * A + sl.start, 2 * A + sl.stop))]
            if getattr(attn, "v_bias", None) is not None:
                out.append((attn.v_bias, sl))
            elif attn.qkv.bias is not None:
                out.append((attn.qkv.bias, slice(2 * A + sl.start, 2 * A + sl.stop)))
            return out
        out = [(attn.v_proj.weight, sl)]
        return out + ([(attn.v_proj.bias, sl)] if attn.v_proj.bias is not None else [])

    def merge_target(self) -> tuple[str, str | None, bool]:
        for name, m in reversed([("visual.trunk.head", self.trunk.head),
                                 *((f"visual.head.{n}", c) for n, c in self.visual.head.named_children())]):
            if isinstance(m, nn.Linear):
                return f"{name}.weight", (f"{name}.bias" if m.bias is not None else None), False
        return "", None, False
