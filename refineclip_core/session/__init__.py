"""An interactive session: what an interactive user works on, and where its data lives (no Streamlit).

``source`` (a model, its images and their feature cache: the unit every page works on),
``images`` (list a folder, a zip or the demo sample and plan its extraction, §2.1 Eq. 4),
``caches`` (one cache folder per model, data and layer scope; prompt edits), ``locking`` (one
extraction per cache folder at a time) and ``demo`` (the embedded demo prepared on a held-out
sample of its world), all inside the home folder (:mod:`refineclip_core.home`).
"""
