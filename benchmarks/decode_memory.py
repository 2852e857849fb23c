"""Peak memory of decoding big images (issue 37 item 8): what one pixel costs, per kind of image.

Writes two images of each kind (8-bit RGB PNG and JPEG, 16-bit grey PNG, 32-bit integer TIFF, RGBA
PNG; ``--side`` pixels square) and, in a fresh process for each kind and worker count, decodes them
exactly (``DecodeConfig(exact=True)``) through the model's transform (CLIP's: bicubic resize to 224,
centre crop), as extraction does. Reports the peak resident memory (Linux ``VmHWM``, reset before decoding) above the resident memory before, and
that per pixel (of one image, with workers=1: the cost :func:`refineclip_core.loading.decode.pixel_cost`
counts in the decoding budget). ``--code DIR`` runs another checkout's ``refineclip_core`` (the
before/after comparison: ``git archive HEAD~1 refineclip_core | tar -x -C /tmp/old``).

    nice python benchmarks/decode_memory.py --side 6000 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("rgb-png", "rgb-jpeg", "grey16-png", "int32-tiff", "rgba-png")

_CHILD = r"""
import sys
import torch
from torchvision import transforms as T
from PIL import Image
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.batches import DecodeConfig, iter_batches
torch.set_num_threads(1)
pre = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
ds = load_dataset(sys.argv[1])
Image.new("RGB", (8, 8)).resize((4, 4))
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")   # Linux: the peak (VmHWM) starts again from now
base = kib("VmRSS")
for batch in iter_batches(ds.records, [(0, len(ds.records))], pre, None, DecodeConfig(exact=True, workers=int(sys.argv[2]))):
    assert not batch.skipped, batch.skipped
print(kib("VmHWM") - base)
"""


def write_images(folder: Path, kind: str, side: int) -> None:
    import numpy as np
    from PIL import Image

    (folder / "c").mkdir(parents=True)
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([(x * 7) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
    arrays = {"rgb-png": (rgb, "png"), "rgb-jpeg": (rgb, "jpg"),
              "grey16-png": (((x * 7 + y * 3) % 65536).astype(np.uint16), "png"),
              "int32-tiff": ((x.astype(np.int64) * 1000 + y).astype(np.int32), "tif"),
              "rgba-png": (np.concatenate([rgb, ((x * y) % 256).astype(np.uint8)[..., None]], -1), "png")}
    arr, ext = arrays[kind]
    for i in range(2):
        Image.fromarray(arr).save(folder / "c" / f"img{i}.{ext}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--code", help="folder holding the refineclip_core to measure (default: this checkout)")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [args.code, os.environ.get("PYTHONPATH")])))
    pixels = args.side * args.side
    print(f"| image ({args.side} x {args.side}, two) | workers | peak above baseline | peak / (pixels x workers), bytes |",
          flush=True)
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="refineclip-decode-mem-") as tmp:
        for kind in args.kinds:
            folder = Path(tmp) / kind
            write_images(folder, kind, args.side)
            for w in args.workers:
                out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(w)], env=env, check=True, cwd=tmp,
                                     capture_output=True, text=True).stdout.split()[-1]
                peak = int(out) * 1024
                print(f"| {kind} | {w} | {peak / 2**20:,.0f} MiB | {peak / pixels / w:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
