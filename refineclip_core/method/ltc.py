"""LTC as released, and our own head search with a typed-cue projection (two compared rows).

**LTC (as released)**: Yeo et al., 2025, "Debiasing CLIP: Interpreting and Correcting Bias in Attention
Heads" (arXiv 2505.17425), ported from the paper and the authors' released code (wj210/CLIP_LTC,
``main_bg.py`` and ``utils/``: read, then written anew here). Its data are every head's direct
contribution ``c_h`` to the image embedding, in the units of the released decomposition (each image's
contributions divided by its embedding's norm, so they sum to the unit embedding; see
docs/DIAGNOSIS.md, "Our decomposition and theirs"), and the class texts ``t_y`` (normalised).

*Locate* (``get_counts``, ``get_impt_heads``), on the **minority groups** of group-labelled images:

1. zero-shot predicts ``ŷ``; a sample is *correct* when ``ŷ = y``. Its other class ``y'`` is the runner-up
   class when correct and the true class when wrong, so the gap is ``ŷ`` against ``y'``;
2. per sample, the single head with the largest share of that gap, ``argmax_h c_h·(t_ŷ − t_y')``;
3. per head, the fraction of correct samples (``c_h``) and of wrong ones (``w_h``) it tops;
4. with ``K⁺`` the heads that top at least one sample, the threshold is ``1/K⁺``: heads with
   ``w_h − c_h > 1/K⁺`` are *spurious* and heads with ``c_h − w_h > 1/K⁺`` *salient*, each list ordered by
   the margin. Every head in scope is searched (the released code searches all layers; here the layers the
   cache holds: extract every layer for the same search).

*Correct*: the spurious heads are mean-ablated (their contribution replaced by its mean, over the
adaptation images here; the released code takes it over the evaluated images themselves), and each salient
head gets RoboShot's "accept" step (Adila et al., ICLR 2024): the differences of the attribute text pairs
(``a_j − b_j``, unnormalised text embeddings; the paper has a language model write the pairs, here the user
types them) are orthonormalised (QR, in the order given) into ``q_1..q_k``; then for each ``q`` in turn
``x ← x + cos(x, q)·q`` and ``x ← x / ||x||``: every salient head ends at unit norm, the norm of the whole
embedding. Predictions are the argmax of the corrected embedding against the class texts. This is the
released background experiment (``main_bg.py``, two-class Waterbirds): every image gets the same correction.
For many classes the released code corrects per pseudo-labelled class with that class's own pairs
(``ortho_by_cls``); that variant is not ported.

**Head search + typed-cue projection** (:class:`HeadSearchCueProjection`) is this project's earlier
reading of LTC, kept under its own name: heads ranked by their normalised share of the logit gap on the
labelled error pair's wrong versus right samples (no group labels), the best-utility prefix (Eq. 10)
mean-ablated, then the whole embedding projected off one typed spurious direction ``u``
(``E' = E_abl − (E_abl·u) u``). It measures differently (docs/DIAGNOSIS.md): neither is the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..errors import RefineClipError
from ..features.decomposition import HeadId
from .ablation import AblationEngine
from .evaluation import block_argmax
from .selection import best_prefix

#: Rows of contributions read at a time when correcting embeddings.
BLOCK = 4096


@dataclass(frozen=True)
class PeersConfig:
    """What the typed-text peers are given, in words (the user's, never guessed).

    ``cue`` / ``cue_versus``: the spurious attribute and what it is taken against (e.g. "a water
    background" vs "a land background"), the direction :class:`HeadSearchCueProjection` projects off.
    ``accept``: LTC's attribute pairs, true differences between the classes (e.g. ("a bird with webbed
    feet", "a bird with thin toes")), the "accept" texts of its correction. ``minority``: the group names
    LTC locates its heads on; empty: :func:`minority_groups`' rule."""

    cue: tuple[str, ...] = ()
    cue_versus: tuple[str, ...] = ()
    accept: tuple[tuple[str, str], ...] = ()
    minority: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pair in self.accept:
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
                raise RefineClipError("Each LTC attribute pair is two non-empty texts (one per class), e.g. "
                                      "'a bird with webbed feet' and 'a bird with thin toes'.")

        from ..loading.data import check_class_name_lengths  # the tokenizer's limit, named for what was typed

        check_class_name_lengths(self.cue, "cue text", "cue texts")
        check_class_name_lengths(self.cue_versus, "'versus' cue text", "cue texts")
        check_class_name_lengths([t for pair in self.accept for t in pair], "LTC attribute text",
                                 "LTC attribute texts")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_accept_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """LTC's attribute pairs from typed lines, one pair a line: ``text for class A | text for class B``
    (blank lines skipped, each side stripped). The text is data: split on ``|``, never formatted. A line
    without exactly one ``|`` or with an empty side is refused in one sentence; lengths are checked by
    :class:`PeersConfig` (the prompt limit of every typed text)."""
    pairs: list[tuple[str, str]] = []
    for i, line in enumerate(str(text).splitlines(), 1):
        if not line.strip():
            continue
        sides = [s.strip() for s in line.split("|")]
        if len(sides) != 2 or not all(sides):
            shown = line.strip() if len(line.strip()) <= 40 else line.strip()[:40] + "..."
            raise RefineClipError(f"LTC attribute pair line {i} ('{shown}') must be two non-empty texts separated "
                                  f"by one '|', e.g. 'a bird with webbed feet | a bird with thin toes'.")
        pairs.append((sides[0], sides[1]))
    return tuple(pairs)


# -- LTC (as released) ---------------------------------------------------------------------------

def gap_sides(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ŷ, y', correct)`` per sample from zero-shot ``scores`` ``(n, C)``: the prediction, the other side
    of the gap (runner-up when correct, the true class when wrong) and whether the prediction is right."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    pred = scores.argmax(1)
    correct = pred == labels
    runner = np.argsort(-scores, axis=1, kind="stable")[:, 1] if scores.shape[1] > 1 else pred
    return pred, np.where(correct, runner, labels), correct


def top_head_counts(head_scores: np.ndarray, pred: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per head, the fraction of samples whose gap ``ŷ − y'`` it contributes most to (``head_scores``:
    ``c_h·t_y`` ``(n, K, C)``); zeros for no samples."""
    n, K = head_scores.shape[:2]
    if n == 0:
        return np.zeros(K)
    i = np.arange(n)
    gap = head_scores[i, :, pred] - head_scores[i, :, other]          # (n, K)
    return np.bincount(gap.argmax(1), minlength=K) / n


def split_heads(right: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(spurious, salient, threshold)``: flat head indices with ``wrong − right`` (resp. ``right − wrong``)
    above ``1/K⁺`` (``K⁺``: heads that top any sample), each ordered by its margin, largest first."""
    counted = int(np.count_nonzero((right > 0) | (wrong > 0)))
    if counted == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), float("inf")
    crit = 1.0 / counted

    def above(v: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(v > crit)
        return idx[np.argsort(-v[idx], kind="stable")]

    return above(wrong - right), above(right - wrong), crit


def accept_basis(pairs: np.ndarray) -> np.ndarray:
    """``(k, d)`` orthonormal directions of the attribute pairs' differences (``pairs``: ``(k, 2, d)``,
    unnormalised text embeddings), by QR in the order given."""
    pairs = np.asarray(pairs, dtype=np.float64)
    if pairs.ndim != 3 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise RefineClipError("LTC needs at least one attribute pair (two texts each) to correct its salient heads.")
    diff = pairs[:, 0] - pairs[:, 1]
    if np.any(np.linalg.norm(diff, axis=1) <= 1e-8):
        raise RefineClipError("An LTC attribute pair embeds its two texts to the same vector; make them differ.")
    q, _ = np.linalg.qr(diff.T)
    return q.T


def accept(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """RoboShot's accept step on rows ``x`` ``(n, d)``: for each ``q`` of ``basis`` in turn, add
    ``cos(x, q)·q`` and renormalise each row to unit norm."""
    x = np.asarray(x, dtype=np.float64).copy()
    for q in basis:
        x += ((x @ q) / np.maximum(np.linalg.norm(x, axis=1), 1e-30))[:, None] * q[None, :]
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return x


@dataclass
class LocateThenCorrect:
    """LTC as released (module docstring): spurious heads mean-ablated, salient heads corrected by the
    accept step, all in the unit-embedding units of the released decomposition."""

    spurious: list[HeadId]
    salient: list[HeadId]
    basis: np.ndarray                 # (k, d) orthonormal accept directions
    mean: np.ndarray                  # (|spurious|, d) mean of c_h/||E|| over the mean rows
    engine: AblationEngine
    counts_right: dict[str, float] = field(default_factory=dict)
    counts_wrong: dict[str, float] = field(default_factory=dict)
    threshold: float = float("inf")
    n_right: int = 0
    n_wrong: int = 0

    @classmethod
    def fit(cls, engine: AblationEngine, rows: np.ndarray, labels: np.ndarray, pairs: np.ndarray,
            mean_rows: np.ndarray | None = None) -> "LocateThenCorrect":
        """Locate on ``rows`` (the minority groups' labelled images; ``labels`` over every cached row) and
        build the correction from the attribute ``pairs`` ``(k, 2, d)``; ``mean_rows``: where the spurious
        heads' means are taken (default every row)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            raise RefineClipError("LTC locates its heads on the minority groups' images; there are none.")
        basis = accept_basis(pairs)
        ids = engine.head_ids()
        pred, other, correct = gap_sides(engine.Et[rows], np.asarray(labels)[rows])
        proj = engine.projections(rows).astype(np.float64)                      # (n, K, C)
        right = top_head_counts(proj[correct], pred[correct], other[correct])
        wrong = top_head_counts(proj[~correct], pred[~correct], other[~correct])
        spur, sal, crit = split_heads(right, wrong)
        spurious, salient = [ids[i] for i in spur], [ids[i] for i in sal]
        mrows = np.arange(len(engine.E)) if mean_rows is None else np.asarray(mean_rows, dtype=np.int64)
        total = np.zeros((len(spurious), engine.E.shape[1]))
        for start in range(0, len(mrows), BLOCK):
            part = mrows[start:start + BLOCK]
            scale = 1.0 / np.maximum(np.linalg.norm(engine.E[part].astype(np.float64), axis=1), 1e-30)
            if spurious:
                total += (engine.contributions(part, spurious).astype(np.float64) * scale[:, None, None]).sum(0)
        return cls(spurious, salient, basis, total / max(len(mrows), 1), engine,
                   {str(h): float(right[i]) for i, h in enumerate(ids)},
                   {str(h): float(wrong[i]) for i, h in enumerate(ids)}, crit, int(correct.sum()),
                   int((~correct).sum()))

    def embeddings(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The corrected embeddings ``(n, d)`` (unit-embedding units: before correction each has norm 1)."""
        rows = np.arange(len(self.engine.E)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.engine.E.shape[1]))
        for start in range(0, len(rows), BLOCK):
            part = rows[start:start + BLOCK]
            e = self.engine.E[part].astype(np.float64)
            scale = 1.0 / np.maximum(np.linalg.norm(e, axis=1), 1e-30)
            e = e * scale[:, None]
            if self.spurious:
                c = self.engine.contributions(part, self.spurious).astype(np.float64) * scale[:, None, None]
                e += (self.mean[None] - c).sum(1)
            for k, h in enumerate(self.salient):
                c = self.engine.contributions(part, [h])[:, 0].astype(np.float64) * scale[:, None]
                e += accept(c, self.basis) - c
            out[start:start + len(part)] = e
        return out

    def predict(self, rows: np.ndarray | None = None) -> np.ndarray:
        text = self.engine.text.astype(np.float64).T
        return block_argmax(lambda r: self.embeddings(r) @ text,
                            np.arange(len(self.engine.E)) if rows is None else np.asarray(rows, dtype=np.int64))


def minority_groups(groups: np.ndarray, labels: np.ndarray, correct: np.ndarray, group_names: Sequence[str],
                    named: Sequence[str] = ()) -> list[str]:
    """The minority groups LTC locates on: ``named`` when given (each must exist), else, per class, the
    groups whose zero-shot accuracy (``correct``) among these images is below that class's best group's
    (the groups the shortcut does not help). ``groups``: ids into ``group_names`` (``-1``: none)."""
    groups, labels, correct = np.asarray(groups), np.asarray(labels), np.asarray(correct, dtype=bool)
    if named:
        missing = [g for g in named if g not in group_names]
        if missing:
            raise RefineClipError(f"LTC's minority group {missing[0]!r} is not a group of these images "
                                  f"({', '.join(group_names) or 'none'}).")
        return list(named)
    out: list[str] = []
    for y in np.unique(labels):
        in_class = (labels == y) & (groups >= 0)
        acc = {int(g): float(correct[in_class & (groups == g)].mean()) for g in np.unique(groups[in_class])}
        if len(acc) > 1:
            best = max(acc.values())
            out += [group_names[g] for g, a in sorted(acc.items()) if a < best]
    return out


# -- our variant: head search + typed-cue projection --------------------------------------------

@dataclass
class HeadSearchCueProjection:
    """Head search + typed-cue projection (module docstring): not LTC, our variant of it.

    *Locate.* Each labelled sample ``x`` of class ``y`` (an error pair's class, ``y'`` the pair's other
    class) gives every head a direct effect on the logit gap, ``v_h(x) = c_h(x)·(t_y − t_y')``, normalised to
    unit mass over the heads (``Σ_h |v_h(x)| = 1``); a head scores ``s_h = mean_C v_h − mean_W v_h`` (correct
    minus wrong samples of the same class). *Correct.* The best-utility prefix (Eq. 10) of the positive
    ``s_h`` ranking is mean-ablated, then the embedding is projected off the typed direction ``u``:
    ``E' = E_abl − (E_abl·u) u``."""

    spurious: list[HeadId]
    direction: np.ndarray
    engine: AblationEngine
    spurious_scores: dict[str, float]

    @classmethod
    def fit(cls, engine: AblationEngine, pairs: list[tuple[int, int, np.ndarray, np.ndarray]], labels: np.ndarray,
            direction: np.ndarray, sample_rows: np.ndarray, top_t: int = 15) -> "HeadSearchCueProjection":
        """``pairs``: ``(y, y', W, C)`` with W (class y predicted y') and C (class y predicted y) as cache rows;
        ``engine`` carries the mean-ablation features; ``sample_rows`` the labelled samples (utility)."""
        ids = engine.head_ids()
        wrong, right = [], []
        for y, other, W, C in pairs:
            for rows, out in ((np.asarray(W, dtype=np.int64), wrong), (np.asarray(C, dtype=np.int64), right)):
                if len(rows):
                    ct = engine.projections(rows)                                          # (n, K, C)
                    v = ct[:, :, y] - ct[:, :, other]
                    out.append(v / np.maximum(np.abs(v).sum(1, keepdims=True), 1e-30))
        if not wrong or not right:
            raise RefineClipError("The head search contrasts wrongly and correctly classified samples of the same "
                                  "class; the labelled samples have none of one kind.")
        W, C = np.concatenate(wrong), np.concatenate(right)
        score = C.mean(0) - W.mean(0)
        ranked = [ids[i] for i in np.argsort(-score, kind="stable") if score[i] > 0][:top_t]
        t, _, _, _ = best_prefix(engine, ranked, sample_rows, labels)
        u = np.asarray(direction, dtype=np.float64)
        return cls(ranked[:t], u / np.linalg.norm(u), engine, {str(ids[i]): float(score[i]) for i in range(len(ids))})

    def embeddings(self, rows: np.ndarray | None = None) -> np.ndarray:
        e = self.engine.embeddings(self.spurious, "mean", rows)
        return e - np.outer(e @ self.direction, self.direction)

    def predict(self, rows: np.ndarray | None = None) -> np.ndarray:
        return (self.embeddings(rows) @ self.engine.text.astype(np.float64).T).argmax(1)
