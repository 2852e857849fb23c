"""A loaded model's tokenizer, built the first time text is encoded, and what it says when it cannot be.

open_clip builds a model's tokenizer from its config: CLIP's byte-pair vocabulary ships with
open_clip, but a ``text_cfg.hf_tokenizer_name`` is loaded with transformers' ``AutoTokenizer``
(from a local folder, the Hugging Face hub cache, or the hub), and a model *name* containing
``siglip`` without one makes open_clip download a sentencepiece vocabulary from Google's storage
(``SigLipTokenizer``). Offline, or without an HTTP client, those fail with whatever the library
raises (an ``OSError``, ``ImportError: HTTPFileSystem requires "requests" and "aiohttp"``).

:class:`DeferredTokenizer` builds the tokenizer only when prompts are first tokenised, so
vision-only work (extracting and checking a decomposition, Grad-CAM) never needs it, and turns a
failure into one sentence (:func:`missing_tokenizer`) that names what is missing and how to provide
it: a local folder named in the config, or a copy in the hub cache. A hub tokenizer with no cached
copy is first checked for a reachable hub (:func:`hub_unreachable`, a few seconds at most): offline,
transformers retries with back-off for about 50 s before failing, which looks like a hung page.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any, Callable, Mapping

from ..errors import RefineClipError

#: open_clip's SigLipTokenizer downloads its vocabulary from here (open_clip/tokenizer.py).
SIGLIP_VOCAB_HOST = "storage.googleapis.com"


#: Seconds the hub may take to accept a connection before a tokenizer with no cached copy is given up.
HUB_PROBE_S = 3.0

#: Environment variables through which a proxy reaches the hub (then no direct probe is made).
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except ImportError:
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def hub_cached(repo: str) -> bool:
    """Whether the hub cache holds anything of repository ``repo`` (then transformers may find it offline)."""
    return os.path.isdir(os.path.join(os.path.expanduser(_hub_cache()), "models--" + repo.replace("/", "--")))


def hub_unreachable(timeout: float = HUB_PROBE_S) -> str | None:
    """None when the hub (``HF_ENDPOINT``, default huggingface.co) accepts a connection within
    ``timeout`` seconds, or a proxy is configured (not probed); else why it is not reachable."""
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[BaseException | None] = []

    def probe() -> None:            # in a thread: name resolution itself has no timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=probe, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if outcome and outcome[0] is None:
        return None
    why = _short(outcome[0]) if outcome and outcome[0] is not None else f"no answer within {timeout:g} s"
    return f"{host} could not be reached: {why}"


def _offline_reason(name: str, config: Mapping[str, Any] | None) -> str | None:
    """Why a hub tokenizer cannot be had now (not cached, hub unreachable), found in seconds; else None."""
    kind, where = tokenizer_source(name, config)
    if kind != "hub" or hub_cached(where):
        return None
    try:
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError:
        HF_HUB_OFFLINE = False
    return "offline mode (HF_HUB_OFFLINE) is set" if HF_HUB_OFFLINE else hub_unreachable()


def tokenizer_source(name: str, config: Mapping[str, Any] | None) -> tuple[str, str]:
    """Where open_clip takes the tokenizer of model ``name`` (config ``config``; None: open_clip's own
    or the hub's) from: ``(kind, where)`` with kind ``folder``, ``hub``, ``siglip-url`` or ``bundled``."""
    if config is None and name.startswith("hf-hub:"):
        return "hub", name[len("hf-hub:"):]
    if config is None:
        try:
            import open_clip
            config = open_clip.get_model_config(name) or {}
        except Exception:  # noqa: BLE001 - only describes a failure
            config = {}
    text = config.get("text_cfg") if isinstance(config.get("text_cfg"), Mapping) else {}
    hf_name = text.get("hf_tokenizer_name")
    if hf_name:
        hf_name = str(hf_name)
        looks_local = os.path.isabs(hf_name) or hf_name.startswith((".", "~")) or os.path.exists(hf_name)
        return ("folder" if looks_local else "hub"), hf_name
    if "siglip" in name.lower():
        return "siglip-url", SIGLIP_VOCAB_HOST
    return "bundled", "open_clip's CLIP vocabulary"


def missing_tokenizer(name: str, config: Mapping[str, Any] | None, exc: BaseException) -> str:
    """One sentence: the tokenizer of ``name`` could not be built, what is missing and how to provide it."""
    kind, where = tokenizer_source(name, config)
    reason = _short(exc)
    if kind == "folder":
        return (f"The tokenizer of model '{name}' should be in the folder '{where}' (its text_cfg.hf_tokenizer_name), "
                f"which has no tokenizer transformers can load ({reason}); put the tokenizer files saved with the "
                "model there (tokenizer.json or spiece.model/tokenizer.model, with tokenizer_config.json).")
    if kind == "hub":
        return (f"The tokenizer of model '{name}' comes from the Hugging Face hub ('{where}') and no copy is cached on "
                f"this machine ({reason}); run once where there is internet so it is kept in the hub cache "
                f"({_hub_cache()}), or save it with save_pretrained into a folder and name that folder in the model "
                "config's text_cfg.hf_tokenizer_name.")
    if kind == "siglip-url":
        return (f"Because the model name '{name}' contains 'siglip' and its config names no tokenizer, open_clip "
                f"downloads a SigLIP sentencepiece vocabulary from {where} for its prompts, which failed here "
                f"({reason}); name a local tokenizer folder in the config's text_cfg.hf_tokenizer_name, or, if the "
                "model uses CLIP's tokenizer, give the config a name without 'siglip'.")
    return f"The tokenizer of model '{name}' could not be built ({reason})."


class DeferredTokenizer:
    """Callable like an open_clip tokenizer; the real one is built on the first call (``build``), and a
    failure to build it is a :class:`RefineClipError` in one sentence (:func:`missing_tokenizer`)."""

    def __init__(self, name: str, config: Mapping[str, Any] | None, build: Callable[[], Callable]) -> None:
        self.name = name
        self._config = config
        self._build = build
        self._tokenizer: Callable | None = None
        self._lock = threading.Lock()

    def get(self) -> Callable:
        """The open_clip tokenizer (built now if it was not yet)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    reason = _offline_reason(self.name, self._config)
                    if reason is not None:
                        raise OSError(reason)
                    self._tokenizer = self._build()
                except RefineClipError:
                    raise
                except Exception as exc:  # ImportError, OSError, ValueError...: whatever the library raises
                    raise RefineClipError(missing_tokenizer(self.name, self._config, exc)) from exc
            return self._tokenizer

    def __call__(self, texts, context_length: int | None = None):
        tokenizer = self.get()
        return tokenizer(texts) if context_length is None else tokenizer(texts, context_length)

    def __repr__(self) -> str:
        return f"DeferredTokenizer({self.name!r}, built={self._tokenizer is not None})"


def deferred_tokenizer(name: str, config: Mapping[str, Any] | None,
                       known: Callable[[str, Mapping[str, Any]], contextlib.AbstractContextManager]
                       ) -> DeferredTokenizer:
    """The tokenizer of model ``name``: ``config`` is the user's config (None: a name open_clip knows),
    made known to open_clip by ``known`` (``loading.open_clip_state.config_known_to_open_clip``) while it is built."""
    import open_clip

    def build() -> Callable:
        with known(name, config) if config is not None else contextlib.nullcontext(name) as arch:
            return open_clip.get_tokenizer(arch)

    return DeferredTokenizer(name, config, build)
