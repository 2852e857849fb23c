"""Feature extraction: one forward pass per image, decomposed (Eq. 4), streamed into a cache.

:func:`extract` is the only expensive step of the whole method; everything after it runs
on the cached arrays. It streams the dataset in shards of consecutive records, writes each
shard atomically, skips shards that are already on disk (so an interrupted run resumes), and
under ``torchrun`` each rank processes the shards ``i % world_size == rank`` and rank 0 marks
the cache complete. Shard contents do not depend on the number of processes, so a
data-parallel cache equals a single-process one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .cache import (
    CacheManifest,
    FeatureCache,
    atomic_write_bytes,
    atomic_write_json,
    npy_bytes,
    read_manifest,
    records_to_json,
    shard_dir,
    shard_is_valid,
    write_shard,
)
from .data import ImageDataset, ImageRecord, SkippedFile, load_image
from .decomposition import architecture_info, decompose, resolve_layers
from .errors import CacheError, ImageLoadError, RefineClipError
from .models import LoadedModel
from .zeroshot import DEFAULT_TEMPLATES, class_text_embeddings

#: ``progress(done, total)`` is called after every batch; ``cancel()`` is polled between batches.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ExtractionConfig:
    layers: int | str | tuple[int, ...] = 4
    batch_size: int = 32
    shard_batches: int = 8
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    @property
    def shard_size(self) -> int:
        return self.batch_size * self.shard_batches


class ExtractionCancelled(RefineClipError):
    """The user cancelled; finished shards stay on disk and the next run resumes from them."""


def data_fingerprint(records: Sequence[ImageRecord]) -> str:
    """Hash of the file list, labels, groups, splits and every file's size and mtime."""
    h = hashlib.sha256()
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{r.path}|{r.label}|{r.group}|{r.split}|{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def cache_fingerprint(loaded: LoadedModel, dataset: ImageDataset, scope: tuple[int, ...], cfg: ExtractionConfig) -> str:
    parts = {
        "model": loaded.spec.fingerprint(),
        "preprocess": loaded.preprocess_signature(),
        "dtype": str(loaded.dtype),
        "layers": list(scope),
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "data": data_fingerprint(dataset.records),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def storage_dtype(model_dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if model_dtype == torch.float64 else np.dtype(np.float32)


def load_batch(loaded: LoadedModel, records: Sequence[ImageRecord], start: int) -> tuple[torch.Tensor | None, list[int], list[SkippedFile]]:
    """Decode and preprocess records; returns the tensor, their record indices and skips."""
    tensors, keep, skipped = [], [], []
    for offset, rec in enumerate(records):
        try:
            img = load_image(rec.path)
            tensors.append(loaded.preprocess(img))
            keep.append(start + offset)
        except ImageLoadError as exc:
            skipped.append(SkippedFile(rec.path, str(exc)))
        except Exception as exc:  # a preprocessing failure on an odd image must not stop the run
            skipped.append(SkippedFile(rec.path, f"preprocessing failed ({type(exc).__name__}: {exc})"))
    if not tensors:
        return None, keep, skipped
    batch = torch.stack(tensors).to(device=loaded.device, dtype=loaded.dtype)
    return batch, keep, skipped


def extract(
    loaded: LoadedModel,
    dataset: ImageDataset,
    out_dir: str | os.PathLike,
    cfg: ExtractionConfig = ExtractionConfig(),
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
) -> FeatureCache:
    """Extract (or resume extracting) the decomposed features of ``dataset`` into ``out_dir``."""
    info = architecture_info(loaded.visual)
    scope = resolve_layers(info.n_layers, cfg.layers)
    root = Path(out_dir)
    rank, world = _dist_info()
    fingerprint = cache_fingerprint(loaded, dataset, scope, cfg)
    manifest = read_manifest(root)
    if rank == 0:
        if manifest is not None and manifest.fingerprint != fingerprint:
            # model, checkpoint, preprocessing, scope or files changed: the cache is stale
            shutil.rmtree(root / "shards", ignore_errors=True)
            manifest = None
        elif root.exists() and manifest is None and any(root.iterdir()):
            if not (root / "shards").exists():
                raise CacheError(f"'{root}' exists and is not a feature cache; choose an empty or new --out folder.")
        if manifest is None or not manifest.complete:
            text = class_text_embeddings(loaded, dataset.classes, cfg.templates)
            manifest = CacheManifest(
                fingerprint=fingerprint,
                model=loaded.spec.to_dict(),
                model_name=loaded.model_name,
                layers=list(scope),
                n_layers=info.n_layers,
                n_heads=info.n_heads,
                embed_dim=info.embed_dim,
                remainder_names=[],
                classes=list(dataset.classes),
                templates=list(cfg.templates),
                logit_scale=loaded.logit_scale,
                dtype=str(storage_dtype(loaded.dtype)),
                data_root=dataset.root,
                layout=dataset.layout,
                n_records=len(dataset.records),
                shard_size=cfg.shard_size,
            )
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(root / "text.npy", npy_bytes(text))
            atomic_write_json(root / "records.json", records_to_json(dataset.records, dataset.skipped))
            atomic_write_json(root / "manifest.json", asdict(manifest))
    _barrier()
    manifest = read_manifest(root)
    if manifest is None:
        raise CacheError(f"Could not read the manifest in '{root}'.")
    if manifest.complete:
        return FeatureCache(root)

    todo = [i for i in range(manifest.n_shards) if i % world == rank and not shard_is_valid(root, i, verify=True)]
    total = len(dataset.records)
    done_images = total - sum(min(manifest.shard_size, total - i * manifest.shard_size) for i in todo) if world == 1 else 0
    np_dtype = storage_dtype(loaded.dtype)
    remainder_names: list[str] | None = None
    for i in todo:
        start = i * manifest.shard_size
        shard_records = dataset.records[start:start + manifest.shard_size]
        chunks: dict[str, list[np.ndarray]] = {"embedding": [], "heads": [], "remainders": [], "index": []}
        skipped: list[SkippedFile] = []
        for b in range(0, len(shard_records), cfg.batch_size):
            if cancel is not None and cancel():
                raise ExtractionCancelled(
                    f"Extraction cancelled after {done_images} of {total} images; finished shards are kept in '{root}'."
                )
            batch, keep, bad = load_batch(loaded, shard_records[b:b + cfg.batch_size], start + b)
            skipped.extend(bad)
            if batch is not None:
                dec = decompose(loaded.visual, batch, scope)
                remainder_names = dec.remainder_names
                chunks["embedding"].append(dec.embedding.cpu().numpy().astype(np_dtype))
                chunks["heads"].append(dec.heads.cpu().numpy().astype(np_dtype))
                chunks["remainders"].append(dec.remainders.cpu().numpy().astype(np_dtype))
                chunks["index"].append(np.asarray(keep, dtype=np.int64))
            done_images += min(cfg.batch_size, len(shard_records) - b)
            if progress is not None:
                progress(done_images, total)
        arrays = {k: _stack(v, k, manifest, np_dtype) for k, v in chunks.items()}
        write_shard(root, i, arrays, skipped)

    _barrier()
    if rank == 0:
        names = remainder_names or _remainder_names_from_model(loaded, scope)
        manifest = read_manifest(root)
        missing = [i for i in range(manifest.n_shards) if not shard_is_valid(root, i)]
        if missing:
            raise CacheError(f"Shards {missing[:5]} of '{root}' are missing after extraction; re-run to complete.")
        manifest.remainder_names = names
        manifest.complete = True
        atomic_write_json(root / "manifest.json", asdict(manifest))
    _barrier()
    return FeatureCache(root)


def _remainder_names_from_model(loaded: LoadedModel, scope: tuple[int, ...]) -> list[str]:
    n = architecture_info(loaded.visual).n_layers
    names = ["embed"]
    for l in range(n):
        names += [f"attn_bias.{l}" if l in scope else f"attn.{l}", f"mlp.{l}"]
    return names + ["ln_post_bias"]


def _stack(parts: list[np.ndarray], name: str, manifest: CacheManifest, dtype: np.dtype) -> np.ndarray:
    if parts:
        return np.concatenate(parts, axis=0)
    d = manifest.embed_dim
    n_layers_scope, h = len(manifest.layers), manifest.n_heads
    n_rem = 2 * manifest.n_layers + 2
    shapes = {"embedding": (0, d), "heads": (0, n_layers_scope, h, d), "remainders": (0, n_rem, d), "index": (0,)}
    return np.zeros(shapes[name], dtype=np.int64 if name == "index" else dtype)


@torch.inference_mode()
def check_decomposition(loaded: LoadedModel, cache: FeatureCache, max_images: int | None = None,
                        batch_size: int = 32) -> dict:
    """Re-run ``encode_image`` on cached images and compare with the cached sum of parts."""
    n = len(cache) if max_images is None else min(len(cache), max_images)
    if n == 0:
        raise CacheError("The cache holds no images to check.")
    recon = cache.reconstruct()
    worst = 0.0
    for start in range(0, n, batch_size):
        rows = list(range(start, min(n, start + batch_size)))
        recs = [cache.records[r] for r in rows]
        batch, keep, bad = load_batch(loaded, recs, 0)
        if bad:
            raise CacheError(f"Image '{bad[0].path}' changed since extraction ({bad[0].reason}); re-extract.")
        e = loaded.model.encode_image(batch).double().cpu().numpy()
        r = recon[rows].astype(np.float64)
        rel = np.linalg.norm(r - e, axis=1) / np.maximum(np.linalg.norm(e, axis=1), 1e-300)
        worst = max(worst, float(rel.max()))
    return {"n_images": n, "dtype": str(loaded.dtype).replace("torch.", ""), "max_rel_error": worst}


def init_distributed_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("REFINECLIP_DEVICE", "").startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return True
