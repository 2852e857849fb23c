"""The method: identify the heads behind an error and remove them on cached features (paper §3.1-3.2).

In pipeline order: ``errorsets`` (W, C, A of §3.2) → ``scores`` (DE_A..DE_D, Eq. 6-9) →
``selection`` (Algorithm 1, the consensus and the stable choice, utility U of Eq. 10;
``stability`` resamples the labelled images) → ``ablation`` (Eq. 5 on cached features, §3.1;
``projections`` keeps the head·text projections within a memory budget, ``verification`` checks
the arithmetic against a real forward pass) → ``evaluation`` (accuracy per class and group,
Tables 1-3; ``intervals`` their 95% intervals). ``protocol`` decides which rows each step sees and
runs the steps in order; ``baselines``, ``ltc`` and ``comparison`` are the compared methods and
their accuracies. The edit itself (phase 2, Eq. 11-13, §3.3) and the reproduction of the paper's
tables (§5) live in :mod:`refineclip_core.edit`.
"""
