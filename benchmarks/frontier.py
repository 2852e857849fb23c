"""The labelled frontier: how far a linear change of the embedding can go when every label is known.

Issue 27 asks the edit (with the diagnosed concept removed) for three things at once: a worst-group gain at
least LTC's, the other classes within 1 point, and no group of the edited classes losing more than 5 points on
average. The concept removal and LTC both meet the first and miss the last. This module asks whether *any*
linear change of the image embedding meets both on the same draws, by measuring a reference that is given
far more than the edit: a linear probe over the edited classes trained on **every adaptation image with its
class and group label** (the edit sees 10 labels per class and no group), group-balanced as in deep feature
reweighting (DFR, Kirichenko et al. 2023: each group of the edited classes weighs the same; or halfway to the
plain loss), with an L2 penalty and a bias. A change of ``visual.proj`` (``P' = P·B``) changes the edited
classes' logits linearly in the embedding (plus a constant offset through ``ln_post``'s bias, before the
normalisation); the probe is the same kind of decision, linear on the normalised embedding with a bias, up
to how that bias scales with the embedding's norm. So the probe's trade between the minority and the
majority groups shows what such an edit reaches *with this much labelled information* — one family of
probes, not a proof for every map — and it is a reference, not a method: a user has no group labels.

The probe has two knobs: a weak penalty (large C) follows the weighted loss and raises the minority groups
at the majority groups' cost, a strong one stays near zero-shot; the group weights decide how much the
minority groups count. Every probe of :data:`PROBES` is run on every draw, and the benchmark reports each
one's mean change per group over the draws (the frontier is then read off with hindsight, on the test
images themselves: generous to the probe), on the same draws as LTC's and the concept removal's rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PROBES = tuple((gamma, c) for gamma in (1.0, 0.5) for c in (3e1, 1e2, 3e2, 1e3, 3e3, 1e4))
"""The labelled probes, ``(γ, C)``: group weights ``n_g^−γ`` (1: every group weighs the same, as DFR; 0.5: halfway
to the plain loss) and L2 penalty ``‖W‖² / (2C)`` (from near zero-shot to nearly unpenalised)."""


def probe_key(gamma: float, c: float) -> str:
    """The metrics key of the labelled probe with group-weight exponent ``gamma`` and penalty ``c``."""
    return f"probe:γ={gamma:g},C={c:g}"


def group_balanced_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, c: float,
                         gamma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression ``softmax(X Wᵀ + b)`` over ``n_classes`` classes (``y`` in
    0..n_classes−1), each row weighted by ``n_g^−gamma`` for its group's size ``n_g`` (``gamma`` 1: every group
    weighs the same), penalty ``‖W‖² / (2c)``; fitted to convergence by L-BFGS in float64. Returns
    ``(W (k, d), b (k,))``."""
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    w = np.zeros(len(y))
    for g in np.unique(groups):
        w[groups == g] = float((groups == g).sum()) ** -gamma
    wt = torch.as_tensor(w / w.sum())
    W = torch.zeros((n_classes, X.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.cross_entropy(Xt @ W.T + b, yt, reduction="none")
        loss = (wt * nll).sum() + (W * W).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def probe_predictions(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray, base_predictions: np.ndarray,
                      train_rows: np.ndarray, classes: Sequence[int],
                      probes: Sequence[tuple[float, float]] = PROBES) -> dict[str, np.ndarray]:
    """Predictions of every row under each labelled probe ``(γ, C)`` of ``probes``: trained on the
    ``train_rows`` labelled with one of ``classes`` (their class and group labels), it re-decides among
    ``classes`` the rows zero-shot (``base_predictions``) puts in one of them; every other row keeps its
    zero-shot prediction, as the edit keeps the other classes."""
    K = np.asarray(list(classes))
    E = np.asarray(embeddings, dtype=np.float64)
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    train = np.asarray(train_rows)[np.isin(labels[train_rows], K)]
    index = {int(k): i for i, k in enumerate(K)}
    y = np.array([index[int(v)] for v in labels[train]], dtype=np.int64)
    inside = np.isin(base_predictions, K)
    out = {}
    for gamma, c in probes:
        W, b = group_balanced_probe(E[train], y, groups[train], len(K), c, gamma)
        pred = base_predictions.copy()
        pred[inside] = K[(E[inside] @ W.T + b).argmax(1)]
        out[probe_key(gamma, c)] = pred
    return out
