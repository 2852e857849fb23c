"""open_clip's own ``VisionTransformer``: CLS-token pooling (OpenAI / LAION CLIP), average pooling
with ``ln_post`` per token or after the pool (CLIPA: ``final_ln_after_pool``, no ``ln_pre``), and
CoCa's attentional pooler. The readout of each is linear once ``ln_post``'s (and the pooler's
``ln_k``) sigma and the pooler's attention weights are held at their real values (Eq. 3)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UnsupportedModelError
from .base import ArchitectureInfo, AttnWeights, Block, HookSet, Readout, VisionBackend, freeze_ln, ln_beta, ln_linear, ln_sigma


def mha_params(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, ...]:
    """``(w_q, w_k, w_v, b_q, b_k, b_v)`` of a ``nn.MultiheadAttention`` (packed or separate weights)."""
    E = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.split(E, dim=0)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bias = mha.in_proj_bias if mha.in_proj_bias is not None else w_q.new_zeros(3 * E)
    b_q, b_k, b_v = bias.split(E)
    return w_q, w_k, w_v, b_q, b_k, b_v


def _layer_scale(module: nn.Module) -> torch.Tensor | None:
    return module.gamma if hasattr(module, "gamma") else None


class OpenClipViT(VisionBackend):
    """Backend for ``open_clip.transformer.VisionTransformer``."""

    def __init__(self, visual: nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        self.visual = visual
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise UnsupportedModelError("This ViT uses a second (contrastive) attentional pooler, which no released "
                                        "open_clip model has; it is not supported.")
        self.pool = "attn" if getattr(visual, "attn_pool", None) is not None else visual.pool_type
        if self.pool not in ("tok", "avg", "attn"):
            raise UnsupportedModelError(f"This ViT pools with '{visual.pool_type}'; only 'tok', 'avg' and "
                                        "attentional pooling decompose into heads.")
        if self.pool == "avg" and visual.final_ln_after_pool:
            self.pool = "avg+ln"
        for i, block in enumerate(visual.transformer.resblocks):
            if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
                raise UnsupportedModelError(
                    f"Block {i} is a {type(block).__name__}; only open_clip's standard ResidualAttentionBlock with "
                    "nn.MultiheadAttention is supported (no qk-norm / scaled-cosine / head-scaling blocks).")
            if not block.attn.batch_first or not block.attn._qkv_same_embed_dim or block.attn.in_proj_bias is None:
                raise UnsupportedModelError(f"Block {i}'s attention layout is not supported (needs batch_first, "
                                            "packed qkv, biases).")
            if not isinstance(block.ln_1, nn.LayerNorm) or not isinstance(block.ln_2, nn.LayerNorm):
                raise UnsupportedModelError(f"Block {i}'s norms are not LayerNorms.")
        if not isinstance(visual.ln_post, nn.LayerNorm):
            raise UnsupportedModelError("ln_post is not a LayerNorm; the decomposition linearises a LayerNorm.")
        self.rows = (0,) if self.pool == "tok" else None
        blocks = visual.transformer.resblocks
        gh, gw = visual.grid_size
        self.info = ArchitectureInfo(
            n_layers=len(blocks), n_heads=blocks[0].attn.num_heads, width=visual.transformer.width,
            embed_dim=visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0],
            n_tokens=gh * gw + 1, n_prefix_tokens=1, grid=(gh, gw), family="open_clip ViT", pool=self.pool)

    def blocks(self) -> list[Block]:
        return [Block(ln_1=b.ln_1, ln_2=b.ln_2, attn=b.attn, attn_out=b.ls_1, mlp_out=b.ls_2)
                for b in self.visual.transformer.resblocks]

    def attn_weights(self, layer: int) -> AttnWeights:
        block = self.visual.transformer.resblocks[layer]
        attn = block.attn
        D, H = attn.embed_dim, attn.num_heads
        _, _, w_v, _, _, b_v = mha_params(attn)
        return AttnWeights(w_v=w_v.view(H, D // H, D), b_v=b_v.view(H, D // H),
                           w_o=attn.out_proj.weight.view(D, H, D // H), b_o=attn.out_proj.bias,
                           scale=_layer_scale(block.ls_1))

    def scores(self, layer, x, rows, ctx):
        attn = self.visual.transformer.resblocks[layer].attn
        B, N, D = x.shape
        H = attn.num_heads
        dh = D // H
        w_q, w_k, _, b_q, b_k, _ = mha_params(attn)
        xr = x if rows is None else x[:, list(rows)]
        q = (xr @ w_q.T + b_q).view(B, -1, H, dh).transpose(1, 2) * dh ** -0.5     # (B, H, R, dh)
        if rows is not None and len(rows) <= dh:
            # W_K,h^T q_h: never projects all tokens through W_K (O(B H N D) instead of O(B N D^2))
            q_in_x = torch.einsum("bhre,hed->bhrd", q, w_k.view(H, dh, D))
            return torch.einsum("bhrd,bnd->bhrn", q_in_x, x) + (q * b_k.view(H, 1, dh)).sum(-1, keepdim=True)
        k = (x @ w_k.T + b_k).view(B, N, H, dh).transpose(1, 2)
        return q @ k.transpose(-1, -2)

    def final_module(self) -> nn.Module | None:
        v = self.visual
        return v.attn_pool if self.pool == "attn" else None if self.pool == "avg+ln" else v.ln_post

    # ---- readout ------------------------------------------------------------------------------
    def readout_hooks(self, hooks: HookSet, cap: dict) -> None:
        hooks.forward_pre(self.visual.ln_post, lambda _m, args: cap.__setitem__("final", args[0]))
        if self.pool == "attn":
            hooks.forward_pre(self.visual.attn_pool, lambda _m, args: cap.__setitem__("pool_in", args[0]))
            hooks.forward(self.visual.attn_pool, lambda _m, _a, out: cap.__setitem__("pool_out", out))

    def _pool_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attentional pooler's attention of its first query over the tokens: ``(B, G, N)``."""
        pool = self.visual.attn_pool
        mha = pool.attn
        G, E = mha.num_heads, mha.embed_dim
        w_q, w_k, _, b_q, b_k, _ = mha_params(mha)
        q = (pool.ln_q(pool.query[:1]) @ w_q.T + b_q).view(G, E // G) * (E // G) ** -0.5
        k = (pool.ln_k(x) @ w_k.T + b_k).view(x.shape[0], x.shape[1], G, E // G)
        return torch.einsum("ge,bnge->bgn", q, k).softmax(-1)

    def readout(self, cap: dict) -> Readout:
        v = self.visual
        proj = v.proj
        final = cap["final"]
        B = final.shape[0]

        def out(t: torch.Tensor) -> torch.Tensor:
            return t @ proj if proj is not None else t

        post_bias = out(ln_beta(v.ln_post, final)).expand(B, -1)
        if self.pool == "tok":
            sigma = ln_sigma(final[:, :1], v.ln_post)                       # (B, 1, 1)
            return Readout(1.0 / sigma, lambda t: out(ln_linear(t[:, 0], v.ln_post)), [("ln_post_bias", post_bias)])
        if self.pool in ("avg", "avg+ln"):
            N = cap["final"].shape[1] if self.pool == "avg" else self.info.n_tokens
            sigma = ln_sigma(final, v.ln_post).view(B, -1)                  # (B, N) or (B, 1)
            w = final.new_ones(B, 1, N) / (N - 1) / sigma[:, None, :]
            w[:, :, 0] = 0
            return Readout(w, lambda t: out(ln_linear(t[:, 0], v.ln_post)), [("ln_post_bias", post_bias)])
        pool, mha = v.attn_pool, v.attn_pool.attn
        G, E = mha.num_heads, mha.embed_dim
        x = cap["pool_in"]
        w = self._pool_attention(x) / ln_sigma(x, pool.ln_k)[..., 0][:, None, :]
        _, _, w_v, _, _, b_v = mha_params(mha)
        w_v, w_o = w_v.view(G, E // G, -1), mha.out_proj.weight.view(E, G, E // G)
        post_sigma = ln_sigma(final[:, :1], v.ln_post)[:, 0]               # (B, 1)

        def after(z: torch.Tensor) -> torch.Tensor:                         # pooler output -> E
            s = post_sigma.view(B, *([1] * (z.dim() - 2)), 1)
            return out(ln_linear(z, v.ln_post) / s)

        def apply(t: torch.Tensor) -> torch.Tensor:
            vals = torch.einsum("bg...d,ged->bg...e", ln_linear(t, pool.ln_k), w_v)
            return after(torch.einsum("bg...e,oge->b...o", vals, w_o))

        bias = w_o.flatten(1) @ (w_v.flatten(0, 1) @ ln_beta(pool.ln_k, x) + b_v) + mha.out_proj.bias
        return Readout(w, apply, [("pool_bias", after(bias.expand(B, -1))), ("ln_post_bias", post_bias)])

    def freeze_readout(self, hooks: HookSet, clean: dict) -> None:
        v = self.visual
        freeze_ln(hooks, v.ln_post, clean["final"])
        if self.pool != "attn":
            return
        pool, mha = v.attn_pool, v.attn_pool.attn
        G, E = mha.num_heads, mha.embed_dim
        weights = self._pool_attention(clean["pool_in"])
        freeze_ln(hooks, pool.ln_k, clean["pool_in"])
        _, _, w_v, _, _, b_v = mha_params(mha)

        def hook(_m, args, _out):
            kx = pool.ln_k(args[0])                                          # frozen sigma (hook above)
            vals = (kx @ w_v.T + b_v).view(kx.shape[0], kx.shape[1], G, E // G)
            first = mha.out_proj(torch.einsum("bgn,bnge->bge", weights, vals).flatten(1))
            return torch.cat([first[:, None], clean["pool_out"][:, 1:]], dim=1)

        hooks.forward(pool, hook)

    def value_rows(self, layer: int, head: int):
        attn = self.visual.transformer.resblocks[layer].attn
        D = attn.embed_dim
        dh = D // attn.num_heads
        sl = slice(2 * D + head * dh, 2 * D + (head + 1) * dh)
        return [(attn.in_proj_weight, sl), (attn.in_proj_bias, sl)]

    def merge_target(self) -> tuple[str, str | None, bool]:
        return ("visual.proj", None, True) if self.visual.proj is not None else ("", None, False)
