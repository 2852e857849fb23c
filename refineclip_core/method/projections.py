"""The caching and memory-budget layer under :class:`~refineclip_core.method.ablation.AblationEngine` (whose
arithmetic, paper Eq. 5, works from the head·text projections ``c_h·t_y`` kept here).

:class:`ProjectionStore` is what the engines over one cache share: ``E`` ``(N, d)``, ``E·t`` ``(N, C)``, the
head contributions (in memory or the cache's on-disk :class:`~refineclip_core.features.sharded.ShardedArray`,
never loaded whole), the per-row-set means ``m_h`` of mean ablation, the per-image Gram matrix and the
projections. When every head's projections fit :data:`PROJECTION_BUDGET`, one pass over the contributions computes
them all; otherwise a head's are computed for the rows asked about when it is first used, and the most recently
used are kept, with the running scores (:class:`RunningScore`) that let a toggle add or subtract only the heads
that changed (:meth:`ProjectionStore.running_score`). :class:`MeanFeatures` memoises one engine's ``m_h`` and what
derives from them; :class:`DerivedEngines` keeps the engines derived from one engine.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from ..features.sharded import ShardedArray, row_blocks

#: Largest size in bytes of the head·text projections ``c_h·t_y`` (float32, ``n·C`` per head and row set)
#: and running scores an engine keeps in memory: every head's for 50,000 images × 64 heads × up to 60
#: classes; beyond that the most recently used (e.g. at 1000 classes, 100 MB per head for 25,000 held-out
#: rows: 6 heads' and a running score).
PROJECTION_BUDGET = 768 << 20

#: The key of the row set "every row" (:meth:`ProjectionStore.projection`).
ALL = "all"

#: Unit roundoff of float32.
U32 = 2.0 ** -24


def _nbytes(item: object) -> int:
    return item.nbytes if isinstance(item, (np.ndarray, RunningScore)) else 0


@dataclass
class RunningScore:
    """``E·t_y − Σ_{h∈S} c_h·t_y`` over a row set (float32 ``(n, C)``), kept between toggles so that a toggle
    adds or subtracts only the heads that changed (a running sum of Eq. 5's dot products).

    ``err`` bounds ``|scores − exact|`` elementwise, the exact value taken from the float32 ``E·t`` and
    projections: every float32 addition ``a ± b`` rounds by at most ``2⁻²⁴·|a ± b|``, and ``|a ± b|`` is at most
    the bound of the new exact value (``max|E·t| + Σ_S max|c_h·t|``) plus the error so far."""

    flat_heads: frozenset                # S as flat head indices (``layer position · H + head``)
    scores: np.ndarray
    err: float

    @property
    def nbytes(self) -> int:
        return self.scores.nbytes


class ProjectionStore:
    """What the engines over one cache share, never copied: E, the head contributions (on disk or in memory),
    texts, and what is memoised from them within ``budget`` bytes (projections, running scores) or once (means per
    row set, the Gram matrix, the zero-shot predictions)."""

    def __init__(self, embeddings: np.ndarray, contributions: np.ndarray | ShardedArray, text: np.ndarray,
                 budget: int) -> None:
        N, Ls, H, d = contributions.shape
        self.E = np.asarray(embeddings, dtype=np.float32)
        self.c = contributions                                           # (N, L_s, H, d), read on demand
        self.text = np.asarray(text, dtype=np.float32)
        self.Et = self.E @ self.text.T                                   # (N, C)
        self.Et_max = abs_max(self.Et)
        self.K, self.H = Ls * H, H
        self.budget = budget
        self.capacity = budget // max(1, N * self.text.shape[0] * 4)   # heads whose projections fit the budget
        self._lock = threading.Lock()
        self._ct: dict[int, np.ndarray] = {}                            # flat head -> c_h·t_y (N, C) of every head
        self.ct_max: dict[int, float] = {}                              # flat head -> max |c_h·t_y| (every row)
        # What toggles keep, least recently used first, within ``budget`` bytes (with ``_ct``): ("p", rows key, k)
        # -> c_h·t_y of those rows (n, C); ("s", rows key, flat heads) -> a running score (:class:`RunningScore`).
        self._kept: dict[tuple, object] = {}
        self._kept_bytes = 0
        self._means: dict[str, np.ndarray] = {}

    def rows_of(self, rows: np.ndarray | slice | None) -> np.ndarray:
        return np.arange(len(self.E)) if rows is None or isinstance(rows, slice) else np.asarray(rows, np.int64)

    def first_pass(self, mean_rows: np.ndarray | None = None) -> None:
        """One pass over the head contributions for what a first ablation needs: every head's
        projections when they all fit the budget, and the means over ``mean_rows`` (if not known)."""
        N, C = len(self.E), self.text.shape[0]
        with self._lock:
            project = self.capacity >= self.K and len(self._ct) < self.K
            key = None if mean_rows is None else row_digest(mean_rows)
            if not project and (key is None or key in self._means):
                return
            if not project:
                self._means[key] = self._mean_over(mean_rows)
                return
            ct = np.empty((self.K, N, C), dtype=np.float32)
            total = np.zeros((self.K, self.c.shape[-1]))
            member = np.zeros(N, dtype=bool)
            if key is not None:
                member[mean_rows] = True
            for pos, block in row_blocks(self.c):
                flat = block.reshape(len(pos) * self.K, -1).astype(np.float32, copy=False)
                ct[:, pos] = (flat @ self.text.T).reshape(len(pos), self.K, C).transpose(1, 0, 2)
                if key is not None and key not in self._means:
                    total += block[member[pos]].reshape(-1, self.K, total.shape[1]).sum(0, dtype=np.float64)
            self._ct = {j: ct[j] for j in range(self.K)}
            self.ct_max.update({j: abs_max(ct[j]) for j in range(self.K)})
            if key is not None and key not in self._means:
                self._means[key] = (total / max(len(mean_rows), 1)).astype(np.float32)

    def projection(self, k: int, rows: np.ndarray | None = None, key: str = ALL) -> np.ndarray:
        """``c_h·t_y`` float32 of flat head ``k`` for ``rows`` (every row by default; ``key`` names the row set,
        :func:`row_digest`). When every head's fits the budget, all are computed in one pass over the
        contributions on first use and kept (:meth:`first_pass`), and a row set's are rows of those;
        otherwise a row set's are computed when first asked for (a read of the head's slab for those rows
        and a product with the texts) and the least recently used of what toggles keep are dropped beyond
        the budget."""
        if k not in self._ct and self.capacity >= self.K:
            self.first_pass()
        if k in self._ct:
            return self._ct[k] if rows is None else self._ct[k][rows]
        out = self.take(("p", key, k))
        if out is None:
            out = self._head_projection(k, slice(None) if rows is None else rows)
            with self._lock:
                self.ct_max[(key, k)] = abs_max(out)
        self.keep(("p", key, k), out)
        return out

    def projection_at(self, k: int, rows: np.ndarray | None, key: str, where: np.ndarray) -> np.ndarray:
        """``projection(k, rows, key)[where]`` (rows of the kept projections of every row when all are kept)."""
        if k in self._ct:
            return self._ct[k][where if rows is None else rows[where]]
        return self.projection(k, rows, key)[where]

    def projection_max(self, k: int, key: str = ALL) -> float:
        """``max |c_h·t_y|`` over the row set ``key`` as :meth:`projection` computed it (every row's when all
        are kept: a bound for any row set)."""
        return self.ct_max[k] if k in self._ct else self.ct_max[(key, k)]

    def take(self, key: tuple) -> object | None:
        """Remove and return a kept item (a running score taken this way belongs to the caller alone)."""
        with self._lock:
            item = self._kept.pop(key, None)
            if item is not None:
                self._kept_bytes -= _nbytes(item)
            return item

    def keep(self, key: tuple, item: object) -> None:
        """Keep ``item`` as the most recently used; drop the least recently used beyond the budget (the
        newest is always kept)."""
        with self._lock:
            old = self._kept.pop(key, None)
            self._kept_bytes += _nbytes(item) - (0 if old is None else _nbytes(old))
            self._kept[key] = item
            limit = self.budget - sum(a.nbytes for a in self._ct.values())
            while self._kept_bytes > limit and len(self._kept) > 1:
                self._kept_bytes -= _nbytes(self._kept.pop(next(iter(self._kept))))

    def take_score(self, key: str, flat_heads: frozenset) -> "RunningScore | None":
        """The kept running score over row set ``key`` whose head set is closest to ``flat_heads`` (fewest heads
        to add or remove), removed from the kept items (so no other session updates it meanwhile)."""
        with self._lock:
            found = [(len(k[2] ^ flat_heads), k) for k in self._kept if k[0] == "s" and k[1] == key]
        for _, k in sorted(found, key=lambda f: f[0]):
            item = self.take(k)
            if item is not None:
                return item
        return None

    def mean(self, rows: np.ndarray) -> np.ndarray:
        """``m_h`` over ``rows`` ``(K, d)`` float32 (zero for no rows), computed once per row set."""
        key = row_digest(rows)
        with self._lock:
            if key not in self._means:
                self._means[key] = self._mean_over(rows)
            return self._means[key]

    def _mean_over(self, rows: np.ndarray) -> np.ndarray:
        total = np.zeros((self.K, self.c.shape[-1]))
        for _, block in row_blocks(self.c, rows):
            total += block.reshape(len(block), self.K, -1).sum(0, dtype=np.float64)
        return (total / max(len(rows), 1)).astype(np.float32)

    def block_projections(self, rows: slice, idx: np.ndarray) -> np.ndarray:
        """``Σ_{k∈idx} c_k·t_y`` float32 ``(n, C)`` for a block of consecutive ``rows``, heads summed in the
        order given, each head's projections computed for the block from its contributions and dropped
        (nothing kept: a pass over every row beyond the budget)."""
        out = None
        for k in idx.tolist():
            part = self._head_projection(k, rows)
            out = part if out is None else np.add(out, part, out=out)
        return out

    def _head_projection(self, k: int, rows: np.ndarray | slice) -> np.ndarray:
        """``c_h·t_y`` float32 ``(n, C)`` of flat head ``k`` for ``rows``, read from its slab and multiplied by the
        texts: the one way every projection beyond :meth:`first_pass` is computed."""
        return self.c[rows, k // self.H, k % self.H].astype(np.float32, copy=False) @ self.text.T

    def gather(self, rows: np.ndarray, idx: np.ndarray, H: int) -> np.ndarray:
        """``c`` of heads ``idx`` (flat) for ``rows``: ``(n, |S|, d)`` float32."""
        out = np.empty((len(rows), len(idx), self.c.shape[-1]), dtype=np.float32)
        whole = isinstance(rows, np.ndarray) and len(rows) == len(self.E) and np.array_equal(rows, np.arange(len(rows)))
        for j, k in enumerate(idx.tolist()):
            out[:, j] = self.c[(slice(None) if whole else rows), k // H, k % H]
        return out


    @cached_property
    def base_predictions(self) -> np.ndarray:
        """Zero-shot predictions of every row (nothing removed)."""
        return self.Et.argmax(1)

    @cached_property
    def gram(self) -> dict[str, np.ndarray]:
        """Per-image inner products among E and the c_h (for the norms of ablated embeddings, Eq. 10's cosines):
        ``EE`` ``(N,)``, ``Ec`` ``(N, K)``, ``cc`` ``(N, K, K)``; one pass over the contributions, computed once for
        every engine over this store (they do not depend on the means)."""
        N, K = len(self.E), self.K
        g = {"EE": np.einsum("nd,nd->n", self.E, self.E).astype(np.float64), "Ec": np.empty((N, K)),
             "cc": np.empty((N, K, K))}
        for pos, block in row_blocks(self.c):
            c = block.reshape(len(pos), K, -1).astype(np.float32)
            g["Ec"][pos] = np.matmul(c, self.E[pos][:, :, None])[:, :, 0]
            g["cc"][pos] = np.matmul(c, c.transpose(0, 2, 1))
        return g

    def running_score(self, want: frozenset, rows: np.ndarray | None, key: str
                      ) -> tuple[RunningScore, list[tuple[Callable, np.ndarray]]]:
        """The running score of flat head set ``want`` over ``rows`` (row set ``key``) and the updates still to
        apply to its scores (``(np.subtract or np.add, projections)``, applied by the engine's ``predict`` a block
        of rows at a time): the closest kept one (taken out of the kept items) updated with the heads that differ,
        or a fresh sum (heads in flat order) when none is kept, when updating would cost more passes than summing,
        or when its error bound would pass 4× a fresh sum's."""

        def step(err: float, heads: frozenset) -> float:            # one float32 addition's rounding, added
            return err + U32 * (self.Et_max + sum(self.projection_max(k, key) for k in heads) + err)

        run = self.take_score(key, want)
        if run is not None:
            ops = sorted(run.flat_heads ^ want)
            if len(ops) <= len(want):
                parts = {k: self.projection(k, rows, key) for k in ops}
                err, now = run.err, set(run.flat_heads)
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
            np.subtract(scores, self.projection(k, rows, key), out=scores)
            now.add(k)
            err = step(err, frozenset(now))
        return RunningScore(want, scores, err), []


class MeanFeatures:
    """One engine's mean-ablation features ``m_h`` (Eq. 5) and what derives from them, each computed on first
    use and kept: the means over ``rows`` (every row by default; the store computes them once per row set) or
    those ``source()`` gives (a row-subset engine takes its parent's), ``m·t`` and the inner products with ``m``
    that the norms of mean-ablated embeddings add."""

    def __init__(self, store: ProjectionStore, rows: np.ndarray | None = None,
                 source: Callable[[], np.ndarray] | None = None) -> None:
        self.store = store
        self.rows = rows
        self._source = source

    def prepare(self) -> None:
        """Before a first mean ablation: the means not known yet come from the same pass over the contributions
        that computes every head's projections (when they fit the budget)."""
        if "m" not in self.__dict__ and self._source is None:
            self.store.first_pass(self.store.rows_of(None) if self.rows is None else self.rows)

    @cached_property
    def m(self) -> np.ndarray:
        """``(K, d)`` mean-ablation features."""
        if self._source is not None:
            return self._source()
        return self.store.mean(self.store.rows_of(None) if self.rows is None else self.rows)

    @cached_property
    def mt(self) -> np.ndarray:
        """``m_h·t_y`` ``(K, C)``."""
        return self.m @ self.store.text.T

    @cached_property
    def gram(self) -> dict[str, np.ndarray]:
        """The inner products with the ``m_h`` that mean ablation adds to the norms: ``Em`` ``(N, K)``, ``cm``
        ``(N, K, K)``, ``mm`` ``(K, K)``."""
        m, K, E = self.m, self.store.K, self.store.E
        g = {"Em": (E @ m.T).astype(np.float64), "cm": np.empty((len(E), K, K)), "mm": (m @ m.T).astype(np.float64)}
        for pos, block in row_blocks(self.store.c):
            g["cm"][pos] = block.reshape(len(pos), K, -1).astype(np.float32) @ m.T
        return g

def abs_max(a: np.ndarray) -> float:
    """``max |a|`` without an ``|a|`` temporary (a head's projections are 200 MB at 50,000 × 1000)."""
    return float(max(a.max(), -a.min())) if a.size else 0.0


def row_digest(rows: np.ndarray) -> str:
    """A key for a row set (the memos of means, variants and subsets)."""
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


#: Engines derived from one engine (other mean rows, row subsets) that it keeps for reuse, of each kind.
KEEP_DERIVED = 8


class DerivedEngines:
    """The engines derived from one :class:`~.ablation.AblationEngine`, one per kind and row set, the
    :data:`KEEP_DERIVED` most recent of each kind kept (a long-running server changes protocols many times)."""

    def __init__(self) -> None:
        self._memo: dict[str, dict[str, object]] = {}

    def get(self, kind: str, rows: np.ndarray, make: Callable[[], object]) -> object:
        """The ``kind`` engine over ``rows`` (by content), made by ``make()`` the first time."""
        memo = self._memo.setdefault(kind, {})
        key = row_digest(rows)
        found = memo.get(key)
        if found is None:
            found = memo[key] = make()
            while len(memo) > KEEP_DERIVED:
                memo.pop(next(iter(memo)), None)
        return found
