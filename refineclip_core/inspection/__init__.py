"""Inspection: what a head encodes and where it looks (paper §5.1, Appendix A.1).

``textspan`` describes a head by the texts spanning its outputs (Table 5); ``gradcam`` draws
Grad-CAM maps of the zero-shot logit for the whole model or one head set (Fig. 3); ``diagnosis``
names, in words, the concept that the blamed heads carry and checks it against random head sets of
the same size (the shortcut behind an error pair; ``refineclip explain``).
"""
