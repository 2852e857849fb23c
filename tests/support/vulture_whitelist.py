"""Names ``vulture`` reports as unused that are used in ways it cannot see (tests/test_lint.py).

vulture only parses this file (it is never imported): each line below "reads" one name, so vulture
counts it as used. Every entry says why the name is live. tests/test_lint.py fails on an entry that
vulture no longer reports (the name was removed or is now used in plain sight): delete that line.
To add one: run ``.venv/bin/python -m vulture`` (paths and confidence come from pyproject.toml's
[tool.vulture]), make sure the name really is used, then add ``_.name  # where and how it is used``.
Code that only tests call is dead code: delete it rather than listing it, unless it is a seam the
tests need (said so below).
"""

_ = None  # stands for any object: vulture reads only the attribute names

# Python protocols called by the interpreter, not by name
_.__getattr__  # refineclip_core/__init__.py: module __getattr__ (PEP 562) resolves the lazy public API
_.__dir__  # refineclip_core/__init__.py: module __dir__ lists the lazy public API
_.__qualname__  # loading/hf_clip/siglip.py: set on a registered timm builder so timm names it
_.__module__  # loading/hf_clip/siglip.py: as __qualname__

# Public API reached through refineclip_core's lazy name table (a string vulture cannot follow)
_.write_report  # refineclip_core.write_report -> reporting.run_report (docs/API.md)

# Arguments that exist for their callers
_.adapt_key  # dashboard/pairs.py _push: st.cache_resource keys on it (the array argument is unhashed)
_.confinement_key  # dashboard/resources.py _thumbnail/_gradcam: Streamlit's cache keys on it (per confinement)
_.ce  # benchmarks/edit_variants.py variant_teacher: accepts the TEACHERS rows' fit keyword (the fit reads it)

# Dataclass fields written to JSON through dataclasses.asdict / to_dict (vulture sees no attribute read)
_.heldout  # reporting/report_schema.py RunReport: a run report's JSON field
_.refine_config  # reporting/report_schema.py RunReport: a run report's JSON field

# The fitted state of the released LTC method (method/ltc.py), kept as the release defines it;
# tests/test_peers.py and tests/test_diagnosis.py check it against independent computations
_.counts_right
_.counts_wrong
_.threshold
_.n_right
_.n_wrong
_.spurious_scores

# Seams the tests need
_.wait  # dashboard/jobs.py Job.wait: tests join a background job (pages poll it instead)
_.plan_split  # demo/world.py: the plan sample_world draws, checked by tests without rendering images
_.last_capture_bytes  # features/backends/base.py: the memory one capture held, measured by tests/test_backends.py

# Set for Streamlit, read by it
_.uses_pages_directory  # dashboard/serve.py sets Streamlit's class flag; Streamlit reads it
