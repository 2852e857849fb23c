"""The embedded demonstration: a procedural spurious-correlation world and a small CLIP.

* :mod:`refineclip_core.demo.world` draws labelled images (two look-alike bird classes whose
  training images sit on "their" background 95% of the time, plus unrelated shapes) and
  writes them as a class-folder or WILDS-Waterbirds dataset.
* :mod:`refineclip_core.demo.train` trains the small open_clip model shipped in
  ``assets/demo`` on the biased training distribution.
* :mod:`refineclip_core.demo.text_pool` generates ``assets/text_pool.txt``, the pool of short
  image descriptions used to describe attention heads (TextSpan-style).
"""

from .world import (
    BACKGROUNDS,
    CLASSES,
    HOME_BACKGROUND,
    TARGET_CLASSES,
    TARGET_PLACES,
    UNRELATED_CLASSES,
    WorldConfig,
    WorldSample,
    caption_families,
    captions,
    sample_world,
    write_world,
)

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "HOME_BACKGROUND",
    "TARGET_CLASSES",
    "TARGET_PLACES",
    "UNRELATED_CLASSES",
    "WorldConfig",
    "WorldSample",
    "caption_families",
    "captions",
    "sample_world",
    "write_world",
]
