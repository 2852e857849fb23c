"""The allowed folders are one object, made once where a run starts and consulted by every reader
(refineclip_core/loading/confine.py): no reader takes a ``roots`` argument, the default where
nothing was made active is the environment's (never "not confined" by accident), and threads,
worker processes and dashboard jobs started inside a confinement keep it."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import refineclip_core
from refineclip_core.cli import main
from refineclip_core.errors import ImageLoadError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.loading.batches import DecodeConfig, iter_batches
from refineclip_core.loading.confine import (ALLOWED_ROOTS_ENV, OUTSIDE_REASON, Confinement, carry, current,
                                             read_roots)
from refineclip_core.loading.data import ImageRecord
from refineclip_core.loading.decode import load_image

from .conftest import make_image


@pytest.fixture()
def outside_link(tmp_path, monkeypatch):
    """An allowed folder holding a real image and a link to an image outside it; no roots in the environment."""
    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "a").mkdir(parents=True)
    (allowed / "b").mkdir()
    outside.mkdir()
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        make_image(rng, (200, 20, 20)).save(allowed / folder / "real.png")
    make_image(rng, (20, 200, 20)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", allowed / "a" / "zz_link.png")
    return allowed.resolve(), allowed / "a" / "zz_link.png"


def _size(img) -> torch.Tensor:
    return torch.tensor(img.size)


def test_the_default_is_the_environments_roots_never_unconfined_by_accident(outside_link, tmp_path, monkeypatch):
    allowed, link = outside_link
    assert current() == Confinement(None)  # a local user's library or CLI: links followed
    load_image(link)
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(allowed))
    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    assert current() == Confinement.of(read_roots()) and current().confined
    with pytest.raises(ImageLoadError, match=OUTSIDE_REASON):  # no argument: the environment's roots hold
        load_image(link)
    with Confinement.of([allowed]).active():  # made active: it holds, inside the block only
        assert current().roots == (allowed,)
    assert current() == Confinement.of(read_roots())


def test_decode_worker_threads_and_processes_keep_the_callers_confinement(outside_link):
    allowed, link = outside_link
    records = [ImageRecord(str(allowed / "a" / "real.png"), 0), ImageRecord(str(link), 0)]
    for cfg in (DecodeConfig(workers=2, prefetch=1), DecodeConfig(workers=1, kind="process")):
        with Confinement.of([allowed]).active():
            batches = iter_batches(records, [(0, 1), (1, 2)], _size, None, cfg)
        got = list(batches)  # drawn outside the block: the confinement of the call still holds
        assert [b.keep for b in got] == [[0], []], cfg
        assert [s.reason for s in got[1].skipped] == [OUTSIDE_REASON], cfg
        followed = list(iter_batches(records, [(0, 2)], _size, None, cfg))  # not confined: the link is read
        assert followed[0].keep == [0, 1], cfg


def test_a_dashboard_job_keeps_the_sessions_confinement(outside_link):
    from dashboard.jobs import start_job

    allowed, link = outside_link

    def read(progress, cancelled):
        return load_image(link).size

    with Confinement.of([allowed]).active():
        job = start_job("read-outside", read)
        bare: dict[str, object] = {}  # a thread started without carry() does not inherit it (why jobs carry it)
        plain = threading.Thread(target=lambda: bare.update(c=current()))
        plain.start()
        plain.join(30)
        carried = threading.Thread(target=carry(lambda: bare.update(carried=current())))
        carried.start()
        carried.join(30)
    job.wait(30)
    assert job.finished and isinstance(job.error, ImageLoadError) and OUTSIDE_REASON in str(job.error)
    assert bare == {"c": Confinement(None), "carried": Confinement.of([allowed])}


def test_the_cli_makes_the_environments_confinement_once_for_the_whole_command(outside_link, tiny_model_files,
                                                                                tmp_path, monkeypatch, capsys):
    """``refineclip extract`` with REFINECLIP_ALLOWED_ROOTS: the listing and the decoding inside the command
    refuse the link without any folders being handed down; without the variable the link is read."""
    allowed, link = outside_link
    model_dir = Path(tiny_model_files["config"]).parent
    flags = ["--model", tiny_model_files["name"], "--model-config", str(tiny_model_files["config"]),
             "--checkpoint", str(tiny_model_files["checkpoint"])]
    assert main(["extract", *flags, "--data", str(allowed), "--out", str(tmp_path / "free"), "--layers", "1"]) == 0
    assert str(link) in {r.path for r in FeatureCache(tmp_path / "free").records}
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, os.pathsep.join([str(allowed), str(model_dir)]))
    monkeypatch.setenv("REFINECLIP_HOME", str(tmp_path / "home"))
    seen: list[Confinement] = []
    import refineclip_core.features.extraction as extraction

    real = extraction.iter_batches
    monkeypatch.setattr(extraction, "iter_batches", lambda *a, **k: (seen.append(current()), real(*a, **k))[1])
    assert main(["extract", *flags, "--data", str(allowed), "--out", str(tmp_path / "confined"), "--layers", "1"]) == 0
    cache = FeatureCache(tmp_path / "confined")
    assert str(link) not in {r.path for r in cache.records}
    assert {s.path: s.reason for s in cache.skipped}[str(link)] == OUTSIDE_REASON
    assert seen and all(c == Confinement.of(read_roots()) for c in seen)  # the decoding ran under it
    capsys.readouterr()  # a checkpoint outside the allowed folders: refused inside the command too
    assert main(["extract", *flags[:4], "--checkpoint", str(link.resolve()), "--data", str(allowed),
                 "--out", str(tmp_path / "no")]) != 0
    assert "outside the allowed folders" in capsys.readouterr().err


def test_no_function_takes_a_loose_roots_argument():
    """Only the containment primitives of confine.py take folders; everything else reads the one object."""
    allowed = {"refineclip_core.loading.confine.is_inside", "refineclip_core.loading.confine.allowed_path"}
    found = []
    for info in pkgutil.walk_packages(refineclip_core.__path__, "refineclip_core."):
        if ".demo." in info.name or info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == info.name:
                if "roots" in inspect.signature(obj).parameters and f"{info.name}.{name}" not in allowed:
                    found.append(f"{info.name}.{name}")
    assert found == []


def test_the_dashboards_fallback_answers_only_in_a_sessions_script_thread():
    """The dashboard registers its session's confinement for code that runs in a session's script thread
    outside app.py's block (a fragment's rerun); anywhere else it answers nothing, so importing the
    dashboard changes no library call."""
    from dashboard import state
    from refineclip_core.loading.confine import _FALLBACKS

    assert _FALLBACKS["dashboard-session"] is state._session_confinement
    assert state._session_confinement() is None
