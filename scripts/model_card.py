"""Render the SigLIP-shaped demo model's card, ``assets/demo_siglip/README.md``, from the files the
training script and the demo benchmark wrote, so that no number in it is typed by hand.

    python scripts/model_card.py                       # assets/demo_siglip/README.md from its metadata.json
    python scripts/model_card.py DIR --out FILE        # another training run's folder
    python scripts/model_card.py --check               # exit 1 when the committed card is out of date

Sources: ``DIR/metadata.json`` (``python -m refineclip_core.demo.train --recipe siglip``: the architecture,
the command that ran, the learning curve, the balanced test sample's accuracies) and the ``demo-siglip``
section of ``benchmarks/RESULTS.md`` (``python benchmarks/demo_world.py --model-dir assets/demo_siglip``:
the checks on the exported edit, quoted as written). Without a metadata.json the card says the model is
not trained yet, and every number is left out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "assets" / "demo_siglip"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "demo-siglip"
TARGETS = ("landbird", "waterbird")

INTRO = """# The SigLIP-shaped demo model

A second embedded model, beside the CLIP-shaped demo model of `assets/demo`: the same procedural bird
world (`refineclip_core/demo/world.py`), the same captions and optimisation, but the image tower and
the loss of SigLIP (Zhai et al., 2023) as open_clip builds them (`refineclip_core/demo/siglip.py`):

- **vision**: timm's `{trunk}` trunk at {size} px (the world's 48 px images resized; patch 16), with
  attention-map pooling (`timm_pool: {pool}`: a learned query attends over the patch tokens, then an
  output projection and a residual MLP) and no projection after the pool (`timm_proj: {proj}`); the
  embedding is the pool's output, {embed}-d;
- **text**: open_clip's text transformer ({text_layers} layers, width {text_width}, {text_heads} heads,
  context {context}) with its local BPE tokenizer (nothing is downloaded);
- **loss**: the pairwise sigmoid loss with a learned logit bias (initialised at {bias}), every caption
  true of an image counted as a positive.

It exists so that everything RefineCLIP does (the exact per-head decomposition, the scores, ablation,
the guard and the exported edit) is exercised on a tower that pools over every token and has no
projection matrix: the exported edit goes into a linear layer added after the pool (the pool ends in its
MLP's residual, which no edit merges into exactly; for this trunk the layer is timm's own classifier head,
`visual.trunk.head`, with a zero bias: `refineclip_core/edit/export.py`), written with its open_clip config
beside the weights. `ModelSpec("demo-map")`, `refineclip ... --model demo-map`
and the Load page's "demo (SigLIP-shaped, map pooling)" load it.

This card is written by `python scripts/model_card.py` from `metadata.json` and from the `demo-siglip`
section of `benchmarks/RESULTS.md`; do not edit it by hand.
"""

LOADING = """## Loading it with plain open_clip

```python
import open_clip
open_clip.add_model_config("assets/demo_siglip/{name}.json")
model = open_clip.create_model("{name}", pretrained="assets/demo_siglip/{name}.safetensors")
```
"""


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def trained(meta: dict) -> list[str]:
    """The recipe, the training run and the balanced test sample's accuracies, from ``metadata.json``."""
    tc = meta["train_config"]
    curve = meta.get("learning_curve") or []
    last = curve[-1] if curve else {}
    env = meta.get("environment", {})
    copied = "" if "--out assets/demo_siglip" in meta["command"] else " (its `--out` folder's three files were " \
                                                                     "then copied here)"
    lines = ["## How it was trained", "", f"The command that ran, as the script recorded it{copied}:", "",
             f"    {meta['command']}", "",
             f"{tc['steps']:,} AdamW steps, batch {tc['batch_size']}, learning rate {tc['lr']:g}, weight decay "
             f"{tc['weight_decay']:g}, seed {meta['seed']}, {env.get('threads', tc.get('threads'))} CPU thread(s); "
             f"{meta['train_seconds'] / 60:.1f} minutes of training (torch {env.get('torch', '?')}, open_clip "
             f"{env.get('open_clip', '?')}). {meta['parameters'] / 1e6:.2f} M parameters; the weights are stored in "
             f"{meta['checkpoint_dtype']} ({meta['checkpoint_bytes'] / 2**20:.1f} MiB). "
             f"The penalty on the MLPs' share of the pooled embedding (`MapMlpShare`, weight {tc['cls_mlp_penalty']:g}) "
             "keeps the attention heads carrying the prediction.", ""]
    if curve:
        lines += ["| step | loss | MLP share | val worst group | val average group | val unrelated |",
                  "|---|---|---|---|---|---|"]
        for p in curve:
            v = p.get("val", {})
            lines.append(f"| {p['step']} | {p['loss']:.3f} | {p.get('cls_mlp_share', float('nan')):.3f} | "
                         f"{pct(v.get('worst_group', float('nan')))} | {pct(v.get('avg_group', float('nan')))} | "
                         f"{pct(v.get('unrelated', float('nan')))} |")
        lines.append("")
        lines.append(f"Final loss {last['loss']:.3f}.")
        lines.append("")
    test = meta["test"]
    m = test["metrics"]
    lines += ["## What it gets right and wrong (measured, zero-shot over all "
              f"{len(m['per_class'])} classes)", "",
              f"On a balanced test sample (seed {test['seed']}, {test['per_group']} images per group and per "
              f"unrelated class; {m['n_images']:,} images):", "",
              "| group | accuracy |", "|---|---|"]
    lines += [f"| {g} | {pct(a)} |" for g, a in m["groups"].items()]
    lines += [f"| average group / worst group | {pct(m['avg_group'])} / {pct(m['worst_group'])} |",
              f"| unrelated classes ({len(m['per_class']) - len(TARGETS)} objects) | {pct(m['unrelated'])} |", ""]
    gap = max(m["groups"].values()) - m["worst_group"]
    lines.append(f"The gap between the best and the worst group is {100 * gap:.1f} points: "
                 + ("the model has learned the background shortcut the edit is meant to find and fix."
                    if gap >= 0.3 and m["worst_group"] > 0 else
                    "with a worst group at 0% the model knows only the background, and no edit can recover a bird "
                    "cue it never learned." if m["worst_group"] == 0 else
                    "a small gap leaves the edit little to fix."))
    return lines + [""]


def benchmark_lines(results: Path) -> list[str]:
    """The ``demo-siglip`` section's checks on the exported edit, quoted (empty when not run yet)."""
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    m = re.search(rf"<!-- {SECTION}:start -->\n(.*?)<!-- {SECTION}:end -->", text, re.S)
    out = ["## The demo benchmark on it", ""]
    if m is None:
        return out + [f"Not run yet: `python benchmarks/demo_world.py --model-dir assets/demo_siglip` writes the "
                      f"`{SECTION}` section of `benchmarks/RESULTS.md`.", ""]
    body = m.group(1)
    written = re.search(r"Written by .*?(?=\n\n)", body, re.S)
    checks = re.search(r"Checks on the exported edit.*?(?=\n\n|\Z)", body, re.S)
    extra: list[str] = []      # the first draws' checks (bullets, their wrapped lines joined)
    for line in body.splitlines():
        if line.startswith(("- Decomposition:", "- The exported edit of world")):
            extra.append(line)
        elif extra and line.startswith("  ") and not extra[-1].endswith("\n"):
            extra[-1] += " " + line.strip()
        elif extra and not extra[-1].endswith("\n"):
            extra[-1] += "\n"
    extra = [e.strip() for e in extra]
    out += [f"From the `{SECTION}` section of `benchmarks/RESULTS.md` (written by `benchmarks/demo_world.py`):", ""]
    if written:
        out += [" ".join(written.group(0).split()), ""]
    table = body.splitlines()
    head = [i for i, line in enumerate(table) if line.startswith("| method |")]
    if head:        # the table's header, and the rows of zero-shot and of the exported edit
        i = head[0]
        out += table[i:i + 2] + [line for line in table[i + 2:] if line.startswith(("| zero-shot |", "| **RefineCLIP-fit: "))
                                 and "concept removed" not in line] + [""]
    if checks:
        out += [re.sub(r"\s*\n\s+", " ", checks.group(0)).strip(), ""]
    if extra:
        out += extra + [""]
    return out


def render(folder: Path = DEFAULT_DIR, results: Path = RESULTS) -> str:
    """The card's Markdown for the model in ``folder``."""
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        from refineclip_core.demo.siglip import siglip_model_config

        cfg, meta, name = siglip_model_config(), None, "refineclip-demo-map"
    else:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cfg, name = meta["train_config"]["model_config"], meta["model_name"]
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    parts = [INTRO.format(trunk=v["timm_model_name"], size=v["image_size"], pool=v["timm_pool"], proj=v["timm_proj"],
                          embed=cfg["embed_dim"], text_layers=t["layers"], text_width=t["width"], text_heads=t["heads"],
                          context=t["context_length"], bias=cfg.get("init_logit_bias")),
             LOADING.format(name=name)]
    if meta is None:
        parts.append("## Not trained yet\n\nThis folder holds no `metadata.json`: train the model with\n\n"
                     "    python -m refineclip_core.demo.train --recipe siglip --out assets/demo_siglip --seed 0\n\n"
                     "and run `python scripts/model_card.py` to fill in this card.\n")
    else:
        parts.append("\n".join(trained(meta)))
        parts.append("\n".join(benchmark_lines(results)))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--out", type=Path, help="where to write the card (default: FOLDER/README.md)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--check", action="store_true", help="only compare with the written card")
    args = ap.parse_args(argv)
    out = args.out or args.folder / "README.md"
    text = render(args.folder, args.results)
    if args.check:
        same = out.is_file() and out.read_text(encoding="utf-8") == text
        print(f"{out}: {'up to date' if same else 'OUT OF DATE: run python scripts/model_card.py'}")
        return 0 if same else 1
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
