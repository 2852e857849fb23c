"""Streamlit helpers shared by the RefineCLIP Studio pages: session state, cached resources,
background jobs and small widgets. No method math lives here: every number comes from
``refineclip_core``.
"""
