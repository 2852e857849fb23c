"""Confinement and isolation, round three (issue 26): each vector of the red-team pass as a test.

* An export carries only the files it needs (config, preprocessor, tokenizer), each read through
  the confined read; links leaving the allowed folders never leave with it (library and CLI).
* A cache, upload or run belongs to the session that made it: another session can neither open
  the cache nor rebuild the model from its manifest.
* A deep or broken custom config is refused with a sentence before anything is registered, and
  leaves nothing in open_clip's process-wide registry: other configs and the demo still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from refineclip_core.cli import main
from refineclip_core.errors import RefineClipError
from refineclip_core.loading import hf_clip
from refineclip_core.loading.confine import Confinement
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.edit.export import export_checkpoint
from refineclip_core.edit.paper import RefinedMap

from .conftest import tiny_config, write_config
from .test_app import demo_spec, home  # noqa: F401 - fixtures (a private home folder, the demo model)

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# 1. exports carry nothing from outside
# ---------------------------------------------------------------------------------------------

SECRET = b"the outside file's secret bytes"


def _hf_folder(root: Path) -> Path:
    """A tiny CLIP folder written by transformers' ``save_pretrained`` inside ``root``."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(vocab_size=hf_clip.CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    folder = root / "hf-clip"
    CLIPModel(cfg).eval().save_pretrained(folder)
    (folder / "vocab.json").write_text('{"a": 0}')  # a real tokenizer file: carried
    return folder


@pytest.fixture()
def hostile_hf(tmp_path):
    """(allowed root, HF folder inside it, outside file): the folder links to the outside file and
    to the server's environment under names an export must never carry."""
    root, outside = tmp_path / "allowed", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    folder = _hf_folder(root)
    (folder / "notes.txt").symlink_to(outside / "secret.txt")
    (folder / "tokenizer_config.txt").symlink_to("/proc/self/environ")
    (folder / "README.md").write_text("not needed by the export")
    return root, folder, outside / "secret.txt"


def _edit(d: int) -> RefinedMap:
    return RefinedMap("diag", theta=np.random.default_rng(1).uniform(0.5, 1.5, d))


def _assert_clean(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "vocab.json"], names
    env = os.environb.get(b"PATH", b"/usr/bin")
    for p in out.iterdir():
        data = p.read_bytes()
        assert SECRET not in data and env not in data and not p.is_symlink()
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(out) is not None


@pytest.mark.parametrize("roots", ["dashboard", "library"])
def test_an_hf_export_carries_only_the_files_it_needs(hostile_hf, tmp_path, roots):
    root, folder, _ = hostile_hf
    allowed = [str(root)] if roots == "dashboard" else None
    loaded = load_model(ModelSpec("x", checkpoint=str(folder), roots=allowed and tuple(allowed)))
    with Confinement.of(allowed).active():
        out = export_checkpoint(str(folder), loaded.model, _edit(16), tmp_path / "out" / "edited", "hf")
    _assert_clean(out)


@pytest.mark.parametrize("roots", ["dashboard", "library"])
def test_a_needed_file_linking_out_refuses_the_export(hostile_hf, tmp_path, roots):
    root, folder, secret = hostile_hf
    (folder / "special_tokens_map.json").symlink_to(secret)
    allowed = (str(root),) if roots == "dashboard" else None
    loaded = load_model(ModelSpec("x", checkpoint=str(folder), roots=allowed))
    with pytest.raises(RefineClipError, match="special_tokens_map.json.*symbolic link outside.*not written"), \
            Confinement.of(allowed).active():
        export_checkpoint(str(folder), loaded.model, _edit(16), tmp_path / "edited", "hf")
    assert not (tmp_path / "edited").exists()
    # a link to the environment under a needed name is refused the same way
    (folder / "special_tokens_map.json").unlink()
    (folder / "merges.txt").symlink_to("/proc/self/environ")
    with pytest.raises(RefineClipError, match="merges.txt"), Confinement.of(allowed).active():
        export_checkpoint(str(folder), loaded.model, _edit(16), tmp_path / "edited", "hf")


def test_a_hub_snapshot_exports_through_its_blob_links(tmp_path):
    """Hugging Face's hub cache stores a snapshot's files as links to ``../../blobs``: those stay
    inside the model's own repository folder and are carried (the CLI, without roots)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    src = _hf_folder(tmp_path / "src")
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    loaded = load_model(ModelSpec("x", checkpoint=str(snap)))
    out = export_checkpoint(str(snap), loaded.model, _edit(16), tmp_path / "edited", "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]


def test_cli_refine_format_hf_carries_nothing_from_outside(hostile_hf, image_folder, tmp_path):
    _, folder, _ = hostile_hf
    cache = tmp_path / "cache"
    assert main(["extract", "--checkpoint", str(folder), "--data", str(image_folder), "--out", str(cache),
                 "--layers", "1"]) == 0
    out = tmp_path / "cli-out"
    assert main(["refine", "--cache", str(cache), "--samples-per-class", "2", "--fit-steps", "3", "--no-baselines",
                 "--out", str(out), "--format", "hf"]) == 0
    _assert_clean(out)


# ---------------------------------------------------------------------------------------------
# 3. one deep or broken config cannot break loading for everyone
# ---------------------------------------------------------------------------------------------

def test_a_deep_config_is_refused_and_leaves_nothing_registered(tmp_path):
    import open_clip
    from open_clip import factory

    before = set(factory._MODEL_CONFIGS)
    paths_before = list(factory._MODEL_CONFIG_PATHS)
    cfg = tiny_config(width=32, layers=1)
    deep_path = tmp_path / "deep.json"
    deep_path.write_text(json.dumps(cfg)[:-1] + ', "junk": ' + "[" * 975 + "]" * 975 + "}")  # 976 deep in all
    for _ in range(2):  # the second try is refused the same way: nothing stuck anywhere
        with pytest.raises(RefineClipError, match=r"nests 976 levels deep \(at most \d+"):
            load_model(ModelSpec("deep", model_config=str(deep_path)))
    assert set(factory._MODEL_CONFIGS) == before and factory._MODEL_CONFIG_PATHS == paths_before
    # a custom config, a transformers folder and the demo model all still load
    other = write_config(tmp_path, "other", tiny_config(width=48, layers=1))
    assert load_model(ModelSpec("other", model_config=str(other))).visual.transformer.width == 48
    assert load_model(ModelSpec("x", checkpoint=str(_hf_folder(tmp_path)))).visual.transformer.width == 32
    assert load_model(ModelSpec("demo")).model_name == "refineclip-demo"
    # and a config that is built stays out of the registry afterwards too
    assert set(factory._MODEL_CONFIGS) == before and "other" not in " ".join(open_clip.list_models())


def test_configs_that_open_clip_cannot_build_leave_nothing_registered(tmp_path):
    from open_clip import factory

    before = set(factory._MODEL_CONFIGS)
    broken = write_config(tmp_path, "broken", {**tiny_config(), "vision_cfg": {"width": 32, "layers": 1,
                                                                               "patch_size": 7, "image_size": 32,
                                                                               "no_such_option": 1}})
    with pytest.raises(RefineClipError, match="Could not build model 'broken'"):
        load_model(ModelSpec("broken", model_config=str(broken)))
    assert set(factory._MODEL_CONFIGS) == before


# ---------------------------------------------------------------------------------------------
# 2. a session's uploads, caches and runs are its own
# ---------------------------------------------------------------------------------------------

def _zip_of(folder: Path) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder))
    return buf.getvalue()


@pytest.fixture()
def two_sessions(tmp_path, monkeypatch, tiny_model_files, class_folder):
    """Session A uploads a checkpoint and an image zip and extracts; session B is a second
    browser. The server runs in the temporary directory itself (so the working-directory root
    holds every session's folder), the home folder is fresh."""
    import tempfile

    from refineclip_core.features.extraction import ExtractionConfig
    from refineclip_core.loading.confine import read_roots
    from refineclip_core.loading.uploads import save_upload, session_upload_dir
    from refineclip_core.session.images import plan_source, scan_images
    from refineclip_core.session.locking import extract_locked

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REFINECLIP_ALLOWED_ROOTS", raising=False)
    monkeypatch.chdir(tmp)
    a_dir, b_dir = session_upload_dir(), session_upload_dir()
    a_roots = read_roots(a_dir)
    ckpt = save_upload(Path(tiny_model_files["checkpoint"]).read_bytes(), "private.pt", "ckpt", a_dir)
    cfg = save_upload(Path(tiny_model_files["config"]).read_bytes(), "tiny-vit.json", "cfg", a_dir)
    spec = ModelSpec(tiny_model_files["name"], checkpoint=str(ckpt), model_config=str(cfg), roots=a_roots)
    with Confinement.of(a_roots).active():  # session A's
        scanned = scan_images("zip", zip_data=_zip_of(class_folder), upload_dir=a_dir)
    loaded = load_model(spec)
    source, ecfg = plan_source(scanned, spec, loaded.model_name, 1, list(scanned.dataset.classes),
                               ["a photo of a {}."], private_dir=a_dir)
    extract_locked(loaded, scanned.dataset, source.cache_dir, ExtractionConfig(layers=1, templates=ecfg.templates))
    return {"a_dir": a_dir, "b_dir": b_dir, "a_source": source, "b_roots": read_roots(b_dir), "tmp": tmp,
            "home": tmp_path / "home"}


def test_a_cache_of_uploads_lives_in_the_sessions_own_folder(two_sessions):
    from refineclip_core.home import home_dir

    cache = Path(two_sessions["a_source"].cache_dir).resolve()
    assert two_sessions["a_dir"].resolve() in cache.parents and (cache / "manifest.json").is_file()
    assert not (home_dir() / "caches").exists() or not any((home_dir() / "caches").iterdir())


def test_another_session_cannot_open_list_or_rebuild_from_it(two_sessions):
    from refineclip_core.errors import CacheError, DataError
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.loading.confine import allowed_path
    from refineclip_core.session.caches import cache_source

    cache, b_roots = two_sessions["a_source"].cache_dir, two_sessions["b_roots"]
    assert str(two_sessions["tmp"].resolve()) in b_roots  # the working directory: A's folder lies below it
    with pytest.raises(CacheError, match="another session"), Confinement.of(b_roots).active():
        cache_source(cache)
    with pytest.raises(DataError, match="outside the folders"):
        allowed_path(two_sessions["a_dir"], b_roots)
    from .conftest import make_image

    (two_sessions["tmp"] / "public").mkdir()
    make_image(np.random.default_rng(0), (10, 20, 30)).save(two_sessions["tmp"] / "public" / "p.png")
    with Confinement.of(b_roots).active():  # B lists the shared folder holding A's
        ds = load_dataset(two_sessions["tmp"])
    assert ds.classes == ["public"] and not any(two_sessions["a_dir"].name in r.path for r in ds.records)
    assert {s.reason for s in ds.skipped if two_sessions["a_dir"].name in s.path} == {
        "class folder: another session's private folder, not listed"}
    # A itself opens its cache, with its own roots
    from refineclip_core.loading.confine import read_roots

    with Confinement.of(read_roots(two_sessions["a_dir"])).active():
        assert cache_source(cache).spec.checkpoint


def test_a_shared_cache_naming_another_sessions_model_is_refused(two_sessions):
    """A cache in the shared home folder (e.g. written before caches moved into the sessions'
    folders) whose manifest names A's uploaded checkpoint and A's roots: B cannot rebuild the
    model from it, and a manifest's roots never replace the opener's."""
    import shutil

    from refineclip_core.errors import CacheError, OutsideRootsError
    from refineclip_core.session.caches import cache_source

    shared = two_sessions["home"] / "caches" / "copied"
    shutil.copytree(two_sessions["a_source"].cache_dir, shared)
    b_roots = two_sessions["b_roots"]
    as_b = Confinement.of(b_roots)
    with pytest.raises(CacheError, match="The cache's checkpoint .* another session"), as_b.active():
        cache_source(shared)
    # even a manifest naming a model B may read gets B's roots, not the recorded ones
    manifest = json.loads((shared / "manifest.json").read_text())
    spec = ModelSpec(**manifest["model"])
    assert two_sessions["a_dir"].resolve().as_posix() in " ".join(spec.roots)
    manifest["model"]["checkpoint"] = manifest["model"]["model_config"] = None
    manifest["model"]["name"] = "demo"
    (shared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="made by another model"), as_b.active():  # the fingerprint is A's model's
        cache_source(shared)
    manifest["extra"]["model_fingerprint"] = ModelSpec("demo").fingerprint()  # forged for a model B may read
    (shared / "manifest.json").write_text(json.dumps(manifest))
    with as_b.active():
        opened = cache_source(shared)
    assert opened.spec.roots == tuple(b_roots)
    # two sessions that may both read it share what is computed from it (one engine, not one per session)
    from refineclip_core.loading.confine import read_roots

    with Confinement.of(read_roots(two_sessions["a_dir"])).active():
        by_a = cache_source(shared)
        assert by_a.spec.roots != opened.spec.roots and by_a.resource_key() == opened.resource_key()
        assert cache_source(two_sessions["a_source"].cache_dir).key != opened.key
    # and the reader itself refuses A's checkpoint under B's roots
    with pytest.raises(OutsideRootsError):
        load_model(ModelSpec(two_sessions["a_source"].spec.name, checkpoint=two_sessions["a_source"].spec.checkpoint,
                             model_config=two_sessions["a_source"].spec.model_config, roots=tuple(b_roots)))


# ---------------------------------------------------------------------------------------------
# 7, 9. names of any encoding shown safely; the CLI never prints raw control characters
# ---------------------------------------------------------------------------------------------

#: A class folder name with terminal escapes (set the title, clear the screen, turn text red).
TERMINAL_NAME = "cat\x1b]0;PWNED\x07\x1b[2J\x1b[31mRED"


def test_visible_marks_what_a_name_could_hide():
    from refineclip_core.names import decodable, visible

    undecodable = os.fsdecode(b"cat_\xff\xfe")
    assert visible(undecodable) == "cat_⟨xFF⟩⟨xFE⟩" and decodable(undecodable) == "cat_⟨xFF⟩⟨xFE⟩"
    assert visible("abc\u202edcba") == "abc⟨U+202E⟩dcba"          # right-to-left override
    assert visible("ca\u200bt") == "ca⟨U+200B⟩t" != visible("cat")  # zero-width space: two names stay two
    assert visible(TERMINAL_NAME) == "cat⟨U+001B⟩]0;PWNED⟨U+0007⟩⟨U+001B⟩[2J⟨U+001B⟩[31mRED"
    assert visible("Größe 猫 🐈 a-b_c.png") == "Größe 猫 🐈 a-b_c.png"  # ordinary text untouched
    assert decodable("ab\u202ec") == "ab\u202ec"                     # data keeps what the user typed
    for text in (undecodable, TERMINAL_NAME, "\ud800x"):
        visible(text).encode("utf-8")  # always encodable


@pytest.fixture()
def hostile_names(tmp_path):
    """Class folders named with undecodable bytes, terminal escapes, a bidi override and a
    zero-width space, and an image file whose name is not UTF-8."""
    from .conftest import make_image

    root = tmp_path / "names"
    rng = np.random.default_rng(0)
    names = [b"cat_\xff\xfe", TERMINAL_NAME.encode(), "dog\u202egod".encode(), "zw\u200bcat".encode()]
    for c, raw in enumerate(names):
        folder = os.path.join(os.fsencode(root), raw)
        os.makedirs(folder)
        for i in range(4):
            img = make_image(rng, (60 * c, 40, 200 - 40 * c))
            fname = b"bad_\xff\xfe%d.png" % i if c == 0 else b"img%d.png" % i
            img.save(os.fsdecode(os.path.join(folder, fname)))
    return root


def test_cli_prints_no_control_characters(hostile_names, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["extract", "--model", "demo", "--data", str(hostile_names), "--out", str(cache), "--layers", "1",
                 "--template", "a photo of {}"]) == 0
    assert main(["zero-shot", "--cache", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert "⟨U+001B⟩]0;PWNED" in out and "⟨xFF⟩⟨xFE⟩" in out and "⟨U+202E⟩" in out and "⟨U+200B⟩" in out
    for stream in (out, err):
        assert not any(ord(ch) < 32 and ch != "\n" or 0x7F <= ord(ch) < 0xA0 or ch in "\u202e\u200b" for ch in stream)
    # an error message naming the folder is printed the same way
    assert main(["extract", "--model", "demo", "--data", str(hostile_names / "missing\x1b[2J"),
                 "--out", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "⟨U+001B⟩[2J" in err
    # argparse's own lines quote what was typed: marked too
    for argv in (["zero-shot", "--cache", "c", "--bogus\x1b]0;PWNED\x07"], ["no-such\x1b[31m-command"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert "\x1b" not in err and "\x07" not in err, err   # marked (or quoted by argparse), never raw


def test_json_to_a_folder_and_a_full_disk_are_one_sentence(tiny_model_files, image_folder, tmp_path, capsys,
                                                           monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["zero-shot", "--model", "demo", "--data", str(image_folder), "--json", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is a folder; give a file path" in err and "Traceback" not in err
    # the disk fills while the cache's shards are written (numpy's message carries no errno)
    import numpy

    real_save = numpy.save

    def full(file, *args, **kwargs):  # writes into memory work, writes to the disk fail
        if isinstance(file, (str, os.PathLike)):
            raise OSError("20480 requested and 16352 written")
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(numpy, "save", full)
    flags = ["--model", tiny_model_files["name"], "--model-config", str(tiny_model_files["config"]),
             "--checkpoint", str(tiny_model_files["checkpoint"])]
    assert main(["extract", *flags, "--data", str(image_folder), "--out", str(tmp_path / "c"), "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full" in err and "unexpected" not in err
    monkeypatch.undo()
    # ENOSPC on a plain write (the --json record, a report)
    import errno

    from refineclip_core.files import atomic_write_bytes

    def no_space(fd, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RefineClipError, match="the disk is full"):
        atomic_write_bytes(tmp_path / "r.json", b"{}")
    assert not list(tmp_path.glob(".r.json.*"))  # no temporary file left behind


def test_nan_or_inf_weights_are_refused_at_load(tiny_model_files, tmp_path):
    from refineclip_core.errors import CheckpointError

    state = torch.load(tiny_model_files["checkpoint"], weights_only=True)
    for bad in (float("nan"), float("inf")):
        broken = dict(state)
        broken["visual.proj"] = broken["visual.proj"].clone()
        broken["visual.proj"][0, 0] = bad
        path = tmp_path / "bad.pt"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=r"1 non-finite values .* in 'visual.proj'"):
            load_model(ModelSpec(tiny_model_files["name"], checkpoint=str(path),
                                 model_config=str(tiny_model_files["config"])))


def test_non_finite_features_are_refused_at_extraction(tiny_model_files, image_folder, tmp_path):
    """Finite weights whose features overflow (ln_post and the projection each scaled by 1e30): nothing written."""
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.loading.data import load_dataset

    loaded = load_model(ModelSpec(tiny_model_files["name"], checkpoint=str(tiny_model_files["checkpoint"]),
                                  model_config=str(tiny_model_files["config"])))
    with torch.no_grad():
        loaded.model.visual.proj.mul_(1e30)
        loaded.model.visual.ln_post.weight.mul_(1e30)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    with pytest.raises(RefineClipError, match=r"non-finite features \(NaN or infinity\) for '.*\.png'"):
        extract(loaded, load_dataset(image_folder), tmp_path / "c", ExtractionConfig(layers=1))
    assert not (tmp_path / "c" / "shards").exists() or not any((tmp_path / "c" / "shards").iterdir())


@pytest.mark.slow
def test_pages_show_names_of_any_encoding(hostile_names, home, demo_spec):
    """Scan, extract and every page with class folders and files whose names are not UTF-8, hold
    terminal escapes, a bidi override or a zero-width space: no page fails, the names are marked."""
    from .test_app import assert_clean, fresh_app, open_page

    at = fresh_app(demo_spec)
    at.run()
    at.radio(key="load_data_kind").set_value("Folder on the server").run()
    at.text_input(key="load_folder").input(str(hostile_names)).run()
    at.button(key="load_scan_btn").click().run()
    assert_clean(at)
    classes = at.session_state["load_scan"].dataset.classes
    assert "cat_⟨xFF⟩⟨xFE⟩" in classes and TERMINAL_NAME in classes  # undecodable bytes marked, the rest kept
    at.button(key="load_extract_btn").click().run()
    assert_clean(at)
    shown = []
    for name in ("errors", "heads", "inspector"):
        page = open_page(at, name)
        shown += [str(e.value) for e in page.markdown] + [str(e.value) for e in page.caption]
        for df in page.dataframe:
            shown += ([str(v) for v in df.value.to_numpy().ravel()] + [str(v) for v in df.value.index]
                      + [str(v) for v in df.value.columns])
        shown += [str(o) for box in page.selectbox for o in box.options]
        shown += [str(o) for box in page.multiselect for o in box.options]
    leaks = [t for t in shown if "\x1b" in t or "\u202e" in t or "zw\u200bcat" in t]
    assert not leaks, leaks[:3]
    text = "\n".join(shown)
    assert "⟨xFF⟩⟨xFE⟩" in text and "⟨U+202E⟩" in text and "⟨U+001B⟩" in text and "zw⟨U+200B⟩cat" in text


# ---------------------------------------------------------------------------------------------
# 5. disk amplification, quotas and clean-up of uploads
# ---------------------------------------------------------------------------------------------

def _zeros_zip(n: int, size: int = 1 << 20) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(n):
            zf.writestr(f"c/{i:04d}.png", b"\0" * size)
    return buf.getvalue()


@pytest.mark.parametrize("size", [1 << 20, 100_000])
def test_many_entries_at_or_under_the_entry_limit_are_a_bomb_too(tmp_path, size):
    """40 entries of exactly 1 MiB of zeros (the old check looked only at entries over 1 MiB), and
    100 kB entries: the archive as a whole expands ~1,000-fold and is refused before writing."""
    from refineclip_core.errors import DataError
    from refineclip_core.loading.unzip import extract_zip

    data = _zeros_zip(40 if size == 1 << 20 else 400, size)
    with pytest.raises(DataError, match=r"expands \d+-fold"):
        extract_zip(data, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_uploads_have_a_session_and_a_total_quota(upload_tmp, monkeypatch, image_folder):
    from refineclip_core.errors import DataError
    from refineclip_core.loading.uploads import folder_bytes, save_upload, session_upload_dir, unpack_upload

    monkeypatch.setenv("REFINECLIP_UPLOAD_QUOTA", "1MB")
    monkeypatch.setenv("REFINECLIP_UPLOAD_TOTAL", "1.5MB")
    a, b = session_upload_dir(), session_upload_dir()
    save_upload(os.urandom(600_000), "one.pt", "ckpt", a)
    with pytest.raises(DataError, match=r"this session's files to 1\.2 MB, over its quota of 1\.0 MB"):
        save_upload(os.urandom(600_000), "two.pt", "ckpt", a)
    save_upload(os.urandom(600_000), "three.pt", "ckpt", b)
    with pytest.raises(DataError, match=r"all sessions' files to 1\.6 MB, over the server's total of 1\.5 MB"):
        save_upload(os.urandom(399_000), "four.pt", "ckpt", b)  # (the folder holds its owner mark too)
    assert folder_bytes(a) < 700_000 and folder_bytes(b) < 700_000  # refused uploads leave nothing
    # a zip is sized by what it unpacks to, before anything is written
    images = _zip_of(image_folder)  # 18 small PNGs, about 90 kB unpacked
    monkeypatch.setenv("REFINECLIP_UPLOAD_QUOTA", "650kB")
    with pytest.raises(DataError, match="over its quota of 650.0 kB"):
        unpack_upload(images, a)
    assert not [p for p in a.iterdir() if p.name.startswith("zip-")]


def test_abandoned_upload_folders_are_swept_after_the_stated_time(upload_tmp, monkeypatch):
    import time

    from refineclip_core.loading.uploads import (ALIVE_FILE, session_upload_dir, sweep_upload_dirs,
                                                 touch_upload_dir)

    monkeypatch.setenv("REFINECLIP_UPLOAD_TTL", "600")
    gone, active = session_upload_dir(), session_upload_dir()
    (gone / "private.pt").write_bytes(b"x" * 1000)
    old = time.time() - 601
    os.utime(gone / ALIVE_FILE, (old, old))
    os.utime(active / ALIVE_FILE, (old, old))
    touch_upload_dir(active)                       # the dashboard does this on each page run
    outside = upload_tmp / "not-an-upload-folder"  # never touched by the sweep
    outside.mkdir()
    os.utime(outside, (old, old))
    assert sweep_upload_dirs() == [gone]
    assert not gone.exists() and active.is_dir() and outside.is_dir()
    # a new session sweeps too
    os.utime(active / ALIVE_FILE, (old, old))
    fresh = session_upload_dir()
    assert not active.exists() and fresh.is_dir()


def test_each_page_run_keeps_the_sessions_folder_alive(home, demo_spec, upload_tmp):
    import time

    from refineclip_core.loading.uploads import ALIVE_FILE

    from .test_app import fresh_app

    from dashboard.state import Key, _SessionFolder

    at = fresh_app(demo_spec)
    owner = _SessionFolder()  # the session's upload folder, as its first upload makes it
    at.session_state[Key.SESSION_FOLDER] = owner
    old = time.time() - 10_000
    os.utime(Path(owner.path) / ALIVE_FILE, (old, old))
    at.run()
    assert (Path(owner.path) / ALIVE_FILE).stat().st_mtime > old + 9_000  # touched by the page run


# ---------------------------------------------------------------------------------------------
# 4. the memory budget counts every part a config can build, before allocating any
# ---------------------------------------------------------------------------------------------

def _coca(width: int, layers: int) -> dict:
    cfg = tiny_config(width=32, layers=1)
    cfg["text_cfg"].update(embed_cls=True, pad_id=0)
    return {**cfg, "custom_text": True,
            "multimodal_cfg": {"width": width, "layers": layers, "heads": 4, "context_length": 16, "dim_head": 16}}


def _timm(name: str) -> dict:
    cfg = tiny_config()
    cfg["vision_cfg"] = {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "avg",
                         "timm_proj": "linear", "image_size": 32}
    return cfg


@pytest.mark.parametrize("label, cfg", [("coca decoder", _coca(64, 2)), ("timm tower", _timm("resnet18"))])
def test_the_estimate_counts_decoders_and_timm_towers_exactly(label, cfg, tmp_path):
    """The parameter count of the estimate equals that of the model open_clip builds."""
    from refineclip_core.loading.budget import estimate_model

    path = write_config(tmp_path, "m", cfg)
    built = load_model(ModelSpec("m", model_config=str(path)), memory_budget="64GB").model
    assert estimate_model(cfg).n_params == sum(p.numel() for p in built.parameters()), label


@pytest.mark.parametrize("label, cfg, params", [
    ("a CoCa decoder of 657M parameters", _coca(1024, 24), r"656\.9 million"),
    ("timm's vit_huge_patch14_224", {**_timm("vit_huge_patch14_224"),
                                     "vision_cfg": {**_timm("x")["vision_cfg"], "timm_model_name": "vit_huge_patch14_224",
                                                    "image_size": 224}}, r"\d+\.\d million"),
])
def test_big_hidden_parts_are_refused_before_allocation(label, cfg, params, tmp_path, monkeypatch):
    import open_clip

    def no_allocation(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called for a config over the budget")

    monkeypatch.setattr(open_clip, "create_model", no_allocation)
    monkeypatch.setenv("REFINECLIP_MEMORY_BUDGET", "500MB")
    path = write_config(tmp_path, "hidden", cfg)
    with pytest.raises(RefineClipError, match=rf"refused before loading: it would need about .* \(({params}) "
                                               r"parameters.* but the budget is 500\.0 MB"):
        load_model(ModelSpec("hidden", model_config=str(path)))


def test_a_tower_that_cannot_be_sized_is_refused_in_one_sentence(tmp_path):
    cfg = _timm("no_such_timm_model")
    with pytest.raises(RefineClipError, match="timm vision tower 'no_such_timm_model' could not be sized"):
        load_model(ModelSpec("t", model_config=str(write_config(tmp_path, "t", cfg))))


def test_decoding_is_budgeted_by_pixels_in_flight(tmp_path, monkeypatch):
    """Eight 2-megapixel PNGs decoded by eight threads at once under a 5-megapixel budget: never
    more than two in flight; an image larger than the whole budget still decodes, alone."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from refineclip_core.loading import decode

    budget = decode.PixelBudget(limit=5_000_000)
    monkeypatch.setattr(decode, "DECODE_BUDGET", budget)
    paths = []
    for i in range(8):
        path = tmp_path / f"big{i}.png"
        Image.new("RGB", (2000, 1000), (i, 0, 0)).save(path)
        paths.append(path)
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(decode.load_image, paths))
    assert [im.size for im in images] == [(2000, 1000)] * 8
    assert 2_000_000 <= budget.peak <= 4_000_000
    huge = tmp_path / "huge.png"
    Image.new("L", (3000, 2000)).save(huge)
    budget.peak = 0
    assert decode.load_image(huge).size == (3000, 2000) and budget.peak == 6_000_000


# ---------------------------------------------------------------------------------------------
# 6. 10,000 classes: every page works; class names have a length limit
# ---------------------------------------------------------------------------------------------

N_MANY = 10_000


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """A real feature cache of 48 images (the demo model, 4 classes) whose class list is then
    widened to 10,000 names with their text embeddings (the image features stay real): what the
    pages compute and send grows with the number of classes, not with the images."""
    from refineclip_core.features.cache_format import read_manifest
    from refineclip_core.files import atomic_write_bytes, atomic_write_json, npy_bytes
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.features.zeroshot import class_text_embeddings
    from refineclip_core.loading.data import load_dataset
    from refineclip_core.session.source import Source

    from .conftest import make_image

    root = tmp_path_factory.mktemp("many")
    data = root / "data"
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(12):
            make_image(rng, colour, size=48).save(data / f"c{c}" / f"{i}.png")
    loaded = load_model(ModelSpec("demo"))
    cache_dir = root / "cache"
    extract(loaded, load_dataset(data), cache_dir, ExtractionConfig(layers=4, templates=("a photo of a {}.",)))
    manifest = read_manifest(cache_dir)
    names = list(manifest.classes) + [f"class {i:05d} " + "x" * (i % 40) for i in range(len(manifest.classes), N_MANY)]
    text = class_text_embeddings(loaded, names, manifest.templates)
    atomic_write_bytes(cache_dir / "text.npy", npy_bytes(text))
    raw = json.loads((cache_dir / "manifest.json").read_text())
    raw["classes"] = names
    atomic_write_json(cache_dir / "manifest.json", raw)
    return Source(spec=ModelSpec("demo"), data_root=str(data), cache_dir=str(cache_dir), label="10,000 classes")


def _sent_bytes(at) -> int:
    """Bytes of every element the page sent (what Streamlit's 200 MB message limit applies to)."""
    total = 0
    stack = [at._tree]
    while stack:
        node = stack.pop()
        proto = getattr(node, "proto", None)
        if proto is not None and hasattr(proto, "ByteSize"):
            total += proto.ByteSize()
        children = getattr(node, "children", {})
        stack.extend(children.values() if isinstance(children, dict) else children)
    return total


@pytest.mark.slow
def test_every_page_works_with_10000_classes(many_classes, home):
    from .test_app import assert_clean, fresh_app

    at = fresh_app(ModelSpec("demo"))
    at.session_state["source"] = many_classes
    at.run()
    assert_clean(at)
    for name in ("load", "errors", "heads", "inspector", "ablate", "refine"):
        at.switch_page(f"pages/{name}.py").run()
        assert_clean(at)
        size = _sent_bytes(at)
        assert size < 20_000_000, (name, size)  # far below Streamlit's 200 MB message limit


def test_a_confusion_matrix_of_some_classes_is_the_slice_of_the_whole():
    from refineclip_core.method.evaluation import confusion_matrix, most_confused_classes

    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 50, 2000), rng.integers(0, 50, 2000)
    pred[:300] = labels[:300]
    mask = rng.random(2000) < 0.7
    whole = confusion_matrix(pred, labels, 50, mask)
    shown = most_confused_classes(pred, labels, 50, 12, mask)
    assert np.array_equal(confusion_matrix(pred, labels, 50, mask, classes=shown), whole[np.ix_(shown, shown)])
    errors = whole.sum(0) + whole.sum(1) - 2 * np.diag(whole)
    assert len(shown) == 12 and errors[shown].min() >= np.delete(errors, shown).max()
    assert np.array_equal(most_confused_classes(pred, labels, 50, 80, mask), np.arange(50))


def test_class_names_have_a_length_limit(tmp_path, image_folder, monkeypatch):
    from refineclip_core.errors import DataError
    from refineclip_core.features import zeroshot
    from refineclip_core.features.zeroshot import class_text_embeddings, validate_templates
    from refineclip_core.loading.data import MAX_CLASS_NAME_CHARS, load_dataset, validate_class_names

    long = "x" * 100_000
    limit = rf"100,000 characters long; class names are limited to {MAX_CLASS_NAME_CHARS} characters"
    rows = ["path,label"] + [f"cat/cat_{i}.png,{'cat' if i % 2 else long}" for i in range(6)]
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    for cls in ("cat",):
        (tmp_path / cls).mkdir()
        for i in range(6):
            (tmp_path / cls / f"cat_{i}.png").write_bytes((image_folder / "cat" / f"cat_{i}.png").read_bytes())
    with pytest.raises(DataError, match=f"The label 'xxx.*{limit}"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match=limit):
        validate_class_names(["a", long, "c"], 3)
    demo = load_model(ModelSpec("demo"))
    tokenized: list = []
    monkeypatch.setattr(zeroshot, "encode_texts", lambda loaded, prompts: tokenized.append(prompts))
    with pytest.raises(DataError, match=limit):  # refused before the tokenizer sees it
        class_text_embeddings(demo, ["a", long], ["a photo of a {}."])
    assert tokenized == []
    assert validate_class_names(["a" * MAX_CLASS_NAME_CHARS, "b"], 2)[0] == "a" * MAX_CLASS_NAME_CHARS
    with pytest.raises(RefineClipError, match="templates are limited to 300 characters"):
        validate_templates(["a photo of {} " + "y" * 400])
    # and the messages about 10,000 names name a few of them, not all
    with pytest.raises(DataError) as exc:
        validate_class_names([f"n{i}" for i in range(N_MANY - 1)], N_MANY)
    assert len(str(exc.value)) < 300 and f"({N_MANY - 1} in all)" in str(exc.value)
