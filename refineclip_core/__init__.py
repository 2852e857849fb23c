"""RefineCLIP: find the attention heads behind CLIP's errors and edit the model to fix them.

The library behind RefineCLIP Studio. Its sub-packages follow the paper's pipeline:
``loading`` (model and images) → ``features`` (exact per-head decomposition, Eq. 3-4, and the
feature cache) → ``method`` (error sets, DE_A..DE_D of Eq. 6-9, Alg. 1 with Eq. 10, ablation
Eq. 5, refinement Eq. 11-13, evaluation, the protocol) → ``inspection`` (TextSpan, Grad-CAM)
→ ``reporting`` (findings, figures, run reports); ``studio`` keeps an interactive session's
data and caches, ``cli`` and ``demo`` sit on top. No module imports Streamlit.
"""

__version__ = "0.1.0"
