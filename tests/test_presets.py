"""Every encoder preset (SPEC §2.1): the table's shapes, a pre-training step at a small image
size, and the classification models' parameter counts against the MIRL paper's Table 3.

Parameter counts are taken on the meta device (no memory, no init), so the paper-scale
presets cost nothing there; the forward/backward step of the big ones is marked slow.
"""
import dataclasses

import pytest
import timm
import torch

from mirl_ds.models.encoder import build_vit
from mirl_ds.models.mae import MaskedAutoencoder
from mirl_ds.models.mirl import SegmentedAutoencoder
from mirl_ds.models.presets import PRESETS, VitPreset, get_preset

PAPER_SCALE = {"vit_small", "vit_base", "vit_large", "vit_s54", "vit_b24", "vit_b48"}
SLOW = {"vit_large", "vit_s54", "vit_b24", "vit_b48"}   # 100M-340M parameters: seconds to build

# SPEC §2.1: depth, dim, heads, MLP, G, decoder dim / depth / heads.
SPEC_TABLE = {
    "vit_small": (12, 384, 6, 1536, 2, 384, 2, 12),
    "vit_base":  (12, 768, 12, 3072, 2, 512, 2, 16),
    "vit_large": (24, 1024, 16, 4096, 4, 512, 2, 16),
    "vit_s54":   (54, 384, 12, 1536, 6, 384, 1, 12),
    "vit_b24":   (24, 768, 12, 3072, 4, 512, 2, 16),
    "vit_b48":   (48, 768, 12, 3072, 6, 512, 2, 16),
}

# MIRL paper Table 3, millions of parameters of the classification model (1000 classes).
# ViT-L is printed as 307M there; timm's ViT-L/16 has 304.3M, which is what we hold it to.
PAPER_PARAMS_M = {"vit_base": 86, "vit_s54": 96, "vit_b24": 171, "vit_b48": 341, "vit_large": 304}


def _marked(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _small(spec: VitPreset) -> VitPreset:
    """Paper-scale presets at 32 px (patch 16: 4 patches, 1 visible); nothing else shrunk."""
    return spec.with_overrides(img_size=32) if spec.img_size == 224 else spec


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_paper_presets_match_the_spec_table(name):
    s = PRESETS[name]
    depth, dim, heads, mlp, g, d_dim, d_depth, d_heads = SPEC_TABLE[name]
    assert (s.img_size, s.patch_size, s.num_patches, s.in_chans) == (224, 16, 196, 3)
    assert (s.depth, s.embed_dim, s.num_heads, int(s.embed_dim * s.mlp_ratio)) == (depth, dim, heads, mlp)
    assert (s.segments, s.decoder_dim, s.decoder_depth, s.decoder_heads) == (g, d_dim, d_depth, d_heads)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_consistent(name):
    s = PRESETS[name]
    assert s.img_size % s.patch_size == 0
    assert s.embed_dim % s.num_heads == 0 and s.decoder_dim % s.decoder_heads == 0
    assert s.embed_dim % 4 == 0 and s.decoder_dim % 4 == 0        # 2-D sin-cos embeddings
    assert s.depth % s.segments == 0 and s.segments % 2 == 0      # MIRL pairs need even G


def test_tiny_presets_exist_for_tests_and_cpu_demos():
    tiny = [s for s in PRESETS.values() if s.img_size <= 64]
    assert tiny and all(s.patch_size in (4, 8) for s in tiny)
    assert any(s.depth >= 12 and s.segments >= 4 for s in tiny)    # a deep one, several segments


def test_with_overrides_changes_only_the_given_fields():
    base = PRESETS["vit_b48"]
    small = base.with_overrides(img_size=32, depth=None, patch_size=None)
    assert small.img_size == 32 and small.num_patches == 4
    assert dataclasses.replace(small, img_size=224) == base
    assert base.img_size == 224                                     # the preset itself is untouched


def test_unknown_preset_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="vit_b48"):
        get_preset("vit_b96")
    assert get_preset("vit_b24") is PRESETS["vit_b24"]


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name, millions", sorted(PAPER_PARAMS_M.items()))
def test_classification_parameter_count_matches_paper_table_3(name, millions):
    with torch.device("meta"):
        vit = build_vit(PRESETS[name], num_classes=1000)
    assert len(vit.blocks) == PRESETS[name].depth
    assert abs(_count(vit) / 1e6 - millions) / millions < 0.01, _count(vit)


@pytest.mark.parametrize("name", ["vit_small", "vit_base", "vit_large"])
def test_presets_with_a_timm_arch_have_exactly_timms_parameter_layout(name):
    spec = PRESETS[name]
    with torch.device("meta"):
        ours = build_vit(spec, num_classes=1000)
        theirs = timm.create_model(spec.timm_arch, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


# --------------------------------------------------------------------------- a training step
@pytest.mark.parametrize("name", _marked(sorted(PRESETS)))
def test_every_preset_builds_mirl_and_takes_a_forward_backward_step(name):
    spec = _small(PRESETS[name])
    torch.manual_seed(0)
    model = SegmentedAutoencoder(spec)   # MIRL with the preset's own G and decoder
    assert model.num_segments == PRESETS[name].segments
    assert len(model.decoders) == spec.segments and len(model.encoder.blocks) == spec.depth
    imgs = torch.randn(2, 3, spec.img_size, spec.img_size)
    out = model(imgs, generator=torch.Generator().manual_seed(0))
    assert len(out.preds) == spec.segments
    assert all(p.shape == (2, spec.num_patches, spec.patch_size**2 * 3) for p in out.preds)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", ["vit_test", pytest.param("vit_base", marks=pytest.mark.slow)])
def test_small_presets_build_mae_with_the_default_decoder_and_step(name):
    spec = _small(PRESETS[name])
    torch.manual_seed(0)
    model = MaskedAutoencoder(spec, norm_pix_loss=True)   # MAE's own 512-d, 8-block decoder
    out = model(torch.randn(2, 3, spec.img_size, spec.img_size),
                generator=torch.Generator().manual_seed(0))
    assert out.preds[0].shape == (2, spec.num_patches, spec.patch_size**2 * 3)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
