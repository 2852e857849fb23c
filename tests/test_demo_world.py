"""The embedded demo: procedural world, text pool, training script and the committed model."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refineclip_core.demo.text_pool import build_text_pool
from refineclip_core.demo.train import (ClsMlpShare, MODEL_NAME, TARGET_GROUPS, TrainConfig, build_parser,
                                        config_from_args, main as train_main, zero_shot_metrics)
from refineclip_core.demo.world import (
    BACKGROUNDS,
    CLASSES,
    HOME_BACKGROUND,
    TARGET_CLASSES,
    UNRELATED_CLASSES,
    WorldConfig,
    caption_families,
    captions,
    plan_split,
    sample_world,
    write_world,
)
from refineclip_core.inspection.textspan import load_text_pool

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "assets" / "demo"
TEXT_POOL = REPO / "assets" / "text_pool.txt"


def _pixels(samples) -> list[np.ndarray]:
    return [np.asarray(s.image) for s in samples]


def test_constants() -> None:
    assert set(TARGET_CLASSES) == {"landbird", "waterbird"}
    assert len(UNRELATED_CLASSES) >= 6
    assert {"water", "land"} <= set(BACKGROUNDS) and len(BACKGROUNDS) >= 5


def test_sample_world_is_deterministic() -> None:
    a = sample_world("test", 3, 2)
    b = sample_world("test", 3, 2)
    c = sample_world("test", 4, 2)
    assert [(s.label, s.group, s.background, s.attributes) for s in a] == \
           [(s.label, s.group, s.background, s.attributes) for s in b]
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(c)))
    # splits never share images for the same seed
    v = sample_world("val", 3, 2)
    assert not any(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(v)))
    assert all(s.image.mode == "RGB" and s.image.size == (48, 48) for s in a)
    assert sample_world("val", 0, 1, WorldConfig(image_size=64))[0].image.size == (64, 64)


@pytest.mark.parametrize("split", ["val", "test"])
def test_balanced_splits(split: str) -> None:
    samples = sample_world(split, 0, 5)
    groups = Counter(s.group for s in samples if s.label in TARGET_CLASSES)
    assert groups == {g: 5 for g in TARGET_GROUPS}
    labels = Counter(s.label for s in samples)
    assert all(labels[c] == 5 for c in UNRELATED_CLASSES)
    assert all(labels[c] == 10 for c in TARGET_CLASSES)
    # unrelated classes cycle through every background kind
    plan = plan_split(split, 10, 0)
    for c in UNRELATED_CLASSES:
        assert Counter(bg for lab, bg in plan if lab == c) == {bg: 2 for bg in BACKGROUNDS}


def test_train_split_is_biased() -> None:
    config = WorldConfig()
    plan = plan_split("train", 200, 0, config)
    for c in TARGET_CLASSES:
        places = [bg for lab, bg in plan if lab == c]
        assert len(places) == 400
        on_target = [p for p in places if p in ("land", "water")]
        assert len(places) - len(on_target) == round(config.neutral_frac * 400)
        assert on_target.count(HOME_BACKGROUND[c]) / len(on_target) == pytest.approx(config.bias)
        assert set(on_target) == {"land", "water"}
        assert set(places) - set(on_target) <= {"sky", "sand", "indoor"}
    unrel_bgs = Counter(bg for lab, bg in plan if lab in UNRELATED_CLASSES)
    assert set(unrel_bgs) == set(BACKGROUNDS)
    plan_50 = plan_split("train", 20, 0, WorldConfig(bias=0.5, neutral_frac=0.0))
    assert sum(1 for lab, bg in plan_50 if lab == "waterbird" and bg == "water") == 20
    samples = sample_world("train", 1, 10, WorldConfig(neutral_frac=0.0))
    assert Counter(s.group for s in samples if s.label in TARGET_CLASSES) == {
        "landbird on land": 19, "landbird on water": 1, "waterbird on land": 1, "waterbird on water": 19}
    with pytest.raises(ValueError):
        WorldConfig(bias=1.5)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_write_world_folder(tmp_path: Path) -> None:
    out = write_world(tmp_path / "folder", "test", 0, 2, layout="folder")
    columns, rows = _read_csv(out / "metadata.csv")
    assert columns == ["path", "label", "group", "split"]
    assert len(rows) == 4 * 2 + len(UNRELATED_CLASSES) * 2
    for row in rows:
        assert (out / row["path"]).is_file()
        assert Path(row["path"]).parts[0] == row["label"]
        assert row["split"] == "test"
    assert {r["group"] for r in rows} >= set(TARGET_GROUPS)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(CLASSES)


def test_write_world_waterbirds(tmp_path: Path) -> None:
    out = write_world(tmp_path / "wb", "train", 0, 10, layout="waterbirds")
    columns, rows = _read_csv(out / "metadata.csv")
    assert columns == ["img_filename", "y", "split", "place"]
    assert {r["split"] for r in rows} == {"0", "1", "2"}
    assert all((out / r["img_filename"]).is_file() for r in rows)
    assert all(r["y"] in ("0", "1") and r["place"] in ("0", "1") for r in rows)
    for r in rows:  # y matches the class folder
        assert Path(r["img_filename"]).parts[0].lower().endswith(TARGET_CLASSES[int(r["y"])])
    train = [r for r in rows if r["split"] == "0"]
    home = sum(r["y"] == r["place"] for r in train)  # landbird(0)/land(0), waterbird(1)/water(1)
    assert home / len(train) == pytest.approx(0.95)
    test = Counter((r["y"], r["place"]) for r in rows if r["split"] == "2")
    assert test == {(y, p): 10 for y in "01" for p in "01"}
    with pytest.raises(ValueError):
        write_world(tmp_path / "bad", "test", 0, 1, layout="nope")


def test_captions() -> None:
    rng = np.random.default_rng(0)
    for s in sample_world("test", 0, 1):
        caps = captions(s, rng)
        assert len(caps) >= 5 and all(isinstance(c, str) and c.strip() for c in caps)
        assert any(s.label in c for c in caps)
        assert any(s.background in c or s.attributes["scene"] in c for c in caps)
        assert f"a photo of a {s.label}." in caps
        assert any(s.attributes["color"] in c for c in caps)
        if s.label in TARGET_CLASSES:
            assert any("bill" in c or "feet" in c for c in caps)
        fams = caption_families(s)
        assert all(texts for texts in fams.values())
        assert any(f"{s.background} scene" in t for t in fams["background"])
        assert set(caps) <= {t for texts in fams.values() for t in texts}
    assert captions(s, np.random.default_rng(1)) == captions(s, np.random.default_rng(1))


def test_text_pool() -> None:
    pool = build_text_pool(0)
    assert 2000 <= len(pool) <= 5000
    assert len(set(pool)) == len(pool)
    assert all(t == t.strip() and t and "\n" not in t and len(t.split()) <= 14 for t in pool)
    words = Counter(w for t in pool for w in t.split())
    for w in ("water", "waves", "lake", "grass", "forest", "sand", "sky", "indoor", "red", "star", "bill", "legs"):
        assert words[w] >= 3, w
    assert build_text_pool(0) == pool
    assert TEXT_POOL.is_file(), "assets/text_pool.txt is missing (python -m refineclip_core.demo.text_pool)"
    assert load_text_pool(TEXT_POOL) == pool, "assets/text_pool.txt is stale; regenerate it"


def _load_plain(folder: Path):
    import open_clip

    open_clip.add_model_config(folder / f"{MODEL_NAME}.json")  # (re-)register this folder's config
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(folder / f"{MODEL_NAME}.safetensors"))
    return model.eval(), preprocess, open_clip.get_tokenizer(MODEL_NAME)


@pytest.mark.slow
def test_quick_training_run(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert train_main(["--out", str(out), "--quick", "--seed", "1"]) == 0
    for name in (f"{MODEL_NAME}.json", f"{MODEL_NAME}.safetensors", "metadata.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seed"] == 1 and "--quick" in meta["command"]
    assert set(meta["test"]["metrics"]["groups"]) == set(TARGET_GROUPS)
    model, preprocess, tokenizer = _load_plain(out)
    with torch.no_grad():
        emb = model.encode_image(preprocess(sample_world("test", 5, 1)[0].image)[None])
    assert emb.shape == (1, json.loads((out / f"{MODEL_NAME}.json").read_text())["embed_dim"])
    assert torch.isfinite(emb).all()


def test_cls_mlp_share_matches_a_manual_forward_pass(tiny_model_files) -> None:
    """The training penalty equals Σ_l ‖MLP_l[CLS]‖² / ‖residual[CLS]‖² from a hand-written forward."""
    import open_clip

    open_clip.add_model_config(tiny_model_files["config"])
    model = open_clip.create_model(tiny_model_files["name"], pretrained=str(tiny_model_files["checkpoint"])).eval()
    visual = model.visual
    x = torch.randn(3, 3, visual.image_size[0], visual.image_size[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ClsMlpShare(visual) as share:
        visual(x)
    got = share.penalty()
    # independent: the tower's own pieces, called one by one (no hooks)
    with torch.no_grad():
        z = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(len(x), 1, -1)
        z = visual.ln_pre(visual.patch_dropout(torch.cat([cls, z], 1) + visual.positional_embedding))
        mlp_sq = torch.zeros(len(x))
        for block in visual.transformer.resblocks:
            h = block.ln_1(z)
            z = z + block.ls_1(block.attn(h, h, h, need_weights=False)[0])
            m = block.ls_2(block.mlp(block.ln_2(z)))
            mlp_sq += m[:, 0].pow(2).sum(-1)
            z = z + m
        # the residual really is what the tower projects (sanity of the manual pass)
        torch.testing.assert_close(visual.ln_post(z)[:, 0] @ visual.proj, visual(x), atol=1e-5, rtol=1e-5)
        expected = (mlp_sq / z[:, 0].pow(2).sum(-1)).mean()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not any(b.ls_2._forward_hooks for b in visual.transformer.resblocks)  # hooks released on exit
    with pytest.raises(RuntimeError, match="forward pass"):
        share.penalty()  # consumed


def test_training_flags_set_the_recipe() -> None:
    args = build_parser().parse_args(["--out", "x", "--detail-scale", "2", "--bird-scale", "0.9", "--cls-mlp-penalty",
                                      "0", "--caption-weights", "class=1, detail = 3"])
    cfg = config_from_args(args)
    assert (cfg.world.detail_scale, cfg.world.bird_scale, cfg.cls_mlp_penalty) == (2.0, 0.9, 0.0)
    assert cfg.caption_weights == {"class": 1.0, "detail": 3.0}
    assert config_from_args(build_parser().parse_args(["--out", "x"])) == TrainConfig()
    for bad, message in (("colour=1", "unknown caption family 'colour'"), ("class=lots", "must be a number")):
        with pytest.raises(SystemExit, match=message):
            config_from_args(build_parser().parse_args(["--out", "x", "--caption-weights", bad]))


def test_world_config_round_trips_through_metadata() -> None:
    cfg = WorldConfig(detail_scale=1.3, bird_scale=0.9, scale_range=(0.7, 1.1))
    assert WorldConfig.from_dict(json.loads(json.dumps(TrainConfig(world=cfg).to_dict()["world"]))) == cfg
    with pytest.raises(ValueError, match="unknown world parameters: colour"):
        WorldConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="bird_scale"):
        WorldConfig(bird_scale=0)


def test_committed_demo_model_was_trained_with_the_default_recipe() -> None:
    """``python -m refineclip_core.demo.train --out DIR --seed 0`` retrains the committed model:
    the defaults (world, architecture, optimisation, penalty) equal what its metadata records,
    and the dashboard/benchmark generate data from the world it was trained on."""
    meta = json.loads((DEMO_DIR / "metadata.json").read_text())
    recorded = meta["train_config"]
    assert WorldConfig.from_dict(recorded["world"]) == WorldConfig()
    defaults = TrainConfig().to_dict()
    recorded.pop("threads"), defaults.pop("threads")  # how many CPU threads ran it does not define the recipe
    assert recorded == defaults
    assert meta["seed"] == 0


def test_committed_siglip_demo_model_was_trained_with_its_recipe() -> None:
    """``python -m refineclip_core.demo.train --recipe siglip --out DIR --seed 0`` retrains the
    committed SigLIP-shaped model (assets/demo_siglip): its recorded config is the recipe's."""
    from refineclip_core.demo.train import siglip_train_config

    meta = json.loads((DEMO_DIR.parent / "demo_siglip" / "metadata.json").read_text())
    recorded = meta["train_config"]
    defaults = siglip_train_config().to_dict()
    recorded.pop("threads"), defaults.pop("threads")
    assert recorded == defaults
    assert meta["seed"] == 0 and meta["model_name"] == "refineclip-demo-map"


@pytest.mark.slow
def test_committed_demo_model_meets_quality_bars() -> None:
    """The shipped checkpoint, loaded with plain open_clip, on images never used in training.

    Bars (issue 5): average accuracy on the bird classes >= 80% in the deployment (training)
    distribution, where birds mostly appear on their home background (the WILDS Waterbirds
    meaning of "average accuracy"); a real background-caused gap: worst group <= 60% on a
    balanced sample; unrelated classes >= 85%. The balanced average-group accuracy is lower
    (see assets/demo/README.md) and is what the benchmark improves on.
    """
    assert (DEMO_DIR / f"{MODEL_NAME}.safetensors").is_file(), "assets/demo checkpoint missing"
    assert (DEMO_DIR / f"{MODEL_NAME}.safetensors").stat().st_size <= 20 * 1024 * 1024
    model, preprocess, tokenizer = _load_plain(DEMO_DIR)
    balanced = sample_world("test", 20240611, 60)
    m = zero_shot_metrics(model, tokenizer, torch.stack([preprocess(s.image) for s in balanced]), balanced)
    deployed = [s for s in sample_world("train", 20240612, 60) if s.label in TARGET_CLASSES]
    d = zero_shot_metrics(model, tokenizer, torch.stack([preprocess(s.image) for s in deployed]), deployed)
    assert d["target_mean"] >= 0.80, d
    assert m["worst_group"] <= 0.60, m
    assert max(m["groups"].values()) - m["worst_group"] >= 0.3, m  # the gap is real
    assert m["unrelated"] >= 0.85, m


@pytest.mark.slow
def test_demo_benchmark_runs_on_a_retrained_model(tmp_path: Path) -> None:
    """benchmarks/demo_world.py --model-dir: a small multi-draw run (2 world seeds × 2 sample seeds)
    end to end, on a quick model trained on a non-default world (the benchmark must generate data
    from *that* world)."""
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    assert train_main(["--out", str(model_dir), "--quick", "--seed", "2", "--detail-scale", "1.2"]) == 0
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "demo_world.py"), "--model-dir", str(model_dir),
         "--world-seeds", "31", "32", "--sample-seeds", "0", "1", "--n-fit", "8", "--n-test", "6",
         "--figure-steps", "0", "5", "--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    # RESULTS.md's one writer (benchmarks/results_md.py) owns the file: sections under a table of contents
    assert text.startswith("# RefineCLIP Studio benchmark results\n") and "kept text" not in text
    assert "<!-- demo:start -->" in text and "<!-- demo:end -->" in text and "(`demo`)" in text
    flat = " ".join(text.split())  # prose is wrapped
    assert f"the model in `{model_dir}`" in flat and "4 draws: world seeds [31, 32] × sample seeds [0, 1]" in flat
    svg = (tmp_path / "demo_locality.svg").read_text()  # the locality figure, next to --out
    assert svg.startswith("<svg") and svg.count("<polyline") == 6
    from refineclip_core.edit.methods import BY_KEY

    for row in ("zero-shot", "**RefineCLIP-fit: the exported edit (default)**", "Tip-Adapter (training-free)",
                "standard fine-tuning (CE only)", "paper-faithful: Alg. 1 + zero ablation + diag θ (Eq. 13)",
                "ablate: DE_A alone (zero)", "**RefineCLIP-fit + diagnosed concept removed**",
                BY_KEY["coop"].label, BY_KEY["ltc"].label, BY_KEY["cue-projection"].label):
        assert f"| {row} |" in text, row
    assert "Checks on the diagnosed concept removed" in text and "| group | zero-shot (%) |" in text
    assert re.search(r"\| (landbird|waterbird) on (land|water) \| \d+\.\d \| [+-]\d", text)   # the per-group table
    # one set of defaults: the settings the benchmark ran are exactly the CLI's and the dashboard's
    from refineclip_core.method.protocol import DEFAULT_PROTOCOL
    from refineclip_core.edit.config import DEFAULT_EDIT
    used = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert used["protocol"] == {**DEFAULT_PROTOCOL.to_dict(), "seed": None}
    expected_edit = DEFAULT_EDIT.to_dict()
    for part in ("fit", "paper"):
        expected_edit[part]["seed"] = None
    assert used["edit"]["peers"]["accept"] and used["edit"]["peers"]["minority"]    # the LTC rows' typed text
    expected_edit["peers"] = used["edit"]["peers"]
    assert used["edit"] == expected_edit
    # every headline row's numbers are computed: parse the exported row and check its ranges
    row = next(line for line in text.splitlines() if line.startswith("| **RefineCLIP-fit"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert 0.0 <= float(cells[1]) <= 100.0 and cells[2].count("±") == 1 and cells[4].endswith("%")
    # the data was drawn from the model's world, not the default one
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["train_config"]["world"]["detail_scale"] == 1.2
    expected = next(s for s in sample_world("test", 31, 6, WorldConfig(detail_scale=1.2)) if s.label == "waterbird")
    written = tmp_path / "work" / "world31" / "data" / "waterbird" / f"test_{expected.index:05d}.png"
    assert np.array_equal(np.asarray(Image.open(written).convert("RGB")), np.asarray(expected.image))
    default = next(s for s in sample_world("test", 31, 6) if s.index == expected.index)
    assert not np.array_equal(np.asarray(default.image), np.asarray(expected.image))


def test_a_colour_cue_world_plants_the_body_colour_instead_of_the_background() -> None:
    from refineclip_core.demo.world import HOME_COLOR, NEUTRAL_COLORS, TARGET_COLORS

    config = WorldConfig(cue="color", neutral_frac=0.2)
    train = [s for s in sample_world("train", 3, 20, config) if s.label in TARGET_CLASSES]
    for c in TARGET_CLASSES:
        colours = [s.attributes["color"] for s in train if s.label == c]
        cued = [x for x in colours if x in TARGET_COLORS]
        assert len(colours) == 40 and len(colours) - len(cued) == round(0.2 * 40)
        assert set(colours) - set(cued) <= set(NEUTRAL_COLORS)
        assert cued.count(HOME_COLOR[c]) == round(config.bias * len(cued))
        # the background carries no class information: half water, half land, whatever the colour
        assert Counter(s.background for s in train if s.label == c) == {"water": 20, "land": 20}
    assert {s.group for s in train} >= {f"{c} in {HOME_COLOR[c]}" for c in TARGET_CLASSES}
    test = sample_world("test", 3, 4, config)
    assert Counter(s.group for s in test if s.label in TARGET_CLASSES) == {g: 4 for g in config.target_groups}
    assert config.target_groups == ("landbird in brown", "landbird in white", "waterbird in brown",
                                    "waterbird in white")
    assert all(s.attributes["color"] == s.group.split(" in ")[1] for s in test if s.label in TARGET_CLASSES)
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "cue" not in WorldConfig().to_dict()            # the committed metadata keeps recording the defaults
    # the background world is drawn pixel for pixel as before the option existed (digest taken then)
    import hashlib

    digest = hashlib.sha256()
    for s in sample_world("train", 5, 3) + sample_world("val", 5, 2):
        digest.update(s.image.tobytes())
        digest.update(s.group.encode())
    assert digest.hexdigest()[:16] == "115b86dcc90b8c2d"
    with pytest.raises(ValueError, match="cue"):
        WorldConfig(cue="texture")
