"""The edit in one place: from the chosen heads to a checked, exported checkpoint (paper §3.3).

Read it in this order: ``config`` (what is exported: :class:`EditConfig`, with RefineCLIP-fit's
:class:`FitConfig` and the paper's :class:`PaperConfig`) → ``fit`` (RefineCLIP-fit: the ablated
model distilled into ``visual.proj``) and ``paper`` (the paper's diag θ, Eq. 11-13, and standard
fine-tuning) → ``compare`` (:func:`fit_edit`: the edit and every compared method on the evaluation
rows) → ``guard`` (the verdict: ``verified`` / ``not-verified`` / ``harmful``, every group and class)
and ``sanity`` (warnings beside the numbers) → ``export`` (the map merged into ``visual.proj``, the
only module here that touches :mod:`~refineclip_core.loading`) → ``record`` (the run as JSON) →
``run`` (:func:`run_edit`, what the Refine page and ``refineclip refine`` call). ``concept``
projects a named concept out of RefineCLIP-fit's teacher; ``reproduce`` runs the paper's tables
on a cache. Identification (which heads) is :mod:`~refineclip_core.method`'s.
"""
