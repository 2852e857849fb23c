"""The edit's configuration: what is exported (:class:`EditConfig`), RefineCLIP-fit's
hyper-parameters (:class:`FitConfig`) and the paper's phase 2 (:class:`PaperConfig`, Eq. 13).

The defaults (:data:`DEFAULT_EDIT`) are what the CLI, the dashboard and the benchmarks use;
:data:`PAPER_EDIT` is the paper's own choice (diag θ by Eq. 13).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from ..errors import RefineClipError
from ..method.baselines import CoOpConfig
from ..method.ltc import PeersConfig
from .concept import ConceptConfig


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of RefineCLIP-fit (see the module docstring)."""

    ridge: float = 1e-3       # λ of the least-squares start, relative to the mean eigenvalue of EᵀE
    steps: int = 200          # Adam steps of the KL distillation (0: least squares only)
    lr: float = 1e-3
    max_rows: int = 8192      # adaptation images used by the KL steps (a seeded subsample above this)
    seed: int = 0
    strength: float = 0.8     # the teacher is E + strength·(E_abl − E) on the success set (fit.py: why 0.8; 1 = all of Eq. 5)

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise RefineClipError(f"The edit's strength must be in (0, 1] (the share of the heads' removal the "
                                  f"edit applies), not {self.strength!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


Strategy = Literal["diag", "full", "lora"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)   # what the CLI and the Refine page offer
#: Which deployable edit phase 2 exports (``EditConfig.method``, ``--method``); not a compared row, those are
#: :class:`refineclip_core.edit.methods.Method` (the registry :data:`refineclip_core.edit.methods.METHODS`).
ExportKind = Literal["fit", "paper"]
EXPORT_KINDS: tuple[str, ...] = get_args(ExportKind)


@dataclass(frozen=True)
class PaperConfig:
    """Hyper-parameters of Eq. (13) and the optimiser. ``success_weight`` and ``locality_weight`` are the
    paper's loss weights α and β of Eq. 13 (App. B: 1e3..1e4); not the fit's ``strength`` nor a
    significance level."""

    strategy: Strategy = "diag"
    success_weight: float = 1e4    # the paper's α: weight of L_success (Eq. 11)
    locality_weight: float = 1e2   # the paper's β: weight of L_locality (Eq. 12)
    steps: int = 500
    lr: float = 1e-2
    seed: int = 0
    rank: int = 4
    weight_ce: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EditConfig:
    """Which deployable edit phase 2 exports (``method``, an :data:`ExportKind`), and the settings of each kind.

    ``fit``: RefineCLIP-fit (:mod:`~refineclip_core.edit.fit`), the default. ``paper``: the
    paper's phase 2 (Eq. 11-13 on the labelled samples) with ``paper.strategy`` diag/full/LoRA.
    """

    method: ExportKind = "fit"
    fit: FitConfig = FitConfig()
    paper: PaperConfig = PaperConfig()
    concept: ConceptConfig = ConceptConfig()   # a concept RefineCLIP-fit's teacher also removes (concept.py)
    coop: CoOpConfig = CoOpConfig()            # the prompt-learning baseline (baselines.CoOp)
    peers: PeersConfig = PeersConfig()         # typed text of the LTC rows (method/ltc.py); empty: left out

    def __post_init__(self) -> None:
        if self.method not in EXPORT_KINDS:
            raise RefineClipError(f"Unknown edit method {self.method!r}; use {' or '.join(EXPORT_KINDS)}.")
        if self.concept.active and self.method != "fit":
            raise RefineClipError("Removing a concept is part of RefineCLIP-fit's teacher; use --method fit.")

    @property
    def exported(self) -> str:
        """The method name the exported checkpoint is reported under."""
        return "refineclip-fit" if self.method == "fit" else f"refineclip-{self.paper.strategy}"

    def to_dict(self) -> dict:
        return {"method": self.method, "exported": self.exported, "fit": self.fit.to_dict(),
                "paper": self.paper.to_dict(), "concept": self.concept.to_dict(), "coop": self.coop.to_dict(),
                "peers": self.peers.to_dict()}


DEFAULT_EDIT = EditConfig()
"""The edit every entry point exports unless told otherwise: RefineCLIP-fit."""


PAPER_EDIT = EditConfig(method="paper")
"""The paper's phase 2: diag(θ) learned by Eq. 13 on the labelled samples."""
