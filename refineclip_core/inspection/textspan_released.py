"""TextSpan as released (Gandelsman et al., ICLR 2024; yossigandelsman/clip_text_span,
``compute_complete_text_set.py``, ``replace_with_iterative_removal``): read, then written anew here.

For one head with outputs ``X`` ``(N, d)`` over the images (not centred) and the pool's normalised text
embeddings ``T`` ``(M, d)`` (not centred either):

1. the texts are projected onto the span of the top ``rank`` (80) right singular vectors of ``X``, the
   subspace the head writes to: ``T ← T Vᵀ V``;
2. the outputs are centred over the images, ``C = X − mean(X)``;
3. ``k`` times: pick the text ``t`` whose *unnormalised* remaining vector gives the outputs the largest
   spread, ``argmax_j std(C t_j)``, so a text that keeps more of its norm in the head's subspace is
   preferred; then remove ``t``'s direction from the outputs and from every text
   (``X ← X − (X t / t·t) tᵀ``).

The chosen directions are orthogonal, so the fractions of variance they explain (along each unit
direction) add up, as in :func:`~refineclip_core.inspection.textspan.greedy_text_span` (our variant: the
pool mean-centred, texts scored by the variance along their *unit* direction, no projection onto the head's
subspace). Where the head's outputs have rank ``r`` below ``rank``, the released code also keeps ``rank − r``
singular directions of zero singular value, which the SVD routine chooses arbitrarily in the null space;
here only the ``r`` determined ones are kept. The released loop keeps picking after the variance is
exhausted (an arbitrary text); here it stops. Scores use the scatter matrix ``S = CᵀC`` with rank-one
updates, as the variant does (``std(C t)² ∝ tᵀ S t`` because ``C`` is centred; deflating ``C`` along ``t``
leaves ``C t'`` unchanged for every remaining text ``t'`` already orthogonal to ``t``).
"""

from __future__ import annotations

import numpy as np

from ..errors import RefineClipError

#: The released code's ``--w_ov_rank``: how many singular directions of the head's outputs the texts are
#: projected onto.
RANK = 80

#: Singular values below this fraction of the largest (times the matrix size) count as zero.
SINGULAR_RTOL = np.finfo(np.float64).eps


def head_subspace(X: np.ndarray, rank: int = RANK) -> np.ndarray:
    """``(r, d)`` orthonormal rows: the top ``min(rank, r)`` right singular vectors of ``X`` with non-zero
    singular values (``r``: the rank of ``X``)."""
    _, s, vh = np.linalg.svd(np.asarray(X, dtype=np.float64), full_matrices=False)
    if not len(s) or s[0] == 0:
        return np.zeros((0, X.shape[1]))
    keep = s > s[0] * max(X.shape) * SINGULAR_RTOL
    return vh[:rank][keep[:rank]]


def released_text_span(head_outputs: np.ndarray, pool_emb: np.ndarray, k: int = 5, rank: int = RANK
                       ) -> tuple[list[int], list[float], float]:
    """The released TextSpan selection for one head (module docstring). Returns ``(indices, explained,
    total)`` like :func:`~refineclip_core.inspection.textspan.greedy_text_span`: pool indices in pick order,
    the variance each pick's unit direction explains (``||C u||² / N``) and the head's total variance."""
    if k < 1:
        raise RefineClipError(f"Ask for at least one text per head (k >= 1), got k={k}.")
    X = np.asarray(head_outputs, dtype=np.float64)
    T = np.asarray(pool_emb, dtype=np.float64)
    if X.ndim != 2 or T.ndim != 2 or X.shape[1] != T.shape[1]:
        raise RefineClipError(f"The head outputs {X.shape} and the text pool {T.shape} must be (n, d) and (m, d).")
    if len(X) == 0:
        raise RefineClipError("A head description needs at least one image; the image set is empty.")
    C = X - X.mean(0, keepdims=True)
    N = len(X)
    total = float(np.einsum("nd,nd->", C, C))
    if total <= 1e-12 * max(float(np.einsum("nd,nd->", X, X)), 1e-300):
        return [], [], 0.0
    V = head_subspace(X, rank)
    Tp = (T @ V.T) @ V                                   # texts in the head's subspace
    S = C.T @ C
    G = Tp @ S
    tn = np.einsum("md,md->m", Tp, Tp)
    scale = tn.max() if len(tn) else 0.0
    indices: list[int] = []
    explained: list[float] = []
    for _ in range(min(k, len(T))):
        score = np.einsum("md,md->m", Tp, G)
        score[tn <= 1e-12 * scale] = -np.inf              # nothing left of the text
        score[indices] = -np.inf
        j = int(np.argmax(score))
        if not np.isfinite(score[j]) or score[j] <= 1e-12 * total:
            break                                           # the head's variance is spanned
        t = Tp[j].copy()
        tt = float(t @ t)
        indices.append(j)
        explained.append(float(score[j]) / tt / N)
        a = Tp @ t / tt
        Tp -= np.outer(a, t)
        G -= np.outer(a, S @ t)
        tn = np.einsum("md,md->m", Tp, Tp)
    return indices, explained, total / N
