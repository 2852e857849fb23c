"""Head ablation on cached features (paper Eq. 5), fast enough for live toggles.

Zero ablation removes a head set ``S``: ``E_abl = E − Σ_{h∈S} c_h``; mean ablation replaces
each head by its mean ``m_h``: ``E_abl = E − Σ_{h∈S} (c_h − m_h)``. No forward pass is
needed. :class:`AblationEngine` projects every head on the class texts once (``c_h·t_y``,
``N·K·C`` values), so predictions for any set cost ``O(N·|S|·C)``; cosine similarities (for the
utility, Eq. 10) additionally use the per-image Gram matrix of the head parts.

At scale the engine holds only what toggles need: E ``(N, d)``, ``E·t`` ``(N, C)`` and the head
projections; the head contributions stay on disk. The first ablation makes one pass over them that
computes every head's projections and the mean-ablation features. When the projections of all heads
would exceed :data:`PROJECTION_BUDGET` bytes (many images × heads × classes), a head's are computed
for the rows asked about (the Ablate page's held-out rows) when it is first toggled (a read of its
contributions for those rows, a product with the texts), and the most recently used are kept.

A toggle does not re-sum the set: per row set the engine keeps the scores ``E·t − Σ_S c_h·t`` of the last
head set (a running score, :class:`~.projections.RunningScore`, counted in the same budget) and adds or
subtracts only the heads that changed, with a bound on its float32 rounding that decides which rows' argmax must be
confirmed in float64; predictions equal :meth:`AblationEngine.dots`' argmax whatever the path. Scores
are assembled a block of rows at a time, so a toggle never holds an ``(N, C)`` float64 array.

What is cached and the memory budget live in :mod:`.projections`; :mod:`.verification` checks the cached
arithmetic against the real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np

from ..features.decomposition import HeadId
from ..features.sharded import ShardedArray
from .evaluation import AccuracyReport, accuracy_report, rows_mask
from .projections import ALL, PROJECTION_BUDGET, U32, DerivedEngines, MeanFeatures, ProjectionStore, row_digest

Mode = Literal["mean", "zero"]
MODES: tuple[str, ...] = get_args(Mode)   # what the CLI and the pages offer (the default first)


@dataclass
class AblationResult:
    """Predictions after removing ``heads``, and what changed."""

    heads: list[HeadId]
    mode: str
    predictions: np.ndarray        # per cached row (-1 outside the mask when only its rows were predicted)
    report: AccuracyReport
    flipped: np.ndarray            # rows whose prediction changed
    fixed: np.ndarray              # rows that became correct
    broken: np.ndarray             # rows that became wrong


class AblationEngine:
    """Ablation arithmetic (Eq. 5: dot products, norms, predictions) over a cache's ``E`` ``(N, d)``,
    ``c`` ``(N, L_s, H, d)`` and texts.

    ``contributions`` (``FeatureCache.heads``) may be an in-memory array or the cache's on-disk
    :class:`ShardedArray`; it is never loaded whole. Everywhere else ``heads`` names a list of :class:`HeadId`.
    ``mean_rows`` (or an explicit ``mean``) defines the mean-ablation features ``m_h`` (default: the mean over
    every row), computed on first use. The roles are apart: this class does the arithmetic; what is cached and
    the memory budget are :attr:`store`'s (:class:`ProjectionStore`: arrays, projections, running scores, the
    Gram matrix), shared, never copied, with every engine derived by :meth:`with_mean_rows`; the engine's own
    ``m_h`` and what derives from them are its :class:`MeanFeatures`; the engines derived from it are kept by
    :class:`DerivedEngines`. Every field is set by :meth:`_set` (a derived engine is made by :meth:`_derive`).
    """

    def __init__(self, embeddings: np.ndarray, contributions: np.ndarray | ShardedArray, text: np.ndarray,
                 layers: Sequence[int], mean_rows: np.ndarray | None = None, mean: np.ndarray | None = None,
                 projection_budget: int = PROJECTION_BUDGET) -> None:
        store = ProjectionStore(embeddings, contributions, text, projection_budget)
        given = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(store.K, -1)
        self._set(store, tuple(layers), MeanFeatures(store, None if mean_rows is None else
                                                     np.asarray(mean_rows, dtype=np.int64),
                                                     None if given is None else (lambda: given)))

    def _set(self, store: ProjectionStore, layers: tuple[int, ...], means: MeanFeatures) -> None:
        """Every field of an engine, set here only: the shared store and the read-only views of it, its own mean
        features, and the engines derived from it (none yet)."""
        self.store = store
        self.layers = layers
        self.n_heads = store.H
        self.n_flat = store.K            # ``K = L_s · H``: the heads in scope, in flat order (:meth:`head_ids`)
        self.E, self.text, self.Et = store.E, store.text, store.Et
        self.base_predictions = store.base_predictions    # zero-shot predictions of every cached row
        # whether every head's head·text projections fit the budget (computed in one pass and kept);
        # otherwise the most recently used row sets' ones are kept
        self.projected = store.capacity >= store.K
        self.means = means
        self._derived = DerivedEngines()

    def _derive(self, means: MeanFeatures) -> "AblationEngine":
        """The explicit copy: an engine over the same store (shared, nothing recomputed) with ``means``."""
        other = AblationEngine.__new__(AblationEngine)
        other._set(self.store, self.layers, means)
        return other

    @property
    def m(self) -> np.ndarray:
        """``(K, d)`` mean-ablation features."""
        return self.means.m

    @property
    def mt(self) -> np.ndarray:
        """``m_h·t_y`` ``(K, C)``."""
        return self.means.mt

    def with_mean_rows(self, rows: np.ndarray) -> "AblationEngine":
        """The same engine (arrays shared, nothing recomputed but the means, and those once per row
        set) whose mean-ablation features ``m_h`` are the means over ``rows`` (e.g. the protocol's
        adaptation images)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._derived.get("mean", rows, lambda: self._derive(MeanFeatures(self.store, rows)))

    def subset(self, rows: np.ndarray) -> "AblationEngine":
        """An engine over ``rows`` only (their head contributions in memory; one per row set), with
        the same mean-ablation features (computed only if the subset uses them)."""
        rows = np.asarray(rows, dtype=np.int64)

        def make() -> AblationEngine:
            sub = AblationEngine(self.E[rows], np.asarray(self.store.c[rows]), self.text, self.layers)
            return sub._derive(MeanFeatures(sub.store, source=lambda: self.m))

        return self._derived.get("subset", rows, make)

    # -- per-image views (what the diagnosis and the baselines read) -----------------------------
    def contributions(self, rows: np.ndarray, heads: Sequence[HeadId] | None = None) -> np.ndarray:
        """``c_h`` (Eq. 4) of ``heads`` (default: every head in scope, flat order) for ``rows``:
        ``(n, |heads|, d)`` float32, read from the cache for these rows only."""
        rows = np.asarray(rows, dtype=np.int64)
        if heads is None:
            return np.asarray(self.store.c[rows], dtype=np.float32).reshape(len(rows), self.store.K, -1)
        return self.store.gather(rows, self.flat_index(heads), self.n_heads)

    def projections(self, rows: np.ndarray) -> np.ndarray:
        """``c_h·t_y`` of every head in scope for ``rows``: ``(n, K, C)`` float32 (the kept or lazily
        computed per-head projections, :meth:`ProjectionStore.projection`)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.stack([self.store.projection(k)[rows] for k in range(self.store.K)], axis=1)

    # -- indexing ------------------------------------------------------------------------
    def flat_index(self, heads: Sequence[HeadId]) -> np.ndarray:
        return np.array([self.layers.index(h.layer) * self.n_heads + h.head for h in heads], dtype=np.int64)

    def head_ids(self) -> list[HeadId]:
        return [HeadId(l, h) for l in self.layers for h in range(self.n_heads)]

    # -- dot products and norms ------------------------------------------------------------
    def dots(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``E_abl · t_y`` for every row and class ``(n, C)``."""
        return np.concatenate([d for _, d in self._dot_blocks(heads, mode, rows)], axis=0)

    def _dot_blocks(self, heads: Sequence[HeadId], mode: Mode, rows: np.ndarray | None, block: int = 4096,
                    dtype: type = np.float64):
        """``(positions, E_abl·t_y)`` over ``rows`` (all by default) a block of rows at a time: a toggle on
        50,000 images × 1000 classes never holds the whole ``(N, C)`` in float64. ``dtype=np.float32``
        computes the same sums in float32 (see :meth:`predict`). Every row of an engine over the projection
        budget streams: each block's projections are computed from the contributions and dropped, so a pass
        over every image (the findings, a refinement's evaluation) keeps nothing and evicts nothing."""
        idx = self.flat_index(heads)
        if len(idx) and mode == "mean":
            self.means.prepare()
        shift = self.mt[idx].sum(0)[None] if len(idx) and mode == "mean" else None
        n = len(self.E) if rows is None else len(rows)
        total = None
        # every row beyond the budget: each block's projections computed and dropped, nothing kept
        streamed = bool(len(idx)) and not self.projected and rows is None
        if len(idx) and not self.projected and rows is not None:   # a row set's, one head at a time, as predict()
            rows_arr = np.asarray(rows, dtype=np.int64)
            key = row_digest(rows_arr)
            for k in idx.tolist():
                part = self.store.projection(k, rows_arr, key)                   # the row set's, as predict() uses
                total = part.copy() if total is None else np.add(total, part, out=total)
        parts = [self.store.projection(k) for k in idx.tolist()] if total is None and not streamed else []
        for start in range(0, max(n, 1), block):
            r = slice(start, min(n, start + block)) if rows is None else np.asarray(rows)[start:start + block]
            if len(idx):
                if streamed:
                    removed = self.store.block_projections(r, idx)
                elif total is not None:
                    removed = total[start:start + block]
                else:
                    removed = parts[0][r].copy()                        # Σ_S c_h·t_y, heads in order (float32)
                    for part in parts[1:]:
                        removed += part[r]
                out = np.subtract(self.Et[r], removed, dtype=dtype)
                if shift is not None:
                    out += shift.astype(dtype, copy=False)
            else:
                out = self.Et[r].astype(dtype)
            yield np.arange(start, start + len(out)), out

    def norms(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``||E_abl||`` per row ``(n,)``."""
        g = self.store.gram
        idx = self.flat_index(heads)
        r = slice(None) if rows is None else rows
        n2 = g["EE"][r].copy()
        if len(idx):
            n2 += -2 * g["Ec"][r][:, idx].sum(1) + g["cc"][r][:, idx][:, :, idx].sum((1, 2))
            if mode == "mean":
                gm = self.means.gram
                n2 += (2 * gm["Em"][r][:, idx].sum(1) - 2 * gm["cm"][r][:, idx][:, :, idx].sum((1, 2))
                       + gm["mm"][np.ix_(idx, idx)].sum())
        return np.sqrt(np.maximum(n2, 0.0))

    def cosines(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``sim(E_abl, t_y)`` ``(n, C)``."""
        norms = self.norms(heads, mode, rows)
        return self.dots(heads, mode, rows) / np.maximum(norms, 1e-30)[:, None]

    def embeddings(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """The ablated embeddings themselves ``(n, d)`` (Eq. 5)."""
        idx = self.flat_index(heads)
        rows = self.store.rows_of(rows)
        out = self.E[rows].astype(np.float64)
        if len(idx):
            for start in range(0, len(rows), 4096):
                part = rows[start:start + 4096]
                out[start:start + len(part)] -= self.store.gather(part, idx, self.n_heads).sum(1)
            if mode == "mean":
                out = out + self.m[idx].sum(0)
        return out

    def predict(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None,
                block: int = 512) -> np.ndarray:
        """Predicted classes after ablation (the norm does not change the argmax) for ``rows`` (all by
        default): exactly the argmax of the float64 scores ``E·t − Σ_S c_h·t + Σ_S m_h·t`` (mean ablation)
        summed from the float32 ``E·t`` and projections, found in float32 and confirmed in float64 for the
        rows whose two best classes are closer than rounding could move them.

        The float32 scores come from a running score per row set (:class:`~.projections.RunningScore`): the scores of the
        last head set asked for over these rows, to which a toggle adds or from which it subtracts only the
        heads that changed (one pass over ``n·C`` values per changed head, instead of one per head in the set).
        Its error bound ``err`` grows with every update; when it would exceed 4× that of a fresh sum the scores
        are summed afresh. A row whose best float32 score leads every other by more than ``2·(err_s + e₆₄)``
        (``err_s``: ``err`` plus the rounding of the mean shift, ``e₆₄``: the float64 sum's rounding) has the
        same argmax as the float64 scores; the others are recomputed in float64. Each session takes the
        running score it updates out of the shared engine, so concurrent toggles never share one. Every row
        of an engine over the projection budget (the findings, a refinement's comparison) is predicted from
        :meth:`dots`' float64 scores a block at a time instead, keeping nothing (:meth:`_dot_blocks`)."""
        a = self.store
        idx = self.flat_index(heads)
        want = frozenset(idx.tolist())
        if len(want) < len(idx) or (rows is None and len(idx) and not self.projected):
            # a head named twice (removed twice), or every row beyond the budget: the float64 scores a block of
            # rows at a time, nothing kept (a refinement's or the findings' one pass over every image would
            # otherwise fill the budget with every row's projections and evict the toggles' held-out rows')
            return np.concatenate([d.argmax(1) for _, d in self._dot_blocks(heads, mode, rows)])
        rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        key = ALL if rows is None else row_digest(rows)
        if len(idx) and mode == "mean":
            self.means.prepare()
        shift = self.mt[idx].sum(0) if len(idx) and mode == "mean" else None     # float32, as dots() adds it
        run, pending = a.running_score(want, rows, key)
        n, C = run.scores.shape
        ct = sum(a.projection_max(k, key) for k in want)
        reach = a.Et_max + ct                                              # bound of |E·t − Σ_S c_h·t|
        mt = 0.0 if shift is None else float(np.abs(self.mt[idx]).max(1).sum())   # bound of |Σ_S m_h·t|
        e_shift = U32 * len(idx) * mt                                      # its float32 sum's rounding
        err = run.err if shift is None else run.err + e_shift + U32 * (reach + mt + run.err + e_shift)
        # dots() (the float64 scores) from the exact ones: a float32 sum of the projections, float64 after
        err_ref = U32 * (len(idx) + 1) * (ct + mt) + 4 * 2.0 ** -53 * (reach + mt)
        bound = 2 * (err + err_ref) * 1.001 + 1e-30
        top = np.empty(n, dtype=np.int64)
        unsure = []
        buf = np.empty((min(block, n), C), dtype=np.float32)
        for start in range(0, n, block):                                   # a block of rows at a time
            b = buf[:min(block, n - start)]
            part = run.scores[start:start + len(b)]
            for op, p in pending:                                  # the update, a block at a time
                op(part, p[start:start + len(b)], out=part)
            if shift is None:
                np.copyto(b, run.scores[start:start + len(b)])
            else:
                np.add(run.scores[start:start + len(b)], shift, out=b)
            t = b.argmax(1)
            top[start:start + len(b)] = t
            if C > 1:
                at = np.arange(len(b))
                best = b[at, t]
                b[at, t] = -np.inf
                unsure.append(start + np.flatnonzero(~(best - b.max(1) > bound)))   # NaN-safe: recheck those too
        a.keep(("s", key, run.flat_heads), run)                              # only once updated whole
        where = np.concatenate(unsure) if unsure else np.zeros(0, dtype=np.int64)
        if len(where):                                                     # dots() for these rows, as it sums
            src = where if rows is None else rows[where]
            exact = self.Et[src].astype(np.float64)
            if len(idx):
                removed = a.projection_at(int(idx[0]), rows, key, where).copy()
                for k in idx[1:].tolist():
                    removed += a.projection_at(k, rows, key, where)
                exact = np.subtract(self.Et[src], removed, dtype=np.float64)
            if shift is not None:
                exact += shift.astype(np.float64)
            top[where] = exact.argmax(1)
        return top

    def ablate(self, heads: Sequence[HeadId], labels: np.ndarray, classes: Sequence[str],
               groups: np.ndarray | None = None, group_names: Sequence[str] = (),
               mode: Mode = "zero", mask: np.ndarray | None = None, mask_only: bool = False) -> AblationResult:
        """Predictions for all cached images after removing ``heads``, and accuracies over ``mask`` (every row
        by default). ``mask_only``: predict only the rows of ``mask`` (``predictions`` holds -1 for the others),
        what a toggle on the Ablate page needs."""
        rows = None if mask is None or not mask_only or bool(np.all(mask)) else np.flatnonzero(mask)
        pred = self.predict(heads, mode, rows)
        if rows is not None:
            pred, part = np.full(len(self.E), -1, dtype=pred.dtype), pred
            pred[rows] = part
        base = self.base_predictions
        sel = rows_mask(len(pred)) if mask is None else mask
        changed = (pred != base) & sel
        return AblationResult(
            heads=list(heads),
            mode=mode,
            predictions=pred,
            report=accuracy_report(pred, labels, classes, groups, group_names, mask),
            flipped=np.flatnonzero(changed),
            fixed=np.flatnonzero(changed & (pred == labels)),
            broken=np.flatnonzero(changed & (base == labels)),
        )
