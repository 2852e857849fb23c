"""Loading: the CLIP model and the labelled images the method runs on (paper §2.1, §2.2).

``models`` turns a :class:`~refineclip_core.loading.models.ModelSpec` (open_clip name and tag,
a local checkpoint, a config JSON, or the embedded demo) into a loaded model; ``hf_clip`` reads
Hugging Face ``transformers`` CLIP checkpoints as open_clip models and writes edits back; ``data`` reads
class folders, ``metadata.csv`` and the WILDS Waterbirds layout into an ``ImageDataset`` and
decodes images safely; ``unzip`` unpacks user zips safely, ``uploads`` keeps a dashboard session's
uploads (its folder, quotas, sweeping) and ``confine`` checks typed server paths and reads files only
inside the allowed folders.
"""
