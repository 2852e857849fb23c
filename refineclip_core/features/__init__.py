"""Features: the one forward pass, decomposed and cached (paper §2.1, Eq. 2-4).

``decomposition`` splits an image embedding exactly into per-head direct contributions
``c[l, h] = P h^{l,h}`` plus a remainder (Eq. 3-4) and computes Eq. 5 through the real model;
``extraction`` streams a dataset through it into the sharded, resumable cache (``cache_format``
writes the folder, ``cache`` reads it back, ``sharded`` reads its arrays out of core); ``zeroshot``
builds the class text embeddings ``E_text(y)`` from class names and prompt templates (§2.1).
Everything after this package runs on cached arrays, without the model.
"""
