"""Scale: data-parallel extraction under torchrun, and extraction in reduced precision.

The distributed tests launch the real command line through ``torch.distributed.run`` (what
the ``torchrun`` script calls) with two CPU processes on the gloo backend, exactly as a user
would: ``torchrun --nproc_per_node=2 -m refineclip_core.cli extract ...``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.extraction import ExtractionConfig, check_decomposition, extract, load_batch
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.models import ModelSpec, load_model

REPO = Path(__file__).resolve().parent.parent
ARRAYS = ("embeddings", "heads", "remainders", "index")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # one intra-op thread in every process, so the reference and the ranks do the same arithmetic
    # progress goes into the captured stderr too (each rank reports its own share of the images)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "REFINECLIP_PROGRESS": "always"}


def _extract_argv(files, data, out, batch_size=1):
    return ["-m", "refineclip_core.cli", "extract", "--model", files["name"], "--model-config", str(files["config"]),
            "--checkpoint", str(files["checkpoint"]), "--data", str(data), "--out", str(out),
            "--layers", "2", "--batch-size", str(batch_size)]


def _torchrun(argv, nproc=2, timeout=90):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *argv]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_rank_extraction_equals_single_process(tiny_model_files, image_folder, tmp_path):
    # batch 1 x 8 batches per shard: 18 images -> shards of 8, 8, 2; rank 0 owns 0 and 2, rank 1 owns 1
    single = subprocess.run([sys.executable, *_extract_argv(tiny_model_files, image_folder, tmp_path / "single")],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=90)
    assert single.returncode == 0, single.stderr[-2000:]
    dist = _torchrun(_extract_argv(tiny_model_files, image_folder, tmp_path / "dist"))
    assert dist.returncode == 0, dist.stderr[-3000:]

    ref, par = FeatureCache(tmp_path / "single"), FeatureCache(tmp_path / "dist")
    assert par.manifest.n_shards == 3 and len(par) == 18
    for name in ARRAYS:
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(par, name))
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(a, b), name
    assert np.array_equal(ref.text, par.text)
    assert ref.manifest.remainder_names == par.manifest.remainder_names and par.manifest.complete
    assert [r.path for r in ref.records] == [r.path for r in par.records]

    # each rank counted only its own shards (8 + 2 and 8 images), the single process all 18,
    # and only rank 0 reported the finished cache
    assert "10/10" in dist.stderr and "8/8" in dist.stderr and "18/18" not in dist.stderr
    assert "18/18" in single.stderr
    assert dist.stdout.count("wrote feature cache") == 1 and "18 images" in dist.stdout


@pytest.mark.slow
def test_rank0_error_reaches_every_rank(tiny_model_files, image_folder, tmp_path):
    """Rank 0 refuses a folder that is not a cache; rank 1 must stop with the same reason
    instead of waiting at a barrier."""
    out = tmp_path / "not-a-cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = _torchrun(_extract_argv(tiny_model_files, image_folder, out))
    assert proc.returncode != 0
    assert "Rank 0 failed: " in proc.stderr and "is not a feature cache" in proc.stderr
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bf16_extraction(tiny_model_files, class_folder, tmp_path):
    """bfloat16 on CPU (fp16 takes the same path but CPU fp16 matmuls are slow; the benchmark
    reports both)."""
    precision = "bf16"
    spec = dict(name=tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                checkpoint=str(tiny_model_files["checkpoint"]))
    half = load_model(ModelSpec(**spec, precision=precision))
    full = load_model(ModelSpec(**spec))
    ds = load_dataset(class_folder)
    cfg = ExtractionConfig(layers="all", batch_size=6, shard_batches=2)
    cache = extract(half, ds, tmp_path / precision, cfg)
    assert cache.manifest.dtype == "float32" and cache.heads.dtype == np.float32 and len(cache) == 18

    # the stored embeddings are the half-precision model's own output, widened exactly
    with torch.inference_mode():
        own = torch.cat([half.model.encode_image(load_batch(half, ds.records[i:i + 6], i)[0])
                         for i in range(0, 18, 6)])
    assert np.array_equal(np.asarray(cache.embeddings), own.float().numpy())
    # the parts still add up, to within a few units of the format's rounding (2^-8 for bf16)
    unit = float(torch.finfo(half.dtype).eps)
    assert check_decomposition(half, cache)["max_rel_error"] <= 8 * unit
    # and the half-precision heads are close to the float32 ones
    ref = extract(full, ds, tmp_path / "fp32", cfg)
    h, r = np.asarray(cache.heads, dtype=np.float64), np.asarray(ref.heads, dtype=np.float64)
    assert np.linalg.norm(h - r) / np.linalg.norm(r) <= 16 * unit
