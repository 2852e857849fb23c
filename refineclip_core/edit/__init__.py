"""The edit as a product: what is checked before an edited checkpoint leaves the studio.

``guard.py`` is the guard: the verdict (``verified`` / ``not-verified`` / ``harmful``) on an edit's
predictions against zero-shot on held-out images, with every group and class, their paired changes
and intervals, Holm's correction and how many images would tell.
(Issue 25 moves the rest of the edit here: configuration, the fitted maps, export and the run.)
"""
