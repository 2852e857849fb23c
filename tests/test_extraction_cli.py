"""Extraction, the feature cache and the first CLI commands, end to end on a tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from refineclip_core.cli import main
from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.cache_format import shard_dir
from refineclip_core.features.extraction import ExtractionConfig, extract
from refineclip_core.loading.data import load_dataset
from refineclip_core.loading.decode import load_image
from refineclip_core.loading.models import ModelSpec, load_model


def _model_flags(files):
    return ["--model", files["name"], "--model-config", str(files["config"]), "--checkpoint", str(files["checkpoint"])]


def _run(argv):
    return main([str(a) for a in argv])


def test_extract_check_and_zero_shot_cli(tiny_model_files, image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    assert _run(["extract", *_model_flags(tiny_model_files), "--data", image_folder, "--out", cache_dir,
                 "--layers", "all", "--batch-size", 4]) == 0
    cache = FeatureCache(cache_dir)
    assert len(cache) == 18 and cache.heads.shape == (18, 3, 4, 32)
    assert _run(["check-decomposition", "--cache", cache_dir, "--json", tmp_path / "check.json"]) == 0
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["n_images"] == 18 and check["dtype"] == "float32" and check["max_rel_error"] <= 1e-5

    assert _run(["zero-shot", "--cache", cache_dir, "--json", tmp_path / "zs.json"]) == 0
    zs = json.loads((tmp_path / "zs.json").read_text())
    assert zs["n_images"] == 18 and zs["n_skipped"] == 0 and zs["classes"] == ["cat", "dog", "fish"]

    # independent reference: plain open_clip, no project code except the default templates
    open_clip.add_model_config(tiny_model_files["config"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        tiny_model_files["name"], pretrained=str(tiny_model_files["checkpoint"]))
    model.eval()
    tok = open_clip.get_tokenizer(tiny_model_files["name"])
    ds = load_dataset(image_folder)
    with torch.no_grad():
        from refineclip_core.features.zeroshot import DEFAULT_TEMPLATES
        text = []
        for c in ds.classes:
            t = model.encode_text(tok([tp.format(c) for tp in DEFAULT_TEMPLATES]))
            text.append(torch.nn.functional.normalize(torch.nn.functional.normalize(t, dim=-1).mean(0), dim=0))
        text = torch.stack(text)
        imgs = torch.stack([preprocess(load_image(r.path)) for r in ds.records])
        pred = (torch.nn.functional.normalize(model.encode_image(imgs), dim=-1) @ text.T).argmax(1).numpy()
    labels = np.array([r.label for r in ds.records])
    assert zs["accuracy"] == pytest.approx(float((pred == labels).mean()))
    for c, name in enumerate(ds.classes):
        assert zs["per_class"][name] == pytest.approx(float((pred[labels == c] == c).mean()))
    groups = sorted({r.group for r in ds.records})
    per_group = {g: float(np.mean([pred[i] == labels[i] for i, r in enumerate(ds.records) if r.group == g]))
                 for g in groups}
    assert zs["per_group"] == pytest.approx(per_group)
    assert zs["worst_group"] == pytest.approx(min(per_group.values()))
    assert zs["average_group"] == pytest.approx(np.mean(list(per_group.values())))


def test_check_decomposition_without_cache_fp64(tiny_model_files, class_folder, tmp_path):
    out = tmp_path / "c.json"
    assert _run(["check-decomposition", *_model_flags(tiny_model_files), "--precision", "fp64",
                 "--data", class_folder, "--json", out]) == 0
    res = json.loads(out.read_text())
    assert res["dtype"] == "float64" and res["n_images"] == 18 and res["max_rel_error"] <= 1e-10


def test_resume_after_lost_shard_and_invalidation(tiny_model_files, image_folder, tmp_path):
    spec = ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                     checkpoint=str(tiny_model_files["checkpoint"]))
    loaded = load_model(spec)
    ds = load_dataset(image_folder)
    cfg = ExtractionConfig(layers=2, batch_size=2, shard_batches=2)
    root = tmp_path / "cache"
    first = extract(loaded, ds, root, cfg)
    ref = {k: np.array(getattr(first, k)) for k in ("embeddings", "heads", "remainders", "index")}
    assert first.manifest.n_shards == 5

    # simulate a crash: shard 2 missing, a half-written temp folder left behind, manifest incomplete
    shutil.rmtree(shard_dir(root, 2))
    (root / "shards" / ".00002.junk").mkdir()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["complete"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="incomplete"):
        FeatureCache(root)
    calls = []
    resumed = extract(loaded, ds, root, cfg, progress=lambda stage, d, t, values=None: calls.append(d))
    assert len(calls) == 2  # only the two batches of the lost shard were recomputed
    for k, v in ref.items():
        np.testing.assert_array_equal(np.array(getattr(resumed, k)), v)

    # a different checkpoint invalidates the cache
    state = torch.load(tiny_model_files["checkpoint"], weights_only=True)
    state["visual.proj"] = state["visual.proj"] * 2
    torch.save(state, tmp_path / "other.pt")
    other = load_model(ModelSpec(spec.name, model_config=spec.model_config, checkpoint=str(tmp_path / "other.pt")))
    rebuilt = extract(other, ds, root, cfg)
    np.testing.assert_allclose(np.array(rebuilt.embeddings), 2 * ref["embeddings"], rtol=1e-5, atol=1e-6)


def test_bad_files_are_skipped_with_reasons(tiny_model_files, class_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(class_folder, data)
    (data / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "dog" / "empty.jpg").write_bytes(b"")
    (data / "dog" / "readme.txt").write_text("not an image")
    out = tmp_path / "cache"
    assert _run(["extract", *_model_flags(tiny_model_files), "--data", data, "--out", out]) == 0
    cache = FeatureCache(out)
    assert len(cache) == 18
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in cache.skipped}
    assert set(reasons) == {"broken.png", "empty.jpg", "readme.txt"}
    assert "extension" in reasons["readme.txt"] and "identify" in reasons["empty.jpg"]
    assert len(cache) + sum(1 for s in cache.skipped if s.path.endswith((".png", ".jpg"))) == 20


@pytest.mark.slow  # two CLI subprocesses (torch import each)
def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "refineclip_core.cli", "zero-shot", "--cache", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a feature cache" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "refineclip_core.cli", "extract", "--model", "NoSuchNet",
                           "--data", str(tmp_path), "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Unknown model" in proc.stderr


def test_every_command_has_help():
    from refineclip_core.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) == len(COMMANDS)
    for name, p in sub.choices.items():
        assert p.format_help().startswith("usage: refineclip " + name)


def test_cli_reference_is_in_sync():
    """docs/CLI.md is generated from --help; regenerate with
    `python -m refineclip_core.cli.reference > docs/CLI.md`."""
    from pathlib import Path

    from refineclip_core.cli.reference import render

    committed = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    assert committed == render()


def test_documentation_links_stay_inside_the_repository():
    """Every relative link and backticked path in the README and CONTRIBUTING names a file of this
    repository (a fresh clone has nothing next to it)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "CONTRIBUTING.md"):
        text = (root / doc).read_text()
        targets = re.findall(r"\]\(([^)#:]+)\)", text)
        for target in targets:
            path = (root / target).resolve()
            assert path.is_relative_to(root) and path.exists(), f"{doc} links to {target}"
        assert "../" not in "".join(re.findall(r"`([^`]*)`", text)), f"{doc} names a path outside the repository"


def test_new_class_names_or_templates_refresh_the_texts_of_a_complete_cache(tiny_model_files, image_folder, tmp_path):
    out = tmp_path / "cache"
    flags = [*_model_flags(tiny_model_files), "--data", image_folder, "--out", out]
    assert _run(["extract", *flags]) == 0
    before = FeatureCache(out)
    heads_before = np.array(before.heads)
    text_before = np.array(before.text)
    assert _run(["extract", *flags, "--class-names", "kitten,puppy,goldfish", "--template", "a drawing of a {}."]) == 0
    after = FeatureCache(out)
    assert after.classes == ["kitten", "puppy", "goldfish"] and after.manifest.templates == ["a drawing of a {}."]
    assert not np.allclose(after.text, text_before)
    np.testing.assert_array_equal(np.array(after.heads), heads_before)  # image features reused, not recomputed
