"""Reporting: the numbers, charts and files a run produces (paper Tables 1-3, Fig. 2).

Findings condense an identification (§3.2) into headline numbers; figures draw score maps
(Eq. 6-9), utility curves (Eq. 10), method comparisons and loss curves (Eq. 11-13); the run
report gathers one run as JSON and a self-contained HTML page.
"""
