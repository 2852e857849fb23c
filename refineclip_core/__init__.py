"""RefineCLIP: find the attention heads behind CLIP's errors and edit the model to fix them.

The library behind RefineCLIP Studio. Its sub-packages follow the paper's pipeline:
``loading`` (model and images) → ``features`` (exact per-head decomposition, Eq. 3-4, and the
feature cache) → ``method`` (identification: error sets, DE_A..DE_D of Eq. 6-9, Alg. 1 with
Eq. 10, ablation Eq. 5, evaluation, the protocol) → ``inspection`` (TextSpan, Grad-CAM, the
diagnosis) → ``edit`` (the edit, Eq. 11-13: fit, guard, export, the run) → ``reporting``
(findings, figures, run reports); ``session`` keeps an interactive session's data and caches,
``cli`` and ``demo`` sit on top. No module imports Streamlit.

For notebooks, the names in ``__all__`` are importable from here (each loaded on first use, so
``import refineclip_core`` stays fast): the same functions and dataclasses the CLI and the
dashboard use. docs/API.md lists them and walks through a complete, tested example.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "RefineClipError": "errors",
    "ModelSpec": "loading.models", "LoadedModel": "loading.models", "load_model": "loading.models",
    "ImageDataset": "loading.data", "load_dataset": "loading.data",
    "ExtractionConfig": "features.extraction", "extract": "features.extraction",
    "FeatureCache": "features.cache",
    "HeadId": "features.decomposition", "parse_heads": "features.decomposition",
    "AccuracyReport": "method.evaluation", "accuracy_report": "method.evaluation", "cache_report": "method.evaluation",
    "confusion_matrix": "method.evaluation",
    "ProtocolConfig": "method.protocol", "DEFAULT_PROTOCOL": "method.protocol", "PAPER_PROTOCOL": "method.protocol",
    "EditConfig": "edit.config", "DEFAULT_EDIT": "edit.config", "PAPER_EDIT": "edit.config",
    "FitConfig": "edit.config", "PaperConfig": "edit.config",
    "Identification": "method.protocol", "identify": "method.protocol", "make_engine": "method.protocol",
    "EditOutcome": "edit.compare", "fit_edit": "edit.compare",
    "EditVerdict": "edit.guard", "assess_edit": "edit.guard", "judge_edit": "edit.guard", "GuardConfig": "edit.guard",
    "sanity_warnings": "edit.sanity",
    "Findings": "reporting.findings", "findings": "reporting.findings", "method_summary": "reporting.findings",
    "per_key_table": "reporting.findings",
    "EditRun": "edit.run", "run_edit": "edit.run", "write_report": "reporting.run_report",
    "write_world": "demo.world",
}
#: Public modules: the Plotly figures (score maps, utility curves, comparisons, loss curves).
_MODULES = {"figures": "reporting.figures"}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
