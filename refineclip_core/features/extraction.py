"""Feature extraction: one forward pass per image, decomposed (Eq. 4), streamed into a cache.

:func:`extract` is the only expensive step of the whole method; everything after it runs
on the cached arrays. It streams the dataset in shards of consecutive records, writes each
shard atomically, skips shards that are already on disk (so an interrupted run resumes), and
under ``torchrun`` each rank processes the shards ``i % world_size == rank`` and rank 0 marks
the cache complete. Shard contents do not depend on the number of processes, so a
data-parallel cache equals a single-process one (``tests/test_distributed.py``).

Distributed protocol (rank 0's steps end in a broadcast of their outcome, so an error on
rank 0 reaches every rank instead of leaving them at a barrier; an error on another rank
ends that process, and ``torchrun`` then stops the others):

1. rank 0 validates or (re)creates the manifest, ``records.json`` and ``text.npy``; its
   outcome (or its error message) is broadcast, which also serves as the barrier after which
   the other ranks read the manifest;
2. every rank writes only its own shards (atomically);
3. barrier; rank 0 checks that all shards exist and marks the manifest complete; its outcome
   is broadcast again, and every rank returns the same :class:`FeatureCache` or raises the
   same error.

The output folder must be on a file system that every rank sees (on several machines: a
shared mount at the same path), and so must the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from ..errors import CacheError, Cancelled, RefineClipError
from ..files import atomic_write_bytes, atomic_write_json, npy_bytes
from ..loading.batches import DecodeConfig, decode_batch, decode_min_side, iter_batches
from ..loading.confine import pinned
from ..loading.data import ImageDataset, ImageRecord, SkippedFile
from ..loading.models import MODEL_FINGERPRINT, LoadedModel
from ..progress import CancelFn, Progress, never, silent
from .cache import FeatureCache
from .cache_format import CacheManifest, read_manifest, records_to_json, shard_is_valid, write_shard
from .decomposition import architecture_info, decompose, resolve_layers
from .scoring import Scoring
from .zeroshot import DEFAULT_TEMPLATES, class_text_embeddings

#: The stage :func:`extract` reports (``progress(EXTRACT_STAGE, done, total)`` after every batch).
EXTRACT_STAGE = "Extracting per-head features"


#: How head contributions and remainders are stored: ``auto`` in the storage dtype of E (float32,
#: float64 for fp64 models), or ``fp32`` / ``fp16`` (half the bytes; the decomposition error it costs
#: is what ``refineclip check-decomposition`` reports, ~1e-3 relative). E itself is never rounded.
Store = Literal["auto", "fp32", "fp16"]
STORES: tuple[str, ...] = ("auto", "fp32", "fp16")


@dataclass(frozen=True)
class ExtractionConfig:
    layers: int | str | tuple[int, ...] = 4
    batch_size: int = 32
    shard_batches: int = 8
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    decode: DecodeConfig = DecodeConfig()    # reduced JPEG decoding, parallel workers (loading.batches)
    store: Store = "auto"

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise RefineClipError(f"Unknown storage {self.store!r}; use {', '.join(STORES)}.")

    @property
    def shard_size(self) -> int:
        return self.batch_size * self.shard_batches


class ExtractionCancelled(Cancelled):
    """The user cancelled an extraction; finished shards stay on disk and the next run resumes from them."""


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
        "decode_min_side": decode_min_side(loaded, cfg.decode.exact),
        "dtype": str(loaded.dtype),
        "parts_dtype": str(parts_dtype(loaded.dtype, cfg.store)),
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


def _on_rank0_then_share(rank: int, world: int, step: Callable[[], None]) -> None:
    """Run ``step`` on rank 0 only and make every rank share its outcome.

    Rank 0's error message is broadcast, so the other ranks raise a :class:`CacheError` with
    the same message instead of waiting forever at a barrier rank 0 never reaches. The
    broadcast also orders the ranks: the others return only after rank 0 finished ``step``.
    """
    error: BaseException | None = None
    if rank == 0:
        try:
            step()
        except Exception as exc:  # shared below, then re-raised unchanged on rank 0
            error = exc
    if world > 1:
        message = [None if error is None else (str(error) or type(error).__name__)]
        torch.distributed.broadcast_object_list(message, src=0)
        if rank != 0 and message[0] is not None:
            raise CacheError(f"Rank 0 failed: {message[0]}")
    if error is not None:
        raise error


def _to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A CPU array in the storage dtype (bf16/fp16 tensors widen exactly to float32 first;
    numpy has no bfloat16; ``float16`` storage rounds from there)."""
    arr = t.detach().to(device="cpu", dtype=torch.float64 if dtype == np.float64 else torch.float32).numpy()
    return arr.astype(dtype, copy=False)


def storage_dtype(model_dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if model_dtype == torch.float64 else np.dtype(np.float32)


def parts_dtype(model_dtype: torch.dtype, store: Store) -> np.dtype:
    """The dtype of the cached head contributions and remainders (see :data:`Store`)."""
    return {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}.get(store, storage_dtype(model_dtype))


def load_batch(loaded: LoadedModel, records: Sequence[ImageRecord], start: int, *, min_side: int | None = None
               ) -> tuple[torch.Tensor | None, list[int], list[SkippedFile]]:
    """Decode and preprocess records in the calling thread; returns the tensor, their record indices
    and skips, read under the confinement in force (:mod:`refineclip_core.loading.confine`); ``min_side``
    decodes JPEGs at a reduced scale (e.g. a cache's ``manifest.decode_min_side``)."""
    batch = decode_batch(records, start, loaded.preprocess, min_side)
    return batch.to(loaded.device, loaded.dtype), batch.keep, batch.skipped


def extract(
    loaded: LoadedModel,
    dataset: ImageDataset,
    out_dir: str | os.PathLike,
    cfg: ExtractionConfig = ExtractionConfig(),
    progress: Progress | None = None,
    cancel: CancelFn | None = None,
) -> FeatureCache:
    """Extract (or resume extracting) the decomposed features of ``dataset`` into ``out_dir``.

    ``progress`` and ``cancel`` follow :mod:`refineclip_core.progress`: one call per batch of
    this rank's images, cancellation between batches (:class:`ExtractionCancelled`).
    """
    progress, cancel = progress or silent, cancel or never
    info = architecture_info(loaded.visual)
    scope = resolve_layers(info.n_layers, cfg.layers)
    _check_capture_budget(loaded, scope, cfg.batch_size)
    root = Path(out_dir)
    rank, world = _dist_info()
    fingerprint = cache_fingerprint(loaded, dataset, scope, cfg)

    scored = Scoring.of_model(loaded.model)
    logit_bias = scored.bias if scored.sigmoid else None   # the manifest records how the model scores

    def prepare() -> None:  # rank 0 only
        manifest = read_manifest(root)
        if manifest is not None and manifest.fingerprint != fingerprint:
            # model, checkpoint, preprocessing, scope or files changed: the cache is stale
            shutil.rmtree(root / "shards", ignore_errors=True)
            manifest = None
        elif root.exists() and manifest is None and any(root.iterdir()):
            if not (root / "shards").exists():
                raise CacheError(f"'{root}' exists and is not a feature cache; choose an empty or new --out folder.")
        if manifest is None or not manifest.complete:
            text = class_text_embeddings(loaded, dataset.classes, cfg.templates)
            if not np.isfinite(text).all():
                raise RefineClipError("The model's class-prompt embeddings hold NaN or infinity; nothing was "
                                      "extracted (check the checkpoint's text tower, or use --precision fp32).")
            manifest = CacheManifest(
                fingerprint=fingerprint,
                model=loaded.spec.to_dict(),
                extra={MODEL_FINGERPRINT: loaded.spec.fingerprint()},  # checked when the cache is opened
                model_name=loaded.model_name,
                layers=list(scope),
                n_layers=info.n_layers,
                n_heads=info.n_heads,
                embed_dim=info.embed_dim,
                remainder_names=[],
                classes=list(dataset.classes),
                templates=list(cfg.templates),
                logit_scale=loaded.logit_scale,
                logit_bias=logit_bias,
                dtype=str(storage_dtype(loaded.dtype)),
                parts_dtype=str(parts_dtype(loaded.dtype, cfg.store)),
                decode_min_side=decode_min_side(loaded, cfg.decode.exact),
                data_root=dataset.root,
                layout=dataset.layout,
                n_records=len(dataset.records),
                shard_size=cfg.shard_size,
            )
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(root / "text.npy", npy_bytes(text))
            atomic_write_json(root / "records.json", records_to_json(dataset.records, dataset.skipped))
            atomic_write_json(root / "manifest.json", asdict(manifest))
        else:
            # image features are still valid; only the class prompts changed: refresh the texts
            prompts = manifest.classes != list(dataset.classes) or manifest.templates != list(cfg.templates)
            if prompts:
                atomic_write_bytes(root / "text.npy", npy_bytes(class_text_embeddings(loaded, dataset.classes,
                                                                                     cfg.templates)))
                manifest.classes, manifest.templates = list(dataset.classes), list(cfg.templates)
            if prompts or manifest.logit_bias != logit_bias:   # a cache from before the scoring was recorded
                manifest.logit_bias = logit_bias
                atomic_write_json(root / "manifest.json", asdict(manifest))

    _on_rank0_then_share(rank, world, prepare)
    manifest = read_manifest(root)
    if manifest is None:
        raise CacheError(f"Could not read the manifest in '{root}'.")
    if manifest.complete:
        return FeatureCache(root)

    # progress counts this rank's share of the records (all of them in a single process)
    n_records = len(dataset.records)
    mine = [i for i in range(manifest.n_shards) if i % world == rank]
    todo = [i for i in mine if not shard_is_valid(root, i, verify=True)]

    def shard_len(i: int) -> int:
        return min(manifest.shard_size, n_records - i * manifest.shard_size)

    total = sum(shard_len(i) for i in mine)
    done_images = total - sum(shard_len(i) for i in todo)
    dtypes = {"embedding": storage_dtype(loaded.dtype), "heads": np.dtype(manifest.parts_dtype or manifest.dtype)}
    dtypes["remainders"] = dtypes["heads"]
    remainder_names: list[str] | None = None
    # every batch of every shard still to do, in order: the decoders work ahead across shard boundaries
    spans = [(i, b, min(b + cfg.batch_size, i * manifest.shard_size + shard_len(i)))
             for i in todo for b in range(i * manifest.shard_size, i * manifest.shard_size + shard_len(i), cfg.batch_size)]
    with pinned(dataset.roots).active():  # read under the confinement the dataset was listed under
        batches = iter_batches(dataset.records, [(a, b) for _, a, b in spans], loaded.preprocess,
                               manifest.decode_min_side, cfg.decode, pin=loaded.device.type == "cuda")
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("embedding", "heads", "remainders", "index")}
    skipped: list[SkippedFile] = []
    try:
        for n, ((i, a, b), batch) in enumerate(zip(spans, batches)):
            if cancel():
                raise ExtractionCancelled(
                    f"Extraction cancelled after {done_images} of {total} images; finished shards are kept in '{root}'."
                )
            skipped.extend(batch.skipped)
            images = batch.to(loaded.device, loaded.dtype)
            if images is not None:
                dec = decompose(loaded.visual, images, scope)
                _check_finite_features(dec, dataset.records, batch.keep)
                remainder_names = dec.remainder_names
                for k in ("embedding", "heads", "remainders"):
                    chunks[k].append(_to_numpy(getattr(dec, k), dtypes[k]))
                chunks["index"].append(np.asarray(batch.keep, dtype=np.int64))
            done_images += b - a
            progress(EXTRACT_STAGE, done_images, total)
            if n + 1 == len(spans) or spans[n + 1][0] != i:     # the shard's last batch: write it whole
                if not chunks["index"] and remainder_names is None:
                    remainder_names = _remainder_names_from_model(loaded, scope)
                write_shard(root, i, {k: _stack(v, k, manifest, dtypes.get(k), remainder_names) for k, v in chunks.items()},
                            skipped)
                chunks, skipped = {k: [] for k in chunks}, []
    finally:
        batches.close()

    def finalise() -> None:  # rank 0 only, after every rank wrote its shards
        final = read_manifest(root)
        if final is None:
            raise CacheError(f"The manifest in '{root}' disappeared during extraction; re-run to complete.")
        missing = [i for i in range(final.n_shards) if not shard_is_valid(root, i)]
        if missing:
            raise CacheError(f"Shards {missing[:5]} of '{root}' are missing after extraction; re-run to complete.")
        final.remainder_names = remainder_names or _remainder_names_from_model(loaded, scope)
        final.complete = True
        atomic_write_json(root / "manifest.json", asdict(final))

    _barrier()
    _on_rank0_then_share(rank, world, finalise)
    return FeatureCache(root)


def _check_capture_budget(loaded: LoadedModel, scope: tuple[int, ...], batch_size: int) -> None:
    """Refuse, before anything runs, a batch whose decomposition would hold more than the memory
    budget (``REFINECLIP_MEMORY_BUDGET``): towers that pool over every token keep every token's terms."""
    from ..loading.budget import format_bytes, memory_budget
    from .backends import backend_for

    per_image = backend_for(loaded.visual).capture_bytes_per_image(scope, torch.finfo(loaded.dtype).bits // 8)
    budget, _ = memory_budget()
    if budget is not None and per_image * batch_size > budget:
        raise RefineClipError(
            f"Decomposing {batch_size} images at once would hold {format_bytes(per_image * batch_size)} "
            f"({format_bytes(per_image)} per image) beyond the forward pass, over the memory budget of "
            f"{format_bytes(budget)}; use a smaller --batch-size or fewer --layers.")


def _check_finite_features(dec, records: Sequence[ImageRecord], keep: Sequence[int]) -> None:
    """Refuse a batch whose features hold NaN or infinity (weights that overflow, e.g. in fp16):
    written into the cache, they would turn every accuracy and score computed from it into NaN."""
    for name in ("embedding", "heads", "remainders"):
        values = getattr(dec, name)
        finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            path = records[int(keep[row])].path  # keep: the record index of each row
            raise RefineClipError(
                f"The model produced non-finite features (NaN or infinity) for '{path}' and "
                f"{int((~finite).sum()) - 1} more images of its batch; nothing of the batch was written (check the "
                "checkpoint's weights, or use --precision fp32: fp16 overflows above 65,504).")


def _remainder_names_from_model(loaded: LoadedModel, scope: tuple[int, ...]) -> list[str]:
    """The remainder names the tower's decomposition gives (from one blank image: they depend on the
    family's readout, :mod:`.backends`), for a rank or shard that decomposed no image."""
    size = loaded.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    blank = torch.zeros(1, 3, int(h), int(w), device=loaded.device, dtype=loaded.dtype)
    return decompose(loaded.visual, blank, scope).remainder_names


def _stack(parts: list[np.ndarray], name: str, manifest: CacheManifest, dtype: np.dtype | None,
           names: list[str] | None) -> np.ndarray:
    if parts:
        return np.concatenate(parts, axis=0)
    d = manifest.embed_dim
    n_layers_scope, h = len(manifest.layers), manifest.n_heads
    n_rem = len(names or ())
    shapes = {"embedding": (0, d), "heads": (0, n_layers_scope, h, d), "remainders": (0, n_rem, d), "index": (0,)}
    return np.zeros(shapes[name], dtype=np.int64 if name == "index" else dtype)


@torch.inference_mode()
def check_decomposition(loaded: LoadedModel, cache: FeatureCache, max_images: int | None = None,
                        batch_size: int = 32) -> dict:
    """Re-run ``encode_image`` on cached images (decoded as they were for the cache) and compare
    with the cached sum of parts (Eq. 4): ``max_rel_error``. ``stored_max_rel_error`` compares the
    sum of the stored parts with the stored E, i.e. what the storage (e.g. ``--store fp16``) costs."""
    n = len(cache) if max_images is None else min(len(cache), max_images)
    if n == 0:
        raise CacheError("The cache holds no images to check.")
    worst, stored = 0.0, 0.0
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        recs = [cache.records[r] for r in rows]
        batch, keep, bad = load_batch(loaded, recs, 0, min_side=cache.manifest.decode_min_side)
        if bad:
            raise CacheError(f"Image '{bad[0].path}' changed since extraction ({bad[0].reason}); re-extract.")
        e = loaded.model.encode_image(batch).double().cpu().numpy()
        r = cache.reconstruct(rows)
        worst = max(worst, float(relative_error(r, e).max()))
        stored = max(stored, float(relative_error(r, cache.embeddings[rows]).max()))
    return {"n_images": n, "dtype": str(loaded.dtype).replace("torch.", ""), "parts_dtype": str(cache.heads.dtype),
            "max_rel_error": worst, "stored_max_rel_error": stored}


def relative_error(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``||approx − exact|| / ||exact||`` per row, in float64."""
    a, e = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return np.linalg.norm(a - e, axis=1) / np.maximum(np.linalg.norm(e, axis=1), 1e-300)


def init_distributed_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment.

    The ranks only synchronise (barriers and one small broadcast; no tensors are reduced), so
    the process group always uses the ``gloo`` backend, on CPU and GPU machines alike. On a
    GPU machine each rank's default CUDA device becomes ``cuda:LOCAL_RANK``, so ``--device
    cuda`` puts rank ``r`` of a node on its ``r``-th GPU (an explicit ``cuda:K`` is kept).
    Returns whether a process group with more than one rank is in use.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available() and torch.cuda.device_count() > 0 and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
    return True
