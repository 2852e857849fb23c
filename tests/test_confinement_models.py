"""Issue 37 items 1-3: every model source confined, a cache opened only with its own model, and
a checkpoint's memory checked from its metadata before anything is allocated.

Each test is one reproduced vector: a crafted cache manifest naming ``local-dir:`` outside the
roots (open and refine, dashboard and CLI), an ``hf-hub:`` name without the operator's opt-in,
a config's ``hf_model_name``/``hf_tokenizer_name`` outside the roots (one sentence whatever the
path is), a cache whose manifest names another model than its fingerprint, and a zip-bomb ``.pt``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from refineclip_core.cli import main
from refineclip_core.errors import CacheError, CheckpointError, OutsideRootsError, RefineClipError
from refineclip_core.loading.checkpoints import checkpoint_memory, read_state_dict
from refineclip_core.loading.confine import Confinement, read_roots
from refineclip_core.loading.models import MODEL_FINGERPRINT, ModelSpec, load_model
from refineclip_core.loading.sources import HUB_ENV, check_config_sources, check_spec_sources, sources_confinement
from refineclip_core.session.caches import cache_model, cache_source

from .conftest import tiny_config, write_config
from .test_app import demo_spec, home  # noqa: F401  (fixtures of the Load page test)

REFINE = ["--samples-per-class", "3", "--top-t", "4", "--pair", "auto", "--fit-steps", "5", "--steps", "10",
          "--no-baselines", "--no-diagnosis"]


@pytest.fixture(scope="module")
def world(tiny_model_files, image_folder, tmp_path_factory):
    """An allowed folder holding a model and a cache extracted from it, and an outside folder holding
    an open_clip ``local-dir`` model (config and weights) that must never be read."""
    import open_clip

    base = tmp_path_factory.mktemp("confine-models")
    allowed, outside = base / "allowed", base / "outside"
    model_dir = allowed / "model"
    model_dir.mkdir(parents=True)
    ckpt, cfg = model_dir / "tiny-vit.pt", model_dir / "tiny-vit.json"
    shutil.copy(tiny_model_files["checkpoint"], ckpt)
    shutil.copy(tiny_model_files["config"], cfg)
    cache = allowed / "cache"
    assert main([str(a) for a in ["extract", "--model", tiny_model_files["name"], "--model-config", cfg,
                                  "--checkpoint", ckpt, "--data", image_folder, "--out", cache, "--layers", 1]]) == 0
    secret = outside / "secret-model"
    secret.mkdir(parents=True)
    (secret / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config(ls=0.5)}))
    torch.manual_seed(7)
    reg = write_config(base / "reg", "secret-arch", tiny_config(ls=0.5))
    open_clip.add_model_config(reg)
    from safetensors.torch import save_file

    save_file(open_clip.create_model("secret-arch").state_dict(), str(secret / "open_clip_model.safetensors"))
    return {"allowed": allowed, "outside": outside, "secret": secret, "cache": cache, "ckpt": ckpt, "cfg": cfg,
            "name": tiny_model_files["name"]}


def _craft(world, name: str, model: dict, fingerprint: str | None = "keep") -> Path:
    """A copy of the cache inside the allowed folder whose manifest names ``model``."""
    crafted = world["allowed"] / name
    shutil.rmtree(crafted, ignore_errors=True)
    shutil.copytree(world["cache"], crafted)
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["model"] = {"name": "x", "pretrained": None, "checkpoint": None, "model_config": None, "device": "cpu",
                         "precision": "fp32", "roots": None, **model}
    if fingerprint != "keep":
        manifest["extra"] = {} if fingerprint is None else {MODEL_FINGERPRINT: fingerprint}
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    return crafted


@pytest.fixture()
def confined(world, monkeypatch):
    """A server's environment: the allowed roots set, hub downloads not allowed, nothing built."""
    import open_clip

    monkeypatch.setenv("REFINECLIP_ALLOWED_ROOTS", str(world["allowed"]))
    monkeypatch.setenv("REFINECLIP_HOME", str(world["allowed"] / "home"))
    monkeypatch.delenv(HUB_ENV, raising=False)
    built: list[str] = []
    real = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda name, *a, **k: (built.append(name), real(name, *a, **k))[1])
    return built


def _open_as_session(folder):
    """The dashboard's way of opening a cache: under a session's confinement."""
    with Confinement.of(read_roots()).active():
        return cache_source(folder)


def _refine(cache: Path, out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in ["refine", "--cache", cache, *REFINE, "--out", out]])
    return rc, capsys.readouterr().err.strip()


def _refusal(exc_info, *paths: str) -> str:
    text = str(exc_info.value)
    for p in paths:
        text = text.replace(p, "<PATH>")
    return text


# ---------------------------------------------------------------------------------------------
# 1. A manifest's model name (local-dir:) outside the roots: refused at open and at refine
# ---------------------------------------------------------------------------------------------

def test_a_crafted_manifest_naming_local_dir_outside_is_refused_everywhere(world, confined, tmp_path, capsys):
    crafted = _craft(world, "crafted-local-dir", {"name": f"local-dir:{world['secret']}"})
    # the dashboard's way of opening a cache
    with pytest.raises(CacheError, match="outside the allowed folders") as info:
        _open_as_session(crafted)
    assert len(str(info.value).splitlines()) == 1
    # the CLI with REFINECLIP_ALLOWED_ROOTS set: refused, nothing exported
    out = world["allowed"] / "exported.safetensors"
    rc, err = _refine(crafted, out, capsys)
    assert rc != 0 and "outside the allowed folders" in err and "model folder" in err and not out.exists(), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # the library's loader refuses the name itself, whoever builds the spec
    with pytest.raises(OutsideRootsError):
        load_model(ModelSpec(f"local-dir:{world['secret']}"))
    assert confined == []  # open_clip never built (nor read) the outside model
    # one sentence whether the folder exists, is missing, or is a file
    answers = []
    for target in (world["secret"], world["outside"] / "missing", world["secret"] / "open_clip_config.json"):
        with pytest.raises(OutsideRootsError) as info:
            load_model(ModelSpec(f"local-dir:{target}"))
        answers.append(_refusal(info, str(target)))
    assert len(set(answers)) == 1, answers


def test_local_dir_inside_the_roots_is_read_as_our_config_and_checkpoint(world, confined):
    """A ``local-dir:`` folder inside the roots loads, sized and read by our own readers (the zip-bomb
    and budget checks apply to it), with the weights it holds."""
    from safetensors.torch import load_file

    inside = world["allowed"] / "local-model"
    shutil.copytree(world["secret"], inside, dirs_exist_ok=True)
    loaded = load_model(ModelSpec(f"local-dir:{inside}"))
    want = load_file(str(inside / "open_clip_model.safetensors"))
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got) and set(want) <= set(got)


def test_without_allowed_roots_the_cli_keeps_following_paths(world, monkeypatch):
    """A local user's CLI (no REFINECLIP_ALLOWED_ROOTS, no dashboard roots) is not confined."""
    monkeypatch.delenv("REFINECLIP_ALLOWED_ROOTS", raising=False)
    assert not sources_confinement().confined
    check_spec_sources(f"local-dir:{world['secret']}", None, None, None)
    assert load_model(ModelSpec(f"local-dir:{world['secret']}")).model_name.startswith("local-dir:")


# ---------------------------------------------------------------------------------------------
# hf-hub: names need the operator's opt-in
# ---------------------------------------------------------------------------------------------

def test_hub_names_are_refused_without_the_operators_opt_in(world, confined, monkeypatch, capsys):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    crafted = _craft(world, "crafted-hub", {"name": "hf-hub:someone/any-repo"})
    with pytest.raises(CacheError, match=f"Hugging Face hub.*{HUB_ENV}=1"):
        _open_as_session(crafted)
    rc, err = _refine(crafted, world["allowed"] / "hub.safetensors", capsys)
    assert rc != 0 and HUB_ENV in err and len(err.splitlines()) == 1
    with pytest.raises(RefineClipError, match=HUB_ENV):
        load_model(ModelSpec("hf-hub:someone/any-repo", roots=(str(world["allowed"]),)))
    # a config's Hugging Face text tower or tokenizer named by repository id: the same
    for key in ("hf_model_name", "hf_tokenizer_name"):
        with pytest.raises(RefineClipError, match=HUB_ENV):
            check_config_sources({"text_cfg": {key: "someone/any-repo"}, "vision_cfg": {}})
    assert confined == []
    # the operator's opt-in lets the name through the check (downloading is then open_clip's)
    monkeypatch.setenv(HUB_ENV, "1")
    check_spec_sources("hf-hub:someone/any-repo", None, None, None)
    check_config_sources({"text_cfg": {"hf_model_name": "someone/any-repo"}, "vision_cfg": {}})


# ---------------------------------------------------------------------------------------------
# 2. text_cfg.hf_model_name / hf_tokenizer_name outside the roots: one sentence, nothing read
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["hf_model_name", "hf_tokenizer_name"])
def test_hf_names_in_a_config_outside_the_roots_give_one_sentence(world, confined, monkeypatch, key):
    import transformers

    def never(*a, **k):
        raise AssertionError("transformers read a path outside the roots")

    for cls in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", never)
    hf_folder = world["outside"] / "hf-text"
    hf_folder.mkdir(exist_ok=True)
    (hf_folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    a_file = world["outside"] / "a-file.txt"
    a_file.write_text("x")
    answers = []
    for target in (hf_folder, world["outside"] / "no-such-folder", a_file, Path("/etc/hostname")):
        cfg = tiny_config()
        cfg["text_cfg"][key] = str(target)
        path = write_config(world["allowed"] / "configs", f"hf-{key}", cfg)
        spec = ModelSpec("tiny-hf", model_config=str(path), roots=read_roots())  # what the Load page builds
        with pytest.raises(OutsideRootsError) as info:
            load_model(spec)
        answers.append(_refusal(info, str(target)))
    assert len(set(answers)) == 1 and f"text_cfg.{key}" in answers[0], answers
    assert confined == []


def test_tokenizer_paths_and_remote_code_in_a_config_are_refused(world, confined):
    with pytest.raises(OutsideRootsError):
        check_config_sources({"text_cfg": {"tokenizer_kwargs": {"bpe_path": "/etc/passwd"}}, "vision_cfg": {}})
    with pytest.raises(RefineClipError, match="remote code"):
        check_config_sources({"text_cfg": {"hf_tokenizer_name": str(world["allowed"]),
                                           "tokenizer_kwargs": {"trust_remote_code": True}}, "vision_cfg": {}})
    with pytest.raises(OutsideRootsError):
        check_config_sources({"text_cfg": {}, "vision_cfg": {"timm_model_name": f"local-dir:{world['outside']}"}})
    with pytest.raises(RefineClipError, match=f"SigLIP vocabulary.*{HUB_ENV}=1"):  # open_clip's choice by name
        check_config_sources({"text_cfg": {}, "vision_cfg": {}}, name="my-siglip-model")
    with pytest.raises(OutsideRootsError):  # a pretrained file beside the working directory, outside the roots
        check_spec_sources("tiny-vit", None, None, "weights.pt")
    inside = world["allowed"] / "tok"
    inside.mkdir(exist_ok=True)
    check_config_sources({"text_cfg": {"hf_tokenizer_name": str(inside)}, "vision_cfg": {}})  # allowed


# ---------------------------------------------------------------------------------------------
# a cache is opened only with the model that made it
# ---------------------------------------------------------------------------------------------

def test_a_cache_is_opened_only_with_the_model_that_made_it(world, confined, capsys):
    # the genuine cache opens, through the dashboard's function and the CLI's
    assert _open_as_session(world["cache"]).spec.checkpoint == str(world["ckpt"])
    # another checkpoint of the same architecture, inside the roots, named by a copied manifest
    other = world["allowed"] / "model" / "other.pt"
    state = torch.load(world["ckpt"], weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, other)
    crafted = _craft(world, "crafted-other", {"name": world["name"], "checkpoint": str(other),
                                              "model_config": str(world["cfg"])})
    with pytest.raises(CacheError, match="made by another model"):
        _open_as_session(crafted)
    out = world["allowed"] / "other.safetensors"
    rc, err = _refine(crafted, out, capsys)
    assert rc != 0 and "made by another model" in err and not out.exists()
    # a manifest that records no fingerprint cannot be checked: a confined opener refuses it
    unrecorded = _craft(world, "crafted-unrecorded", {"name": world["name"], "checkpoint": str(world["ckpt"]),
                                                      "model_config": str(world["cfg"])}, fingerprint=None)
    with pytest.raises(CacheError, match="no fingerprint"):
        _open_as_session(unrecorded)
    # the recorded fingerprint is the model's own (ModelSpec.fingerprint), checked, not trusted blindly
    manifest = json.loads((world["cache"] / "manifest.json").read_text())
    assert manifest["extra"][MODEL_FINGERPRINT] == ModelSpec(**{**manifest["model"], "roots": None}).fingerprint()
    spec = cache_model(type("M", (), {"model": manifest["model"], "extra": manifest["extra"]})(), world["cache"])
    assert spec.checkpoint == str(world["ckpt"])


# ---------------------------------------------------------------------------------------------
# 3. a zip-bomb .pt: refused from its zip entries' sizes before anything is allocated
# ---------------------------------------------------------------------------------------------

def deflate_bomb(path: Path, n_bytes: int) -> Path:
    """``torch.save`` of ``n_bytes`` of zeros, its zip rewritten with deflate (what the attack did)."""
    plain = path.with_suffix(".plain")
    torch.save({"w": torch.zeros(n_bytes // 4, dtype=torch.float32)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    return path


BOMB_CHILD = r"""
import os, resource, sys
sys.path.insert(0, os.getcwd())
from refineclip_core.errors import RefineClipError
from refineclip_core.loading.checkpoints import read_state_dict
from refineclip_core.loading.confine import Confinement

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

before = peak_mib()
try:
    with Confinement.of([os.path.dirname(sys.argv[1])]).active():
        read_state_dict(sys.argv[1])
    print("LOADED", before, peak_mib())
except RefineClipError as exc:
    print("REFUSED", before, peak_mib(), str(exc).replace(chr(10), " "))
"""


@pytest.mark.slow  # two subprocesses, one inflates 300 MB
def test_a_zip_bomb_checkpoint_is_refused_before_allocation(tmp_path):
    inflated = 300 * 2**20
    bomb = deflate_bomb(tmp_path / "bomb.pt", inflated)
    assert bomb.stat().st_size < inflated / 100  # a few hundred kB on disk
    with zipfile.ZipFile(bomb) as zf:
        assert sum(i.file_size for i in zf.infolist()) >= inflated
    env = {**os.environ, "REFINECLIP_MEMORY_BUDGET": "100MB"}
    run = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(bomb)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert run.returncode == 0, run.stderr
    verdict, before, peak, *message = run.stdout.split(" ", 3)
    assert verdict == "REFUSED", run.stdout
    assert "expands to 314.6 MB" in message[0] and "budget is 100.0 MB" in message[0]
    assert float(peak) - float(before) < 50, run.stdout  # the 300 MB were never inflated
    # within budget the same file is read (the check is of size, not of compression)
    env["REFINECLIP_MEMORY_BUDGET"] = "1GB"
    run = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(bomb)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert run.stdout.startswith("LOADED"), run.stdout + run.stderr


def test_the_model_budget_counts_a_checkpoint_as_large_as_it_expands(tiny_model_files, tmp_path, monkeypatch):
    import open_clip

    state = torch.load(tiny_model_files["checkpoint"], weights_only=True)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert checkpoint_memory(packed) == checkpoint_memory(plain) >= sum(v.numel() * v.element_size()
                                                                        for v in state.values())
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("built over the budget"))
    need = checkpoint_memory(plain)
    with pytest.raises(CheckpointError, match="refused before loading"):
        load_model(ModelSpec(tiny_model_files["name"], checkpoint=str(packed)), memory_budget=need // 2)


def test_a_legacy_torch_file_is_refused_with_a_sentence(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="before PyTorch 1.6"):
        read_state_dict(legacy)


def test_a_checkpoint_larger_than_its_model_can_hold_is_refused_whatever_the_budget(tiny_model_files, tmp_path,
                                                                                   monkeypatch):
    """The Load page's path under the default budget (most of the machine's memory): a deflated
    checkpoint expanding to far more than the architecture's weights is refused from its metadata."""
    import open_clip

    monkeypatch.delenv("REFINECLIP_MEMORY_BUDGET", raising=False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("built for a bomb"))
    bomb = deflate_bomb(tmp_path / "bomb.pt", 150 * 2**20)
    with pytest.raises(CheckpointError, match="more than 4 times the .* of weights of model") as info:
        load_model(ModelSpec(tiny_model_files["name"], checkpoint=str(bomb), model_config=str(tiny_model_files["config"]),
                             roots=(str(tmp_path), str(Path(tiny_model_files["config"]).parent))))
    assert len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# 2, on the Load page itself: an uploaded config's hf_model_name answers the same for any path
# ---------------------------------------------------------------------------------------------

def test_the_load_page_is_no_existence_oracle(home, demo_spec, tiny_model_files, image_folder, tmp_path):
    import re
    import tempfile

    from .test_app import fresh_app

    outside = Path(tempfile.mkdtemp(prefix="refineclip-outside-"))  # outside the allowed roots (basetemp)
    try:
        (outside / "hf-text").mkdir()
        (outside / "hf-text" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
        at = fresh_app(demo_spec)
        at.run()
        at.radio(key="load_model_kind").set_value("Local checkpoint").run()
        at.radio(key="load_ckpt_where").set_value("Path on the server").run()
        at.text_input(key="load_ckpt_path").input(str(tiny_model_files["checkpoint"])).run()
        at.selectbox(key="load_ckpt_arch").set_value("(custom config JSON)").run()
        at.radio(key="load_cfg_where").set_value("Upload").run()
        at.radio(key="load_data_kind").set_value("Folder on the server").run()
        at.text_input(key="load_folder").input(str(image_folder)).run()
        answers = []
        for target in (outside / "hf-text", outside / "missing", Path("/etc/hostname")):
            cfg = tiny_config()
            cfg["text_cfg"]["hf_model_name"] = str(target)
            at.file_uploader(key="load_cfg_upload").upload("tiny-hf.json", json.dumps(cfg).encode(),
                                                           "application/json").run()
            at.button(key="load_scan_btn").click().run()
            at.button(key="load_extract_btn").click().run()
            assert not at.exception
            shown = re.sub(r"\\(.)", r"\1", " ".join(e.value for e in at.error))  # markdown escapes undone
            assert "text_cfg.hf_model_name" in shown and "outside the allowed folders" in shown, shown
            answers.append(re.sub(r"'[^']*\.json'", "<CFG>", shown.replace(str(target), "<PATH>")))
        assert len(set(answers)) == 1, answers
        assert at.session_state["source"] is None or at.session_state["source"].is_demo
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_local_dir_models_fingerprint_covers_its_files(world, tmp_path, monkeypatch):
    monkeypatch.delenv("REFINECLIP_ALLOWED_ROOTS", raising=False)
    folder = tmp_path / "ld"
    shutil.copytree(world["secret"], folder)
    spec = ModelSpec(f"local-dir:{folder}")
    before = spec.fingerprint()
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "open_clip_model.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    assert spec.fingerprint() != before  # new weights under the same name: another model


def test_finding_a_transformers_folder_outside_the_roots_reveals_nothing(world):
    from refineclip_core.loading.hf_clip import find_hf_checkpoint

    hf = world["outside"] / "hf-clip"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "clip"}))
    answers = []
    for target in (hf, world["outside"] / "nothing-here", hf / "config.json"):
        with pytest.raises(OutsideRootsError) as info, Confinement.of([world["allowed"]]).active():
            find_hf_checkpoint(target)
        answers.append(_refusal(info, str(target)))
    assert len(set(answers)) == 1, answers
