"""What an interactive session works on: a model, its images and their feature cache.

A :class:`Source` is plain, hashable data (it lives in a browser session's state and keys the
dashboard's shared resources); :func:`~refineclip_core.session.demo.prepare_demo` returns one
for the embedded demo, the Load page builds one for the user's model and images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

from ..errors import CacheError
from ..features.cache_format import read_manifest
from ..loading.models import ModelSpec


@dataclass(frozen=True)
class Source:
    """A model, its images and their feature cache, plus the prompts the user chose."""

    spec: ModelSpec
    data_root: str
    cache_dir: str
    label: str
    classes: tuple[str, ...] | None = None      # display names replacing the cached ones
    templates: tuple[str, ...] | None = None    # prompt templates replacing the cached ones
    is_demo: bool = False
    extra_skipped: tuple = field(default=())     # (path, reason) skipped before extraction (e.g. zip junk)

    @property
    def spec_json(self) -> str:
        return self.spec.key()

    @property
    def key(self) -> str:
        """Identifies the cache *and* the prompts (two sources with equal keys share resources). The opening
        session's allowed folders (``spec.roots``) are not part of it: a session holds a source only once
        its own folders were checked against the cache and its model (:func:`~.caches.cache_source`, the Load
        page), and what is computed from the same files is the same, so two sessions on one cache share one
        engine, identification and findings (at 1000 classes × 50,000 images, 0.6 GB and 10 s each)."""
        payload = [replace(self.spec, roots=None).key(), self.cache_dir, list(self.classes or []),
                   list(self.templates or [])]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """The cache's fingerprint now: it changes when the folder is re-extracted in place."""
        man = read_manifest(self.cache_dir)
        if man is None or not man.complete:
            raise CacheError(f"The feature cache '{self.cache_dir}' is missing or incomplete; load the images again.")
        return man.fingerprint

    def resource_key(self) -> str:
        """:attr:`key` plus the current :meth:`fingerprint`: the key of anything computed from the
        cache (an engine, scores, descriptions), so a re-extraction in place never serves stale results."""
        return self.key + self.fingerprint()
