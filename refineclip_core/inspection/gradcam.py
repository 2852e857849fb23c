"""Grad-CAM heat maps of CLIP zero-shot logits, for the whole model or for a set of heads.

Paper Appendix A.1, Figure 3 shows, per image, Grad-CAM (Selvaraju et al., 2017) of the
initial CLIP model and of the heads that RefineCLIP (and TextSpan) selected. Grad-CAM needs a
classifier; the zero-shot classifier is (paper §2.1)

    logits_y = logit_scale * sim(E', t_y)

with ``E'`` either the ordinary image embedding ``E`` (whole-model map) or the direct
contribution of a head set ``S``, ``E' = sum_{h in S} c[h]`` (paper Eq. 4, ``P h^{l,h}``).
The head part is computed by :func:`refineclip_core.features.decomposition.decompose_differentiable`,
the same code as the cached decomposition, so its logits equal those from the feature cache.

``c[h]`` divides by the per-image standard deviation of ``ln_post``'s input (Eq. 3). That is a
positive scalar shared by every head, and the cosine similarity ignores it: the head-set
logits, and so their gradients, depend on the images only through the heads' own attention
outputs (and the layers below them).

The maps come from ``pytorch_grad_cam.GradCAM`` with the tower's own reshape transform (patch
tokens to a ``(D, gh, gw)`` grid; prefix tokens, i.e. the class and register tokens, dropped; a
tower without a class token, such as SigLIP's, keeps all its tokens), both given by the
vision backend (:mod:`refineclip_core.features.backends`). The target layer is the attention
input (``ln_1``) of the last block for the whole model (its output is what the last attention
reads), and of each layer of the head set for a head set, since that is what those heads read
(maps of several layers are normalised and averaged by GradCAM). Hooks are always removed, the model's parameters keep
their ``requires_grad`` flags and gradients, and its outputs are unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import RefineClipError
from ..features.backends import backend_for
from ..features.decomposition import HeadId, HeadLike, decompose_differentiable, parse_heads
from ..features.extraction import load_batch
from ..loading.data import ImageRecord, SkippedFile

class ZeroShotClassifierModule(nn.Module):
    """``images -> logit_scale * cos(E', t_y)`` for every class ``y``: a classifier for Grad-CAM.

    Args:
        loaded_model: a :class:`~refineclip_core.loading.models.LoadedModel`.
        text_embeddings: ``(C, d)`` class text embeddings (normalised here again).
        head_mask: ``None`` for the whole model (``E' = E``), or the heads ``S`` whose direct
            contributions make ``E' = sum_{h in S} c[h]`` (paper Eq. 4).

    When autograd is on and the images do not require gradients, ``forward`` makes them do so
    (a leaf copy), because the model's parameters usually do not: without it no activation in
    the model would carry a gradient for Grad-CAM.
    """

    def __init__(self, loaded_model, text_embeddings: np.ndarray | torch.Tensor,
                 head_mask: Sequence[HeadLike] | None = None) -> None:
        super().__init__()
        self.visual = loaded_model.visual
        text = torch.as_tensor(np.asarray(text_embeddings) if not isinstance(text_embeddings, torch.Tensor)
                               else text_embeddings.detach()).float()
        if text.ndim != 2 or text.shape[0] == 0:
            raise RefineClipError(f"Class text embeddings must be a non-empty (classes, dim) array; got shape {tuple(text.shape)}.")
        self.backend = backend_for(self.visual)
        info = self.backend.info
        embed_dim = info.embed_dim
        if text.shape[1] != embed_dim:
            raise RefineClipError(
                f"Class text embeddings have dimension {text.shape[1]} but the model embeds into {embed_dim}; "
                "use text embeddings from the same model."
            )
        self.register_buffer("text", torch.nn.functional.normalize(text, dim=-1).to(loaded_model.device), persistent=False)
        self.logit_scale = float(loaded_model.logit_scale)
        self.heads: tuple[HeadId, ...] | None = None
        self.head_layers: tuple[int, ...] = ()
        if head_mask is not None:
            heads = tuple(parse_heads(head_mask))
            if not heads:
                raise RefineClipError("The head set is empty; pick at least one head or use the whole model.")
            for h in heads:
                if not (0 <= h.layer < info.n_layers and 0 <= h.head < info.n_heads):
                    raise RefineClipError(
                        f"Head {h} does not exist in this model ({info.n_layers} layers x {info.n_heads} heads)."
                    )
            self.heads = heads
            self.head_layers = tuple(sorted({h.layer for h in heads}))

    @property
    def n_classes(self) -> int:
        return int(self.text.shape[0])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``E'``: the image embedding, or the head set's summed direct contribution. ``(B, d)``."""
        if self.heads is None:
            return self.backend.embed(images)
        dec = decompose_differentiable(self.visual, images, self.head_layers)
        position = {l: i for i, l in enumerate(dec.layers)}
        parts = [dec.heads[:, position[h.layer], h.head] for h in self.heads]
        return torch.stack(parts, dim=0).sum(dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        images = images.to(device=self.text.device, dtype=dtype)
        if torch.is_grad_enabled() and not images.requires_grad:
            images = images.detach().requires_grad_(True)
        emb = self.embed(images).float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(emb.dtype).tiny)
        text = self.text.clone() if self.text.is_inference() else self.text  # built under inference_mode
        return self.logit_scale * emb @ text.T


@contextlib.contextmanager
def _preserved_state(module: nn.Module) -> Iterator[None]:
    """Freeze parameters for the duration; restore ``requires_grad``, ``.grad`` and train/eval
    flags afterwards (GradCAM calls ``eval()`` and ``zero_grad()`` on its model)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in module.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, training in modes:
            m.training = training


def target_layers_for(visual: nn.Module, heads: Sequence[HeadLike] | None = None,
                      layer: int | None = None) -> list[nn.Module]:
    """Grad-CAM target layers (the backend's :meth:`gradcam_target`, the attention input): of
    ``layer`` if given (negative counts from the end), else of every layer of the head set, else of
    the last block."""
    backend = backend_for(visual)
    n = backend.info.n_layers
    if layer is not None:
        if not -n <= int(layer) < n:
            raise RefineClipError(f"Layer {layer} does not exist; this model has layers 0..{n - 1}.")
        return [backend.gradcam_target(int(layer) % n)]
    if heads:
        return [backend.gradcam_target(l) for l in sorted({h.layer for h in parse_heads(heads)})]
    return [backend.gradcam_target(n - 1)]


def gradcam_maps(loaded, images: torch.Tensor, target_class: int | Sequence[int], text: np.ndarray | torch.Tensor,
                 heads: Sequence[HeadLike] | None = None, layer: int | None = None) -> np.ndarray:
    """Grad-CAM maps ``(B, H, W)`` in ``[0, 1]`` of the zero-shot logit of ``target_class``.

    Args:
        loaded: the :class:`~refineclip_core.loading.models.LoadedModel`.
        images: ``(B, 3, H, W)`` preprocessed images (``loaded.preprocess`` output, stacked).
        target_class: one class index for all images, or one per image.
        text: ``(C, d)`` class text embeddings (e.g. ``FeatureCache.text``).
        heads: ``None`` for the whole model, else the head set whose direct contribution is
            explained (paper Fig. 3, third and fourth columns).
        layer: override the target layer (index of the block whose ``ln_1`` output is used).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.ndim != 4 or images.shape[1] != 3:
        raise RefineClipError(f"Grad-CAM needs a batch of RGB images (B, 3, H, W); got shape {tuple(images.shape)}.")
    visual = loaded.visual
    backend = backend_for(visual)  # refuses unsupported towers with a clear message
    B = images.shape[0]
    classes = [int(target_class)] * B if isinstance(target_class, (int, np.integer)) else [int(c) for c in target_class]
    if len(classes) != B:
        raise RefineClipError(f"Give one target class for all images or one per image; got {len(classes)} for {B} images.")
    reshape = backend.tokens_to_grid

    # Outside inference mode even when called from inside it (Streamlit callers often are):
    # tensors made here must be usable by autograd.
    with torch.inference_mode(False), torch.enable_grad(), _preserved_state(visual):
        classifier = ZeroShotClassifierModule(loaded, text, head_mask=heads)
        for c in classes:
            if not 0 <= c < classifier.n_classes:
                raise RefineClipError(f"Target class {c} does not exist; there are {classifier.n_classes} classes.")
        layers = target_layers_for(visual, classifier.heads, layer)
        inputs = images.detach().clone().to(device=loaded.device, dtype=loaded.dtype).requires_grad_(True)
        cam = GradCAM(model=classifier, target_layers=layers, reshape_transform=reshape)
        # GradCAM's own __exit__ swallows IndexError; release its hooks explicitly instead so
        # every error reaches the caller and no hook survives either way.
        try:
            maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(c) for c in classes])
        finally:
            cam.activations_and_grads.release()
            cam.outputs = None
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return np.clip(maps, 0.0, 1.0)


def model_input_image(loaded, image_tensor: torch.Tensor) -> Image.Image:
    """The picture the model saw: a preprocessed ``(3, H, W)`` tensor with the normalisation
    undone, as an RGB image (to overlay a Grad-CAM map without misalignment from cropping)."""
    cfg = getattr(loaded.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32).view(3, 1, 1)
    arr = (image_tensor.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mode="RGB")


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``cam`` (``(h, w)`` in ``[0, 1]``) drawn over it as a JET heat map.

    ``alpha`` is the weight of the heat map (0: the image only, 1: the heat map only). The map
    is resized (bilinear) to the image's size; pass the image as the model saw it
    (:func:`model_input_image`) so that the two line up.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if not 0.0 <= float(alpha) <= 1.0:
        raise RefineClipError(f"The overlay opacity must be between 0 and 1, got {alpha}.")
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise RefineClipError(f"A Grad-CAM map must be a 2-D array; got shape {cam.shape}.")
    rgb = image.convert("RGB")
    width, height = rgb.size
    if cam.shape != (height, width):
        cam = np.asarray(Image.fromarray(cam, mode="F").resize((width, height), Image.BILINEAR), dtype=np.float32)
    cam = np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0)
    base = np.asarray(rgb, dtype=np.float32) / 255.0
    out = show_cam_on_image(base, cam, use_rgb=True, image_weight=1.0 - float(alpha))
    return Image.fromarray(out, mode="RGB")


@dataclass
class GradcamPanel:
    """One image of the head inspector's Grad-CAM comparison (paper Fig. 3)."""

    row: int                 # the image's cache row
    image: Image.Image       # the model input, enlarged
    whole: Image.Image       # overlay: the whole model's map
    head: Image.Image        # overlay: the head set's own map
    whole_max: float         # largest value of each map (0: no region raises the logit)
    head_max: float


def gradcam_panels(loaded, records: Sequence[ImageRecord], rows: Sequence[int], target_class: int,
                   text: np.ndarray, heads: Sequence[HeadLike], size: int = 192
                   ) -> tuple[list[GradcamPanel], list[SkippedFile]]:
    """Grad-CAM of ``target_class`` for the whole model and for ``heads`` alone on the images of
    cache ``rows`` (``records`` are the cache's), decoded again from disk (under the confinement
    in force); images that cannot be read any more are returned as skipped."""
    batch, keep, skipped = load_batch(loaded, [records[r] for r in rows], 0)
    if batch is None:
        return [], skipped
    whole = gradcam_maps(loaded, batch, int(target_class), text)
    only = gradcam_maps(loaded, batch, int(target_class), text, heads=heads)
    panels = []
    for i in range(batch.shape[0]):
        img = model_input_image(loaded, batch[i])
        scale = max(1, size // img.width)
        big = img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC)
        panels.append(GradcamPanel(int(rows[keep[i]]), big, overlay(big, whole[i]), overlay(big, only[i]),
                                   float(whole[i].max()), float(only[i].max())))
    return panels, skipped
