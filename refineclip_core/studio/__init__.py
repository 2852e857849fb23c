"""The studio session: where an interactive user's data, caches and demo live (no Streamlit).

The studio home folder, per-folder locking so two sessions never extract into one cache,
the cache folder of each (model, data, scope) and prompt edits on an opened cache, and the
embedded demo prepared on a held-out sample of its world (features: §2.1, Eq. 4).
"""
