"""Dataset layouts and the image loader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from refineclip_core.errors import DataError, ImageLoadError
from refineclip_core.loading.data import load_dataset, parse_metadata
from refineclip_core.loading.decode import load_image


def test_class_folder_layout(class_folder):
    ds = load_dataset(class_folder)
    assert ds.layout == "folder" and ds.classes == ["cat", "dog", "fish"]
    assert len(ds) == 18 and ds.groups == [] and not ds.skipped
    assert [r.label for r in ds.records[:6]] == [0] * 6


def test_metadata_csv_layout_with_groups_and_splits(image_folder):
    ds = load_dataset(image_folder)
    assert ds.layout == "csv" and ds.classes == ["cat", "dog", "fish"]
    assert ds.groups == ["cat-a", "cat-b", "dog-a", "dog-b", "fish-a", "fish-b"]
    test = load_dataset(image_folder, split="test")
    assert len(test) == 9 and {r.split for r in test.records} == {"test"}
    with pytest.raises(DataError, match="No images with split 'val'"):
        load_dataset(image_folder, split="val")


def test_waterbirds_layout(tmp_path):
    rows = ["img_filename,y,split,place"]
    for i, (y, place, split) in enumerate([(0, 0, 0), (0, 1, 2), (1, 1, 2), (1, 0, 1)]):
        (tmp_path / "001.Bird").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"001.Bird/{i}.jpg")
        rows.append(f"001.Bird/{i}.jpg,{y},{split},{place}")
    (tmp_path / "metadata.csv").write_text("\n".join(rows))
    ds = load_dataset(tmp_path)
    assert ds.layout == "waterbirds" and ds.classes == ["landbird", "waterbird"]
    assert [r.group for r in ds.records] == ["landbird on land", "landbird on water", "waterbird on water",
                                             "waterbird on land"]
    assert [r.split for r in ds.records] == ["train", "test", "test", "val"]
    # an uploaded CSV's layout is read from its header, as load_dataset does for metadata.csv
    parsed = parse_metadata((tmp_path / "metadata.csv").read_text(), tmp_path)
    assert parsed.layout == "waterbirds" and parsed.records == ds.records
    assert parse_metadata("path,label\n001.Bird/0.jpg,x\n", tmp_path).layout == "csv"


def test_csv_rows_escaping_the_root_or_missing_are_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    text = "path,label\na.png,x\n../etc/passwd,y\nmissing.png,x\n,x\n"
    ds = parse_metadata(text, tmp_path)
    assert [r.path.endswith("a.png") for r in ds.records] == [True]
    reasons = sorted(s.reason for s in ds.skipped)
    assert reasons == ["empty path or label", "file listed in the CSV does not exist", "path points outside the data folder"]
    with pytest.raises(DataError, match="needs columns path, label"):
        parse_metadata("file,class\n", tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="No usable images"):
        load_dataset(tmp_path)


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_image_loader_modes_and_orientation(tmp_path):
    cases = {
        "rgba.png": _bytes(Image.new("RGBA", (5, 4), (255, 0, 0, 0)), "PNG"),
        "la.png": _bytes(Image.new("LA", (5, 4), (10, 255)), "PNG"),
        "i16.png": _bytes(Image.fromarray(np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000), "PNG"),
        "cmyk.jpg": _bytes(Image.new("CMYK", (5, 4), (0, 255, 255, 0)), "JPEG"),
        "p.gif": _bytes(Image.new("P", (5, 4), 3), "GIF"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (5, 4), name
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(tmp_path / "i16.png").getpixel((4, 3))[0] == 255            # 16-bit rescaled
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    (tmp_path / "rot.jpg").write_bytes(_bytes(Image.new("RGB", (6, 3)), "JPEG", exif=exif))
    assert load_image(tmp_path / "rot.jpg").size == (3, 6)


def test_image_loader_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    full = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(full[: len(full) // 2])
    for name, reason in [("empty.jpg", "identify"), ("text.jpg", "identify"), ("trunc.jpg", "truncated")]:
        with pytest.raises(ImageLoadError, match=reason):
            load_image(tmp_path / name)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_csv_column_mapping(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "metadata.csv").write_text("file,Young,Male\na.png,young,1\nb.png,old,0\n")
    ds = load_dataset(tmp_path, layout="csv", columns={"path": "file", "label": "Young", "group": "Male"})
    assert ds.classes == ["old", "young"] and [r.group for r in ds.records] == ["1", "0"]
    with pytest.raises(DataError, match="needs columns file, Age"):
        load_dataset(tmp_path, layout="csv", columns={"path": "file", "label": "Age"})
