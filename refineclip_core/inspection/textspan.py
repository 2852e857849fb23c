"""Text descriptions of attention heads, TextSpan style (Gandelsman et al., 2024): two algorithms.

``method="released"``: TextSpan as released (:mod:`.textspan_released`: texts projected onto the head's top-80
singular directions, picked by the unnormalised remaining text vector, no centring of the pool).
``method="centred"``: our variant, described below (the pool mean-centred, texts scored along their unit
direction). :data:`DEFAULT_SPAN` is the one that measured better (docs/DIAGNOSIS.md, "Which TextSpan").

The paper (§4, Appendix A.1, Table 5) describes the heads its scores select with the top-5
texts TextSpan finds for them. Our variant. For one head, the data are its direct contributions
``c[l, h]`` (paper Eq. 4, ``P h^{l,h}``) over a set of images, ``C`` of shape ``(N, d)``, and a
pool of ``M`` L2-normalised text embeddings ``T`` of shape ``(M, d)``. Both are mean-centred
(``C`` over the images, ``T`` over the pool). Then, ``k`` times:

1. for every remaining text ``t_j`` take its direction ``u_j = t_j / ||t_j||`` and the variance
   of the head's outputs along it, ``||C u_j||^2 / N``;
2. pick the text whose direction explains the most variance;
3. project that direction out of the head's outputs and out of every remaining text
   (``X <- X (I - u u^T)``), so the next pick explains what the previous ones did not.

The chosen directions are orthonormal, so the fractions of variance they explain add up:
after ``s`` picks their sum is the share of the head's variance inside the span of those
``s`` texts.

Implementation (vectorised, no per-text loop). Projecting ``u`` out of ``C`` does not change
``C t'`` for any text ``t'`` already orthogonal to ``u`` (``C (I - u u^T) t' = C t'``), so the
score of a remaining text only needs the current residual texts ``T'`` and either ``C`` itself
(``C T'^T``, ``N x M``, when ``N`` is small) or the scatter matrix ``S = C^T C``
(``t'^T S t'``, via ``G = T' S``, ``M x d``, when ``N`` is large). Both are updated by
rank-one corrections after each pick, so ``k`` steps cost one large matrix product plus
``O(k . M . d)``: about 0.7 s for ``N = 10000, M = 5000, d = 1024`` in float32 on two CPU cores.

Many images. The description depends on the images only through the mean and covariance of the
head's outputs, so a uniform random sample of the images estimates it; past
:data:`MAX_IMAGES` images :func:`describe_heads` describes a seeded random sample of that size
(reading one head's outputs for 50,000 images from a ViT-L/14 cache on disk took most of the Head
inspector's time) and records the sample size and the number it was drawn from on the
:class:`HeadDescription`. ``max_images=None`` describes every image.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, RefineClipError
from ..features.decomposition import HeadId
from ..home import asset

#: A text whose residual norm falls below this fraction of its centred norm is considered
#: already spanned by the chosen directions and is not picked again (its direction would be
#: rounding noise).
MIN_RESIDUAL = 1e-3

#: The text pool shipped with the project (``python -m refineclip_core.demo.text_pool`` writes it).
DEFAULT_TEXT_POOL = asset("text_pool.txt")

#: Relative threshold under which a head's total variance counts as zero.
ZERO_VARIANCE_RTOL = 1e-12

#: The greedy search stops once the chosen texts explain all but this fraction of the head's
#: variance: further picks would explain only rounding noise and their order would be arbitrary.
RESIDUAL_STOP = 1e-9

#: The head-description algorithms (module docstring) and the default one.
SPAN_METHODS = ("released", "centred")
DEFAULT_SPAN = "centred"

#: Most images :func:`describe_heads` reads for one head by default; beyond it a seeded random sample
#: of this many (the covariance of 10,000 images pins the top texts down: ``tests/test_textspan.py``).
MAX_IMAGES = 10_000


@dataclass
class HeadDescription:
    """The TextSpan description of one head.

    Attributes:
        head: which head (absolute layer index).
        texts: the chosen texts, in the order they were picked (at most ``k``; fewer when the
            pool runs out of directions or the texts already explain all the variance, none
            when the head's outputs do not vary).
        variance_explained: per text, the fraction of the head's total variance explained by
            the text's direction after projecting out the previous texts. Non-negative, and
            the running sum (:attr:`cumulative`) is at most 1.
        total_variance: ``sum_i ||c_i - mean(c)||^2 / N``: the trace of the covariance of the
            head's outputs over the images (0 for a constant head).
        indices: position of each chosen text in the pool.
        n_images: how many images the description was computed over.
        sampled_from: when those were a random sample (:data:`MAX_IMAGES`), how many images they were
            drawn from; ``None`` when every image was used.
        method: which algorithm chose the texts (:data:`SPAN_METHODS`).
    """

    head: HeadId
    texts: list[str]
    variance_explained: list[float]
    total_variance: float
    indices: list[int] = field(default_factory=list)
    n_images: int = 0
    sampled_from: int | None = None
    method: str = DEFAULT_SPAN

    @property
    def cumulative(self) -> list[float]:
        """Running sum of :attr:`variance_explained`: the share of the head's variance in the
        span of the first ``s`` texts."""
        return [float(x) for x in np.cumsum(self.variance_explained)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.as_list(),
            "texts": list(self.texts),
            "indices": list(self.indices),
            "variance_explained": list(self.variance_explained),
            "cumulative": self.cumulative,
            "total_variance": self.total_variance,
            "n_images": self.n_images,
            "sampled_from": self.sampled_from,
            "method": self.method,
        }


@dataclass(frozen=True)
class _Pool:
    """A text pool prepared once for many heads: mean-centred embeddings and their norms."""

    centred: np.ndarray   # (M, d)
    norms_sq: np.ndarray  # (M,) squared norms of the centred embeddings


def _prepare_pool(pool_emb: np.ndarray, n_texts: int | None = None, dtype: np.dtype | None = None) -> _Pool:
    emb = np.asarray(pool_emb)
    if emb.ndim != 2:
        raise RefineClipError(f"The text pool embeddings must be a (texts, dim) array; got shape {emb.shape}.")
    if n_texts is not None and emb.shape[0] != n_texts:
        raise RefineClipError(
            f"The text pool has {n_texts} texts but {emb.shape[0]} embeddings; embed the same list you pass."
        )
    if emb.shape[0] < 2:
        raise RefineClipError(
            "The text pool needs at least 2 texts: TextSpan mean-centres the pool, which leaves a single text empty."
        )
    if not np.all(np.isfinite(emb)):
        raise RefineClipError("The text pool embeddings contain NaN or infinite values; re-embed the pool.")
    dtype = dtype or np.result_type(emb.dtype, np.float32)
    centred = emb.astype(dtype, copy=True)
    centred -= centred.mean(axis=0, keepdims=True)
    return _Pool(centred=centred, norms_sq=np.einsum("md,md->m", centred, centred))


def _sum_of_squares(A: np.ndarray, block: int = 8192) -> float:
    """``Σ_i ||a_i||²`` with each row's in float64, a block of rows at a time (no float64 copy of ``A``)."""
    return float(sum(np.einsum("nd,nd->n", A[i:i + block], A[i:i + block], dtype=np.float64).sum()
                     for i in range(0, len(A), block)))


def greedy_text_span(head_outputs: np.ndarray, pool: _Pool | np.ndarray, k: int = 5,
                     method: str = "auto") -> tuple[list[int], list[float], float]:
    """The TextSpan greedy selection for one head (see the module docstring).

    Args:
        head_outputs: ``(N, d)`` direct contributions of one head over ``N`` images.
        pool: ``(M, d)`` normalised text embeddings (or a prepared pool).
        k: how many texts to pick.
        method: ``"auto"`` (the cheaper of the two), ``"scatter"`` (``S = C^T C``) or
            ``"direct"`` (``C T'^T``); both give the same picks up to rounding.

    Returns:
        ``(indices, explained, total)``: pool indices in pick order, the variance each pick
        explains (absolute, ``||C u||^2 / N``), and the head's total variance. Fewer than ``k``
        indices when the pool has fewer independent directions or the picks already explain
        all of the head's variance (:data:`RESIDUAL_STOP`); none when ``total`` is 0.
    """
    if k < 1:
        raise RefineClipError(f"Ask for at least one text per head (k >= 1), got k={k}.")
    X = np.asarray(head_outputs)
    if X.ndim != 2:
        raise RefineClipError(f"A head's outputs must be an (images, dim) array; got shape {X.shape}.")
    if not isinstance(pool, _Pool):
        pool = _prepare_pool(pool)
    dtype = pool.centred.dtype
    M, d = pool.centred.shape
    N = X.shape[0]
    if X.shape[1] != d:
        raise RefineClipError(
            f"The head outputs have dimension {X.shape[1]} but the text pool has {d}; embed the pool with the same model."
        )
    if N == 0:
        raise RefineClipError("A head description needs at least one image; the image set is empty.")
    if not np.all(np.isfinite(X)):
        raise RefineClipError("The head outputs contain NaN or infinite values; re-extract the feature cache.")

    C = X.astype(dtype, copy=True)
    C -= C.mean(axis=0, keepdims=True)
    total = _sum_of_squares(C)
    scale = _sum_of_squares(X)
    if total == 0.0 or total <= ZERO_VARIANCE_RTOL * scale:
        return [], [], 0.0                  # a constant head (or one image): nothing varies

    T = pool.centred.copy()                  # residual texts T'
    tn2 = pool.norms_sq.copy()
    alive = pool.norms_sq > 0
    # Scores need t'^T S t' for every residual text t'. Either keep P = C T'^T (N x M) or
    # G = T' S (M x d); take the cheaper one.
    if method not in ("auto", "scatter", "direct"):
        raise ValueError(f"method must be 'auto', 'scatter' or 'direct', got {method!r}")
    use_scatter = d * (N + M) < N * M if method == "auto" else method == "scatter"
    if use_scatter:
        S = C.T @ C                          # (d, d)
        G = T @ S                            # (M, d): row j is S t'_j (S is symmetric)
        numerators = np.einsum("md,md->m", T, G)
    else:
        P = C @ T.T                          # (N, M)
        numerators = np.einsum("nm,nm->m", P, P)

    indices: list[int] = []
    explained: list[float] = []
    explained_sum = 0.0
    for _ in range(min(k, M)):
        if total - explained_sum <= RESIDUAL_STOP * total:
            break
        alive &= tn2 > (MIN_RESIDUAL ** 2) * pool.norms_sq
        if not alive.any():
            break
        scores = np.full(M, -np.inf)
        scores[alive] = numerators[alive] / tn2[alive]
        j = int(np.argmax(scores))
        u = T[j] / np.sqrt(tn2[j])
        Cu = C @ u
        indices.append(j)
        var_u = float(np.dot(Cu.astype(np.float64), Cu.astype(np.float64)))
        explained_sum += var_u
        explained.append(var_u / N)
        a = T @ u                            # (M,) components of the residual texts along u
        T -= np.outer(a, u)                  # project u out of every text
        tn2 = np.einsum("md,md->m", T, T)
        if use_scatter:
            G -= np.outer(a, S @ u)          # S t'_new = S t' - a S u
            numerators = np.einsum("md,md->m", T, G)
        else:
            P -= np.outer(Cu, a)             # C t'_new = C t' - a C u
            numerators = np.einsum("nm,nm->m", P, P)
        alive[j] = False
    return indices, explained, total / N


def describe_head(head_outputs: np.ndarray, pool_texts: Sequence[str], pool_emb: np.ndarray | _Pool,
                  k: int = 5, head: HeadId | None = None, method: str = DEFAULT_SPAN,
                  raw_pool: np.ndarray | None = None) -> HeadDescription:
    """TextSpan description of one head from its outputs ``(N, d)`` over a set of images, by ``method``
    (:data:`SPAN_METHODS`; ``raw_pool``: the pool's embeddings as given, when ``pool_emb`` is prepared)."""
    if method not in SPAN_METHODS:
        raise RefineClipError(f"Unknown head-description method {method!r}; use one of {', '.join(SPAN_METHODS)}.")
    if method == "released":
        from .textspan_released import released_text_span

        if raw_pool is None and isinstance(pool_emb, _Pool):
            raise RefineClipError("The released TextSpan reads the pool as embedded (not centred); pass raw_pool.")
        raw = np.asarray(pool_emb if raw_pool is None else raw_pool)
        if raw.shape[0] != len(pool_texts):
            raise RefineClipError(f"The text pool has {len(pool_texts)} texts but {raw.shape[0]} embeddings; "
                                  "embed the same list.")
        indices, explained, total = released_text_span(head_outputs, raw, k)
        return HeadDescription(head=head if head is not None else HeadId(-1, -1), texts=[pool_texts[i] for i in indices],
                               variance_explained=[e / total for e in explained] if total > 0 else [],
                               total_variance=float(total), indices=indices, n_images=int(len(head_outputs)),
                               method=method)
    if not isinstance(pool_emb, _Pool):
        pool_emb = _prepare_pool(pool_emb, n_texts=len(pool_texts))
    elif pool_emb.centred.shape[0] != len(pool_texts):
        raise RefineClipError(
            f"The text pool has {len(pool_texts)} texts but {pool_emb.centred.shape[0]} embeddings; embed the same list."
        )
    indices, explained, total = greedy_text_span(head_outputs, pool_emb, k)
    fractions = [e / total for e in explained] if total > 0 else []
    return HeadDescription(
        head=head if head is not None else HeadId(-1, -1),
        texts=[pool_texts[i] for i in indices],
        variance_explained=fractions,
        total_variance=float(total),
        indices=indices,
        n_images=int(len(head_outputs)),
    )


def describe_heads(contributions: Any, head_ids: Sequence[HeadId], pool_texts: Sequence[str],
                   pool_emb: np.ndarray, k: int = 5, layers: Sequence[int] | None = None,
                   rows: np.ndarray | None = None, max_images: int | None = MAX_IMAGES,
                   seed: int = 0, method: str = DEFAULT_SPAN) -> list[HeadDescription]:
    """TextSpan descriptions of several heads from a feature cache's head contributions.

    Args:
        contributions: ``(N, L_s, H, d)`` per-head contributions (``FeatureCache.heads``),
            or a :class:`~refineclip_core.features.cache.FeatureCache` (its heads and layer scope are used).
        head_ids: the heads to describe (absolute layer indices, as in ``FeatureCache.head_ids()``).
        pool_texts, pool_emb: the text pool and its normalised embeddings ``(M, d)``.
        k: texts per head (paper Table 5: 5).
        layers: absolute layer index of each entry of axis 1 (``FeatureCache.manifest.layers``).
            ``None`` means axis 1 starts at layer 0 (a cache of all layers).
        rows: optional image rows to use (e.g. a split); all rows by default.
        max_images: past this many rows, a random sample of this many (seeded by ``seed``, the same
            for every head) is described; ``None`` describes every row (module docstring).
        method: the algorithm (:data:`SPAN_METHODS`, default :data:`DEFAULT_SPAN`).
    """
    if hasattr(contributions, "manifest") and hasattr(contributions, "heads"):
        if layers is None:
            layers = list(contributions.manifest.layers)
        contributions = contributions.heads
    if getattr(contributions, "ndim", 0) != 4:
        raise RefineClipError("Expected per-head contributions of shape (images, layers, heads, dim); got "
                              f"{getattr(contributions, 'shape', None)}.")
    n_layers_in_cache, n_heads = contributions.shape[1], contributions.shape[2]
    layers = list(range(n_layers_in_cache)) if layers is None else [int(l) for l in layers]
    if len(layers) != n_layers_in_cache:
        raise RefineClipError(f"'layers' names {len(layers)} layers but the head array holds {n_layers_in_cache}.")
    position = {l: i for i, l in enumerate(layers)}
    pool = _prepare_pool(pool_emb, n_texts=len(pool_texts))
    n_all = contributions.shape[0]
    chosen = np.arange(n_all) if rows is None else np.asarray(rows)
    if chosen.dtype == bool:
        chosen = np.flatnonzero(chosen)
    sampled_from = None
    if max_images is not None and len(chosen) > max_images:
        sampled_from = len(chosen)
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, int(max_images), replace=False))
    whole = rows is None and sampled_from is None
    out = []
    for hid in head_ids:
        if hid.layer not in position:
            raise RefineClipError(
                f"Head {hid} is outside the cache's layer scope (layers {layers}); re-extract with more layers."
            )
        if not 0 <= hid.head < n_heads:
            raise RefineClipError(f"Head {hid} does not exist: layers have {n_heads} heads.")
        data = contributions[(slice(None) if whole else chosen), position[hid.layer], hid.head]
        desc = describe_head(np.asarray(data), pool_texts, pool, k=k, head=hid, method=method, raw_pool=pool_emb)
        desc.sampled_from = sampled_from
        out.append(desc)
    return out


# -- the text pool ---------------------------------------------------------------------------------

def load_text_pool(path: str | os.PathLike) -> list[str]:
    """One description per line; blank lines and lines starting with ``#`` are ignored,
    surrounding whitespace is stripped and exact duplicates are dropped (first one kept)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"Text pool '{path}' does not exist; give a text file with one description per line.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read text pool '{path}' ({exc}); give a UTF-8 text file with one description per line.") from exc
    seen: set[str] = set()
    texts: list[str] = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#") or text in seen:
            continue
        seen.add(text)
        texts.append(text)
    if len(texts) < 2:
        raise DataError(f"Text pool '{path}' has {len(texts)} usable lines; TextSpan needs at least 2 descriptions.")
    return texts


def pool_hash(texts: Sequence[str]) -> str:
    """A hash of the pool's texts in order (part of the embedding cache key)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def model_fingerprint(loaded: Any) -> str:
    """The model's fingerprint for caching text embeddings.

    ``ModelSpec.fingerprint()`` covers the architecture, checkpoint and precision; a model with
    random weights (no checkpoint, no pretrained tag) gets a digest of its text-tower weights on
    top, since two random models share a spec.
    """
    spec = loaded.spec.resolved()
    fp = loaded.spec.fingerprint()
    if spec.checkpoint or spec.pretrained:
        return fp
    h = hashlib.sha256(fp.encode())
    for name, tensor in sorted(loaded.model.state_dict().items()):
        if name.startswith("visual."):
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def text_pool_cache_file(loaded: Any, texts: Sequence[str], cache_path: str | os.PathLike) -> Path:
    """Where :func:`encode_text_pool` caches the embeddings of ``texts`` for ``loaded``."""
    return Path(cache_path) / f"textpool-{model_fingerprint(loaded)}-{pool_hash(texts)}.npy"


def encode_text_pool(loaded: Any, texts: Sequence[str], cache_path: str | os.PathLike | None = None) -> np.ndarray:
    """Normalised text embeddings ``(M, d)`` float32 of a pool, cached on disk when asked.

    ``cache_path`` is a folder; the file inside is keyed by the model fingerprint and a hash of
    the texts, written atomically, so a pool or model change never reads stale embeddings and
    an interrupted write never leaves a half file.
    """
    from ..files import atomic_write_bytes, npy_bytes
    from ..features.zeroshot import encode_texts

    texts = list(texts)
    if not texts:
        raise RefineClipError("The text pool is empty; give at least 2 descriptions.")
    target = text_pool_cache_file(loaded, texts, cache_path) if cache_path is not None else None
    if target is not None and target.exists():
        try:
            cached = np.load(target)
            if cached.shape[0] == len(texts) and cached.ndim == 2 and np.all(np.isfinite(cached)):
                return cached.astype(np.float32, copy=False)
        except (OSError, ValueError):
            pass  # unreadable: re-embed and overwrite
    emb = encode_texts(loaded, texts).numpy().astype(np.float32)
    if target is not None:
        atomic_write_bytes(target, npy_bytes(emb))
    return emb


def embedded_text_pool(loaded: Any, path: str | os.PathLike | None = None,
                       cache_path: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """A text pool (default: the shipped :data:`DEFAULT_TEXT_POOL`) and its embeddings by ``loaded``
    (:func:`encode_text_pool`), cached in ``cache_path`` (default: the home folder's ``text-pools``)."""
    from ..home import home_dir

    texts = load_text_pool(path or DEFAULT_TEXT_POOL)
    return texts, encode_text_pool(loaded, texts, cache_path or home_dir() / "text-pools")
