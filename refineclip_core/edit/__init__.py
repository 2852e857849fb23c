"""The edit as a product: what is checked before an edited checkpoint leaves the studio.

``guard.py`` is the guard: the verdict (``verified`` / ``not-verified`` / ``harmful``) on an edit's
predictions against zero-shot on held-out images, with every group and class, their paired changes
and intervals, Holm's correction and how many images would tell. ``sanity.py`` lists the warnings
shown beside every number (accuracy at chance, tiny error sets, few held-out images, data other
than the demo world).
(Issue 25 moves the rest of the edit here: configuration, the fitted maps, export and the run.)
"""
