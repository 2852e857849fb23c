"""Measure issue 37 item 3: a zip-bomb ``.pt`` (a zero tensor saved by ``torch.save``, its zip
rewritten with deflate) loaded through the project's reader vs ``torch.load`` alone.

    python benchmarks/zip_bomb.py [--gib 2] [--budget 1GB]

``read_state_dict`` runs under ``--budget``; ``load_model`` (the Load page's path: the demo model's
architecture with the bomb as its checkpoint) under the default budget (75% of the memory available),
where the bomb is refused because it expands to more than four times the model's weights. Each load runs in a fresh interpreter and prints its peak RSS (``VmHWM``) before and after. The
bomb is written without holding the tensor in memory (a sparse file mapped as the storage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[3])

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import open_clip, torch  # imported before the first measurement: only the load itself is measured
from refineclip_core.errors import RefineClipError
from refineclip_core.loading.checkpoints import read_state_dict
before = hwm_mib()
out = {"before_mib": before}
try:
    if sys.argv[2] == "torch.load":
        torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    elif sys.argv[2] == "load_model":  # the dashboard's path: the demo architecture with the bomb as checkpoint
        from refineclip_core.loading.models import DEMO_DIR, ModelSpec, load_model
        load_model(ModelSpec("refineclip-demo", checkpoint=sys.argv[1], roots=(os.path.dirname(sys.argv[1]),),
                             model_config=str(DEMO_DIR / "refineclip-demo.json")))
    else:
        from refineclip_core.loading.confine import Confinement
        with Confinement.of([os.path.dirname(sys.argv[1])]).active():
            read_state_dict(sys.argv[1])
    out["result"] = "loaded"
except RefineClipError as exc:
    out["result"] = str(exc)
out["peak_mib"] = hwm_mib()
print(json.dumps(out))
"""


def write_bomb(path: Path, n_bytes: int) -> Path:
    """``torch.save`` of ``n_bytes`` of zeros (from a sparse mapped file), re-deflated into ``path``."""
    sparse = path.with_suffix(".zeros")
    with open(sparse, "wb") as fh:
        fh.truncate(n_bytes)
    storage = torch.UntypedStorage.from_file(str(sparse), shared=False, nbytes=n_bytes)
    plain = path.with_suffix(".plain")
    torch.save({"w": torch.empty(0, dtype=torch.uint8).set_(storage)}, plain)
    del storage
    sparse.unlink()
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            with src.open(info) as r, dst.open(info.filename, "w", force_zip64=True) as w:
                while block := r.read(1 << 24):
                    w.write(block)
    plain.unlink()
    return path


def measure(path: Path, how: str, budget: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "REFINECLIP_MEMORY_BUDGET"}
    if budget:
        env["REFINECLIP_MEMORY_BUDGET"] = budget
    run = subprocess.run([sys.executable, "-c", CHILD, str(path), how, str(ROOT)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--skip-torch-load", action="store_true", help="do not run the unprotected torch.load")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bomb = write_bomb(Path(tmp) / "bomb.pt", int(args.gib * 2**30))
        with zipfile.ZipFile(bomb) as zf:
            expands = sum(i.file_size for i in zf.infolist())
        print(f"file {bomb.stat().st_size / 2**20:.2f} MiB on disk, entries expand to {expands / 2**20:.0f} MiB; "
              f"budget {args.budget}")
        runs = [("refineclip read_state_dict", args.budget),
                ("refineclip load_model (demo architecture, default budget)", None),
                *(() if args.skip_torch_load else [("torch.load", None)])]
        for how, budget in runs:
            r = measure(bomb, how.split()[1] if how.startswith("refineclip") else how, budget)
            print(f"{how}: peak RSS {r['before_mib']:.0f} -> {r['peak_mib']:.0f} MiB "
                  f"(+{r['peak_mib'] - r['before_mib']:.0f}); {r['result']}")


if __name__ == "__main__":
    main()
