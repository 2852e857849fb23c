"""Shared fixtures: tiny random open_clip configs, checkpoints and image folders made on the fly.

Nothing here downloads: models are built from config JSONs written into tmp folders and
initialised randomly (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests use tiny models: one thread avoids oversubscribing small shared machines (CI has 2 cores),
# where several threads per tiny matmul are many times slower than one.
torch.set_num_threads(1)


def tiny_config(width: int = 64, layers: int = 3, head_width: int = 16, patch: int = 8, image: int = 32,
                ls: float | None = None, quick_gelu: bool = False, embed_dim: int = 32, **vision_extra) -> dict:
    vision = {"image_size": image, "patch_size": patch, "width": width, "layers": layers, "head_width": head_width}
    if ls is not None:
        vision["ls_init_value"] = ls
    vision.update(vision_extra)
    return {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    }


def write_config(folder: Path, name: str, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    """A tiny ViT config JSON and a random checkpoint for it (seeded, perturbed so that
    LayerNorm/bias parameters are not at their trivial initial values)."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-model")
    cfg_path = write_config(folder, "tiny-vit", tiny_config(ls=0.5))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(50.0))
    ckpt = folder / "tiny-vit.pt"
    torch.save(model.state_dict(), ckpt)
    return {"name": "tiny-vit", "config": cfg_path, "checkpoint": ckpt}


def make_image(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 40) -> Image.Image:
    arr = rng.integers(0, 60, size=(size, size, 3)).astype(np.int16) + np.array(colour, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Three classes of small noisy colour images, 6 each, with groups in a metadata.csv."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    colours = {"cat": (180, 40, 40), "dog": (40, 180, 40), "fish": (40, 40, 180)}
    rows = ["path,label,group,split"]
    for cls, colour in colours.items():
        (root / cls).mkdir()
        for i in range(6):
            rel = f"{cls}/{cls}_{i}.png"
            make_image(rng, colour).save(root / rel)
            rows.append(f"{rel},{cls},{cls}-{'a' if i % 2 else 'b'},{'test' if i >= 3 else 'train'}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def class_folder(image_folder, tmp_path_factory):
    """The same images as a plain class-folder tree (no metadata.csv)."""
    import shutil

    root = tmp_path_factory.mktemp("classfolder")
    for cls in ("cat", "dog", "fish"):
        shutil.copytree(image_folder / cls, root / cls)
    return root


#: Class labels and groups that are Markdown and HTML (issue 16: names from users are plain text).
HOSTILE_CLASSES = ("[x](http://evil.com) **bold** A", "<img src=x onerror=alert(1)> $x^2$ `t` B")
HOSTILE_GROUPS = ("~~strike~~ :red[g1] | c |", ":material/home: <b>g2</b> www.evil.com a@evil.com")
#: Fragments that would become a link, emphasis, HTML, math, code, colour, an icon or a table if rendered.
RAW_MARKUP = ("](http", "**bold**", "<img", "$x^2$", "`t`", ":red[", ":material/home:", "~~strike~~", "<b>",
              "| c |")
#: Text that GitHub-flavoured Markdown turns into links even with every punctuation mark escaped.
AUTOLINKS = ("www.evil.com", "http://evil.com", "a@evil.com")


def write_hostile_dataset(root: Path, outside: Path, n_per_class: int = 14) -> Path:
    """A ``metadata.csv`` dataset whose labels, groups and file names are Markdown and HTML, plus
    ``zz_link.png``, a link to ``outside/secret.png`` (outside the allowed folders: to be skipped)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows = ["path,label,group"]
    for c, (label, colour) in enumerate(zip(HOSTILE_CLASSES, [(200, 40, 40), (40, 40, 200)])):
        for i in range(n_per_class):
            name = f"**f{c}{i}** <b>x [y](z) $w$.png"  # no "/" in a file name
            make_image(rng, colour, size=48).save(root / name)
            rows.append(f'"{name}","{label}","{HOSTILE_GROUPS[i % 2]}"')
    outside.mkdir(parents=True, exist_ok=True)
    make_image(rng, (0, 0, 0), size=48).save(outside / "secret.png")
    (root / "zz_link.png").symlink_to(outside / "secret.png")
    rows.append(f'zz_link.png,"{HOSTILE_CLASSES[0]}","{HOSTILE_GROUPS[0]}"')
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------------------------------------
# Chromium through Playwright: one browser per test session, shared by every browser test (a second
# ``sync_playwright()`` while the first runs fails with "Sync API inside the asyncio loop").

@pytest.fixture(scope="session")
def chromium() -> str:
    """Fail (never skip) with the install command when Chromium is missing."""
    import os

    from tests.support import browser as shots

    if not (os.path.isfile(shots.CHROMIUM) and os.access(shots.CHROMIUM, os.X_OK)):
        pytest.fail(shots.INSTALL_HINT, pytrace=False)
    return shots.CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    from tests.support.browser import launch_chromium

    pw = sync_playwright().start()
    try:
        b = launch_chromium(pw)
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture()
def upload_tmp(tmp_path, monkeypatch):
    """A private temporary directory standing for the shared one, where upload session folders go
    (several servers' folders in tests of quotas and sweeping)."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp
