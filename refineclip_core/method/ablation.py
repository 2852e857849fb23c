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

The arrays and projections live in :mod:`.projections`; :mod:`.verification` checks the cached
arithmetic against the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Literal, Sequence, get_args

import numpy as np

from ..features.decomposition import HeadId
from ..features.sharded import ShardedArray, row_blocks
from .evaluation import AccuracyReport, accuracy_report, rows_mask
from .projections import (ALL, PROJECTION_BUDGET, U32, DerivedEngines, ProjectionStore, RunningScore,
                          row_digest)

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


@dataclass
class _Shared:
    """What an engine and the engines derived from it with other mean rows share, never copied: the arrays
    and projections within their budget (:class:`ProjectionStore`), the zero-shot predictions and the
    per-image Gram matrix (computed once for all of them)."""

    store: ProjectionStore
    layers: tuple[int, ...]
    n_heads: int
    base_predictions: np.ndarray
    gram: dict[str, np.ndarray] = field(default_factory=dict)


class AblationEngine:
    """Ablation arithmetic over a cache's ``E`` ``(N, d)``, ``c`` ``(N, L_s, H, d)`` and texts.

    ``heads`` may be an in-memory array or the cache's on-disk :class:`ShardedArray`; it is
    never loaded whole. ``mean_rows`` (or an explicit ``mean``) defines the mean-ablation
    features ``m_h`` (default: the mean over every row), computed on first use. The roles are
    apart: this class does the arithmetic (Eq. 5, dot products, norms, predictions); the arrays,
    the projections and their memory budget are :class:`ProjectionStore`'s, shared through
    :class:`_Shared` with every engine derived by :meth:`with_mean_rows`; the derived engines are
    kept by :class:`DerivedEngines`.
    """

    def __init__(self, embeddings: np.ndarray, heads: np.ndarray | ShardedArray, text: np.ndarray,
                 layers: Sequence[int], mean_rows: np.ndarray | None = None, mean: np.ndarray | None = None,
                 projection_budget: int = PROJECTION_BUDGET) -> None:
        store = ProjectionStore(embeddings, heads, text, projection_budget)
        given = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(store.K, -1)
        self._bind(_Shared(store, tuple(layers), heads.shape[2], store.Et.argmax(1)),
                   None if mean_rows is None else np.asarray(mean_rows, dtype=np.int64),
                   None if given is None else (lambda: given))

    def _bind(self, shared: _Shared, mean_rows: np.ndarray | None,
              mean_source: Callable[[], np.ndarray] | None) -> None:
        """Every field of an engine, set here only: what it shares, which rows its means are over (or where
        they come from), and the engines derived from it (none yet). ``m``/``mt`` are computed on first use."""
        self._shared = shared
        self._mean_rows = mean_rows
        self._mean_source = mean_source
        self._derived = DerivedEngines()

    # -- the shared arrays -----------------------------------------------------------------------
    @property
    def _a(self) -> ProjectionStore:
        return self._shared.store

    @property
    def layers(self) -> tuple[int, ...]:
        return self._shared.layers

    @property
    def n_heads(self) -> int:
        return self._shared.n_heads

    @property
    def base_predictions(self) -> np.ndarray:
        """Zero-shot predictions of every cached row (nothing removed)."""
        return self._shared.base_predictions

    @property
    def E(self) -> np.ndarray:
        return self._a.E

    @property
    def text(self) -> np.ndarray:
        return self._a.text

    @property
    def Et(self) -> np.ndarray:
        return self._a.Et

    @property
    def projected(self) -> bool:
        """Whether every head's head·text projections fit :data:`PROJECTION_BUDGET` (computed in one pass
        and kept); otherwise the most recently used row sets' ones are kept."""
        return self._a.capacity >= self._a.K

    @cached_property
    def m(self) -> np.ndarray:
        """``(K, d)`` mean-ablation features."""
        if self._mean_source is not None:
            return self._mean_source()
        rows = self._a.rows_of(None) if self._mean_rows is None else self._mean_rows
        return self._a.mean(rows)

    @cached_property
    def mt(self) -> np.ndarray:
        return self.m @ self.text.T                                      # (K, C)

    def with_mean_rows(self, rows: np.ndarray) -> "AblationEngine":
        """The same engine (arrays shared, nothing recomputed but the means, and those once per row
        set) whose mean-ablation features ``m_h`` are the means over ``rows`` (e.g. the protocol's
        adaptation images)."""
        rows = np.asarray(rows, dtype=np.int64)

        def make() -> AblationEngine:
            other = AblationEngine.__new__(AblationEngine)
            other._bind(self._shared, rows, None)
            return other

        return self._derived.get("mean", rows, make)

    def subset(self, rows: np.ndarray) -> "AblationEngine":
        """An engine over ``rows`` only (their head contributions in memory; one per row set), with
        the same mean-ablation features (computed only if the subset uses them)."""
        rows = np.asarray(rows, dtype=np.int64)

        def make() -> AblationEngine:
            sub = AblationEngine(self.E[rows], np.asarray(self._a.c[rows]), self.text, self.layers)
            sub._mean_source = lambda: self.m
            return sub

        return self._derived.get("subset", rows, make)

    # -- per-image views (what the diagnosis and the baselines read) -----------------------------
    @property
    def n_flat(self) -> int:
        """``K = L_s · H``: the heads in scope, in flat order (:meth:`head_ids`)."""
        return self._a.K

    def contributions(self, rows: np.ndarray, heads: Sequence[HeadId] | None = None) -> np.ndarray:
        """``c_h`` (Eq. 4) of ``heads`` (default: every head in scope, flat order) for ``rows``:
        ``(n, |heads|, d)`` float32, read from the cache for these rows only."""
        rows = np.asarray(rows, dtype=np.int64)
        if heads is None:
            return np.asarray(self._a.c[rows], dtype=np.float32).reshape(len(rows), self._a.K, -1)
        return self._a.gather(rows, self.flat_index(heads), self.n_heads)

    def projections(self, rows: np.ndarray) -> np.ndarray:
        """``c_h·t_y`` of every head in scope for ``rows``: ``(n, K, C)`` float32 (the kept or lazily
        computed per-head projections, :meth:`ProjectionStore.projection`)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.stack([self._a.projection(k)[rows] for k in range(self._a.K)], axis=1)

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
        if len(idx) and mode == "mean" and "m" not in self.__dict__ and self._mean_source is None:
            self._a.first_pass(self._a.rows_of(None) if self._mean_rows is None else self._mean_rows)
        shift = self.mt[idx].sum(0)[None] if len(idx) and mode == "mean" else None
        n = len(self.E) if rows is None else len(rows)
        total = None
        # every row beyond the budget: each block's projections computed and dropped, nothing kept
        streamed = bool(len(idx)) and not self.projected and rows is None
        if len(idx) and not self.projected and rows is not None:   # a row set's, one head at a time, as predict()
            rows_arr = np.asarray(rows, dtype=np.int64)
            key = row_digest(rows_arr)
            for k in idx.tolist():
                part = self._a.projection(k, rows_arr, key)                   # the row set's, as predict() uses
                total = part.copy() if total is None else np.add(total, part, out=total)
        parts = [self._a.projection(k) for k in idx.tolist()] if total is None and not streamed else []
        for start in range(0, max(n, 1), block):
            r = slice(start, min(n, start + block)) if rows is None else np.asarray(rows)[start:start + block]
            if len(idx):
                if streamed:
                    removed = self._a.block_projections(r, idx)
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

    @property
    def _gram(self) -> dict[str, np.ndarray]:
        """Per-image inner products among E and the c_h (for norms of ablated embeddings); computed once
        and shared with the engines derived by :meth:`with_mean_rows` (they do not depend on the means)."""
        g = self._shared.gram
        if not g:
            N, K = len(self.E), self._a.K
            new = {"EE": np.einsum("nd,nd->n", self.E, self.E).astype(np.float64), "Ec": np.empty((N, K)),
                   "cc": np.empty((N, K, K))}
            for pos, block in row_blocks(self._a.c):
                c = block.reshape(len(pos), K, -1).astype(np.float32)
                new["Ec"][pos] = np.matmul(c, self.E[pos][:, :, None])[:, :, 0]
                new["cc"][pos] = np.matmul(c, c.transpose(0, 2, 1))
            g.update(new)
        return g

    @cached_property
    def _gram_mean(self) -> dict[str, np.ndarray]:
        """The inner products with the m_h that mean ablation adds (computed only when used)."""
        m, K = self.m, self._a.K
        g = {"Em": (self.E @ m.T).astype(np.float64), "cm": np.empty((len(self.E), K, K)),
             "mm": (m @ m.T).astype(np.float64)}
        for pos, block in row_blocks(self._a.c):
            g["cm"][pos] = block.reshape(len(pos), K, -1).astype(np.float32) @ m.T
        return g

    def norms(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None) -> np.ndarray:
        """``||E_abl||`` per row ``(n,)``."""
        g = self._gram
        idx = self.flat_index(heads)
        r = slice(None) if rows is None else rows
        n2 = g["EE"][r].copy()
        if len(idx):
            n2 += -2 * g["Ec"][r][:, idx].sum(1) + g["cc"][r][:, idx][:, :, idx].sum((1, 2))
            if mode == "mean":
                gm = self._gram_mean
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
        rows = self._a.rows_of(rows)
        out = self.E[rows].astype(np.float64)
        if len(idx):
            for start in range(0, len(rows), 4096):
                part = rows[start:start + 4096]
                out[start:start + len(part)] -= self._a.gather(part, idx, self.n_heads).sum(1)
            if mode == "mean":
                out = out + self.m[idx].sum(0)
        return out

    def predict(self, heads: Sequence[HeadId], mode: Mode = "zero", rows: np.ndarray | None = None,
                block: int = 512) -> np.ndarray:
        """Predicted classes after ablation (the norm does not change the argmax) for ``rows`` (all by
        default): exactly the argmax of the float64 scores ``E·t − Σ_S c_h·t + Σ_S m_h·t`` (mean ablation)
        summed from the float32 ``E·t`` and projections, found in float32 and confirmed in float64 for the
        rows whose two best classes are closer than rounding could move them.

        The float32 scores come from a running score per row set (:class:`RunningScore`): the scores of the
        last head set asked for over these rows, to which a toggle adds or from which it subtracts only the
        heads that changed (one pass over ``n·C`` values per changed head, instead of one per head in the set).
        Its error bound ``err`` grows with every update; when it would exceed 4× that of a fresh sum the scores
        are summed afresh. A row whose best float32 score leads every other by more than ``2·(err_s + e₆₄)``
        (``err_s``: ``err`` plus the rounding of the mean shift, ``e₆₄``: the float64 sum's rounding) has the
        same argmax as the float64 scores; the others are recomputed in float64. Each session takes the
        running score it updates out of the shared engine, so concurrent toggles never share one. Every row
        of an engine over the projection budget (the findings, a refinement's comparison) is predicted from
        :meth:`dots`' float64 scores a block at a time instead, keeping nothing (:meth:`_dot_blocks`)."""
        a = self._a
        idx = self.flat_index(heads)
        want = frozenset(idx.tolist())
        if len(want) < len(idx) or (rows is None and len(idx) and not self.projected):
            # a head named twice (removed twice), or every row beyond the budget: the float64 scores a block of
            # rows at a time, nothing kept (a refinement's or the findings' one pass over every image would
            # otherwise fill the budget with every row's projections and evict the toggles' held-out rows')
            return np.concatenate([d.argmax(1) for _, d in self._dot_blocks(heads, mode, rows)])
        rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        key = ALL if rows is None else row_digest(rows)
        if len(idx) and mode == "mean" and "m" not in self.__dict__ and self._mean_source is None:
            a.first_pass(a.rows_of(None) if self._mean_rows is None else self._mean_rows)
        shift = self.mt[idx].sum(0) if len(idx) and mode == "mean" else None     # float32, as dots() adds it
        run, pending = self._running(want, rows, key)
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
        a.keep(("s", key, run.heads), run)                              # only once updated whole
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

    def _running(self, want: frozenset, rows: np.ndarray | None, key: str
                 ) -> tuple[RunningScore, list[tuple[Callable, np.ndarray]]]:
        """The running score of head set ``want`` over ``rows`` and the updates still to apply to its scores
        (``(np.subtract or np.add, projections)``, applied by :meth:`predict` a block of rows at a time): the
        closest kept one updated with the heads that differ, or a fresh sum (heads in flat order) when none
        is kept, when updating would cost more passes than summing, or when its error bound would pass 4× a
        fresh sum's."""
        a = self._a

        def step(err: float, heads: frozenset) -> float:            # one float32 addition's rounding, added
            return err + U32 * (a.Et_max + sum(a.projection_max(k, key) for k in heads) + err)

        run = a.take_score(key, want)
        if run is not None:
            ops = sorted(run.heads ^ want)
            if len(ops) <= len(want):
                parts = {k: a.projection(k, rows, key) for k in ops}
                err, now = run.err, set(run.heads)
                for k in ops:
                    now ^= {k}
                    err = step(err, frozenset(now))
                fresh, now = 0.0, set()
                for k in sorted(want):
                    now.add(k)
                    fresh = step(fresh, frozenset(now))
                if err <= 4 * fresh:
                    return RunningScore(want, run.scores, err), [(np.subtract if k in want else np.add, parts[k])
                                                                   for k in ops]
        scores = self.Et.copy() if rows is None else self.Et[rows]
        err, now = 0.0, set()
        for k in sorted(want):
            np.subtract(scores, a.projection(k, rows, key), out=scores)
            now.add(k)
            err = step(err, frozenset(now))
        return RunningScore(want, scores, err), []

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
