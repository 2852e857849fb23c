"""Model families behind the vision-backend seam, at their real sizes with random weights (issue 34).

    nice -n 10 python benchmarks/families.py            # all five towers, batch 2, 3 repetitions, 1 thread
    python benchmarks/families.py --only PE-Core-T-16-384 --batch 4 --reps 5

For each architecture (``open_clip.create_model(name)``, no pretrained tag, nothing downloaded):
the largest relative error of the sum of parts against ``encode_image`` in float32 and float64
(Eq. 4), the time of :func:`~refineclip_core.features.decomposition.decompose` with the default
layers in scope (the last 4) over a plain ``encode_image`` (interleaved, medians, the ratio taken
within each repetition; on a shared machine the times are noisy, so the ratio of the matrix-multiply
FLOPs torch's profiler counts is given too: it leaves out the fused attention kernel of the plain
pass but counts the decomposition's recomputed attention, so it overstates the extra work a little),
and the bytes per image the decomposition holds beyond the forward pass
(:meth:`~refineclip_core.features.backends.VisionBackend.capture_bytes_per_image`; towers that pool
over every token keep every token's terms), which ``extract`` checks against
``REFINECLIP_MEMORY_BUDGET`` before it starts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refineclip_core.features.backends import backend_for  # noqa: E402
from refineclip_core.features.decomposition import decompose, resolve_layers  # noqa: E402

ARCHS = ("ViT-B-16-SigLIP2", "PE-Core-T-16-384", "EVA02-B-16", "ViT-L-14-CLIPA", "coca_ViT-B-32")


def _encode(model, images):
    return model.encode_image(images, normalize=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@torch.inference_mode()
def measure(name: str, batch: int, reps: int) -> dict:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():  # LayerNorm / bias parameters off their trivial init
        for p in model.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    backend = backend_for(model.visual)
    info = backend.info
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    scope = resolve_layers(info.n_layers, 4)
    err32 = _rel(decompose(model.visual, images, scope).reconstruct(), _encode(model, images))
    enc, dec, ratio = [], [], []
    for r in range(reps + 1):
        times = {}
        for kind in (("enc", "dec") if r % 2 else ("dec", "enc")):
            t0 = time.perf_counter()
            _encode(model, images) if kind == "enc" else decompose(model.visual, images, scope)
            times[kind] = time.perf_counter() - t0
        if r:  # the first repetition warms up
            enc.append(times["enc"]), dec.append(times["dec"]), ratio.append(times["dec"] / times["enc"])
    flops = {}
    from torch.profiler import profile

    for kind, run in (("enc", lambda: _encode(model, images)), ("dec", lambda: decompose(model.visual, images, scope))):
        with profile(with_flops=True) as prof:
            run()
        flops[kind] = sum(e.flops for e in prof.key_averages())
    model = model.double()
    err64 = _rel(decompose(model.visual, images.double(), "all").reconstruct(), _encode(model, images.double()))
    return {"name": name, "family": info.family, "pool": info.pool, "layers": info.n_layers, "heads": info.n_heads,
            "tokens": info.n_tokens, "prefix": info.n_prefix_tokens, "err32": err32, "err64": err64,
            "enc_s": statistics.median(enc) / batch, "dec_s": statistics.median(dec) / batch,
            "ratio": statistics.median(ratio), "flops": flops["dec"] / flops["enc"], "bytes": backend.capture_bytes_per_image(scope, 4),
            "merge": backend.merge_target()[0] or "visual.head.proj.weight (added by the export, config beside)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=ARCHS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 by default: on a shared machine more threads than free cores "
                         "make both passes wait on each other and the ratio meaningless)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.reps} repetitions, float32 on {torch.get_num_threads()} CPU threads; "
          "time per image; ratio = decompose (last 4 layers) / encode_image")
    print("| architecture | family, pool | layers x heads, tokens (prefix) | rel. err fp32 | rel. err fp64 (all layers) "
          "| encode_image | decompose | time ratio | FLOP ratio | bytes / image held | edit merges into |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.only or ARCHS:
        m = measure(name, args.batch, args.reps)
        print(f"| {m['name']} | {m['family']}, {m['pool']} | {m['layers']} x {m['heads']}, {m['tokens']} ({m['prefix']}) "
              f"| {m['err32']:.1e} | {m['err64']:.1e} | {m['enc_s'] * 1e3:.0f} ms | {m['dec_s'] * 1e3:.0f} ms "
              f"| {m['ratio']:.2f}x | {m['flops']:.2f}x | {m['bytes'] / 2**20:.1f} MiB | {m['merge']} |", flush=True)


if __name__ == "__main__":
    main()
