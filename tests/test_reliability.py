"""Reliability and security (issue 8): hostile images, unsafe uploads, crashes, degenerate data.

Everything is generated here (no committed binaries): a corpus of broken and odd image files,
zips that try to escape or explode, a hard ``SIGKILL`` in the middle of an extraction, and
property-based / fuzz inputs for the CSV parser, the CLI parser and the image loader.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import signal
import stat
import struct
import subprocess
import sys
import time
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from refineclip_core.cli import build_parser, main
from refineclip_core.errors import CacheError, CheckpointError, DataError, ImageLoadError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.loading.data import load_dataset, parse_metadata
from refineclip_core.loading.decode import MAX_ASPECT_RATIO, load_image
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.loading.confine import ALLOWED_ROOTS_ENV, UPLOAD_PREFIX, allowed_path, default_allowed_roots
from refineclip_core.loading.unzip import extract_zip
from refineclip_core.loading.uploads import cleanup_upload_dir, session_upload_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The test machine's cores are shared: one intra-op thread is far faster than an
    oversubscribed pool, and it makes in-process and subprocess results bit-identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flags(files) -> list[str]:
    return ["--model", files["name"], "--model-config", str(files["config"]), "--checkpoint", str(files["checkpoint"])]


def _run(argv) -> int:
    return main([str(a) for a in argv])


def _strict_json(text: str):
    """``json.loads`` that fails on NaN / Infinity (which Python's encoder would happily write)."""
    def refuse(name):
        raise AssertionError(f"non-finite number {name} in JSON output")
    return json.loads(text, parse_constant=refuse)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# 1. A corpus of bad and odd image files through `refineclip extract`
# ---------------------------------------------------------------------------------------------

def _build_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus; returns path -> None (must be embedded) or a substring of its skip reason."""
    rng = np.random.default_rng(7)
    expected: dict[str, str | None] = {}

    def rgb(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def good(img: Image.Image, path: Path, **kw) -> None:
        img.save(path, **kw)
        expected[str(path)] = None

    a, b = root / "a", root / "b"
    (a / "nested" / "deeper").mkdir(parents=True)
    b.mkdir()
    good(rgb(20, 20), a / "plain.png")
    (a / "zero.jpg").write_bytes(b"")
    expected[str(a / "zero.jpg")] = "empty file"
    full = _encode(rgb(64, 64), "JPEG")
    (a / "truncated.jpg").write_bytes(full[: len(full) // 2])
    expected[str(a / "truncated.jpg")] = "truncated"
    (a / "text.jpg").write_text("I am a text file wearing a .jpg name\n")
    expected[str(a / "text.jpg")] = "identify"
    (a / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    expected[str(a / "bomb.png")] = "decompression-bomb"
    good(Image.fromarray(rng.integers(0, 65536, (16, 16)).astype(np.uint16)), a / "sixteen_bit.png")
    good(rgb(16, 16).convert("CMYK"), a / "cmyk.jpg")
    pal = rgb(16, 16).convert("P")
    good(pal, a / "palette_alpha.png", transparency=3)
    good(rgb(16, 16).convert("LA"), a / "grey_alpha_LA.png")
    frames = [rgb(16, 16).convert("P") for _ in range(3)]
    frames[0].save(a / "animated.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    expected[str(a / "animated.gif")] = None
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    good(rgb(30, 10), a / "nested" / "exif rotated.jpg", exif=exif)
    good(rgb(1, 1), a / "nested" / "one_pixel.png")
    good(rgb(10_000, 10), a / "nested" / "deeper" / "wide.png")
    good(Image.new("RGB", (1, 1_000_000), (9, 99, 199)), a / "nested" / "deeper" / "tall_strip.png")
    good(rgb(12, 12), b / "  name with  spaces .png")
    non_utf8 = Path(os.fsdecode(os.fsencode(str(b)) + b"/caf\xe9-\xff.png"))  # not valid UTF-8 on disk
    good(rgb(12, 12), non_utf8, format="PNG")
    rgb(12, 12).save(b / ".hidden.png")
    expected[str(b / ".hidden.png")] = "hidden file"
    (b / ".cache").mkdir()
    rgb(12, 12).save(b / ".cache" / "inside_hidden.png")
    expected[str(b / ".cache")] = "hidden folder"
    (b / "notes.txt").write_text("not an image")
    expected[str(b / "notes.txt")] = "not an image file extension"
    os.symlink("self_loop.jpg", b / "self_loop.jpg")
    expected[str(b / "self_loop.jpg")] = "symbolic link loop"
    os.symlink("nowhere.png", b / "dangling.png")
    expected[str(b / "dangling.png")] = "not found"
    os.symlink("..", b / "up")  # a folder symlink back up: a loop if followed
    expected[str(b / "up")] = "not followed"
    os.symlink(".", root / "itself")  # class folders that are the data root or its parent
    expected[str(root / "itself")] = "loop"
    os.symlink("..", root / "parent")
    expected[str(root / "parent")] = "loop"
    locked = b / "locked.png"
    rgb(12, 12).save(locked)
    os.chmod(locked, 0)
    try:  # as root (the CI container) chmod 000 does not stop reads; then the file must be embedded
        with open(locked, "rb"):
            readable = True
    except PermissionError:
        readable = False
    expected[str(locked)] = None if readable else "permission denied"
    return expected


def _entries(root: Path) -> set[str]:
    """Every file below ``root`` plus every folder a dataset must not descend into (independent walk)."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if d.startswith(".") or os.path.islink(p):
                out.add(p)
            else:
                keep.append(d)
        dirnames[:] = keep
        out.update(os.path.join(dirpath, f) for f in filenames)
    return out


def test_bad_image_corpus_is_extracted_with_every_file_accounted_for(tiny_model_files, tmp_path):
    assert Image.MAX_IMAGE_PIXELS is not None  # the decompression-bomb guard stays on
    data = tmp_path.resolve() / "data"
    expected = _build_corpus(data)
    out = tmp_path / "cache"
    assert _run(["extract", *_flags(tiny_model_files), "--data", data, "--out", out, "--batch-size", 3,
                 "--layers", "all"]) == 0
    cache = FeatureCache(out)
    processed = [r.path for r in cache.records]
    skipped = {s.path: s.reason for s in cache.skipped}
    assert len(processed) == len(set(processed)) and not set(processed) & set(skipped)
    for path, reason in expected.items():
        if reason is None:
            assert path in processed, (ascii(path), skipped.get(path))
        else:
            assert path in skipped and reason in skipped[path], (ascii(path), skipped.get(path))
    # nothing lost, nothing invented: processed + skipped == what an independent walk finds
    present = _entries(data)
    assert set(processed) | set(skipped) == present == set(expected)
    assert len(processed) + len(skipped) == len(present)
    assert len(cache) == sum(r is None for r in expected.values())
    assert cache.classes == ["a", "b"]
    assert np.isfinite(cache.embeddings).all() and np.isfinite(cache.heads).all()
    # the decomposition stays exact on the odd images (16-bit, CMYK, alpha, strips, 1x1)
    assert _run(["check-decomposition", "--cache", out, "--json", tmp_path / "check.json"]) == 0
    check = _strict_json((tmp_path / "check.json").read_text())
    assert check["n_images"] == len(cache) and check["max_rel_error"] <= 1e-5


def test_odd_modes_orientation_and_strips_decode_as_expected(tmp_path):
    rng = np.random.default_rng(3)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (10, 30, 3), dtype=np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)  # stored 30x10, displayed rotated
    # LA: grey 100 at alpha 0 must become the white background, grey 100 at alpha 255 stays 100
    la = Image.fromarray(np.array([[[100, 0], [100, 255]]], dtype=np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    assert np.array(load_image(tmp_path / "la.png")).tolist() == [[[255, 255, 255], [100, 100, 100]]]
    sixteen = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    assert np.array(load_image(tmp_path / "s.png"))[0, :, 0].tolist() == [0, 255]
    # an extreme strip is centre-cropped to MAX_ASPECT_RATIO; what CLIP preprocessing (resize the
    # short side, centre crop) sees is unchanged
    strip = Image.fromarray(rng.integers(0, 256, (10, 10_000, 3), dtype=np.uint8))
    strip.save(tmp_path / "w.png")
    loaded = load_image(tmp_path / "w.png")
    assert loaded.size == (10 * MAX_ASPECT_RATIO, 10)
    assert np.array_equal(np.array(loaded), np.array(strip)[:, 4900:5100])
    from torchvision import transforms

    pre = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(32), transforms.ToTensor()])
    assert torch.allclose(pre(loaded), pre(strip), atol=1.5 / 255)
    # a 1 x 2,000,000 PNG is a few kB; without the crop the resize would allocate ~6 GB
    Image.new("RGB", (2_000_000, 1), (5, 6, 7)).save(tmp_path / "long.png")
    assert (tmp_path / "long.png").stat().st_size < 20_000
    long = load_image(tmp_path / "long.png")
    assert long.size == (MAX_ASPECT_RATIO, 1)  # cropped on load: the resize sees a small image
    assert pre(long).shape == (3, 32, 32)


def test_decompression_bomb_guard_refuses_both_pillow_levels(tmp_path):
    import open_clip  # noqa: F401  (importing the stack must not switch the guard off)

    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    for name, (w, h) in {"error": (100_000, 100_000), "warning": (limit // 1000 + 1, 1000)}.items():
        assert (w * h > 2 * limit) == (name == "error") and w * h > limit
        (tmp_path / f"{name}.png").write_bytes(_png_header_only(w, h))
        with pytest.raises(ImageLoadError, match="decompression-bomb"):
            load_image(tmp_path / f"{name}.png")


def test_permission_denied_has_its_own_reason(tmp_path, monkeypatch):
    # chmod 000 cannot be tested as root, so make the open itself fail the way the OS would
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    real_open = os.open  # load_image opens the file itself (then checks what it opened)

    def deny(fp, *args, **kwargs):
        if str(fp) == str(path):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(path)


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints: pickles disguised by their extension (the rest is in test_models.py)
# ---------------------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name,writer", [
    ("weights.bin", "pickle0"), ("weights.bin", "pickle5"), ("model.pth", "pickle2"),
    ("model.pth", "torch_zip"), ("last.ckpt", "torch_zip"), ("model.safetensors", "pickle4"),
])
def test_disguised_pickle_checkpoints_never_run(tiny_model_files, tmp_path, name, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    payload = {"state_dict": {"visual.proj": _Evil(marker)}}
    if writer == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=int(writer[-1]))
    spec = ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]), checkpoint=str(path))
    with pytest.raises(CheckpointError):
        load_model(spec)
    assert not marker.exists()


def test_disguised_pickle_through_the_cli_is_one_line(tiny_model_files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.bin", "wb") as fh:
        pickle.dump({"visual.proj": _Evil(marker)}, fh, protocol=2)
    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "c" / "x.png")
    flags = ["--model", tiny_model_files["name"], "--model-config", tiny_model_files["config"],
             "--checkpoint", tmp_path / "evil.bin"]
    assert _run(["extract", *flags, "--data", tmp_path / "d", "--out", tmp_path / "cache"]) == 2
    err = capsys.readouterr().err.strip()
    # refused before unpickling: a non-zip torch file's memory cannot be checked first (issue 37 item 3)
    assert err.startswith("refineclip: error:") and "\n" not in err and "not a zip-format torch file" in err
    assert not marker.exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# 3. Zip uploads
# ---------------------------------------------------------------------------------------------

def _zip(entries, method=zipfile.ZIP_DEFLATED) -> bytes:
    """``entries``: (name or ZipInfo, bytes). ZipInfo entries keep their attributes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            info = name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name)
            info.compress_type = method
            zf.writestr(info, data)
    return buf.getvalue()


def _patch_first_entry(raw: bytes, *, local: tuple[int, str, int] | None = None,
                       central: tuple[int, str, int] | None = None) -> bytes:
    """Overwrite a field (offset, struct format, value) of the first local / central header."""
    out = bytearray(raw)
    if local:
        struct.pack_into("<" + local[1], out, out.find(b"PK\x03\x04") + local[0], local[2])
    if central:
        struct.pack_into("<" + central[1], out, out.find(b"PK\x01\x02") + central[0], central[2])
    return bytes(out)


def _with_mode(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = mode << 16
    return info


ESCAPE = f"refineclip-escape-{uuid.uuid4().hex}.txt"


@pytest.mark.parametrize("entries,match", [
    ([("ok/a.txt", b"x"), (f"../{ESCAPE}", b"evil")], "points outside"),
    ([(f"cls/../../{ESCAPE}", b"evil")], "points outside"),
    ([(f"..\\{ESCAPE}", b"evil")], "points outside"),
    ([(f"/tmp/{ESCAPE}", b"evil")], "absolute path"),
    ([(f"C:\\{ESCAPE}", b"evil")], "absolute path"),
    ([(_with_mode("cls/link.png", stat.S_IFLNK | 0o777), b"/etc/passwd")], "symbolic link"),
    ([(_with_mode("cls/fifo", stat.S_IFIFO | 0o644), b"")], "not a regular file"),
])
def test_unsafe_zip_entries_are_refused_before_anything_is_written(tmp_path, entries, match):
    dest = tmp_path / "up" / "x"
    with pytest.raises(DataError, match=match):
        extract_zip(_zip(entries), dest)
    assert not dest.exists() and not (tmp_path / "up").exists()
    assert not (tmp_path / ESCAPE).exists()
    assert not Path("/tmp", ESCAPE).exists()


def test_encrypted_entries_are_refused(tmp_path):
    raw = _zip([("cls/a.png", b"secret")])
    raw = _patch_first_entry(raw, local=(6, "H", 0x1), central=(8, "H", 0x1))  # general-purpose flag bit 0
    assert zipfile.ZipFile(io.BytesIO(raw)).infolist()[0].flag_bits & 0x1
    with pytest.raises(DataError, match="is encrypted; upload an unencrypted zip"):
        extract_zip(raw, tmp_path / "x")


def test_zip_bombs_and_limits(tmp_path):
    # one highly compressible entry: 8 MB of zeros deflate to ~8 kB
    bomb = _zip([("cls/zeros.bmp", b"\x00" * 8_000_000)])
    assert len(bomb) < 20_000
    with pytest.raises(DataError, match="zip bomb"):
        extract_zip(bomb, tmp_path / "bomb")
    assert not (tmp_path / "bomb").exists()
    many = _zip([(f"cls/{i}.png", b"x") for i in range(25)])
    with pytest.raises(DataError, match="more than 20 files"):
        extract_zip(many, tmp_path / "many", max_files=20)
    assert extract_zip(many, tmp_path / "many_ok", max_files=25).n_files == 25
    big = _zip([(f"cls/{i}.bin", os.urandom(600)) for i in range(3)])
    with pytest.raises(DataError, match="more than"):
        extract_zip(big, tmp_path / "big", max_total_bytes=1000)
    assert not (tmp_path / "big").exists()
    # a header that under-declares the size: streaming never writes past what was declared
    data = os.urandom(50_000)
    liar = _zip([("cls/a.bin", data)], method=zipfile.ZIP_STORED)
    liar = _patch_first_entry(liar, local=(22, "I", 100), central=(24, "I", 100))
    assert zipfile.ZipFile(io.BytesIO(liar)).infolist()[0].file_size == 100
    with pytest.raises(DataError, match="cls/a.bin"):
        extract_zip(liar, tmp_path / "liar", max_total_bytes=1000)
    assert not (tmp_path / "liar").exists()
    # compressed sizes that add up to more than the archive (overlapping entries)
    overlap = _patch_first_entry(_zip([("cls/a.bin", b"abc")]), central=(20, "I", 10**8))
    with pytest.raises(DataError, match="overlapping"):
        extract_zip(overlap, tmp_path / "overlap")
    assert not list(tmp_path.glob(".*partial*"))  # no half-extracted folder is left behind


def test_garbage_and_non_empty_destinations(tmp_path):
    with pytest.raises(DataError, match="not a readable zip"):
        extract_zip(b"PK\x03\x04 definitely not a zip", tmp_path / "g")
    with pytest.raises(DataError, match="does not exist"):
        extract_zip(tmp_path / "missing.zip", tmp_path / "g")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="new or empty folder"):
        extract_zip(_zip([("c/a.png", b"x")]), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_good_zip_of_class_folders_extracts_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"birds/{c}/{i}.png": _encode(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "PNG")
             for c in ("cat", "dog") for i in range(3)}
    entries = [("birds/", b""), ("birds/cat/", b""), *files.items(),
               ("__MACOSX/birds/cat/._0.png", b"junk"), ("birds/.DS_Store", b"junk")]
    raw = _zip(entries)
    (tmp_path / "up.zip").write_bytes(raw)
    named = io.BytesIO(raw)
    named.name = "up.zip"  # like Streamlit's UploadedFile
    for i, source in enumerate([raw, tmp_path / "up.zip", named]):
        dest = tmp_path / f"x{i}"
        up = extract_zip(source, dest)
        assert up.root == dest.resolve() / "birds" and up.n_files == 6 and up.dest == dest
        assert {s.path for s in up.skipped} == {"__MACOSX/birds/cat/._0.png", "birds/.DS_Store"}
        assert up.total_bytes == sum(len(v) for v in files.values())
        for rel, content in files.items():
            assert (dest / rel).read_bytes() == content
        ds = load_dataset(up.root)
        assert ds.classes == ["cat", "dog"] and len(ds) == 6 and not ds.skipped
    # a zip of one class folder keeps the class: the root is the extraction folder itself
    one = extract_zip(_zip([("cat/0.png", files["birds/cat/0.png"])]), tmp_path / "one")
    assert one.root == (tmp_path / "one").resolve() and load_dataset(one.root).classes == ["cat"]
    # a metadata.csv layout wrapped in a folder
    meta = extract_zip(_zip([("d/metadata.csv", b"path,label\nimg/0.png,cat\n"),
                             ("d/img/0.png", files["birds/cat/0.png"])]), tmp_path / "meta")
    assert meta.root == (tmp_path / "meta").resolve() / "d" and load_dataset(meta.root).layout == "csv"


def test_session_upload_dir_and_cleanup(tmp_path):
    d = session_upload_dir()
    try:
        assert d.is_dir() and d.name.startswith(UPLOAD_PREFIX) and stat.S_IMODE(d.stat().st_mode) == 0o700
        (d / "x").mkdir()
        (d / "x" / "f").write_text("a")
        other = tmp_path / (UPLOAD_PREFIX + "not-in-tmpdir")
        other.mkdir()
        assert cleanup_upload_dir(other) is False and other.exists()  # not in the temp dir: untouched
        assert cleanup_upload_dir(tmp_path) is False and tmp_path.exists()
        assert cleanup_upload_dir(None) is False
        assert cleanup_upload_dir(d) is True and not d.exists()
    finally:
        cleanup_upload_dir(d)


def test_allowed_path(tmp_path, monkeypatch):
    root = (tmp_path / "allowed").resolve()
    (root / "data").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "sneaky")
    assert allowed_path(root / "data", [root]) == root / "data"
    assert allowed_path(str(root), [root]) == root
    assert allowed_path(f"  {root}/data/../data  ", [root]) == root / "data"
    for bad in (tmp_path / "secret", f"{root}/../secret", root / "sneaky", "/etc", tmp_path / "nothing-here"):
        with pytest.raises(DataError, match="outside the folders") as info:
            allowed_path(bad, [root])
        assert str(root) in str(info.value) and ALLOWED_ROOTS_ENV in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        allowed_path(root / "missing", [root])
    with pytest.raises(DataError, match="cannot be resolved|outside"):
        allowed_path(f"{root}/a\x00b", [root])
    with pytest.raises(DataError, match="Give a folder"):
        allowed_path("   ", [root])
    # defaults: the home folder (demo data), the demo assets and the working directory;
    # the variable replaces them
    from refineclip_core.loading.models import ASSETS_DIR

    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "demo-data").mkdir(parents=True)
    monkeypatch.chdir(root)
    assert default_allowed_roots() == [tmp_path / "home", ASSETS_DIR, root]
    assert allowed_path("data") == root / "data"
    assert allowed_path(tmp_path / "home" / "demo-data") == (tmp_path / "home" / "demo-data").resolve()
    with pytest.raises(DataError, match="outside"):
        allowed_path(tmp_path / "secret")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"{tmp_path / 'secret'}{os.pathsep}{os.pathsep}")
    assert default_allowed_roots() == [tmp_path / "secret"]
    assert allowed_path(tmp_path / "secret") == (tmp_path / "secret").resolve()
    with pytest.raises(DataError, match="outside"):
        allowed_path("data")


# ---------------------------------------------------------------------------------------------
# 4. Crash safety: SIGKILL in the middle of an extraction, then resume
# ---------------------------------------------------------------------------------------------

def _shard_files(shards: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(shards)): (f.stat().st_ino, f.stat().st_mtime_ns)
            for d in sorted(shards.iterdir()) if not d.name.startswith(".") for f in sorted(d.iterdir())}


@pytest.mark.slow
def test_sigkill_mid_extraction_resumes_to_an_identical_cache(tiny_model_files, tmp_path, monkeypatch):
    import refineclip_core.features.extraction as extraction

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    n_images = 200
    for c in ("p", "q"):
        (data / c).mkdir(parents=True)
        for i in range(n_images // 2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / c / f"{i:03d}.png")
    out, ref = tmp_path / "cache", tmp_path / "reference"
    args = ["extract", *_flags(tiny_model_files), "--data", str(data), "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    shards = out / "shards"
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "refineclip_core.cli", *args, "--out", str(out)],
                                cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        try:
            while not (shards.is_dir() and any((d / "done.json").exists() for d in shards.iterdir()
                                               if not d.name.startswith("."))):
                assert proc.poll() is None, f"extract ended before the kill: {(tmp_path / 'child.log').read_text()}"
                assert time.monotonic() < deadline, "no shard appeared within 180 s"
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(CacheError, match="incomplete"):  # a killed cache is never read as complete
        FeatureCache(out)
    survivors = _shard_files(shards)
    n_done = len({k.split("/")[0] for k in survivors})
    shard_size = json.loads((out / "manifest.json").read_text())["shard_size"]
    assert shard_size == 8 and 1 <= n_done < n_images // shard_size
    # a half-written shard (temp folders start with '.') full of wrong numbers must never be read
    fake = shards / f".{n_done:05d}.half-written"
    fake.mkdir(exist_ok=True)
    np.save(fake / "embedding.npy", np.full((shard_size, 32), 1e30, dtype=np.float32))

    calls: list[int] = []
    real = extraction.decompose
    monkeypatch.setattr(extraction, "decompose",
                        lambda visual, images, layers: (calls.append(images.shape[0]), real(visual, images, layers))[1])
    assert _run([*args, "--out", out]) == 0
    assert sum(calls) == n_images - n_done * shard_size  # only the missing shards were computed
    after = _shard_files(shards)
    assert {k: after[k] for k in survivors} == survivors  # finished shards were not rewritten
    calls.clear()
    assert _run([*args, "--out", ref]) == 0  # an uninterrupted run for comparison
    assert sum(calls) == n_images
    resumed, reference = FeatureCache(out), FeatureCache(ref)
    for name in ("embeddings", "heads", "remainders", "index", "text", "labels"):
        assert np.array_equal(np.asarray(getattr(resumed, name)), np.asarray(getattr(reference, name))), name
    assert resumed.records == reference.records and resumed.skipped == reference.skipped


# ---------------------------------------------------------------------------------------------
# 5. Degenerate data
# ---------------------------------------------------------------------------------------------

def test_one_class_one_image_gives_a_defined_zero_shot_result(tiny_model_files, tmp_path):
    (tmp_path / "d" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8), (120, 10, 10)).save(tmp_path / "d" / "only" / "x.png")
    assert _run(["extract", *_flags(tiny_model_files), "--data", tmp_path / "d", "--out", tmp_path / "c"]) == 0
    assert _run(["zero-shot", "--cache", tmp_path / "c", "--json", tmp_path / "zs.json"]) == 0
    zs = _strict_json((tmp_path / "zs.json").read_text())
    # with a single class every prediction is that class
    assert zs["n_images"] == 1 and zs["accuracy"] == 1.0 and zs["per_class"] == {"only": 1.0}
    assert zs["per_group"] == {} and zs["worst_group"] is None and zs["average_group"] is None


def test_identical_images_give_identical_predictions_and_finite_reports(tiny_model_files, tmp_path):
    d = tmp_path / "d"
    rows = ["path,label,group,split"]
    for cls, n in (("a", 3), ("b", 1)):
        (d / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (128, 128, 128)).save(d / cls / f"{i}.png")  # constant, identical
            rows.append(f"{cls}/{i}.png,{cls},{cls}-g,test")
    (d / "metadata.csv").write_text("\n".join(rows) + "\n")
    assert _run(["extract", *_flags(tiny_model_files), "--data", d, "--out", tmp_path / "c"]) == 0
    cache = FeatureCache(tmp_path / "c")
    emb = np.asarray(cache.embeddings)
    assert np.isfinite(emb).all() and np.allclose(emb, emb[:1], rtol=1e-5, atol=1e-6)
    for split, n in (("test", 4), ("val", 0)):
        out = tmp_path / f"zs-{split}.json"
        assert _run(["zero-shot", "--cache", tmp_path / "c", "--split", split, "--json", out]) == 0
        zs = _strict_json(out.read_text())
        assert zs["n_images"] == n
        if n:
            # every image gets the same class k: accuracy is the share of k, classes score 1 and 0
            assert zs["accuracy"] in (0.75, 0.25) and sorted(zs["per_class"].values()) == [0.0, 1.0]
            assert zs["worst_group"] == 0.0 and zs["average_group"] == 0.5
        else:
            assert zs["accuracy"] is None and zs["per_class"] == {} and zs["worst_group"] is None
    # duplicate display names would merge two classes' prompts and report rows
    assert _run(["extract", *_flags(tiny_model_files), "--data", d, "--out", tmp_path / "c2",
                 "--class-names", "x,x"]) == 2


# ---------------------------------------------------------------------------------------------
# 6. Property-based tests and fuzzing
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def meta_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("meta")
    root = (base / "root").resolve()
    (root / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png"):
        (root / rel).write_bytes(b"x")
    (base / "outside.png").write_bytes(b"x")
    os.symlink(base / "outside.png", root / "link_out.png")
    os.symlink("loop.png", root / "loop.png")
    return root


_CELLS = st.one_of(
    st.sampled_from(["a.png", "sub/b.png", "./a.png", "sub/../a.png", "../outside.png", "link_out.png",
                     "loop.png", "/etc/passwd", "..", ".", "", " ", "a.png\x00", "0", "1", "2", "train",
                     "cat", '"a.png"', '"x,y"', '"unterminated', "\ufeff"]),
    st.text(max_size=12),
)
_HEADERS = st.lists(st.sampled_from(["path", "label", "group", "split", "img_filename", "y", "place", "extra", ""]),
                    min_size=0, max_size=6)


@st.composite
def _csv_text(draw):
    header = draw(_HEADERS)
    rows = draw(st.lists(st.lists(_CELLS, max_size=7), max_size=6))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return sep.join([",".join(header)] + [",".join(r) for r in rows]) + draw(st.sampled_from(["", sep]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(_csv_text(), st.text(max_size=200)), waterbirds=st.booleans())
def test_parse_metadata_only_raises_data_error_and_stays_below_root(meta_root, text, waterbirds):
    try:
        ds = parse_metadata(text, meta_root, waterbirds=waterbirds)
    except DataError:
        return
    for rec in ds.records:
        resolved = Path(rec.path).resolve()
        assert meta_root in resolved.parents and resolved.is_file()
        assert 0 <= rec.label < len(ds.classes)
    assert all(s.reason for s in ds.skipped)


_PARSER = build_parser()
_TOKENS = ["extract", "zero-shot", "check-decomposition", "--model", "demo", "--checkpoint", "--data", "--out",
           "--layers", "all", "0", "-1", "4", "--batch-size", "--batch-size=0", "--layers=x", "--precision",
           "fp16", "int8", "--help", "-h", "--debug", "--json", "--cache", "--split", "--template", "{}",
           "--class-names", "--templates-file", "--", "-", "--layout", "waterbirds", "9" * 5000]


@settings(max_examples=200, deadline=None)
@given(argv=st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=10)), max_size=8))
def test_cli_parser_only_exits_cleanly(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            ns = _PARSER.parse_args(argv)
        except SystemExit:
            return
    assert callable(ns.func) and ns.command in ("extract", "zero-shot", "check-decomposition")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.5 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op < 0.65:
            del out[rng.randrange(len(out) + 1):]
        elif op < 0.8:
            i = rng.randrange(len(out) + 1)
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            i, j = sorted(rng.randrange(len(out) + 1) for _ in range(2))
            out[i:i] = out[i:j][:64]
    return bytes(out)


def test_load_image_fuzz_gives_rgb_or_image_load_error(tmp_path):
    rng_np = np.random.default_rng(0)
    base = Image.fromarray(rng_np.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = {"png": _encode(base, "PNG"), "jpg": _encode(base, "JPEG", exif=exif),
             "gif": _encode(base.convert("P"), "GIF"), "tif": _encode(base, "TIFF")}
    rng = random.Random(20240601)
    outcomes = {"ok": 0, "error": 0}
    warnings.simplefilter("ignore", UserWarning)  # Pillow's TIFF "corrupt EXIF" chatter (pytest restores filters)
    for i in range(200):
        ext = rng.choice(sorted(seeds))
        path = tmp_path / f"{i}.{ext}"
        path.write_bytes(_mutate(rng, seeds[ext]))
        try:
            img = load_image(path)
        except ImageLoadError as exc:
            assert str(exc)
            outcomes["error"] += 1
            continue
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
        img.tobytes()
        outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0  # the mutations exercised both paths
