"""Writing the edited model back as a folder ``CLIPModel.from_pretrained`` loads, carrying only the files it needs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ...errors import CheckpointError, OutsideRootsError, RefineClipError
from ...files import check_quota
from ..confine import OUTSIDE_REASON, Confinement, current, loads_json
from .convert import CLIP_EOT_ID, LEGACY_EOS_ID, _transformers, open_clip_config, open_clip_to_hf
from .folder import CONFIG_FILE, HFCheckpoint, PREPROCESSOR_FILE, WEIGHTS_FILE
from . import siglip


#: Weight-file endings: an export folder holding other weights than the one it writes is refused.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


#: The only files of a source folder an export carries besides the weights it writes: the model's
#: config and what ``CLIPProcessor.from_pretrained`` reads (image processor, tokenizer). Anything
#: else in the folder (notes, caches, links to elsewhere) stays behind.
EXPORT_FILES = (CONFIG_FILE, PREPROCESSOR_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "tokenizer.model")


#: Largest file an export copies (a CLIP tokenizer.json is about 2 MB).
MAX_EXPORT_FILE_BYTES = 64_000_000


def _model_activation(blocks, which: str) -> str:
    from open_clip.transformer import QuickGELU

    names = set()
    for block in blocks:
        act = block.mlp.gelu
        if isinstance(act, QuickGELU):
            names.add("quick_gelu")
        elif type(act) is torch.nn.GELU:
            names.add("gelu" if act.approximate == "none" else "gelu_pytorch_tanh")
        else:
            raise RefineClipError(f"The {which} tower's activation {type(act).__name__} has no transformers CLIP "
                                  "equivalent; export it in open_clip format instead.")
    if len(names) != 1:
        raise RefineClipError(f"The {which} tower mixes activations; export it in open_clip format instead.")
    return names.pop()


def _model_eps(norms, which: str) -> float:
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1 or not all(isinstance(n, torch.nn.LayerNorm) and n.elementwise_affine for n in norms):
        raise RefineClipError(f"The {which} tower's layer norms differ from transformers CLIP's (one eps, affine); "
                              "export it in open_clip format instead.")
    return eps.pop()


def _plain_blocks(blocks, which: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    for block in blocks:
        if (type(block) is not ResidualAttentionBlock or not isinstance(block.attn, torch.nn.MultiheadAttention)
                or block.attn.in_proj_bias is None or hasattr(block, "ln_1_kv")):
            raise RefineClipError(f"The {which} tower's blocks are not plain CLIP blocks; export it in open_clip "
                                  "format instead.")
        if not (isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)):
            raise RefineClipError(f"The {which} tower uses layer scale, which transformers CLIP does not have; "
                                  "export it in open_clip format instead.")


def hf_config_dict(model: torch.nn.Module) -> dict:
    """The transformers ``CLIPConfig`` (as a dict) of an open_clip ``CLIP`` ViT, or a refusal.

    Only what transformers' CLIPModel computes is accepted: class-token pooling, ``ln_pre``,
    no layer scale or attentional pooler, plain blocks, a causal text tower pooled at the EOT
    token (``argmax`` or ``eos``), bias-free projections and no logit bias.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if type(model) is not CLIP or not isinstance(visual, VisionTransformer):
        raise RefineClipError("Only open_clip CLIP ViTs with the built-in text tower can be written in transformers "
                              "format; export this model in open_clip format instead.")
    if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool
            or isinstance(visual.ln_pre, torch.nn.Identity) or visual.conv1.bias is not None):
        raise RefineClipError("This ViT pools or normalises differently from transformers CLIP (class token, ln_pre, "
                              "ln_post); export it in open_clip format instead.")
    if not isinstance(model.text_projection, torch.nn.Parameter) or getattr(model, "logit_bias", None) is not None:
        raise RefineClipError("This model has a projection bias or a logit bias, which transformers CLIP does not; "
                              "export it in open_clip format instead.")
    if getattr(model, "attn_mask", None) is None:
        raise RefineClipError("This text tower is not causal, unlike transformers CLIP's; export it in open_clip "
                              "format instead.")
    pool, eos = model.text_pool_type, getattr(model, "text_eos_id", None)
    if pool == "argmax":
        eos_id = LEGACY_EOS_ID
    elif pool == "eos" and isinstance(eos, int):
        eos_id = eos
    else:
        raise RefineClipError(f"This text tower pools with '{pool}', which transformers CLIP cannot; export it in "
                              "open_clip format instead.")
    size, patch = visual.image_size, visual.patch_size
    if size[0] != size[1] or patch[0] != patch[1] or visual.conv1.in_channels != 3:
        raise RefineClipError("transformers CLIP needs square images and patches of RGB; export this model in "
                              "open_clip format instead.")
    vb, tb = list(visual.transformer.resblocks), list(model.transformer.resblocks)
    _plain_blocks(vb, "vision")
    _plain_blocks(tb, "text")
    embed_dim = int(visual.proj.shape[1])
    vision = {
        "hidden_size": int(visual.class_embedding.shape[0]), "intermediate_size": vb[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(vb), "num_attention_heads": vb[0].attn.num_heads, "image_size": int(size[0]),
        "patch_size": int(patch[0]), "num_channels": 3, "hidden_act": _model_activation(vb, "vision"),
        "layer_norm_eps": _model_eps([visual.ln_pre, visual.ln_post, *(n for b in vb for n in (b.ln_1, b.ln_2))],
                                     "vision"),
        "projection_dim": embed_dim,
    }
    text = {
        "vocab_size": model.token_embedding.num_embeddings, "hidden_size": model.token_embedding.embedding_dim,
        "intermediate_size": tb[0].mlp.c_fc.out_features, "num_hidden_layers": len(tb),
        "num_attention_heads": tb[0].attn.num_heads, "max_position_embeddings": int(model.positional_embedding.shape[0]),
        "hidden_act": _model_activation(tb, "text"),
        "layer_norm_eps": _model_eps([model.ln_final, *(n for b in tb for n in (b.ln_1, b.ln_2))], "text"),
        "bos_token_id": CLIP_EOT_ID - 1, "eos_token_id": eos_id, "projection_dim": embed_dim,
    }
    if (vision["hidden_act"] == "quick_gelu") != (text["hidden_act"] == "quick_gelu"):
        raise RefineClipError("The towers disagree on QuickGELU; export this model in open_clip format instead.")
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": embed_dim,
            "logit_scale_init_value": float(model.logit_scale.detach().reshape(-1)[0]),
            "text_config": text, "vision_config": vision}


def _preprocessor_config(model: torch.nn.Module) -> dict:
    """A ``CLIPImageProcessor`` config matching the open_clip model's validation preprocessing."""
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = int(model.visual.image_size[0])
    resample = {"bilinear": 2, "bicubic": 3}.get(pp.get("interpolation", "bicubic"), 3)
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": resample, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            "image_std": list(pp.get("std", (0.26862954, 0.26130258, 0.27577711))), "do_convert_rgb": True}


def _check_out_dir(out_dir: Path, source: HFCheckpoint | None) -> None:
    if out_dir.name.endswith(_WEIGHT_SUFFIXES) or (out_dir.exists() and not out_dir.is_dir()):
        raise RefineClipError(f"'{out_dir}' names a file, but a transformers checkpoint is a folder: give a folder "
                              "path (or ask for the open_clip format to get one weights file).")
    if source is not None and out_dir.resolve() == source.folder.resolve():
        raise RefineClipError(f"'{out_dir}' is the folder the model was loaded from; write the edit to another one.")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name != WEIGHTS_FILE and p.name.endswith(_WEIGHT_SUFFIXES))
        if foreign:
            raise RefineClipError(f"The folder '{out_dir}' already holds other weights ({', '.join(foreign[:3])}); "
                                  "choose an empty or new folder.")


def export_confinement(source: HFCheckpoint) -> Confinement:
    """What an export of ``source`` may copy files from: the confinement in force (the dashboard's,
    a server's) when there is one; otherwise (a local user's CLI) the source folder itself, plus, for
    a Hugging Face hub snapshot (``models--org--name/snapshots/<rev>/``, whose files link to
    ``../../blobs/``), its repository folder. A file linking anywhere else is never copied."""
    if current().confined:
        return current()
    folder = source.folder.expanduser().resolve()
    own = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        own.append(folder.parent.parent)
    return Confinement.of(own)


def _export_files(source: HFCheckpoint) -> dict[str, bytes]:
    """The files of :data:`EXPORT_FILES` present in ``source``'s folder, each read through the
    confined read (loading/confine.py) under :func:`export_confinement`: a link leaving it, a device
    or pipe, or an oversized file refuses the export in one sentence; other names are not read."""
    allowed = export_confinement(source)
    files: dict[str, bytes] = {}
    for name in EXPORT_FILES:
        path = source.folder / name
        if not os.path.lexists(path):
            continue
        try:
            data = allowed.read_bytes(path, limit=MAX_EXPORT_FILE_BYTES)
        except OutsideRootsError as exc:
            raise RefineClipError(f"'{name}' in '{source.folder}' is a {OUTSIDE_REASON} of the model; the export was "
                                  "not written (replace the link by the file itself).") from exc
        except OSError as exc:
            raise RefineClipError(f"'{name}' in '{source.folder}' cannot be copied into the export "
                                  f"({exc.strerror or exc}); the export was not written.") from exc
        if len(data) > MAX_EXPORT_FILE_BYTES:
            raise RefineClipError(f"'{name}' in '{source.folder}' is larger than {MAX_EXPORT_FILE_BYTES // 1_000_000} "
                                  "MB, too large for a config or tokenizer file; the export was not written.")
        files[name] = data
    return files


def write_hf_checkpoint(out_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                        source: HFCheckpoint | None = None) -> Path:
    """Write the open_clip ``state`` (e.g. with a merged ``visual.proj``) as a transformers folder.

    When the model came from transformers, ``config.json`` and the other files an export needs
    (:data:`EXPORT_FILES`: preprocessor and tokenizer files, nothing else) are copied from
    ``source``, each read like every other file (only inside :func:`export_confinement`, links leaving
    them refused); otherwise the config is built from ``model`` (:func:`hf_config_dict`) with a
    matching ``preprocessor_config.json``. The weights go to ``model.safetensors``;
    ``CLIPModel.from_pretrained(out_dir)`` loads the folder.
    """
    from safetensors.torch import save

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, source)
    files: dict[str, bytes] = {}
    if source is not None:
        files = _export_files(source)
        if CONFIG_FILE not in files:
            raise RefineClipError(f"'{source.config}' disappeared; the export was not written.")
        raw = loads_json(files[CONFIG_FILE], f"'{source.config}'", CheckpointError)
        if not isinstance(raw, dict):
            raise CheckpointError(f"'{source.config}' is not a transformers config (a JSON object).")
        if siglip.is_siglip(raw):
            siglip.open_clip_config(raw, str(source.config))  # refuses what the model cannot have come from
        else:
            n_vision, n_text = (open_clip_config(raw, str(source.config))[k]["layers"]
                                for k in ("vision_cfg", "text_cfg"))
    else:
        if not hasattr(model.visual, "transformer"):
            raise RefineClipError("Only a CLIP-shaped open_clip model (open_clip's own ViT image tower) can be written "
                                  "as a transformers CLIPModel; export this one in open_clip format instead.")
        cfg = hf_config_dict(model)
        n_vision, n_text = cfg["vision_config"]["num_hidden_layers"], cfg["text_config"]["num_hidden_layers"]
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        config = _transformers().CLIPConfig.from_dict({**cfg, "dtype": dtype})
        files[CONFIG_FILE] = config.to_json_string().encode()
        files[PREPROCESSOR_FILE] = json.dumps(_preprocessor_config(model), indent=2).encode()
    if source is not None and siglip.is_siglip(raw):
        hf_state = siglip.open_clip_to_hf({k: v.detach().cpu() for k, v in state.items()}, raw["model_type"])
        files[WEIGHTS_FILE] = save(hf_state, metadata={"format": "pt"})
        _write_folder(out_dir, files)
        return out_dir
    try:
        hf_state = open_clip_to_hf({k: v.detach().cpu() for k, v in state.items()}, n_vision, n_text)
    except KeyError as exc:
        raise RefineClipError(f"The weights lack {exc}, which a transformers CLIPModel needs; export them in "
                              "open_clip format instead.") from exc
    files[WEIGHTS_FILE] = save(hf_state, metadata={"format": "pt"})
    _write_folder(out_dir, files)
    return out_dir


def _write_folder(out_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``out_dir``: into a temporary sibling first, then renamed into place
    (the whole folder at once when it is new, file by file when it exists)."""
    check_quota(out_dir, sum(len(data) for data in files.values()))  # a session folder's quota
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would be kept by the rename
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        for name in files:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def zip_folder(folder: str | os.PathLike) -> bytes:
    """The files of ``folder`` as a zip archive (one level, for downloads)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        root = Path(folder)
        for path in sorted(root.iterdir()):
            if path.is_file() and not path.is_symlink():  # the export writes plain files only
                zf.write(path, arcname=f"{root.name}/{path.name}")
    return buf.getvalue()
