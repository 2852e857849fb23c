"""The method: identify the heads behind an error, remove them, refine the model (paper §3).

In pipeline order: ``errorsets`` (W, C, A of §3.2) → ``scores`` (DE_A..DE_D, Eq. 6-9) →
``selection`` (Algorithm 1, utility U of Eq. 10) → ``ablation`` (Eq. 5 on cached features, §3.1)
→ ``refinement`` (phase 2, Eq. 11-13, §3.3) → ``evaluation`` (accuracy per class and group,
Tables 1-3). ``baselines`` holds the compared methods; ``protocol`` decides which rows each
step sees and runs the steps in order; ``reproduce`` repeats the protocol over seeds (§5).
"""
