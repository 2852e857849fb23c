"""Confinement and hostile input, round two (issue 16).

* Every file the dashboard reads (images, ``metadata.csv``, checkpoints, configs) is checked
  against the allowed folders when it is opened; links leaving them are skipped with the reason
  "symbolic link outside the allowed folders", class folders and nested folders alike, also
  when a link is swapped in after the folder was listed. The CLI follows links unless given
  ``--no-follow-links``.
* Templates and class names are data: no ``str.format`` semantics (property-based tests).
* A model config is sized before anything is allocated and refused above a memory budget; the
  estimate is checked against the parameter counts of models actually built here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refineclip_core.cli import main
from refineclip_core.cli.common import templates as cli_templates
from refineclip_core.errors import ImageLoadError, OutsideRootsError, RefineClipError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.extraction import load_batch
from refineclip_core.features.zeroshot import class_text_embeddings, fill_template, read_templates, validate_templates
from refineclip_core.loading.budget import (
    BUDGET_ENV,
    available_memory,
    check_model_budget,
    estimate_model,
    memory_budget,
    parse_size,
)
from refineclip_core.loading.confine import OUTSIDE_REASON, Confinement
from refineclip_core.loading.data import ImageDataset, load_dataset, parse_metadata
from refineclip_core.loading.decode import load_image
from refineclip_core.loading.checkpoints import read_state_dict
from refineclip_core.loading.models import ModelSpec, load_model
from refineclip_core.loading.confine import read_roots

from .conftest import make_image, tiny_config, write_config

REPO = Path(__file__).resolve().parent.parent


def _run(argv) -> int:
    return main([str(a) for a in argv])


def _flags(files) -> list[str]:
    return ["--model", files["name"], "--model-config", str(files["config"]), "--checkpoint", str(files["checkpoint"])]


# ---------------------------------------------------------------------------------------------
# 1. Confinement: links leaving the allowed folders
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def linked_tree(tmp_path):
    """``allowed/data`` with links that leave ``allowed`` (file, nested folder, class folder) and
    links that stay inside it (file, nested folder, class folder); ``elsewhere`` is outside."""
    rng = np.random.default_rng(0)
    base = tmp_path.resolve()
    allowed, elsewhere = base / "allowed", base / "elsewhere"
    data, other = allowed / "data", allowed / "other"
    for d in (data / "a", data / "b", other / "dir", elsewhere / "dir"):
        d.mkdir(parents=True)
    for p in (data / "a" / "real.png", data / "b" / "real.png", other / "x.png", other / "dir" / "y.png",
              elsewhere / "secret.png", elsewhere / "dir" / "secret2.png"):
        make_image(rng, (100, 50, 20), size=16).save(p)
    links = {
        data / "a" / "zz_link.png": (elsewhere / "secret.png", False),   # file link leaving
        data / "a" / "nested_out": (elsewhere / "dir", False),           # nested folder link leaving
        data / "c": (elsewhere / "dir", False),                          # class folder link leaving
        data / "b" / "in_link.png": (other / "x.png", True),             # file link staying inside
        data / "b" / "nested_in": (other / "dir", True),                 # nested folder link staying inside
        data / "d": (other / "dir", True),                               # class folder link staying inside
    }
    for link, (target, _) in links.items():
        os.symlink(target, link)
    return {"allowed": allowed, "elsewhere": elsewhere, "data": data, "links": links}


def _reasons(ds: ImageDataset) -> dict[str, str]:
    return {s.path: s.reason for s in ds.skipped}


def test_links_leaving_the_roots_are_skipped_with_the_reason(linked_tree):
    data, links = linked_tree["data"], linked_tree["links"]
    with Confinement.of([linked_tree["allowed"]]).active():
        ds = load_dataset(data)
    listed = {r.path for r in ds.records}
    reasons = _reasons(ds)
    assert ds.roots == (str(linked_tree["allowed"]),)
    for link, (target, inside) in links.items():
        if inside:  # followed, whether a file, a nested folder or a class folder
            assert str(link) not in reasons, reasons.get(str(link))
            assert any(p == str(link) or p.startswith(str(link) + "/") for p in listed), link
        else:  # skipped and listed with the same reason at every depth
            assert OUTSIDE_REASON in reasons[str(link)], (link, reasons.get(str(link)))
            assert not any(p == str(link) or p.startswith(str(link) + "/") for p in listed), link
    # nothing listed resolves outside the allowed folder
    assert all(Path(p).resolve().is_relative_to(linked_tree["allowed"]) for p in listed)
    assert "c" not in ds.classes and "d" in ds.classes


def test_the_cli_follows_links_unless_told_otherwise(linked_tree, tiny_model_files, tmp_path):
    data, links = linked_tree["data"], linked_tree["links"]
    ds = load_dataset(data)  # the library's and the CLI's default: follow links wherever they point
    listed = {r.path for r in ds.records}
    for link in links:
        assert any(p == str(link) or p.startswith(str(link) + "/") for p in listed), link
    assert {"a", "b", "c", "d"} == set(ds.classes)

    out_follow, out_confined = tmp_path / "follow", tmp_path / "confined"
    assert _run(["extract", *_flags(tiny_model_files), "--data", data, "--out", out_follow, "--layers", 1]) == 0
    assert _run(["extract", *_flags(tiny_model_files), "--data", data, "--out", out_confined, "--layers", 1,
                 "--no-follow-links"]) == 0
    followed = {r.path for r in FeatureCache(out_follow).records}
    confined = FeatureCache(out_confined)
    assert str(data / "a" / "zz_link.png") in followed
    assert str(data / "a" / "zz_link.png") not in {r.path for r in confined.records}
    # --no-follow-links confines to the data folder itself: links to allowed/other leave it too
    skipped = {s.path: s.reason for s in confined.skipped}
    for link in links:
        assert OUTSIDE_REASON in skipped[str(link)], (link, skipped.get(str(link)))


def test_a_link_swapped_in_after_listing_is_refused_when_read(linked_tree, tiny_model_files):
    allowed, elsewhere, data = linked_tree["allowed"], linked_tree["elsewhere"], linked_tree["data"]
    confined = Confinement.of([allowed])
    with confined.active():
        ds = load_dataset(data)
    victim = data / "a" / "real.png"
    assert str(victim) in {r.path for r in ds.records}
    with confined.active():
        load_image(victim)  # readable while it is a real file inside
    # swap the file for a link leaving the roots (atomically, as an attacker would)
    tmp_link = data / "a" / ".swap"
    os.symlink(elsewhere / "secret.png", tmp_link)
    os.replace(tmp_link, victim)
    with pytest.raises(ImageLoadError, match=OUTSIDE_REASON), confined.active():
        load_image(victim)
    load_image(victim)  # not confined (the CLI) the link is followed
    # a folder above the file swapped for a link: the file actually opened is what is checked
    moved = data / "b_moved"
    os.rename(data / "b", moved)
    os.symlink(elsewhere, data / "b")
    (elsewhere / "real.png").write_bytes((moved / "real.png").read_bytes())
    with pytest.raises(ImageLoadError, match=OUTSIDE_REASON), confined.active():
        load_image(data / "b" / "real.png")
    # the extraction's reader reports it as a skipped file, with the reason
    from refineclip_core.loading.models import load_model as load

    loaded = load(ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                            checkpoint=str(tiny_model_files["checkpoint"])))
    with confined.active():
        batch, keep, skipped = load_batch(loaded, [r for r in ds.records if r.path in (str(victim),)], 0)
    assert batch is None and keep == [] and skipped[0].reason == OUTSIDE_REASON


def test_metadata_and_csv_rows_are_confined(linked_tree):
    allowed, elsewhere, data = linked_tree["allowed"], linked_tree["elsewhere"], linked_tree["data"]
    (elsewhere / "metadata.csv").write_text("path,label\na/real.png,x\n")
    os.symlink(elsewhere / "metadata.csv", data / "metadata.csv")
    with pytest.raises(OutsideRootsError, match=OUTSIDE_REASON), Confinement.of([allowed]).active():
        load_dataset(data)
    assert len(load_dataset(data)) == 1  # the CLI reads the linked metadata.csv
    text = "path,label\na/real.png,x\na/zz_link.png,y\n../elsewhere_typo.png,y\n"
    with Confinement.of([allowed]).active():
        ds = parse_metadata(text, data)
    reasons = {s.path: s.reason for s in ds.skipped}
    assert [r.path for r in ds.records] == [str(data / "a" / "real.png")]
    assert reasons["a/zz_link.png"] == OUTSIDE_REASON
    assert reasons["../elsewhere_typo.png"] == "path points outside the data folder"  # a typo, not a link
    assert ds.roots == (str(allowed),)


def test_devices_and_pipes_are_not_read(tmp_path, monkeypatch):
    """A FIFO is opened non-blocking (a blocking open would wait forever for a writer) and refused
    before any read. The spy fails a blocking open of the FIFO instead of letting it hang."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    opened: list[int] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        if os.fspath(path) == str(fifo):
            opened.append(flags)
            assert flags & os.O_NONBLOCK, "the FIFO was opened for a blocking read"
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
    assert opened  # it was opened (non-blocking), looked at, and refused


def test_checkpoints_and_configs_are_read_only_inside_the_roots(tiny_model_files, tmp_path):
    allowed = (tmp_path / "allowed").resolve()
    allowed.mkdir()
    ckpt_link, cfg_link = allowed / "model.pt", allowed / "model.json"
    os.symlink(tiny_model_files["checkpoint"], ckpt_link)
    os.symlink(tiny_model_files["config"], cfg_link)
    name = tiny_model_files["name"]
    free = ModelSpec(name, checkpoint=str(ckpt_link), model_config=str(cfg_link))
    load_model(free)  # no roots: links followed
    confined = ModelSpec(name, checkpoint=str(ckpt_link), model_config=str(cfg_link), roots=[str(allowed)])
    assert confined.roots == (str(allowed),) and hash(confined)  # a list becomes a tuple: still hashable
    with pytest.raises(OutsideRootsError, match=OUTSIDE_REASON):
        load_model(confined)
    with pytest.raises(OutsideRootsError, match=OUTSIDE_REASON):
        confined.fingerprint()  # hashing the weights reads them too
    with pytest.raises(OutsideRootsError, match=OUTSIDE_REASON), Confinement.of([allowed]).active():
        read_state_dict(ckpt_link)
    # the same files copied inside the roots load; roots do not change the fingerprint
    os.remove(ckpt_link), os.remove(cfg_link)
    ckpt_link.write_bytes(Path(tiny_model_files["checkpoint"]).read_bytes())
    cfg_link.write_bytes(Path(tiny_model_files["config"]).read_bytes())
    inside = ModelSpec(name, checkpoint=str(ckpt_link), model_config=str(cfg_link), roots=(str(allowed),))
    load_model(inside)
    assert inside.fingerprint() == ModelSpec(name, checkpoint=str(ckpt_link), model_config=str(cfg_link)).fingerprint()
    assert ModelSpec(**json.loads(json.dumps(inside.to_dict()))) == inside
    # swapped for a link after the spec was made: refused when read
    os.remove(ckpt_link)
    os.symlink(tiny_model_files["checkpoint"], ckpt_link)
    with pytest.raises(OutsideRootsError), Confinement.of(inside.roots).active():
        read_state_dict(ckpt_link)
    with pytest.raises(OutsideRootsError):
        inside.fingerprint()


def test_read_roots_hold_the_allowed_roots_the_home_and_the_session_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINECLIP_ALLOWED_ROOTS", str(tmp_path / "a"))
    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    roots = read_roots(tmp_path / "session")
    assert roots == tuple(str((tmp_path / n).resolve()) for n in ("a", "home", "session"))


# ---------------------------------------------------------------------------------------------
# 2. Templates and class names are data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, name, prompt", [
    ("a {} }", "cat", "a cat }"),
    ("a {} {0}", "cat", "a cat {0}"),
    ("a {} {.__class__}", "cat", "a cat {.__class__}"),
    ("{{}} {", "x", "{x} {"),
    ("a photo of a {}.", "{0} {} {.__init__.__globals__}", "a photo of a {0} {} {.__init__.__globals__}."),
    ("%s {} %(x)s", "%d", "%s %d %(x)s"),
])
def test_templates_are_filled_literally(template, name, prompt):
    assert fill_template(validate_templates([template])[0], name) == prompt


def test_hostile_templates_through_the_cli(tiny_model_files, image_folder, tmp_path, capsys):
    out = tmp_path / "cache"
    hostile = ["a {} }", "a {} {0}", "a {} {.__class__}", "{{}} {!r}"]
    argv = ["extract", *_flags(tiny_model_files), "--data", image_folder, "--out", out, "--layers", 1,
            "--class-names", "{0},{.__class__},[x](http://evil)"]
    for t in hostile:
        argv += [f"--template={t}"]
    assert _run(argv) == 0, capsys.readouterr().err
    man = FeatureCache(out).manifest
    assert man.templates == hostile and man.classes == ["{0}", "{.__class__}", "[x](http://evil)"]
    capsys.readouterr()
    assert _run(["extract", *_flags(tiny_model_files), "--data", image_folder, "--out", tmp_path / "c2",
                 "--template=a {} and {}"]) == 2
    err = capsys.readouterr().err
    assert "exactly one '{}'" in err and "unexpected" not in err and len(err.strip().splitlines()) == 1


_TEXT = st.one_of(st.text(max_size=40),
                  st.lists(st.sampled_from(["{}", "{", "}", "{0}", "{.x}", "{!r}", "%s", "a", " ", "\x00", "\ud800",
                                            "é", "\n", "[x](y)", "**", "$", "`"]), max_size=8).map("".join))
#: Templates: arbitrary text, and text around one ``{}`` (so that many pass validation).
_TEMPLATE = st.one_of(_TEXT, st.tuples(_TEXT, _TEXT).map(lambda p: p[0] + "{}" + p[1]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(templates=st.lists(_TEMPLATE, max_size=4), names=_TEXT)
def test_cli_validation_path_only_raises_refineclip_errors(templates, names):
    args = argparse.Namespace(templates=[f"{t}" for t in templates] or None, templates_file=None)
    try:
        valid = cli_templates(args)
    except RefineClipError:
        return
    for t in valid:
        assert t.count("{}") == 1
        head, tail = t.split("{}")
        for n in names.split(","):
            prompt = fill_template(t, n)
            assert prompt.startswith(head) and prompt.endswith(tail) and prompt[len(head):len(prompt) - len(tail)] == n
    ds = ImageDataset("/x", [], [f"c{i}" for i in range(len(names.split(",")))], "folder")
    try:
        ds.renamed(names.split(","))
    except RefineClipError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_TEMPLATE, max_size=5))
def test_templates_files_only_raise_refineclip_errors(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("tpl") / "templates.txt"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        out = read_templates(path)
    except RefineClipError:
        return
    assert all(t.count("{}") == 1 for t in out)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_files):
    return load_model(ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                                checkpoint=str(tiny_model_files["checkpoint"])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(classes=st.lists(_TEXT, max_size=3), templates=st.lists(_TEMPLATE, max_size=3))
def test_text_embedding_path_only_raises_refineclip_errors(tiny_loaded, classes, templates):
    try:
        text = class_text_embeddings(tiny_loaded, classes, templates)
    except RefineClipError:
        return
    assert text.shape == (len(classes), 32) and np.isfinite(text).all()


# ---------------------------------------------------------------------------------------------
# 3. Model configs are sized before allocation
# ---------------------------------------------------------------------------------------------

def _configs() -> dict[str, dict]:
    t = tiny_config()
    text = dict(t["text_cfg"])
    return {
        "tiny": t,
        "layer-scale": tiny_config(ls=0.5, width=48, layers=2, head_width=8, patch=4, image=24),
        "mlp-ratio": {**tiny_config(mlp_ratio=2.5, no_ln_pre=True, embed_dim=24),
                      "text_cfg": {**text, "mlp_ratio": 3.0, "layers": 2, "context_length": 20, "vocab_size": 1000,
                                   "ls_init_value": 0.1, "proj_bias": True}},
        "rect-patches": tiny_config(image=[32, 24], patch=[8, 6], width=32, layers=1, head_width=16),
        "attn-pool": tiny_config(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
        "resnet": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16},
                   "text_cfg": {**text, "embed_cls": True, "no_causal_mask": True}},
        "logit-bias": {**t, "init_logit_bias": -10},
    }


@pytest.mark.parametrize("label", list(_configs()))
def test_parameter_estimate_matches_models_built_here(label, tmp_path):
    import open_clip

    cfg = _configs()[label]
    name = f"budget-test-{label}"
    open_clip.add_model_config(write_config(tmp_path, name, cfg))
    model = open_clip.create_model(name)
    real = sum(p.numel() for p in model.parameters())
    est = estimate_model(cfg)
    assert est.n_params == real, (label, est.n_params, real)
    buffers = sum(b.numel() for b in model.buffers() if b.dtype.is_floating_point)
    assert est.weight_bytes >= 4 * real and est.weight_bytes - 4 * real <= 4 * buffers + 4 * 10_000


def test_activation_and_load_estimates_grow_as_they_should():
    cfg = tiny_config(image=224, patch=8)  # image activations larger than the text tower's 256 prompts
    a, b = estimate_model(cfg, batch_size=32), estimate_model(cfg, batch_size=64)
    assert b.activation_bytes > a.activation_bytes and a.weight_bytes == b.weight_bytes
    assert estimate_model(cfg, "fp64").activation_bytes == 2 * a.activation_bytes
    assert estimate_model(cfg, checkpoint_bytes=1000).load_bytes == 1000
    assert estimate_model(cfg, checkpoint_bytes=None).load_bytes == 4 * a.n_params  # a downloaded file
    assert estimate_model(cfg, "fp16").load_bytes == 2 * a.n_params  # the half-precision copy
    # a real ViT-B-16 for scale: about 150 million parameters, a few GB in all
    import open_clip

    big = estimate_model(open_clip.get_model_config("ViT-B-16"), checkpoint_bytes=600_000_000)
    assert 149e6 < big.n_params < 151e6 and 1e9 < big.total_bytes < 4e9


def _terabyte_config(tmp_path: Path) -> Path:
    cfg = tiny_config(width=65536, layers=64, head_width=64, patch=14, image=224)
    cfg["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 32768, "heads": 64, "layers": 48}
    return write_config(tmp_path, "huge-clip", cfg)


def test_a_terabyte_config_is_refused_before_allocation(tmp_path, monkeypatch):
    import open_clip

    def no_allocation(*a, **k):
        raise AssertionError("open_clip.create_model was called for a config over the budget")

    monkeypatch.setattr(open_clip, "create_model", no_allocation)
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    path = _terabyte_config(tmp_path)
    est = estimate_model(json.loads(path.read_text()))
    assert est.total_bytes > 1e12  # terabytes
    with pytest.raises(RefineClipError) as info:
        load_model(ModelSpec("huge-clip", model_config=str(path)))
    msg = str(info.value)
    assert "TB of memory" in msg and "trillion parameters" in msg and "budget is" in msg and "available" in msg
    assert len(msg.splitlines()) == 1


@pytest.mark.slow
def test_a_terabyte_config_does_not_raise_the_memory_of_the_process(tmp_path):
    """In a fresh interpreter: the refusal costs no memory (peak RSS before vs after the call)."""
    path = _terabyte_config(tmp_path)
    code = (
        "import resource, sys\n"
        "from refineclip_core.loading.models import ModelSpec, load_model\n"
        "from refineclip_core.errors import RefineClipError\n"
        "import open_clip, torch\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_model(ModelSpec('huge-clip', model_config={str(path)!r}))\n"
        "except RefineClipError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('not refused')\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != BUDGET_ENV}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    before_kb, after_kb = res.stdout.split()
    assert int(after_kb) - int(before_kb) < 50_000, (before_kb, after_kb)  # < 50 MB more at peak


def test_the_budget_is_settable_and_named(tiny_model_files, monkeypatch, capsys):
    spec = ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                     checkpoint=str(tiny_model_files["checkpoint"]))
    monkeypatch.setenv(BUDGET_ENV, "1kB")
    with pytest.raises(RefineClipError, match=f"budget is 1.0 kB \\({BUDGET_ENV}\\)"):
        load_model(spec)
    load_model(spec, memory_budget="10GB")  # an explicit budget wins over the environment
    monkeypatch.delenv(BUDGET_ENV)
    assert _run(["eval", *_flags(tiny_model_files), "--data", "/nonexistent", "--memory-budget", "2kB"]) == 2
    err = capsys.readouterr().err
    assert "budget is 2.0 kB (the --memory-budget option)" in err and len(err.strip().splitlines()) == 1
    assert _run(["eval", *_flags(tiny_model_files), "--data", "/nonexistent", "--memory-budget", "lots"]) == 2
    assert "Cannot read the memory budget 'lots'" in capsys.readouterr().err
    assert parse_size("16GB") == 16 * 10**9 and parse_size("512 MiB") == 512 * 2**20 and parse_size("2e3") == 2000
    avail = available_memory()
    assert avail is not None and avail > 0
    assert 0 < memory_budget()[0] <= avail


@pytest.mark.parametrize("vision, message", [
    ({"width": "huge"}, "vision_cfg.width must be a number"),
    ({"layers": -3}, "vision_cfg.layers must be at least 1"),
    ({"patch_size": float("nan")}, "vision_cfg.patch_size must be a number"),
    ({"width": 10**400}, "too large to estimate"),
    ({"layers": [1, 2]}, "one number or four"),
])
def test_nonsense_configs_are_refused_with_one_sentence(vision, message):
    cfg = tiny_config()
    cfg["vision_cfg"].update(vision)
    with pytest.raises(RefineClipError, match=message):
        check_model_budget("x", cfg, budget="1TB")


def test_config_files_are_read_with_a_size_limit(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({**tiny_config(), "padding": "x" * 2_000_000}))
    with pytest.raises(RefineClipError, match="larger than 1000 kB"):
        load_model(ModelSpec("big", model_config=str(path)))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RefineClipError, match="nests 100000 levels deep"):  # measured before parsing
        load_model(ModelSpec("deep", model_config=str(deep)))
    broken = tmp_path / "broken.json"
    broken.write_text('{"vision_cfg": {}, "text_cfg": {')
    with pytest.raises(RefineClipError, match="not valid JSON"):
        load_model(ModelSpec("broken", model_config=str(broken)))


# ---------------------------------------------------------------------------------------------
# 4. Names from users stay text in figures and in the HTML report
# ---------------------------------------------------------------------------------------------

EVIL = ("</script><script>alert(1)</script> [x](http://evil) A", "<img src=x onerror=alert(2)> $x^2$ %{y} B")


def test_plot_text_keeps_names_literal():
    from refineclip_core.reporting.figures import confusion_figure, plot_text, push_figure

    assert plot_text("<b>x</b> $m$ %{y} & co") == "&lt;b&gt;x&lt;/b&gt; &#36;m&#36; &#37;{y} &amp; co"
    fig = confusion_figure(np.eye(2, dtype=int), list(EVIL))
    assert list(fig.data[0].x) == [plot_text(c) for c in EVIL]
    push = push_figure([0.1, 0.2], list(EVIL), EVIL[1])
    assert all("%{y}" not in t.hovertemplate.split("<br>")[0] for t in push.data)  # only the template's own field
    assert "<img" not in push.layout.yaxis.title.text


def test_html_report_escapes_hostile_names(tiny_model_files, tmp_path):
    from refineclip_core.features.extraction import ExtractionConfig, extract
    from refineclip_core.edit.config import FitConfig
    from refineclip_core.method.protocol import ProtocolConfig, identify, make_engine
    from refineclip_core.edit.compare import fit_edit
    from refineclip_core.edit.config import EditConfig
    from refineclip_core.edit.config import PaperConfig
    from refineclip_core.reporting.run_report import render_html
    from refineclip_core.edit.record import build_run_report

    rng = np.random.default_rng(1)
    rows = ["path,label,group"]
    for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        for i in range(6):
            make_image(rng, colour).save(tmp_path / f"{c}_{i}.png")
            rows.append(f'{c}_{i}.png,"{EVIL[c]}","<b>g{i % 2}</b> **bold**"')
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    loaded = load_model(ModelSpec(tiny_model_files["name"], model_config=str(tiny_model_files["config"]),
                                  checkpoint=str(tiny_model_files["checkpoint"])))
    cache = extract(loaded, load_dataset(tmp_path), tmp_path / "cache",
                    ExtractionConfig(layers=1, templates=("a {} <script>x</script>",)))
    ident = identify(cache, ProtocolConfig(samples_per_class=None))
    outcome = fit_edit(cache, ident, EditConfig(fit=FitConfig(steps=5), paper=PaperConfig(steps=5)),
                             baselines=False)
    page = render_html(build_run_report(cache, ident, make_engine(cache), outcome))
    for raw in ("<script>alert(1)", "<img src=x", "<b>g0", "<script>x</script>"):
        assert raw not in page, raw
    assert "&lt;img src=x onerror=alert(2)&gt;" in page  # shown, escaped
