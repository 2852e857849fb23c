"""The handwritten-digits world (scikit-learn's digits, Colored-MNIST style) and its model's trainer."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from refineclip_core.demo.digits import (DIGIT_NAMES, MODEL_NAME, ZERO_SHOT_TEMPLATES, DigitsConfig, caption_families,
                                         handwriting, load_digit_images, plan_digits, render_digit, sample_digits,
                                         write_digits)
from refineclip_core.demo.train import (TrainConfig, build_parser, config_from_args, digits_train_config,
                                        main as train_main, world_from_dict)
from refineclip_core.demo.world import COLORS, WorldConfig
from refineclip_core.features.zeroshot import DEFAULT_TEMPLATES
from refineclip_core.loading.data import load_dataset

CFG = DigitsConfig()


def test_the_digits_are_scikit_learns() -> None:
    images, labels = load_digit_images()
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(labels, ref.target)
    np.testing.assert_allclose(images * 16, ref.images)
    assert DIGIT_NAMES[int(labels[0])] == "zero" and len(DIGIT_NAMES) == 10


def test_handwriting_shares_never_overlap() -> None:
    _, labels = load_digit_images()
    model = handwriting("model", 0)
    for seed in (3, 4):
        fit, test = handwriting("fit", seed), handwriting("test", seed)
        for c in range(10):
            m, f, t = set(model[c]), set(fit[c]), set(test[c])
            assert not (m & f) and not (m & t) and not (f & t)
            assert m | f | t == set(np.flatnonzero(labels == c).tolist())
            assert abs(len(m) - len(f | t)) <= 1                       # half and half
            assert abs(len(f) - CFG.fit_share * len(f | t)) <= 0.5
    assert {c: list(v) for c, v in handwriting("model", 0).items()} == {c: list(v) for c, v in handwriting("model", 9).items()}
    assert any(set(handwriting("test", 3)[c]) != set(handwriting("test", 4)[c]) for c in range(10))


def test_training_split_correlates_the_target_digits_with_their_colour() -> None:
    n = 100
    plan = plan_digits("train", 5, n, CFG)
    for label in CFG.target_classes:
        colours = Counter(c for lab, c, _ in plan if lab == label)
        home, away = CFG.home_color(label), next(c for c in CFG.home_colors if c != label and c != CFG.home_color(label))
        n_neutral = round(CFG.neutral_frac * 2 * n)
        assert sum(colours.values()) == 2 * n
        assert sum(colours[c] for c in CFG.neutral_colors) == n_neutral
        assert colours[home] == round(CFG.bias * (2 * n - n_neutral))
        assert colours[home] + colours[away] == 2 * n - n_neutral
    assert {lab for lab, _, _ in plan} == set(CFG.classes)
    for label in CFG.unrelated_classes:              # the other digits use every colour, home colours included
        colours = Counter(c for lab, c, _ in plan if lab == label)
        assert sum(colours.values()) == n and set(colours) <= set(CFG.colors)
    unrelated = Counter(c for lab, c, _ in plan if lab in CFG.unrelated_classes)
    assert set(unrelated) == set(CFG.colors)
    # the model's pool is drawn from the model half only; a world's train split from its fit share
    model = handwriting("model", 0)
    pool = plan_digits("train", 0, 30, CFG, source="model")
    model_half = set(np.concatenate(list(model.values())).tolist())
    assert all(i in model_half for _, _, i in pool)                    # (label noise swaps 3/8 handwriting)
    fit = handwriting("fit", 5)
    assert all(i in set(fit[DIGIT_NAMES.index(lab)]) for lab, _, i in plan)


@pytest.mark.parametrize("split", ["val", "test"])
def test_balanced_splits_decorrelate_class_and_colour(split: str) -> None:
    samples = sample_digits(split, 7, None, CFG)
    share = handwriting("test" if split == "test" else "fit", 7)
    for label in CFG.target_classes:
        digits = share[DIGIT_NAMES.index(label)]
        by_colour = {c: sorted(s.attributes["digit_index"] for s in samples if s.label == label and s.background == c)
                     for c in CFG.home_colors}
        # the same handwriting, once on each home colour: colour says nothing about the class
        assert by_colour[CFG.home_colors[0]] == by_colour[CFG.home_colors[1]] == sorted(digits.tolist())
        assert {s.background for s in samples if s.label == label} == set(CFG.home_colors)
    for label in CFG.unrelated_classes:
        colours = Counter(s.background for s in samples if s.label == label)
        assert max(colours.values()) - min(colours[c] for c in CFG.colors) <= 1
    capped = sample_digits(split, 7, 5, CFG)
    assert Counter(s.group for s in capped if s.label in CFG.target_classes) == {g: 5 for g in CFG.target_groups}


def test_groups_are_class_by_colour() -> None:
    assert CFG.target_groups == ("three on red", "three on green", "eight on red", "eight on green")
    for s in sample_digits("train", 1, 20, CFG) + sample_digits("val", 1, 3, CFG):
        assert s.group == (f"{s.label} on {s.background}" if s.label in CFG.target_classes else s.label)
        assert s.background in CFG.colors


def test_rendering_is_deterministic_and_puts_the_digit_on_its_colour() -> None:
    a, b = sample_digits("test", 2, 3, CFG), sample_digits("test", 2, 3, CFG)
    assert [np.asarray(x.image).tobytes() for x in a] == [np.asarray(x.image).tobytes() for x in b]
    assert all(x.image.size == (48, 48) and x.image.mode == "RGB" for x in a)
    assert np.asarray(sample_digits("test", 3, 3, CFG)[0].image).tobytes() != np.asarray(a[0].image).tobytes()
    rng = np.random.default_rng(0)
    blank, _ = render_digit(np.zeros((8, 8), np.float32), "green", rng, DigitsConfig(noise=0.0))
    mean = np.asarray(blank, np.float32).reshape(-1, 3).mean(0)
    assert np.abs(mean - np.asarray(COLORS["green"])).max() < 35      # jitter and brightness only
    full, attrs = render_digit(np.ones((8, 8), np.float32), "green", np.random.default_rng(0), DigitsConfig(noise=0.0))
    assert attrs["stroke"] == "white"
    assert np.asarray(full, np.float32).mean() > mean.mean() + 30      # white strokes cover part of it


def test_captions_are_true_and_hold_the_zero_shot_prompts() -> None:
    s = sample_digits("val", 0, 1, CFG)[0]
    fams = caption_families(s)
    assert tuple(fams) == CFG.caption_family_names
    assert all(t.replace("{}", s.label) in fams["class"] for t in (*ZERO_SHOT_TEMPLATES, *DEFAULT_TEMPLATES))
    assert all(s.background in t for t in fams["background"] + fams["class_background"] + fams["attributes"])
    assert all(s.label in t or str(DIGIT_NAMES.index(s.label)) in t for f in ("class", "class_background")
               for t in fams[f])


def test_config_round_trips_and_refuses_bad_values() -> None:
    cfg = DigitsConfig(target_classes=("one", "seven"), unrelated=("zero", "four"), bias=0.9)
    assert DigitsConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert world_from_dict(cfg.to_dict()) == cfg
    assert world_from_dict(WorldConfig().to_dict()) == WorldConfig()
    for bad, msg in ((dict(target_classes=("three", "three")), "two different"),
                     (dict(unrelated=("one", "three")), "must differ"),
                     (dict(target_classes=("three", "ten")), "unknown digit"),
                     (dict(home_colors=("red", "red")), "twice"), (dict(home_colors=("red", "mauve")), "unknown colour"),
                     (dict(fit_share=1.0), "fit_share")):
        with pytest.raises(ValueError, match=msg):
            DigitsConfig(**bad)
    with pytest.raises(ValueError, match="unknown digits-world parameters: hue"):
        DigitsConfig.from_dict({"kind": "digits", "hue": 1})


def test_write_digits_is_a_dataset_with_groups(tmp_path: Path) -> None:
    out = write_digits(tmp_path / "d", "all", 4, {"train": 5, "val": 2, "test": 3}, CFG)
    ds = load_dataset(out)
    assert sorted(ds.classes) == sorted(CFG.classes) and set(CFG.classes) < set(DIGIT_NAMES)
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert Counter(r["group"] for r in rows if r["split"] == "test" and r["label"] in CFG.target_classes) == \
        {g: 3 for g in CFG.target_groups}
    assert all((out / r["path"]).is_file() for r in rows)


def test_cli_demo_data_writes_the_digits_world(tmp_path: Path, capsys) -> None:
    from refineclip_core.cli import main as cli_main

    assert cli_main(["demo-data", "--world", "digits", "--out", str(tmp_path / "dg"), "--split", "test",
                     "--n-per-group", "4"]) == 0
    text = capsys.readouterr().out
    assert "Digits-world images" in text and "refineclip-digits" in text
    ds = load_dataset(tmp_path / "dg")
    assert sorted(ds.classes) == sorted(CFG.classes) and {"three on red", "eight on green"} <= set(ds.groups)
    assert cli_main(["demo-data", "--world", "digits", "--out", str(tmp_path / "x"), "--layout", "waterbirds"]) != 0


def test_digits_recipe_and_flags() -> None:
    cfg = config_from_args(build_parser().parse_args(["--out", "x", "--world", "digits"]))
    assert cfg == digits_train_config(threads=2)
    assert isinstance(cfg.world, DigitsConfig) and cfg.world.model_name == MODEL_NAME
    assert config_from_args(build_parser().parse_args(["--out", "x", "--world", "digits", "--bias", "0.8"])).world.bias == 0.8
    with pytest.raises(SystemExit, match="bird world only"):
        config_from_args(build_parser().parse_args(["--out", "x", "--world", "digits", "--cue", "color"]))
    with pytest.raises(SystemExit, match="unknown caption family 'detail'"):
        config_from_args(build_parser().parse_args(["--out", "x", "--world", "digits", "--caption-weights", "detail=1"]))
    assert TrainConfig().world == WorldConfig()                     # the demo recipe is untouched


@pytest.mark.slow
def test_quick_digits_training_run(tmp_path: Path) -> None:
    import open_clip

    out = tmp_path / "digits"
    assert train_main(["--world", "digits", "--out", str(out), "--quick", "--seed", "1", "--threads", "1"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_name"] == MODEL_NAME and meta["train_config"]["world"]["kind"] == "digits"
    assert world_from_dict(meta["train_config"]["world"]) == DigitsConfig()
    assert set(meta["test"]["metrics"]["groups"]) == set(CFG.target_groups)
    assert set(meta["test"]["metrics"]["per_class"]) == set(CFG.classes)
    assert meta["data"]["target_classes"] == list(CFG.target_classes)
    open_clip.add_model_config(out / f"{MODEL_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(out / f"{MODEL_NAME}.safetensors"))
    with torch.no_grad():
        emb = model.eval().encode_image(preprocess(sample_digits("test", 5, 1, CFG)[0].image)[None])
    assert torch.isfinite(emb).all()


def test_label_noise_only_in_the_models_pool() -> None:
    """Colored MNIST's label noise: in the model's pool, ``label_noise`` of the target digits' images show the
    other target's handwriting under their own caption and colour; a world's splits keep exact labels."""
    pool = [s for s in CFG.training_pool(0, 400) if s.label in CFG.target_classes]
    flipped = np.mean([s.attributes["digit"] != s.label for s in pool])
    assert abs(flipped - CFG.label_noise) < 0.04                                # 1,600 images
    assert all(s.attributes["digit"] in CFG.target_classes for s in pool)
    home = np.mean([s.background == CFG.home_color(s.label) for s in pool])       # colour follows the caption
    assert home > 0.8
    for split in ("train", "val", "test"):
        assert all(s.attributes["digit"] == s.label for s in sample_digits(split, 3, 30, CFG))
    clean = [s for s in DigitsConfig(label_noise=0.0).training_pool(0, 50) if s.label in CFG.target_classes]
    assert all(s.attributes["digit"] == s.label for s in clean)
