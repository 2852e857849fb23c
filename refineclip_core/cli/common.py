"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from ..features.cache import atomic_write_json
from ..features.extraction import EXTRACT_STAGE
from ..features.zeroshot import DEFAULT_TEMPLATES, read_templates, validate_templates
from ..errors import RefineClipError
from ..loading.budget import BUDGET_ENV
from ..loading.data import ImageDataset, load_dataset
from ..loading.hf_clip import find_hf_checkpoint
from ..loading.models import DEMO_MODEL, LoadedModel, ModelSpec, load_model
from ..progress import Progress


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None if required else DEMO_MODEL,
                   help="open_clip architecture name (e.g. ViT-B-16), or 'demo' for the embedded demo model"
                        + ("; required unless --checkpoint is a Hugging Face CLIP, whose config.json names the "
                           "architecture" if required else ""))
    g.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai); downloads where possible")
    g.add_argument("--checkpoint", help="local weights: .pt/.bin/.safetensors state dict or open_clip checkpoint, or "
                                        "a Hugging Face transformers CLIP (the CLIPModel.save_pretrained folder, or "
                                        "its weights file with config.json beside it)")
    g.add_argument("--model-config", help="open_clip model config JSON for a custom architecture")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp64", "fp16", "bf16"],
                   help="model precision; fp32 (default) keeps the decomposition exact to ~1e-6")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help=f"refuse, before loading, a model estimated to need more memory than SIZE (e.g. 16GB); "
                        f"default: ${BUDGET_ENV}, else 75%% of the memory available")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    name = args.model
    if name is None:
        hf = find_hf_checkpoint(args.checkpoint)
        if hf is None:
            raise RefineClipError("--model is required (an open_clip architecture such as ViT-B-16, or 'demo') "
                                  "unless --checkpoint is a Hugging Face CLIP folder.")
        name = hf.label
    return ModelSpec(name=name, pretrained=args.pretrained, checkpoint=args.checkpoint,
                     model_config=args.model_config, device=args.device, precision=args.precision)


def load(args: argparse.Namespace, spec: ModelSpec | None = None) -> LoadedModel:
    """The model of the ``--model`` flags (or ``spec``), within ``--memory-budget``."""
    return load_model(spec or model_spec(args), getattr(args, "memory_budget", None))


def add_link_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-follow-links", action="store_true",
                   help="read only images and metadata that resolve inside the --data folder, as the dashboard "
                        "does; by default symbolic links are followed wherever they point")


def dataset(args: argparse.Namespace, **kwargs) -> ImageDataset:
    """``load_dataset(args.data, ...)``, confined to the data folder with ``--no-follow-links``."""
    roots = None
    if getattr(args, "no_follow_links", False):
        data = Path(args.data).expanduser()
        roots = [data.parent if data.is_file() else data]
    return load_dataset(args.data, roots=roots, **kwargs)


def add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                   help="prompt template with '{}' for the class name (repeatable); default: a small ensemble")
    p.add_argument("--templates-file", help="file with one template per line")
    p.add_argument("--class-names", help="comma-separated display names replacing the folder/CSV class names, in order")


def templates(args: argparse.Namespace) -> tuple[str, ...]:
    out: list[str] = []
    if getattr(args, "templates_file", None):
        out += read_templates(args.templates_file)
    if getattr(args, "templates", None):
        out += validate_templates(args.templates)
    return tuple(out) if out else DEFAULT_TEMPLATES


def layers_arg(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        k = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers takes a positive integer or 'all', not {value!r}") from exc
    if k < 1:
        raise argparse.ArgumentTypeError("--layers must be >= 1")
    return k


def positive_int(value: str) -> int:
    try:
        k = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from exc
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {k}")
    return k


def write_json(path: str | None, obj: dict[str, Any]) -> None:
    """Write ``obj`` atomically to ``path`` (or print it when no path is given)."""
    if path:
        atomic_write_json(Path(path), obj)
    else:
        json.dump(obj, sys.stdout, indent=1, default=str)
        print()


def progress_bar(desc: str, unit: str = "img") -> Progress:
    """A :class:`~refineclip_core.progress.Progress` drawing one tqdm bar per stage on stderr."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(stage: str, done: int, total: int, values: Mapping[str, float] | None = None) -> None:
        bar = state.get("bar")
        if bar is None or state.get("stage") != stage:
            if bar is not None:
                bar.close()
            label = desc if stage == EXTRACT_STAGE else f"{desc}: {stage}"
            bar = state["bar"] = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, initial=0)
            state["stage"] = stage
        bar.update(done - bar.n)
        if values:
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if done >= total:
            bar.close()

    return update
