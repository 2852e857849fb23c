"""Hugging Face ``transformers`` CLIP checkpoints, read as open_clip models and written back, exactly.

Reading (:func:`find_hf_checkpoint`, :func:`read_hf_checkpoint`). A ``CLIPModel.save_pretrained``
folder (``config.json`` + ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``), or
one of its weight files with ``config.json`` beside it, becomes the open_clip model that computes
the same functions: the open_clip config is built from the HF config and the weights are renamed.

=====================================================  ==============================================
transformers ``CLIPModel``                             open_clip ``CLIP``
=====================================================  ==============================================
``vision_model.embeddings.class_embedding``            ``visual.class_embedding``
``vision_model.embeddings.patch_embedding.weight``     ``visual.conv1.weight``
``vision_model.embeddings.position_embedding.weight``  ``visual.positional_embedding``
``vision_model.pre_layrnorm`` / ``post_layernorm``     ``visual.ln_pre`` / ``visual.ln_post``
``…encoder.layers.i.self_attn.{q,k,v}_proj``           ``…resblocks.i.attn.in_proj_{weight,bias}`` (q;k;v)
``…encoder.layers.i.self_attn.out_proj``               ``…resblocks.i.attn.out_proj``
``…encoder.layers.i.layer_norm1`` / ``layer_norm2``    ``…resblocks.i.ln_1`` / ``ln_2``
``…encoder.layers.i.mlp.fc1`` / ``fc2``                ``…resblocks.i.mlp.c_fc`` / ``c_proj``
``visual_projection.weight`` (out × in)                ``visual.proj`` (in × out): transposed
``text_model.embeddings.token_embedding.weight``       ``token_embedding.weight``
``text_model.embeddings.position_embedding.weight``    ``positional_embedding``
``text_model.final_layer_norm``                        ``ln_final``
``text_projection.weight`` (out × in)                  ``text_projection`` (in × out): transposed
``logit_scale``                                        ``logit_scale``
=====================================================  ==============================================

Both encode the image as ``post_layernorm(x[:, 0]) @ Wᵀ`` and pool the text at its end-of-text
token: transformers takes the first position of ``eos_token_id``, or ``input_ids.argmax`` for the
legacy ``eos_token_id == 2`` — open_clip's ``pool_type`` ``"eos"`` and ``"argmax"``. Activations
map to ``QuickGELU`` (``quick_gelu``), ``nn.GELU()`` (``gelu``) or ``nn.GELU(approximate="tanh")``
(``gelu_pytorch_tanh``, and ``gelu_new``, the same function written out); layer-norm eps goes into
each tower's ``norm_kwargs``. A config open_clip cannot reproduce exactly — another activation,
towers that disagree on QuickGELU, a bias on a projection, a vocabulary that open_clip's CLIP
tokenizer does not fit, another ``model_type`` — is refused with one sentence
(:class:`~refineclip_core.errors.CheckpointError`) instead of loading something that computes
other numbers.

Writing (:func:`write_hf_checkpoint`). The edited model goes back out as a folder that
``CLIPModel.from_pretrained`` loads: ``config.json`` (the source's own when the model came from
transformers, else built from the open_clip model, which must then be a plain ViT CLIP) and
``model.safetensors`` with the merged ``visual.proj`` as ``visual_projection.weight``.

``transformers`` is optional (``pip install 'refineclip-studio[hf]'``): it is imported only to
read or write an HF config, and its absence is reported in one sentence.

``SiglipModel`` / ``Siglip2Model`` folders (``model_type`` ``siglip`` / ``siglip2``) take the same
road through :mod:`.siglip`: open_clip's SigLIP layout (a timm ViT trunk with attention-map pooling,
no projection; a text tower pooled at the last position), the folder's own tokenizer, and back.

The package reads as the steps: ``folder`` (find the files), ``convert`` (config and weights, both
ways; ``siglip`` for SigLIP), ``export`` (write a folder with only the files it needs).
"""

from __future__ import annotations

from .folder import (CONFIG_FILE, HFCheckpoint, MAX_JSON_BYTES, PREPROCESSOR_FILE, WEIGHTS_FILE, WEIGHT_FILES,
                     find_hf_checkpoint, hf_folder_in, is_hf_checkpoint)
from .convert import (ACTIVATIONS, CLIP_EOT_ID, CLIP_VOCAB_SIZE, ConvertedCLIP, LEGACY_EOS_ID, hf_to_open_clip,
                      open_clip_config, open_clip_to_hf, read_hf_checkpoint, read_hf_config, read_hf_state_dict)
from .export import EXPORT_FILES, MAX_EXPORT_FILE_BYTES, export_confinement, hf_config_dict, write_hf_checkpoint, zip_folder

__all__ = [
    "CONFIG_FILE", "HFCheckpoint", "MAX_JSON_BYTES", "PREPROCESSOR_FILE", "WEIGHTS_FILE", "WEIGHT_FILES",
    "find_hf_checkpoint", "hf_folder_in", "is_hf_checkpoint", "ACTIVATIONS", "CLIP_EOT_ID", "CLIP_VOCAB_SIZE",
    "ConvertedCLIP", "LEGACY_EOS_ID", "hf_to_open_clip", "open_clip_config", "open_clip_to_hf",
    "read_hf_checkpoint", "read_hf_config", "read_hf_state_dict", "EXPORT_FILES", "MAX_EXPORT_FILE_BYTES",
    "export_confinement", "hf_config_dict", "write_hf_checkpoint", "zip_folder",
]
