"""Train the embedded demo CLIP on the biased training split of the procedural world.

Run ``python -m refineclip_core.demo.train --out assets/demo --seed 0`` (about 25 minutes on
two CPU cores). It writes, into ``--out``:

* ``refineclip-demo.json``: the open_clip architecture config (schema of open_clip's
  ``model_configs``); the model name is the file stem, ``refineclip-demo``;
* ``refineclip-demo.safetensors``: the state dict, tensors stored in float16 (open_clip
  casts them to the model's precision on load);
* ``metadata.json``: the command, seed, data and optimisation parameters, the learning
  curve and the zero-shot metrics of the *saved* checkpoint (reloaded with plain open_clip)
  on a freshly generated balanced test set.

The checkpoint loads with plain open_clip::

    open_clip.add_model_config("assets/demo/refineclip-demo.json")
    model = open_clip.create_model("refineclip-demo", pretrained="assets/demo/refineclip-demo.safetensors")

Training is standard CLIP contrastive learning with two twists. Captions are short and
repeat ("a photo of a waterbird.", "a water scene"), so a caption drawn for one image is
often true of other images in the batch too: duplicate captions, and more generally every
caption that is true of an image (the world knows all of them), count as positives of that
image (soft targets) instead of being pushed apart as false negatives. And a small penalty
(:class:`ClsMlpShare`, ``--cls-mlp-penalty``) keeps the MLPs from writing the CLS embedding
directly, so that, as in large CLIP models, the attention heads' direct effects (paper
Eq. 4) carry the prediction.
``--quick`` trains a tiny architecture for a few steps (a smoke test, seconds).

``--recipe siglip`` trains the SigLIP-shaped model instead (:mod:`.siglip`: a timm ViT trunk with
attention-map pooling and no projection, the sigmoid loss, :class:`~.siglip.MapMlpShare` as the
penalty; :func:`siglip_train_config`) on the same world.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..features.decomposition import HookSet, hook_modules
from ..features.scoring import uses_sigmoid_loss
from ..features.zeroshot import fill_template
from .digits import DEFAULT_CAPTION_WEIGHTS as DIGITS_CAPTION_WEIGHTS, KIND as DIGITS_KIND, DigitsConfig
from .siglip import SIGLIP_MLP_PENALTY, SIGLIP_MODEL_NAME, SIGLIP_STEPS, MapMlpShare, sigmoid_loss_with_duplicates, siglip_model_config
from .world import (
    CLASSES,
    TARGET_CLASSES,
    TARGET_PLACES,
    WorldConfig,
    CAPTION_FAMILIES,
    WorldSample,
    group_name,
)

MODEL_NAME = WorldConfig.model_name
"""open_clip model name of the demo model (the stem of its config file)."""

ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
"""Prompt ensemble used for the zero-shot metrics recorded in ``metadata.json``."""

TARGET_GROUPS: tuple[str, ...] = tuple(group_name(c, p) for c in TARGET_CLASSES for p in TARGET_PLACES)
"""The four target groups in WILDS order: landbird/land, landbird/water, waterbird/land, waterbird/water."""


def default_model_config(quick: bool = False) -> dict[str, Any]:
    """The demo architecture (open_clip ``model_configs`` schema); ``quick``: a tiny one.

    Vision: 48 px, patch 8 (36 patches + CLS), width 128, 6 layers, 8 heads of width 16, CLS
    pooling (so the paper's direct decomposition is exact). Text: width 128, 3 layers,
    8 heads, context 24 tokens, the standard 49,408-token BPE vocabulary. Embedding 256-d:
    the paper edits this space with diag(θ), and a 64-d space left too few coordinates for it
    to separate the bird cue from the background (see assets/demo/README.md).
    """
    if quick:
        return {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 48, "layers": 6, "width": 128, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 8, "layers": 3},
    }


def digits_model_config() -> dict[str, Any]:
    """The digits model's architecture: the demo's vision layout at width 96 (6 heads of width 16 per layer)
    and a 32-wide text tower, so that its float16 weights stay under 5 MB (the 49,408-token table is most
    of them); the 256-d embedding of the demo model."""
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 48, "layers": 4, "width": 96, "head_width": 16, "patch_size": 12},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


DEFAULT_CAPTION_WEIGHTS: dict[str, float] = {
    "class_background": 0.25, "class": 0.25, "background": 0.2, "attributes": 0.15, "detail": 0.15,
}
"""How often each caption family is drawn (renormalised over the families an image has)."""


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (recorded in ``metadata.json``).

    ``cls_mlp_penalty``: weight of :class:`ClsMlpShare`'s penalty (0 = plain CLIP training).
    ``world``: the bird world (:class:`WorldConfig`, the demo model) or the handwritten digits
    (:class:`~refineclip_core.demo.digits.DigitsConfig`; :func:`digits_train_config`).
    """

    seed: int = 0
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    pool_per_group: int = 2000
    pool_unrelated: int = 2000
    threads: int = 2
    eval_every: int = 250
    val_per_group: int = 50
    test_per_group: int = 250
    test_seed_offset: int = 1000
    caption_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CAPTION_WEIGHTS))
    cls_mlp_penalty: float = 1.0
    world: WorldConfig | DigitsConfig = field(default_factory=WorldConfig)
    model_config: dict[str, Any] = field(default_factory=default_model_config)
    model_name: str = ""
    """open_clip model name (the config and weights files' stem); empty: the world's (``refineclip-demo``)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["world"] = self.world.to_dict()
        if not self.model_name:
            del d["model_name"]  # the world's name, as in metadata written before the field existed
        return d


def digits_train_config(seed: int = 0, threads: int = 1) -> TrainConfig:
    """The recipe of the digits model (``--world digits``): shorter than the demo's, on the handwritten
    digits world's model half."""
    return TrainConfig(seed=seed, threads=threads, steps=1500, batch_size=128, pool_per_group=1500,
                       pool_unrelated=1500, val_per_group=36, test_per_group=1000,
                       caption_weights=dict(DIGITS_CAPTION_WEIGHTS), world=DigitsConfig(),
                       model_config=digits_model_config())


def siglip_train_config(seed: int = 0, threads: int = 2) -> TrainConfig:
    """The recipe of the SigLIP-shaped demo model (``--recipe siglip``, demo/siglip.py): the demo
    model's world, data and optimisation with the SigLIP-shaped architecture; its logit bias makes
    :func:`train` use the sigmoid loss, and its timm trunk :class:`~.siglip.MapMlpShare`."""
    return TrainConfig(seed=seed, threads=threads, steps=SIGLIP_STEPS, eval_every=250, model_config=siglip_model_config(),
                       cls_mlp_penalty=SIGLIP_MLP_PENALTY, model_name=SIGLIP_MODEL_NAME)


def world_from_dict(data: dict[str, Any]) -> WorldConfig | DigitsConfig:
    """The world a model's ``metadata.json`` records (``train_config.world``): digits when it says so."""
    if data.get("kind") == DIGITS_KIND:
        return DigitsConfig.from_dict(data)
    return WorldConfig.from_dict(data)


# ----------------------------------------------------------------------------------------------
# Data


def images_to_uint8(images: Sequence[Any], size: int | None = None) -> torch.Tensor:
    """Stack PIL images into a uint8 N×3×H×W tensor; ``size``: resized to size×size first (bicubic,
    what open_clip's preprocess does to a square image) when they are another size."""
    def fit(im):
        return im if size is None or im.size == (size, size) else im.resize((size, size), resample=3)  # BICUBIC
    arr = np.stack([np.asarray(fit(im).convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×3×H×W → float, scaled to [0, 1] and normalised like open_clip's preprocess."""
    x = x.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def images_to_tensor(images: Sequence[Any], mean: Sequence[float], std: Sequence[float],
                     size: int | None = None) -> torch.Tensor:
    """Stack PIL images (resized to ``size`` when given) into a normalised float tensor."""
    return normalise(images_to_uint8(images, size), mean, std)


@dataclass
class CaptionPool:
    """Unique captions (tokenised once); per image its caption ids by family and the set of
    all its true captions (used to mark positives across the batch)."""

    texts: list[str]
    tokens: torch.Tensor
    candidates: list[dict[str, list[int]]]
    valid: list[frozenset[int]]
    weights: dict[str, float]

    @classmethod
    def build(cls, samples: Sequence[WorldSample], tokenizer: Callable, weights: dict[str, float],
              families: Callable[[WorldSample], dict[str, list[str]]] | None = None) -> "CaptionPool":
        """``families``: every caption of a sample by family (default: the bird world's)."""
        families = families or WorldConfig().caption_families
        index: dict[str, int] = {}
        candidates, valid = [], []
        for sample in samples:
            fams = {f: [index.setdefault(t, len(index)) for t in texts]
                    for f, texts in families(sample).items()}
            valid.append(frozenset(i for ids in fams.values() for i in ids))
            candidates.append({f: ids for f, ids in fams.items() if weights.get(f, 0.0) > 0 and ids})
        texts = list(index)
        return cls(texts=texts, tokens=tokenizer(texts), candidates=candidates, valid=valid, weights=dict(weights))

    def positives(self, rows: np.ndarray, caption_ids: np.ndarray) -> torch.Tensor:
        """``M[i, j] = 1`` when the caption drawn for row ``j`` is true of the image of row ``i``."""
        return torch.tensor([[float(int(c) in self.valid[int(r)]) for c in caption_ids] for r in rows])

    def draw(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One caption id per image row: a family by weight, then a caption uniformly."""
        out = np.empty(len(rows), dtype=np.int64)
        for k, r in enumerate(rows):
            fams = self.candidates[int(r)]
            names = list(fams)
            w = np.array([self.weights[f] for f in names])
            ids = fams[names[int(rng.choice(len(names), p=w / w.sum()))]]
            out[k] = ids[int(rng.integers(len(ids)))]
        return out


class CompactTokenEmbedding(torch.nn.Module):
    """Training stand-in for the text token table: only the rows of tokens that occur.

    The 49,408 × width table dominates the parameter count, but the world's captions use a
    few hundred tokens. Optimising only those rows gives the same updates (rows of tokens
    that never occur get no gradient, and embeddings get no weight decay) for a fraction of
    the optimiser's time. :meth:`write_back` copies the trained rows into the full table.
    """

    def __init__(self, full: torch.nn.Embedding, used_ids: torch.Tensor) -> None:
        super().__init__()
        used = torch.unique(used_ids)
        remap = torch.zeros(full.num_embeddings, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        self.register_buffer("used", used, persistent=False)
        self.register_buffer("remap", remap, persistent=False)
        self.weight = torch.nn.Parameter(full.weight.detach()[used].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[ids], self.weight)

    @torch.no_grad()
    def write_back(self, full: torch.nn.Embedding) -> torch.nn.Embedding:
        full.weight[self.used] = self.weight.detach()
        return full


def clip_loss_with_duplicates(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                              positives: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with several positives per row (soft targets).

    ``positives[i, j]`` is 1 when text ``j`` describes image ``i``: at least the diagonal and
    every duplicate caption; here every caption that is true of the image (the same class,
    the same background kind, ...). Image→text targets spread evenly over a row's positives,
    text→image targets over a column's.
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale * image_emb @ text_emb.t()
    positives = positives.float()
    t_img = positives / positives.sum(dim=1, keepdim=True)
    t_txt = positives.t() / positives.t().sum(dim=1, keepdim=True)
    loss_i = -(t_img * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(t_txt * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


class ClsMlpShare(HookSet):
    """Measures how much of the CLS token's final residual the MLPs wrote (a training penalty).

    In large CLIP ViTs the image embedding is written almost entirely by the attention heads
    of the last layers: mean-ablating the direct effect of every MLP barely changes accuracy
    (Gandelsman et al., 2024, Sec. 3), which is what makes the paper's per-head direct
    effects (Eq. 4) a complete account of a prediction. A 6-layer model trained from scratch
    does not have that property by itself: its last MLPs write a large share of the
    embedding. After a forward pass inside this context, :meth:`penalty` is
    ``mean_b Σ_l ‖mlp_l(x_b)[CLS]‖² / ‖r_b‖²`` with ``r_b`` the CLS residual entering
    ``ln_post``; the ratio is scale-free, so it cannot be lowered by shrinking everything.
    """

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self._mlp: list[torch.Tensor] = []
        self._final: torch.Tensor | None = None
        for layer in range(len(visual.transformer.resblocks)):
            self.forward(hook_modules(visual, layer)[f"blocks.{layer}.mlp_out"],
                         lambda _m, _i, out: self._mlp.append(out[:, 0]))
        self.forward_pre(hook_modules(visual)["ln_post.in"], self._keep_final)

    def _keep_final(self, _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._final = inputs[0][:, 0]

    def penalty(self) -> torch.Tensor:
        if self._final is None or not self._mlp:
            raise RuntimeError("ClsMlpShare.penalty() needs a forward pass of the image tower first")
        mlp = torch.stack(self._mlp).pow(2).sum(-1).sum(0)          # (B,)
        out = (mlp / self._final.pow(2).sum(-1).clamp_min(1e-6)).mean()
        self._mlp.clear()
        self._final = None
        return out


# ----------------------------------------------------------------------------------------------
# Zero-shot evaluation


@torch.no_grad()
def class_text_embeddings(model: torch.nn.Module, tokenizer: Callable, classes: Sequence[str] = CLASSES,
                          templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """L2-normalised class embeddings, averaged over ``templates`` (classes × embed_dim)."""
    rows = []
    for c in classes:
        emb = F.normalize(model.encode_text(tokenizer([fill_template(t, c) for t in templates])).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_metrics(model: torch.nn.Module, tokenizer: Callable, images: torch.Tensor,
                      samples: Sequence[WorldSample], batch_size: int = 256,
                      target_groups: Sequence[str] = TARGET_GROUPS, classes: Sequence[str] = CLASSES,
                      target_classes: Sequence[str] = TARGET_CLASSES) -> dict[str, Any]:
    """Zero-shot accuracy over all ``classes`` (normalised image/text embeddings).

    ``images`` are the preprocessed images of ``samples``; ``target_groups`` the world's four
    target groups (``WorldConfig.target_groups``); ``classes``/``target_classes`` the world's
    (default: the bird world's). Returns per-class and per-group
    accuracies, the four target groups (``groups``), ``avg_group`` (mean of the four),
    ``worst_group``, ``target_mean`` (over all target images), ``unrelated`` (over all
    unrelated images) and ``overall``.
    """
    model.eval()
    classes = list(classes)
    text = class_text_embeddings(model, tokenizer, classes)
    feats = torch.cat([F.normalize(model.encode_image(images[i:i + batch_size]).float(), dim=-1)
                       for i in range(0, len(images), batch_size)])
    pred = (feats @ text.t()).argmax(1).numpy()
    labels = np.array([classes.index(s.label) for s in samples])
    correct = pred == labels
    groups = np.array([s.group for s in samples])
    is_target = np.array([s.label in target_classes for s in samples])
    per_group = {g: float(correct[groups == g].mean()) for g in target_groups if (groups == g).any()}
    per_class = {c: float(correct[labels == i].mean()) for i, c in enumerate(classes) if (labels == i).any()}
    confusion = {c: {classes[j]: int(((labels == i) & (pred == j)).sum()) for j in range(len(classes))
                     if ((labels == i) & (pred == j)).any()} for c in target_classes for i in [classes.index(c)]}
    return {
        "groups": per_group,
        "avg_group": float(np.mean(list(per_group.values()))) if per_group else float("nan"),
        "worst_group": float(min(per_group.values())) if per_group else float("nan"),
        "target_mean": float(correct[is_target].mean()) if is_target.any() else float("nan"),
        "unrelated": float(correct[~is_target].mean()) if (~is_target).any() else float("nan"),
        "overall": float(correct.mean()),
        "per_class": per_class,
        "target_confusion": confusion,
        "n_images": int(len(samples)),
    }


def format_metrics(m: dict[str, Any]) -> str:
    g = " / ".join(f"{v:.3f}" for v in m["groups"].values())
    return (f"groups {g} | avg-group {m['avg_group']:.3f} worst {m['worst_group']:.3f} "
            f"target {m['target_mean']:.3f} | unrelated {m['unrelated']:.3f}")


# ----------------------------------------------------------------------------------------------
# Training


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name or "bn" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _log(msg: str) -> None:
    print(msg, flush=True)


def train(out_dir: str | Path, cfg: TrainConfig, command: str = "", log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train the demo model, write the three artifacts into ``out_dir``; returns the metadata."""
    import open_clip
    from safetensors.torch import save_file

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 42])
    world = cfg.world
    model_name = cfg.model_name or world.model_name

    config_path = out / f"{model_name}.json"
    config_path.write_text(json.dumps(cfg.model_config, indent=2) + "\n", encoding="utf-8")
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    size = int(model.visual.image_size[0])
    sigmoid = uses_sigmoid_loss(model)
    share_hooks = ClsMlpShare if hasattr(model.visual, "transformer") else MapMlpShare
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {model_name}: {n_params / 1e6:.2f} M parameters")
    metrics_kw = {"target_groups": world.target_groups, "classes": world.classes,
                  "target_classes": world.target_classes}

    t0 = time.time()
    pool = world.training_pool(cfg.seed, cfg.pool_per_group, cfg.pool_unrelated)
    pool_u8 = images_to_uint8([s.image for s in pool], size)
    caps = CaptionPool.build(pool, tokenizer, cfg.caption_weights, world.caption_families)
    val = world.sample("val", cfg.seed, cfg.val_per_group)
    val_x = images_to_tensor([s.image for s in val], mean, std, size)
    n_groups = dict(sorted(Counter(s.group for s in pool if s.label in world.target_classes).items()))
    log(f"train pool: {len(pool)} images ({n_groups}), {len(caps.texts)} distinct captions, "
        f"{time.time() - t0:.1f}s")

    full_table = model.token_embedding
    prompts = tokenizer([fill_template(t, c) for c in world.classes for t in ZERO_SHOT_TEMPLATES])
    model.token_embedding = CompactTokenEmbedding(full_table, torch.cat([caps.tokens.flatten(), prompts.flatten()]))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=cfg.warmup_frac,
        anneal_strategy="cos", cycle_momentum=False, div_factor=25.0, final_div_factor=1e3)
    curve: list[dict[str, Any]] = []
    t_train = time.time()
    running = running_share = 0.0
    for step in range(1, cfg.steps + 1):
        model.train()
        rows = rng.choice(len(pool), size=cfg.batch_size, replace=False)
        cap_ids = caps.draw(rows, rng)
        images = normalise(pool_u8[torch.from_numpy(rows)], mean, std)
        unique_ids, inverse = np.unique(cap_ids, return_inverse=True)
        with share_hooks(model.visual) if cfg.cls_mlp_penalty > 0 else contextlib.nullcontext() as share:
            img_emb = model.encode_image(images)
        txt_emb = model.encode_text(caps.tokens[torch.from_numpy(unique_ids)])[torch.from_numpy(inverse)]
        scale = model.logit_scale.exp().clamp(max=100.0)
        if sigmoid:
            loss = sigmoid_loss_with_duplicates(img_emb, txt_emb, scale, model.logit_bias, caps.positives(rows, cap_ids))
        else:
            loss = clip_loss_with_duplicates(img_emb, txt_emb, scale, caps.positives(rows, cap_ids))
        if cfg.cls_mlp_penalty > 0:
            mlp_share = share.penalty()
            running_share += mlp_share.item()
            loss = loss + cfg.cls_mlp_penalty * mlp_share
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        running += loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            n = cfg.eval_every if step % cfg.eval_every == 0 else step % cfg.eval_every
            m = zero_shot_metrics(model, tokenizer, val_x, val, **metrics_kw)
            point = {"step": step, "loss": running / n, "cls_mlp_share": running_share / n,
                     "elapsed_s": round(time.time() - t_train, 1),
                     "val": {k: m[k] for k in ("groups", "avg_group", "worst_group", "target_mean", "unrelated")}}
            curve.append(point)
            log(f"step {step}/{cfg.steps} loss {running / n:.3f} mlp share {running_share / n:.3f} "
                f"({point['elapsed_s']}s) val: {format_metrics(m)}")
            running = running_share = 0.0
    train_s = time.time() - t_train
    model.token_embedding = model.token_embedding.write_back(full_table)

    # save in float16 (keeps the 49,408-token text table small), then evaluate what was saved
    ckpt = out / f"{model_name}.safetensors"
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(ckpt), metadata={"format": "pt", "model_name": model_name})
    open_clip.add_model_config(config_path)
    loaded, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(ckpt))
    test_seed = cfg.seed + cfg.test_seed_offset
    test = world.sample("test", test_seed, cfg.test_per_group)
    test_x = torch.stack([preprocess(s.image) for s in test])
    metrics = zero_shot_metrics(loaded, tokenizer, test_x, test, **metrics_kw)
    log(f"test (saved checkpoint, seed {test_seed}, {len(test)} images): {format_metrics(metrics)}")

    meta = {
        "model_name": model_name,
        "command": command,
        "seed": cfg.seed,
        "train_config": cfg.to_dict(),
        "data": {
            "train_pool_images": len(pool),
            "train_pool_groups": n_groups,
            "train_pool_unrelated_per_class": cfg.pool_unrelated,
            "distinct_captions": len(caps.texts),
            "classes": list(world.classes),
            "target_classes": list(world.target_classes),
            "unrelated_classes": list(world.unrelated_classes),
        },
        "parameters": n_params,
        "checkpoint_dtype": "float16",
        "checkpoint_bytes": ckpt.stat().st_size,
        "zero_shot_templates": list(ZERO_SHOT_TEMPLATES),
        "test": {"split": "test", "seed": test_seed, "per_group": cfg.test_per_group, "metrics": metrics},
        "learning_curve": curve,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "environment": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                        "python": platform.python_version(), "threads": cfg.threads},
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {config_path}, {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB), {out / 'metadata.json'}; "
        f"wall {meta['wall_seconds']}s")
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refineclip_core.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (e.g. assets/demo)")
    p.add_argument("--world", choices=["birds", "digits"], default="birds",
                   help="birds: the demo model's procedural world (default); digits: scikit-learn's handwritten "
                        "digits on coloured backgrounds (refineclip_core/demo/digits.py; its own recipe, "
                        "digits_train_config)")
    p.add_argument("--recipe", choices=["clip", "siglip"], default="clip",
                   help="clip: the CLIP-shaped demo model (default); siglip: the SigLIP-shaped one (timm ViT trunk, "
                        "map pooling, sigmoid loss; refineclip_core/demo/siglip.py, siglip_train_config), bird world only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="optimisation steps (default 2000, digits 1500, --recipe siglip 700; 3 with --quick)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bias", type=float, default=None, help="training background bias (default 0.95)")
    p.add_argument("--neutral-frac", type=float, default=None,
                   help="fraction of training birds on neutral backgrounds (default 0.2)")
    p.add_argument("--bird-scale", type=float, default=None, help="size of the birds (default 1.15)")
    p.add_argument("--caption-weights", default=None,
                   help="family=weight,... (families: class_background, class, background, attributes, detail)")
    p.add_argument("--cls-mlp-penalty", type=float, default=None,
                   help="weight of the penalty on the MLPs' share of the CLS embedding (default 1; 0 = plain CLIP)")
    p.add_argument("--detail-scale", type=float, default=None, help="size of the bill/legs cue (default 1.5)")
    p.add_argument("--cue", choices=["background", "color"], default=None,
                   help="the shortcut planted in the training split (default background; color: body colour)")
    p.add_argument("--pool-per-group", type=int, default=None, help="train pool: 2×N images per bird class")
    p.add_argument("--pool-unrelated", type=int, default=None, help="train pool: images per unrelated class")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--test-per-group", type=int, default=None)
    p.add_argument("--model-config", default=None, help="open_clip config JSON replacing the default architecture")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if getattr(args, "world", "birds") == "digits":
        if getattr(args, "recipe", "clip") != "clip":
            raise SystemExit("--recipe siglip trains on the bird world only, not on --world digits")
        return _digits_config_from_args(args)
    world_kw: dict[str, Any] = {}
    if args.bias is not None:
        world_kw["bias"] = args.bias
    if args.neutral_frac is not None:
        world_kw["neutral_frac"] = args.neutral_frac
    if args.bird_scale is not None:
        world_kw["bird_scale"] = args.bird_scale
    if args.detail_scale is not None:
        world_kw["detail_scale"] = args.detail_scale
    if args.cue is not None:
        world_kw["cue"] = args.cue
    recipe = siglip_train_config() if getattr(args, "recipe", "clip") == "siglip" else TrainConfig()
    cfg = dataclasses.replace(recipe, seed=args.seed, lr=args.lr, threads=args.threads, world=WorldConfig(**world_kw))
    return _common_args(cfg, args, CAPTION_FAMILIES)


def _common_args(cfg: TrainConfig, args: argparse.Namespace, caption_families) -> TrainConfig:
    """What --quick, the step/size overrides, --caption-weights and --model-config do to either world's recipe."""
    if args.quick:
        cfg.steps, cfg.batch_size, cfg.pool_per_group, cfg.pool_unrelated = 3, 16, 8, 4
        cfg.eval_every, cfg.val_per_group, cfg.test_per_group = 1000, 2, 3
        if getattr(args, "recipe", "clip") == "clip":  # the SigLIP-shaped model is already small
            cfg.model_config = default_model_config(quick=True)
    for name in ("steps", "batch_size", "pool_per_group", "pool_unrelated", "eval_every", "test_per_group",
                 "cls_mlp_penalty"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.caption_weights:
        cfg.caption_weights = _caption_weights(args.caption_weights, caption_families)
    if args.model_config:
        cfg.model_config = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    return cfg


def _digits_config_from_args(args: argparse.Namespace) -> TrainConfig:
    bird_only = [flag for flag, name in (("--bird-scale", "bird_scale"), ("--detail-scale", "detail_scale"),
                                         ("--cue", "cue")) if getattr(args, name) is not None]
    if bird_only:
        raise SystemExit(f"{bird_only[0]} applies to the bird world only, not to --world digits")
    cfg = digits_train_config(seed=args.seed, threads=args.threads)
    cfg.lr = args.lr
    world_kw = {k: getattr(args, k) for k in ("bias", "neutral_frac") if getattr(args, k) is not None}
    if world_kw:
        cfg.world = dataclasses.replace(cfg.world, **world_kw)
    return _common_args(cfg, args, cfg.world.caption_family_names)


def _caption_weights(spec: str, families: Sequence[str]) -> dict[str, float]:
    weights = {}
    for item in spec.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in families:
            raise SystemExit(f"unknown caption family {name!r}; families: {', '.join(families)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SystemExit(f"caption weight for {name!r} must be a number, got {value!r}") from None
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    command = "python -m refineclip_core.demo.train " + " ".join(shlex.quote(a) for a in argv)
    train(args.out, cfg, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
