"""RefineCLIP: find the attention heads behind CLIP's errors and edit the model to fix them.

The library behind RefineCLIP Studio. Modules follow the paper's pipeline:
``models`` → ``data`` → ``decomposition`` (Eq. 3-4) → ``extraction``/``cache`` →
``errorsets`` → ``scores`` (Eq. 6-9) → ``selection`` (Alg. 1, Eq. 10) → ``ablation`` (Eq. 5)
→ ``refinement`` (Eq. 11-13) → ``evaluation``. No module imports Streamlit.
"""

__version__ = "0.1.0"
