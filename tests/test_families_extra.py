"""Model families beyond the CLIP ViT (issue 34 items 5 and 7): transformers SigLIP / SigLIP 2 folders
in and out, and what a model whose tokenizer cannot be had offline says.

The reference is transformers itself (``SiglipModel`` / ``Siglip2Model``: ``get_image_features``,
``get_text_features``) on tiny random configs saved with ``save_pretrained``, next to a tokenizer
built in the test from a ten-word vocabulary. Nothing is downloaded: ``HF_HUB_OFFLINE=1`` for every test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from refineclip_core.errors import CheckpointError, RefineClipError
from refineclip_core.loading import hf_clip
from refineclip_core.loading.models import ModelSpec, load_model

transformers = pytest.importorskip("transformers")
from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel  # noqa: E402

WORDS = "a photo of cat bird on water land the an extremely long caption".split()
PROMPTS = ["a photo of a cat", "a bird on water", "", "an extremely long caption " * 10, "The cat, on LAND!"]
TOLERANCE = {"fp32": 1e-5, "fp64": 1e-12}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, when first imported (earlier in the session): without
    # this a hub tokenizer name went to the network and retried with backoff for ~45 s before failing
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _save_tokenizer(folder) -> int:
    """A WordLevel tokenizer over :data:`WORDS` (pad 0, end of text 1 appended, unknown 2), saved the way
    ``save_pretrained`` saves any fast tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return len(vocab)


#: Tiny configs: what transformers' SigLIP lets a config vary (activations, eps, widths, an MLP width
#: that is no multiple of the width, patch and image size / patch count, context length).
VARIANTS = {
    "siglip": dict(vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                               image_size=24, patch_size=8),
                   text=dict(hidden_size=24, intermediate_size=50, num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=12, projection_size=32)),
    "siglip-gelu-eps": dict(vision=dict(hidden_size=24, intermediate_size=61, num_hidden_layers=1,
                                        num_attention_heads=3, image_size=20, patch_size=4, hidden_act="gelu",
                                        layer_norm_eps=1e-5),
                            text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=10, projection_size=24,
                                      layer_norm_eps=1e-5)),
    "siglip2": dict(vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_patches=9, patch_size=8),
                    text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=12, projection_size=32)),
}


def _is2(variant: str) -> bool:
    return variant.startswith("siglip2")


def _image_size(variant: str) -> int:
    v = VARIANTS[variant]["vision"]
    return v["image_size"] if not _is2(variant) else math.isqrt(v["num_patches"]) * v["patch_size"]


def _save(tmp_path, variant: str, seed: int = 0, vision=None, tokenizer: bool = True):
    v = {**VARIANTS[variant]["vision"], **(vision or {})}
    folder = tmp_path / f"hf-{variant}"
    folder.mkdir()
    vocab = _save_tokenizer(folder) if tokenizer else len(WORDS) + 3
    text = {**VARIANTS[variant]["text"], "vocab_size": vocab}
    cfg_cls, model_cls = (Siglip2Config, Siglip2Model) if _is2(variant) else (SiglipConfig, SiglipModel)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(text_config=text, vision_config=v)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(12.0))
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(folder)
    return model, folder


def _images(size: int, n: int = 4, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3)).to(dtype)


def _hf_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """transformers' image embedding; SigLIP 2 takes (row, column, channel)-flattened patches, the way
    its image processor cuts them, over the checkpoint's full grid (no padding)."""
    if isinstance(model, Siglip2Model):
        p = model.config.vision_config.patch_size
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        out = model.get_image_features(pixel_values=patches,
                                       pixel_attention_mask=torch.ones(b, patches.shape[1], dtype=torch.long),
                                       spatial_shapes=torch.tensor([[h // p, w // p]] * b))
    else:
        out = model.get_image_features(pixel_values=images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_text_features(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_siglip_folder_computes_transformers_embeddings(tmp_path, variant, precision):
    hf, folder = _save(tmp_path, variant)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    hf = hf.to(dtype)
    loaded = load_model(ModelSpec("x", checkpoint=str(folder), precision=precision))
    images = _images(_image_size(variant), dtype=dtype)
    tokens = loaded.tokenizer(PROMPTS)
    context = VARIANTS[variant]["text"]["max_position_embeddings"]
    assert tokens.shape == (len(PROMPTS), context) and int(tokens.max()) <= len(WORDS) + 2
    # the folder's tokenizer as transformers loads it (for SigLIP 2 its own class: Gemma's normaliser, left padding)
    own = transformers.AutoTokenizer.from_pretrained(folder)(PROMPTS[:2], padding="max_length", max_length=context)
    assert tokens[:2].tolist() == own.input_ids
    if not _is2(variant):
        assert tokens[0, :6].tolist() == [3, 4, 5, 3, 6, 1] and tokens[0, -1] == 0    # a photo of a cat </s> <pad>…
    ids = torch.randint(0, len(WORDS) + 3, (3, context), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        errors = {"image": _rel(loaded.model.encode_image(images), _hf_image_features(hf, images)),
                  "text": _rel(loaded.model.encode_text(tokens), _hf_text_features(hf, tokens)),
                  "text (arbitrary ids)": _rel(loaded.model.encode_text(ids), _hf_text_features(hf, ids))}
    assert max(errors.values()) <= TOLERANCE[precision], errors
    assert loaded.logit_scale == pytest.approx(12.0, rel=1e-6)
    assert float(loaded.model.logit_bias) == pytest.approx(-3.0)
    trunk = loaded.model.visual.trunk
    assert type(trunk).__name__ == "VisionTransformer" and trunk.global_pool == "map" and trunk.cls_token is None


@pytest.mark.parametrize("variant", ["siglip", "siglip2"])
def test_edited_siglip_goes_back_out_as_a_folder_transformers_loads(tmp_path, variant):
    """An edit of the layers a SigLIP edit merges into (the pool's output projection and its MLP's last
    layer) written with write_hf_checkpoint: from_pretrained reproduces open_clip's edited embedding, the
    config and tokenizer files travel along, and the text tower is untouched."""
    hf, folder = _save(tmp_path, variant)
    loaded = load_model(ModelSpec("x", checkpoint=str(folder)))
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    for key in ("visual.trunk.attn_pool.proj.weight", "visual.trunk.attn_pool.mlp.fc2.weight",
                "visual.trunk.attn_pool.mlp.fc2.bias"):
        state[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=g)
    loaded.model.load_state_dict(state)
    out = hf_clip.write_hf_checkpoint(tmp_path / "edited", state, loaded.model, hf_clip.find_hf_checkpoint(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    edited = type(hf).from_pretrained(out).eval()
    images = _images(_image_size(variant))
    ids = torch.randint(0, len(WORDS) + 3, (3, VARIANTS[variant]["text"]["max_position_embeddings"]),
                        generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, before = loaded.model.encode_image(images), _hf_image_features(hf, images)
        assert _rel(_hf_image_features(edited, images), expected) <= 1e-5 and _rel(before, expected) > 1e-2
        assert torch.equal(_hf_text_features(edited, ids), _hf_text_features(hf, ids))
    again = load_model(ModelSpec("x", checkpoint=str(out)))       # and it reads back through the loader
    with torch.no_grad():
        assert _rel(again.model.encode_image(images), expected) <= 1e-5


REFUSALS = {
    "no head": ("siglip", dict(vision_use_head=False), "no attention-pooling head"),
    "odd grid": ("siglip2", dict(num_patches=8), "not a square grid"),
    "activation": ("siglip", dict(hidden_act="relu"), "cannot compute exactly"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_siglip_configs_open_clip_cannot_run_are_refused_in_one_sentence(tmp_path, case):
    variant, vision, match = REFUSALS[case]
    _, folder = _save(tmp_path, variant, vision=vision)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(ModelSpec("x", checkpoint=str(folder)))
    assert "\n" not in str(err.value)


def test_the_registered_trunk_is_the_one_timm_builds_for_those_arguments():
    """Equal SigLIP towers share one registered timm name; another eps or activation is another name."""
    import timm

    raw = SiglipConfig(vision_config=VARIANTS["siglip"]["vision"]).to_dict()
    args = hf_clip.siglip.trunk_arguments(raw)
    name = hf_clip.siglip.timm_trunk(args)
    assert name == hf_clip.siglip.timm_trunk(dict(args)) and timm.is_model(name)
    assert hf_clip.siglip.timm_trunk({**args, "norm_eps": 1e-5}) != name
    trunk = timm.create_model(name, num_classes=0, global_pool="map")
    assert trunk.embed_dim == 32 and len(trunk.blocks) == 2 and trunk.blocks[0].mlp.fc1.out_features == 40
    assert trunk.patch_embed.img_size == (24, 24) and trunk.norm.eps == 1e-6
    assert type(trunk.blocks[0].mlp.act).__name__ == "GELUTanh" or trunk.blocks[0].mlp.act.approximate == "tanh"


# ------------------------------------------------------------------------------------------------
# Item 7: a tokenizer that cannot be had offline is one sentence, and only when text is tokenised


def _no_downloads(monkeypatch) -> None:
    """open_clip's SigLipTokenizer fetches its vocabulary with fsspec (HF_HUB_OFFLINE does not stop it)."""
    import fsspec

    def refuse(*_a, **_k):
        raise OSError("downloads are disabled in this test")

    monkeypatch.setattr(fsspec, "open", refuse)


def _cli(argv, capsys) -> tuple[int, str]:
    from refineclip_core.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("case", ["hub", "siglip-name", "folder"])
def test_a_tokenizer_that_cannot_be_had_offline_is_one_sentence(tmp_path, image_folder, monkeypatch, capsys, case):
    """The tokenizer is built when prompts are first tokenised: a vision-only command (check-decomposition)
    runs without one; a command that needs text stops with one sentence naming the missing tokenizer and
    how to provide it (no ImportError, no traceback)."""
    from .conftest import tiny_config, write_config

    _no_downloads(monkeypatch)
    cfg = tiny_config(image=32, patch=8)
    name = "tiny-clip"
    if case == "hub":
        cfg["text_cfg"]["hf_tokenizer_name"] = "refineclip-tests/no-such-tokenizer"
    elif case == "folder":
        cfg["text_cfg"]["hf_tokenizer_name"] = str(tmp_path / "tokenizer-folder")
        (tmp_path / "tokenizer-folder").mkdir()
    else:  # the case: a SigLIP-shaped config whose name contains 'siglip' and names no tokenizer
        name = "tiny-siglip"
        cfg = {"embed_dim": 192, "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                                                "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
               "text_cfg": cfg["text_cfg"]}
    config = write_config(tmp_path / "cfg", name, cfg)
    model = ["--model", name, "--model-config", str(config)]
    code, out = _cli(["check-decomposition", *model, "--data", str(image_folder), "--max-images", "4"], capsys)
    assert code == 0, out
    assert "largest relative error" in out
    code, out = _cli(["eval", *model, "--data", str(image_folder)], capsys)
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in out and "ImportError" not in out, out
    message = lines[-1]
    expected = {"hub": ("refineclip-tests/no-such-tokenizer", "hub cache", "hf_tokenizer_name"),
                "siglip-name": ("contains 'siglip'", "hf_tokenizer_name", "without 'siglip'"),
                "folder": ("tokenizer-folder", "tokenizer.json")}[case]
    assert all(part in message for part in expected), message


def test_a_transformers_siglip_folder_decomposes_exactly_from_the_cli(tmp_path, image_folder, capsys):
    """The converted SigLIP (timm trunk, map pooling) through the vision-backend seam: extracted with the
    folder's own tokenizer for the prompts, and check-decomposition's largest relative error within float32's
    promise."""
    _, folder = _save(tmp_path, "siglip")
    cache = tmp_path / "cache"
    code, out = _cli(["extract", "--checkpoint", str(folder), "--data", str(image_folder), "--out", str(cache),
                      "--layers", "all", "--batch-size", "6"], capsys)
    assert code == 0, out
    code, out = _cli(["check-decomposition", "--cache", str(cache), "--json", str(tmp_path / "check.json")], capsys)
    assert code == 0, out
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["n_images"] == 18 and result["max_rel_error"] <= 1e-5, result


def test_deferred_tokenizer_builds_once_and_tokenises_like_open_clip(tmp_path):
    import open_clip

    from .conftest import tiny_config, write_config

    config = write_config(tmp_path, "tiny-bpe", tiny_config())
    loaded = load_model(ModelSpec("tiny-bpe", model_config=str(config)))
    assert "built=False" in repr(loaded.tokenizer)
    tokens = loaded.tokenizer(["a photo of a cat", "a bird"])
    assert torch.equal(tokens, open_clip.tokenizer.SimpleTokenizer(context_length=16)(["a photo of a cat", "a bird"]))
    assert loaded.tokenizer.get() is loaded.tokenizer.get() and "built=True" in repr(loaded.tokenizer)


def test_siglip_folder_without_its_tokenizer_encodes_images_and_says_what_is_missing(tmp_path):
    hf, folder = _save(tmp_path, "siglip", tokenizer=False)
    loaded = load_model(ModelSpec("x", checkpoint=str(folder)))
    images = _images(_image_size("siglip"))
    with torch.no_grad():
        assert _rel(loaded.model.encode_image(images), _hf_image_features(hf, images)) <= 1e-5
    with pytest.raises(RefineClipError, match=r"should be in the folder .*tokenizer\.json") as err:
        loaded.tokenizer(["a cat"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Item 4: the SigLIP-shaped demo model's recipe (demo/siglip.py)


def test_sigmoid_loss_is_siglips_pairwise_loss_with_every_true_caption_positive():
    from refineclip_core.demo.siglip import sigmoid_loss_with_duplicates

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    positives = torch.eye(5)
    positives[0, 3] = positives[2, 1] = 1.0
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)
    brute = 0.0
    for i in range(5):
        for j in range(5):
            cos = float(img[i] @ txt[j] / (img[i].norm() * txt[j].norm()))
            z = 1.0 if positives[i, j] else -1.0
            brute += math.log1p(math.exp(-z * (7.0 * cos - 2.5)))
    assert float(sigmoid_loss_with_duplicates(img, txt, scale, bias, positives)) == pytest.approx(brute / 5, rel=1e-12)


def test_map_mlp_share_against_a_forward_pass_written_out():
    """The penalty's two shares computed by running the trunk block by block and the attention pool by hand."""
    import open_clip

    from refineclip_core.demo.siglip import MapMlpShare, siglip_model_config
    from refineclip_core.loading.models import config_known_to_open_clip

    torch.manual_seed(0)
    with config_known_to_open_clip("siglip-demo", siglip_model_config()) as arch:
        model = open_clip.create_model(arch).double().eval()
    images = torch.randn(3, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad(), MapMlpShare(model.visual) as share:
        emb = model.encode_image(images)
        penalty = float(share.penalty())
        trunk = model.visual.trunk
        x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))
        mlps = []
        for block in trunk.blocks:
            x = x + block.attn(block.norm1(x))
            m = block.mlp(block.norm2(x))
            mlps.append(m[:, 1:])                       # the class token is not pooled
            x = x + m
        r = x[:, 1:]
        trunk_share = (sum(m.pow(2).sum(-1) for m in mlps) / r.pow(2).sum(-1)).mean(-1)
        pool, xn = trunk.attn_pool, trunk.norm(x)[:, 1:]
        heads, width = pool.num_heads, xn.shape[-1]
        q = pool.q(pool.latent.expand(3, -1, -1)).reshape(3, 1, heads, -1).transpose(1, 2)
        k, v = pool.kv(xn).reshape(3, xn.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        y = pool.proj((att @ v).transpose(1, 2).reshape(3, 1, width))[:, 0]
        pool_mlp = pool.mlp(pool.norm(y))
        assert torch.allclose(y + pool_mlp, emb, atol=1e-12)
        expected = float((trunk_share + pool_mlp.pow(2).sum(-1) / emb.pow(2).sum(-1)).mean())
    assert penalty == pytest.approx(expected, rel=1e-10)


def test_the_siglip_recipe_is_one_flag():
    from refineclip_core.demo.siglip import siglip_model_config
    from refineclip_core.demo.train import build_parser, config_from_args, siglip_train_config

    cfg = config_from_args(build_parser().parse_args(["--out", "x", "--recipe", "siglip"]))
    assert cfg == siglip_train_config() and cfg.model_config == siglip_model_config()
    vision = cfg.model_config["vision_cfg"]
    assert vision["timm_pool"] == "map" and vision["timm_proj"] == "none" and "init_logit_bias" in cfg.model_config
    with pytest.raises(SystemExit, match="bird world only"):
        config_from_args(build_parser().parse_args(["--out", "x", "--recipe", "siglip", "--world", "digits"]))


# ------------------------------------------------------------------------------------------------
# Item 6: the coverage table is generated, current, and meets the bar


@pytest.mark.slow
def test_models_md_is_what_the_coverage_script_writes():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("coverage_table", root / "scripts" / "coverage_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import open_clip

    table = script.rows()
    text = script.render(table, open_clip.__version__)   # what main() writes
    assert text == (root / "docs" / "MODELS.md").read_text(), "run python scripts/coverage_table.py"
    plain = [r for r in table if r["plain_vit"]]
    assert sum(r["tags"] for r in plain) == 147                                   # the count, open_clip 3.3.0
    assert sum(r["tags"] for r in plain if r["reason"] is None) >= 140
    assert all(r["reason"] is None or r["reason"].count(". ") == 0 for r in table)  # one sentence each
    refused = {r["arch"] for r in table if r["reason"]}
    assert {"RN50", "convnext_base", "MobileCLIP-S1"} <= refused and "ViT-B-16-SigLIP2" not in refused


def test_an_unreachable_hub_is_said_in_seconds_not_after_minutes_of_retries(tmp_path, monkeypatch):
    """A hub tokenizer with no cached copy: when the hub cannot be reached, the one sentence comes from a
    probe of a few seconds, before transformers would retry with back-off (~50 s here); a cached copy or
    a proxy is left to transformers."""
    import socket
    import time

    import huggingface_hub.constants

    from refineclip_core.errors import RefineClipError
    from refineclip_core.loading import tokenizers

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # the probe, not the flag, decides
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in tokenizers._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid:8443")
    tried = []

    def unreachable(address, timeout=None):
        tried.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    built = []
    config = {"text_cfg": {"hf_tokenizer_name": "someone/their-tokenizer"}}
    tok = tokenizers.DeferredTokenizer("their-model", config, lambda: built.append(1) or (lambda t: t))
    start = time.perf_counter()
    with pytest.raises(RefineClipError) as err:
        tok(["a photo of a cat"])
    assert time.perf_counter() - start < 2 and not built
    assert tried == [(("hub.example.invalid", 8443), tokenizers.HUB_PROBE_S)]
    message = str(err.value)
    assert "someone/their-tokenizer" in message and "hub.example.invalid could not be reached" in message
    assert "hub cache" in message and "\n" not in message
    # a copy in the hub cache, or a proxy: no probe, transformers decides
    (tmp_path / "hub" / "models--someone--their-tokenizer").mkdir(parents=True)
    assert tok(["x"]) == ["x"] and built == [1]
    (tmp_path / "hub" / "models--someone--their-tokenizer").rmdir()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert tokenizers.hub_unreachable() is None and len(tried) == 1
