"""Model loading: checkpoints of every accepted form, and clear refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from refineclip_core.errors import CheckpointError, RefineClipError
from refineclip_core.loading.checkpoints import read_state_dict
from refineclip_core.loading.models import ModelSpec, load_model

from .conftest import tiny_config, write_config


def _spec(files, **kw):
    return ModelSpec(files["name"], model_config=str(files["config"]), **kw)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_forms_round_trip(tiny_model_files, tmp_path):
    ref = load_model(_spec(tiny_model_files, checkpoint=str(tiny_model_files["checkpoint"])))
    state = torch.load(tiny_model_files["checkpoint"], weights_only=True)
    forms = {
        "train.pt": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
        "plain.bin": state,
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("train.pt", "plain.bin", "w.safetensors"):
        other = load_model(_spec(tiny_model_files, checkpoint=str(tmp_path / name)))
        assert _same_weights(ref.model, other.model), name
    # pretrained= with a file path behaves like --checkpoint
    via_pretrained = load_model(_spec(tiny_model_files, pretrained=str(tmp_path / "w.safetensors")))
    assert _same_weights(ref.model, via_pretrained.model)
    assert abs(ref.logit_scale - 50.0) < 1e-3


@pytest.mark.parametrize("form", ["pickle-2", "pickle-4", "torch-zip"])
def test_malicious_pickle_is_refused_and_never_runs(tiny_model_files, tmp_path, form):
    """A raw pickle is refused before it is unpickled (its memory cannot be read from metadata first);
    a zip-format torch file whose pickle calls a function is refused by the weights-only loader."""
    marker = tmp_path / "pwned.txt"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    if form == "torch-zip":
        torch.save({"state_dict": Evil()}, path)
        match = "safe .weights-only. loader|could run code"
    else:
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": Evil()}, fh, protocol=int(form.split("-")[1]))
        match = "not a zip-format torch file"
    with pytest.raises(CheckpointError, match=match):
        load_model(_spec(tiny_model_files, checkpoint=str(path)))
    assert not marker.exists()


def test_wrong_architecture_names_the_keys(tiny_model_files, tmp_path):
    other_cfg = write_config(tmp_path, "other-vit", tiny_config(width=96, head_width=32, layers=2))
    with pytest.raises(CheckpointError) as info:
        load_model(ModelSpec("other-vit", model_config=str(other_cfg), checkpoint=str(tiny_model_files["checkpoint"])))
    msg = str(info.value)
    assert "does not fit architecture 'other-vit'" in msg and "shape mismatches" in msg and "visual." in msg
    assert "unexpected keys" in msg and "ls_1.gamma" in msg


@pytest.mark.parametrize("content,match", [(b"", "not a zip-format torch file"),
                                           (b"not a checkpoint at all", "not a zip-format torch file")])
def test_garbage_checkpoints(tiny_model_files, tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(_spec(tiny_model_files, checkpoint=str(path)))


def test_missing_checkpoint_and_bad_safetensors(tiny_model_files, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad)


def test_unknown_model_and_bad_config(tmp_path):
    with pytest.raises(RefineClipError, match="Unknown model 'NoSuchNet'"):
        load_model(ModelSpec("NoSuchNet"))
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    with pytest.raises(RefineClipError, match="not valid JSON"):
        load_model(ModelSpec("c", model_config=str(cfg)))
    cfg.write_text('{"embed_dim": 3}')
    with pytest.raises(RefineClipError, match="vision_cfg"):
        load_model(ModelSpec("c", model_config=str(cfg)))


def test_offline_pretrained_tag_gives_one_clear_sentence(monkeypatch):
    """The real-weight path up to the download call: the download fails (as offline) and the
    user gets the model, the tag and the fix in one sentence."""
    import open_clip.factory

    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RefineClipError) as info:
        load_model(ModelSpec("ViT-B-32", pretrained="openai"))
    msg = str(info.value)
    assert "'openai'" in msg and "ViT-B-32" in msg and "--checkpoint" in msg and "\n" not in msg


def test_fingerprint_tracks_weights(tiny_model_files, tmp_path):
    a = _spec(tiny_model_files, checkpoint=str(tiny_model_files["checkpoint"]))
    state = torch.load(tiny_model_files["checkpoint"], weights_only=True)
    state["visual.proj"] = state["visual.proj"] * 2
    torch.save(state, tmp_path / "b.pt")
    b = _spec(tiny_model_files, checkpoint=str(tmp_path / "b.pt"))
    assert a.fingerprint() == _spec(tiny_model_files, checkpoint=str(tiny_model_files["checkpoint"])).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_uploaded_configs_with_the_same_file_name_never_replace_each_other(tmp_path):
    """open_clip's config registry is process-wide (every dashboard session shares it): a user's
    config is known to it only while one model is built, under a name of its own, so two users'
    different ``config.json`` files never give each other their architecture, even while both
    builds are in progress, and nothing stays registered afterwards."""
    import open_clip

    from refineclip_core.loading.models import config_known_to_open_clip, read_config

    narrow = write_config(tmp_path / "alice", "config", tiny_config(width=32, head_width=16))
    wide = write_config(tmp_path / "bob", "config", tiny_config(width=64, head_width=16))
    before = set(open_clip.list_models())
    with config_known_to_open_clip("config", read_config(narrow)) as a, \
            config_known_to_open_clip("config", read_config(wide)) as b:  # a second session, before the first builds
        assert a != b and a.startswith("config-") and b.startswith("config-")
        assert open_clip.create_model(a).visual.transformer.width == 32
        assert open_clip.create_model(b).visual.transformer.width == 64
    assert set(open_clip.list_models()) == before
    loaded = load_model(ModelSpec("config", model_config=str(narrow)))
    assert loaded.visual.transformer.width == 32 and loaded.model_name == "config"


def test_loading_quiets_only_its_own_random_init_notice(tiny_model_files, caplog):
    """A load with a checkpoint drops open_clip's "initialized randomly" notice in its own thread
    only: the root logger's level never changes, and other threads' warnings (another session
    loading at the same time) still reach the log (issue 25: no process-wide silencing)."""
    import logging
    import threading

    from refineclip_core.loading import open_clip_state

    root = logging.getLogger()
    seen_levels, other_thread = [], threading.Event()
    notice = open_clip_state._RandomInitNotice.NOTICE

    def other_session():
        logging.warning("%s 'x' from another session", notice)
        logging.warning("another session's own warning")
        other_thread.set()

    import open_clip

    real_create = open_clip.create_model

    def create_and_meanwhile(*args, **kwargs):
        seen_levels.append(root.level)
        t = threading.Thread(target=other_session)
        t.start()
        t.join()
        return real_create(*args, **kwargs)

    with caplog.at_level(logging.WARNING):
        open_clip.create_model = create_and_meanwhile
        try:
            load_model(_spec(tiny_model_files, checkpoint=str(tiny_model_files["checkpoint"])))
        finally:
            open_clip.create_model = real_create
        messages = [r.getMessage() for r in caplog.records]
        assert other_thread.is_set()
        assert seen_levels == [logging.WARNING]  # caplog's level: untouched during the load
        assert not any(m.startswith(notice) and "'tiny-vit'" in m for m in messages)  # ours dropped
        assert any("from another session" in m for m in messages)  # the other thread's kept
        assert "another session's own warning" in messages
        # after the load, the same notice in this thread is logged as usual
        logging.warning("%s 'y'", notice)
        assert any(m.startswith(notice) and "'y'" in m for m in [r.getMessage() for r in caplog.records])
