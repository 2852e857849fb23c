"""Say why in words: which concepts the removed part of the embedding carries (issue 17).

The paper answers its first question (§5.1, Tables 4-5, Fig. 3) by reading TextSpan
descriptions of the blamed heads and their Grad-CAM maps by hand. This module turns that reading
into a computation with a checkable answer: for an error pair ``y → ŷ`` and a head set ``S`` (by
default the protocol's choice), it names the concepts carried by what ablation removes,

    r(x) = Σ_{h∈S} c[h](x)        (Eq. 5; mean ablation removes r(x) − Σ m_h, the same up to a constant)

and ranks them by their share of the removed part's variance, next to the heads that write each.

**Concepts.** A text pool's single descriptions are noisy directions (a description mixes an
object, a scene and a style: "a goose on a lake"), so descriptions are grouped first: every
content word that at least ``min_texts`` descriptions mention is a *concept*, whose direction is
the mean of those descriptions' (pool-centred, unit) text directions. Near-duplicates are merged
before anything is measured: plural forms ("star", "stars") and words whose descriptions are
nearly the same ones ("clip" and "art" from "clip art"). A concept's mean direction is
shorter the more its descriptions disagree; that length (its *coherence*) weighs how strongly it
is picked, so a word used in descriptions of everything ("small", "robin" in a pool the model
never learned) does not outrank a word whose descriptions agree ("water").

**Ranking (TextSpan over concepts, on the push).** Over the images the error pair concerns (the
protocol's labelled samples and the unlabelled adaptation images predicted as either class; never
the evaluation images), centre ``r``: ``R`` ``(N, d)``. What makes the error is the removed part's
*push* toward the wrong class, ``p = R·(t_ŷ − t_y)``, the logit gap that ablation closes; the
concepts are ranked by how much of that push they carry. The text difference of the two classes'
prompts, ``t_y − t_ŷ``, is projected out of every concept first: a head carrying a shortcut
writes toward the wrong class by construction, so words the text tower places near a class
("pointed" near "landbird") would otherwise name every direction the prompts lean on. Then,
greedily (Gandelsman et al.'s TextSpan with concepts instead of single descriptions and the push
covariance ``g = Rᵀ(p − p̄)/N`` as the target): pick the concept whose direction, orthogonalised
against the earlier picks, carries the most of ``g`` (weighted by coherence); credit it with its
*push share* ``(u·g)²/||g||²`` and its *share* of the removed variance ``||R u||²/||R||²`` (each
adds up to at most 1 over the picks); attach to it the near-duplicates, concepts whose activation
over the images correlates with the pick's by at least ``tau`` and whose direction points its way
(cosine at least :data:`NAME_MIN`): "land / grassland / ground" is one concept; project the
pick's direction out of ``R``, ``g`` and every remaining concept. The heads carrying a pick are
an exact split of its variance: ``Cov(c̃_h·u, r̃·u) / Var(r̃·u)`` sums to 1 over ``S``.

**The sentence.** It names the first concept (by push share) whose activation goes with the push
toward ``ŷ`` (correlation at least :data:`PUSH_MIN`) and carries at least half as much of it as
any; when the strongest concepts go against the push (the errors lack them: "water" for waterbirds
misread as landbirds), the strongest of them, and what pushes toward ``ŷ`` instead. It adds whether
the misclassified images of ``W`` carry more or less of it than the correctly classified ``C``
(standardised difference of the activation among the labelled samples, shown when at least
:data:`CONTRAST_MIN`).

**What tells the classes apart.** The concepts best aligned, in text space, with ``t_y − t_ŷ``
(words naming a class left out) name what *should* separate them; their share of the removed
variance beyond the named concept (TextSpan's residual) decides "not flat / webbed (2%)".

**The control.** Every head in scope is split the same way along the gap between ``W`` and ``C``
measured in the sum of all of them (a direction that does not depend on the set; the push when
``W`` or ``C`` is empty): the verdict is *shortcut* when at most :data:`P_RANDOM_MAX` of random
sets of as many heads hold as much of it. When the protocol removes no head (no prefix beat
removing nothing), the diagnosis explains the ``top_t`` heads its ranking suspects most instead,
and says so.

**Limits.** The answer is only as good as the text pool and the model's text tower: a concept
missing from the pool cannot be named (the nearest words are, and their share is low), and a
text tower that learned the shortcut itself (the demo's "webbed" is partly "water") blurs the
names; the shares are in the image embedding's geometry, not causal effects (the ablation and its
accuracy change are that); with a handful of ``W`` images the contrast is a small-sample
estimate, and the control uses the samples that chose the heads. ``diagnose`` states what it
measured (images, set sizes, fallback orientation) in :attr:`PairDiagnosis.notes`.
docs/DIAGNOSIS.md says the same for users, next to the paper's TextSpan.

:func:`attribute_heads` is the known-attribute mode (the paper's "TextSpan *" baseline made
usable): the user types contrasting phrases and heads are ranked by the share of that text
direction's variance they write into the embedding.

The package reads as the steps above: ``concepts`` (the vocabulary of a text pool), ``span`` (the
greedy span and exact head shares), ``pairs`` (the diagnosis of an error pair, the sentence, the
control), ``attribute`` (the known-attribute mode) and ``evidence`` (a head's part per group, AUCs).
"""

from __future__ import annotations

from .attribute import AttributeHeads, attribute_direction, attribute_heads, attribute_shares, phrase_direction
from .concepts import (MERGE_OVERLAP, STOPWORDS, ConceptVocabulary, concept_vocabulary, content_words, load_vocabulary,
                       pool_units)
from .evidence import HeadEvidence, group_profile, head_evidence, separation_auc
from .pairs import (CONTRAST_MIN, HEAD_MIN_SHARE, LEAD_FROM, MAX_ROWS, P_RANDOM_MAX, PUSH_MIN, Concept, Diagnosis,
                    PairDiagnosis, class_concepts, diagnose, diagnose_removed, diagnosis_rows, project_rows,
                    summary_lines)
from .span import (N_RANDOM_SETS, NAME_MIN, ROW_BLOCK, TAU, SpanPick, concept_span, correlation, head_shares,
                   head_shares_along, project_along, random_set_p, standardised_difference, variance_split)

__all__ = [
    "AttributeHeads", "attribute_direction", "attribute_heads", "attribute_shares", "phrase_direction",
    "MERGE_OVERLAP", "STOPWORDS", "ConceptVocabulary", "concept_vocabulary", "content_words", "load_vocabulary",
    "pool_units", "HeadEvidence", "group_profile", "head_evidence", "separation_auc",
    "CONTRAST_MIN", "HEAD_MIN_SHARE", "LEAD_FROM", "MAX_ROWS", "P_RANDOM_MAX", "PUSH_MIN", "Concept", "Diagnosis",
    "PairDiagnosis", "class_concepts", "diagnose", "diagnose_removed", "diagnosis_rows", "project_rows",
    "summary_lines", "N_RANDOM_SETS", "NAME_MIN", "ROW_BLOCK", "TAU", "SpanPick", "concept_span", "correlation",
    "head_shares", "head_shares_along", "project_along", "random_set_p", "standardised_difference", "variance_split",
]
