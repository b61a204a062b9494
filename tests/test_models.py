"""Behaviour of the pre-training models (SPEC §2): MIRL's paired residual loss, MAE as the
one-segment case, DID memories, masking, gradients, timm export, coarse/fine targets, zoom-in
and truncated pre-training.

Targets, losses and position embeddings are recomputed here by hand (reshape/permute, explicit
unbiased variance, a numpy port of MAE's ``get_2d_sincos_pos_embed``) rather than with the
project's own helpers, so that a slip in a helper shows up as a disagreement.
"""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mirl_ds.build import build_pretrain_model
from mirl_ds.config.loader import ConfigError, load_config
from mirl_ds.models.cross_block import CrossBlock
from mirl_ds.models.mae import MaskedAutoencoder
from mirl_ds.models.mirl import SegmentedAutoencoder
from mirl_ds.models.presets import PRESETS
from mirl_ds.models.targets import coarse_fine_targets

TEST = PRESETS["vit_test"]        # 32 px, patch 8 (L = 16), depth 4, G = 2
DEEP = PRESETS["vit_tiny_deep"]   # 32 px, patch 4 (L = 64), depth 12, G = 6


# --------------------------------------------------------------------------- hand-made references
def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _patchify_by_hand(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order, pixels as (row, col, channel)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)   # n, c, gh, p, gw, q
    x = x.permute(0, 2, 4, 3, 5, 1)                # n, gh, gw, p, q, c
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def _normalise_by_hand(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = t.mean(dim=-1, keepdim=True)
    var = ((t - mean) ** 2).sum(dim=-1, keepdim=True) / (t.shape[-1] - 1)   # unbiased
    return (t - mean) / torch.sqrt(var + eps)


def _masked_mean_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the mean over pixels of the squared error."""
    err = ((pred - target) ** 2).mean(dim=-1)     # [N, L]
    return (err * mask).sum() / mask.sum()


def _mae_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, get_2d_sincos_pos_embed(cls_token=True)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


# --------------------------------------------------------------------------- 1. MIRL loss
@pytest.fixture(scope="module")
def deep_mirl():
    torch.manual_seed(0)
    return SegmentedAutoencoder(DEEP)   # objective mirl, G = 6, DID in every block


def test_mirl_loss_equals_paired_residual_formula_recomputed_by_hand(deep_mirl):
    imgs = _images(3, seed=1)
    out = deep_mirl(imgs, generator=_gen())
    g_count = 6
    assert len(out.preds) == g_count
    assert all(p.shape == (3, DEEP.num_patches, 4 * 4 * 3) for p in out.preds)
    target = _normalise_by_hand(_patchify_by_hand(imgs, 4))
    mask = out.batch.mask
    expected = {}
    for g in range(1, g_count // 2 + 1):   # shallow g with deep G-g+1, supervised via the sum only
        pair_sum = out.preds[g - 1] + out.preds[g_count - g]
        expected[f"pair_{g}_{g_count - g + 1}"] = _masked_mean_mse(pair_sum, target, mask)
    assert sorted(out.terms) == sorted(expected) == ["pair_1_6", "pair_2_5", "pair_3_4"]
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value, rtol=1e-5, atol=1e-6)
    total = sum(2.0 / g_count * v for v in expected.values())
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    # The pairing matters: reconstructing with each decoder alone gives a different number.
    alone = sum(_masked_mean_mse(p, target, mask) for p in out.preds) / g_count
    assert not torch.allclose(out.loss, alone, rtol=1e-3)


@pytest.mark.parametrize("omega", [0.1, 1.0])
def test_mirl_alternative_loss_adds_omega_times_shallow_error(deep_mirl, omega):
    alt = SegmentedAutoencoder(DEEP, omega=omega)
    alt.load_state_dict(deep_mirl.state_dict(), strict=True)
    imgs = _images(2, seed=3)
    out = alt(imgs, generator=_gen(7))
    target = _normalise_by_hand(_patchify_by_hand(imgs, 4))
    mask = out.batch.mask
    total = 0.0
    for g in range(1, 4):
        shallow, deep = out.preds[g - 1], out.preds[6 - g]
        expected = (omega * _masked_mean_mse(shallow, target, mask)
                    + _masked_mean_mse(shallow + deep, target, mask))
        torch.testing.assert_close(out.terms[f"pair_{g}_{7 - g}"], expected, rtol=1e-5, atol=1e-6)
        total = total + expected / 3
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)


def test_mirl_pair_weights_scale_each_pair(deep_mirl):
    weights = [0.5, 0.3, 0.2]
    model = SegmentedAutoencoder(DEEP, pair_weights=weights)
    model.load_state_dict(deep_mirl.state_dict(), strict=True)
    out = model(_images(2, seed=4), generator=_gen(8))
    expected = sum(w * out.terms[f"pair_{g}_{7 - g}"] for g, w in zip((1, 2, 3), weights))
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- 2. MAE = one segment
def _mae_to_segmented(state: dict) -> dict:
    renames = {"decoder_embed.": "decoders.0.embed.", "decoder_blocks.": "decoders.0.blocks.",
               "decoder_norm.": "decoders.0.norm.", "decoder_pred.": "decoders.0.pred."}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def test_one_segment_multi_decoder_without_did_equals_mae_for_same_weights_and_mask():
    dec = dict(decoder_dim=32, decoder_depth=2, decoder_heads=2)
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TEST, norm_pix_loss=True, **dec)
    torch.manual_seed(1)   # different init: only the copied weights may make them agree
    seg = SegmentedAutoencoder(TEST, objective="multi_decoder", segments=1, did="off",
                               weight_norm_pred=False, **dec)
    seg.load_state_dict(_mae_to_segmented(mae.state_dict()), strict=True)
    imgs = _images(4, seed=2)
    out_mae = mae(imgs, generator=_gen(5))
    out_seg = seg(imgs, generator=_gen(5))
    assert torch.equal(out_mae.batch.mask, out_seg.batch.mask)
    torch.testing.assert_close(out_seg.preds[0], out_mae.preds[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_seg.loss, out_mae.loss, rtol=1e-6, atol=1e-7)
    # ...and both are MAE's norm_pix_loss computed by hand.
    target = _normalise_by_hand(_patchify_by_hand(imgs, 8))
    torch.testing.assert_close(out_mae.loss, _masked_mean_mse(out_mae.preds[0], target,
                                                              out_mae.batch.mask), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 3. DID memories
def _run_capturing(model, imgs, seed, perturb_block=None):
    """Forward with hooks: memory inputs of every decoder's first block (before norm3), the
    embedded memories m_0 (decoder_embed0) and m_g (decoders[g-1].embed), optionally with
    noise added to the output of one encoder block."""
    memories, embedded, handles = {}, {}, []
    for g, dec in enumerate(model.decoders):
        handles.append(dec.blocks[0].norm3.register_forward_pre_hook(
            lambda mod, args, g=g: memories.__setitem__(g, args[0].detach().clone())))
        handles.append(dec.embed.register_forward_hook(
            lambda mod, args, out, g=g: embedded.__setitem__(g + 1, out.detach().clone())))
    handles.append(model.decoder_embed0.register_forward_hook(
        lambda mod, args, out: embedded.__setitem__(0, out.detach().clone())))
    if perturb_block is not None:
        def add_noise(mod, args, out):
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
            return out + 0.5 * noise
        handles.append(model.encoder.blocks[perturb_block].register_forward_hook(add_noise))
    try:
        with torch.no_grad():
            out = model(imgs, generator=_gen(seed))
    finally:
        for h in handles:
            h.remove()
    return memories, embedded, out


def test_decoder_g_memory_is_exactly_the_shallower_memories_newest_first(deep_mirl):
    imgs = _images(2, seed=5)
    memories, embedded, out = _run_capturing(deep_mirl, imgs, seed=11)
    visible = int(DEEP.num_patches * (1 - 0.75))
    assert set(memories) == set(range(6))
    for g in range(6):   # 0-based decoder g is the paper's H_{g+1}: memory [m_g, …, m_0]
        assert memories[g].shape == (2, (g + 1) * (1 + visible), DEEP.decoder_dim)
        expected = torch.cat([embedded[j] for j in range(g, -1, -1)], dim=1)
        assert torch.equal(memories[g], expected), f"decoder {g + 1}"
    # H_1 attends to m_0 only, which is z_0 (cls + visible, before block 0) through norm_low.
    z0 = deep_mirl.embed(out.batch)
    assert torch.equal(memories[0], deep_mirl.decoder_embed0(deep_mirl.norm_low(z0)).detach())


def test_decoder_memory_ignores_own_and_deeper_segments_but_sees_shallower_ones(deep_mirl):
    imgs = _images(2, seed=6)
    base_mem, _, base_out = _run_capturing(deep_mirl, imgs, seed=12)
    chunk = 1 + int(DEEP.num_patches * (1 - 0.75))
    for s, (lo, _) in enumerate(deep_mirl.segment_bounds):   # perturb segment s's first block
        mem, _, out = _run_capturing(deep_mirl, imgs, seed=12, perturb_block=lo)
        for d in range(6):
            if s >= d:   # the decoder's own segment or a deeper one: memory untouched
                assert torch.equal(mem[d], base_mem[d]), f"segment {s + 1} leaked into H_{d + 1}"
            else:        # only m_{s+1} (segment s's output) changes; older memories do not
                newest_changed = d - 1 - s   # position of m_{s+1} in [m_d, …, m_0]
                for k in range(d + 1):
                    part, ref = (t[:, k * chunk:(k + 1) * chunk] for t in (mem[d], base_mem[d]))
                    assert torch.equal(part, ref) != (k <= newest_changed), (s, d, k)
        # The hook took effect: the decoder of the perturbed segment predicts something else.
        assert not torch.allclose(out.preds[s], base_out.preds[s])


@pytest.mark.parametrize("did, cross_blocks", [("every", [True, True, True]),
                                                ("first", [True, False, False]),
                                                ("off", [False, False, False])])
def test_did_placement_decides_which_decoder_blocks_cross_attend(did, cross_blocks):
    model = SegmentedAutoencoder(TEST, did=did, decoder_depth=3)
    for dec in model.decoders:
        assert [isinstance(b, CrossBlock) for b in dec.blocks] == cross_blocks
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("decoder_embed0.") for n in names) == (did != "off")
    assert any(n.startswith("norm_low.") for n in names) == (did != "off")
    out = model(_images(2), generator=_gen())
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------- 4. masking
def _small_model(kind: str):
    torch.manual_seed(0)
    if kind == "mae":
        return MaskedAutoencoder(TEST, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                 norm_pix_loss=True)
    return SegmentedAutoencoder(TEST)


def _pred_layers(model):
    if isinstance(model, MaskedAutoencoder):
        return [model.decoder_pred]
    return [dec.pred for dec in model.decoders]


@pytest.mark.parametrize("kind", ["mae", "mirl"])
def test_loss_ignores_predictions_and_targets_at_visible_patches(kind):
    model = _small_model(kind)
    imgs = _images(3, seed=7)
    with torch.no_grad():
        base = model(imgs, generator=_gen(21))
    mask = base.batch.mask                                # [N, L], fixed by the seed
    pred_noise = 10 * torch.randn(mask.shape + (8 * 8 * 3,), generator=_gen(5))
    target_noise = 10 * torch.randn(mask.shape + (8 * 8 * 3,), generator=_gen(6))

    def run(where: torch.Tensor):
        """Add noise to every decoder's prediction and to the target, at patches ``where``."""
        sel = where.unsqueeze(-1)
        handles = [layer.register_forward_hook(
            lambda mod, args, out: out + F.pad(pred_noise * sel, (0, 0, 1, 0)))   # cls row untouched
            for layer in _pred_layers(model)]
        prepare = model.prepare

        def noisy_prepare(x, generator=None):
            batch = prepare(x, generator)
            batch.target.patches = batch.target.patches + target_noise * sel
            return batch
        model.prepare = noisy_prepare
        try:
            with torch.no_grad():
                return model(imgs, generator=_gen(21))
        finally:
            del model.prepare
            for h in handles:
                h.remove()

    at_visible = run(1 - mask)
    assert torch.equal(at_visible.batch.mask, mask)
    torch.testing.assert_close(at_visible.loss, base.loss, rtol=0, atol=1e-6)
    one_masked = torch.zeros_like(mask)
    one_masked[0, mask[0].nonzero()[0]] = 1
    assert not torch.allclose(run(one_masked).loss, base.loss, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mae", "mirl"])
def test_encoder_never_sees_masked_patches(kind):
    model = _small_model(kind)
    imgs = _images(2, seed=8)
    with torch.no_grad():
        base = model(imgs, generator=_gen(22))
    pix = base.batch.mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 8, 4, 8).reshape(imgs.shape)
    changed = imgs + 3 * pix * torch.randn(imgs.shape, generator=_gen(9))
    with torch.no_grad():
        out = model(changed, generator=_gen(22))
        visible_changed = model(imgs + 3 * (1 - pix), generator=_gen(22))
    for p, q in zip(out.preds, base.preds):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.loss, base.loss)          # the target did change
    assert not torch.allclose(visible_changed.preds[0], base.preds[0], atol=1e-3)


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.9])
def test_exactly_int_L_times_one_minus_ratio_tokens_are_visible_per_sample(ratio):
    model = SegmentedAutoencoder(DEEP, mask_ratio=ratio)
    length = DEEP.num_patches
    keep = int(length * (1 - ratio))
    seen = {}
    h = model.encoder.blocks[0].register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("tokens", args[0].shape[1]))
    with torch.no_grad():
        out = model(_images(4, seed=9), generator=_gen(3))
    h.remove()
    mask = out.batch.mask
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [length - keep] * 4
    assert seen["tokens"] == 1 + keep                      # cls + visible tokens only
    for n in range(4):   # the kept indices are exactly the unmasked patches
        assert sorted(out.batch.ids_keep[n].tolist()) == (mask[n] == 0).nonzero().flatten().tolist()


def test_masks_differ_between_samples_and_follow_the_generator():
    model = SegmentedAutoencoder(TEST)
    imgs = _images(8, seed=10)
    mask_a = model.prepare(imgs, _gen(1)).mask
    assert len({tuple(m.tolist()) for m in mask_a}) == 8
    assert torch.equal(model.prepare(imgs, _gen(1)).mask, mask_a)
    assert not torch.equal(model.prepare(imgs, _gen(2)).mask, mask_a)


# --------------------------------------------------------------------------- 5. gradients
BASE = ["model.preset=vit_test", "model.decoder_depth=2"]
MAE_DECODER = ["objective.mae_decoder_dim=32", "objective.mae_decoder_depth=2",
               "objective.mae_decoder_heads=2"]
GRADIENT_CASES = {
    "mirl_did_every": ["objective.name=mirl", "objective.did=every"],
    "mirl_did_first": ["objective.name=mirl", "objective.did=first"],
    "mirl_did_off": ["objective.name=mirl", "objective.did=off"],
    "mirl_weight_norm_off": ["objective.name=mirl", "objective.weight_norm_pred=false"],
    "mirl_alternative_loss": ["objective.name=mirl", "objective.alternative_loss_omega=0.1"],
    "mae": ["objective.name=mae", *MAE_DECODER],
    "multi_decoder": ["objective.name=multi_decoder"],
    "coarse_to_fine": ["objective.name=coarse_to_fine"],
    "fine_to_coarse": ["objective.name=fine_to_coarse"],
    "mirl_feature_loss": ["objective.name=mirl", "objective.feature_loss.enabled=true"],
    "mae_feature_loss": ["objective.name=mae", *MAE_DECODER, "objective.feature_loss.enabled=true"],
}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(case):
    torch.manual_seed(0)
    model = build_pretrain_model(_cfg(*BASE, *GRADIENT_CASES[case]))
    out = model(_images(4, seed=11), generator=_gen(4))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing, bad, zero = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all():
            bad.append(name)
        elif not p.grad.abs().sum() > 0:
            zero.append(name)
    assert not missing, f"trainable parameters without a gradient: {missing}"
    assert not bad, f"non-finite gradients: {bad}"
    assert not zero, f"all-zero gradients: {zero}"


def _feature_loss_model(name: str):
    extra = MAE_DECODER if name == "mae" else []
    torch.manual_seed(0)
    return build_pretrain_model(_cfg(*BASE, f"objective.name={name}", *extra,
                                     "objective.feature_loss.enabled=true",
                                     "objective.feature_loss.momentum=0.9"))


@pytest.mark.parametrize("name", ["mirl", "mae"])
def test_feature_loss_momentum_encoder_is_not_trainable(name):
    model = _feature_loss_model(name)
    trainable = [n for n, p in model.momentum_encoder.named_parameters() if p.requires_grad]
    assert not trainable, f"momentum encoder parameters left trainable: {trainable[:3]} ..."


@pytest.mark.parametrize("name", ["mirl", "mae"])
def test_feature_loss_momentum_encoder_moves_only_by_ema(name):
    model = _feature_loss_model(name)
    ema = model.momentum_encoder.module
    before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(_images(4, seed=12), generator=_gen(5)).loss.backward()
    opt.step()
    model.after_optimizer_step()
    online = dict(model.encoder.named_parameters())
    moved = 0
    for n, p in ema.named_parameters():
        expected = 0.9 * before[n] + 0.1 * online[n].detach()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(p, before[n])
    assert moved > 0


def test_did_off_as_written_in_yaml_builds_decoders_without_cross_attention(tmp_path):
    """``off`` is the documented value (schema: every | first | off); YAML 1.1 reads a bare
    ``off`` as the boolean False, so the config loader must still take it as the string."""
    from_cli = _cfg(*BASE, "objective.did=off")
    path = tmp_path / "did_off.yaml"
    path.write_text("model:\n  preset: vit_test\nobjective:\n  did: off\n")
    from_yaml = load_config(path)
    for cfg in (from_cli, from_yaml):
        assert cfg.objective.did == "off"
        model = build_pretrain_model(cfg)
        assert not any(isinstance(b, CrossBlock) for dec in model.decoders for b in dec.blocks)


@pytest.mark.parametrize("name", ["mirl", "mae"])
def test_frozen_sincos_position_embeddings_stay_fixed_while_weights_train(name):
    extra = MAE_DECODER if name == "mae" else []
    torch.manual_seed(0)
    model = build_pretrain_model(_cfg(*BASE, f"objective.name={name}", *extra))
    frozen = {"encoder.pos_embed": model.encoder.pos_embed, "decoder_pos_embed": model.decoder_pos_embed}
    grid = TEST.img_size // TEST.patch_size
    for key, p in frozen.items():
        assert not p.requires_grad, key
        dim = p.shape[-1]
        assert torch.allclose(p[0].double(), torch.from_numpy(_mae_sincos_2d(dim, grid)), atol=1e-6), key
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model(_images(4, seed=13), generator=_gen(6)).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    unchanged = [n for n, p in after.items() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"trainable weights that did not move: {unchanged}"


# --------------------------------------------------------------------------- 6. timm export
def test_exported_encoder_loads_strictly_into_timm_vit_base_and_gives_same_features():
    torch.manual_seed(0)
    model = SegmentedAutoencoder(PRESETS["vit_base"])
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224), generator=_gen(1))
        for p in model.encoder.parameters():   # move every weight (LayerNorms too) off its init
            p.add_(0.02 * torch.randn(p.shape))
    state = model.encoder.state_dict()
    with torch.device("meta"):   # timm's own (slow) init is overwritten by the load anyway
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vit.load_state_dict(state, strict=True, assign=True)   # strict keys, shapes checked too
    assert not any(t.is_meta for t in vit.state_dict().values())
    model.encoder.eval()
    vit.eval()
    img = torch.randn(1, 3, 224, 224, generator=_gen(2))
    with torch.no_grad():
        ours = model.encoder.forward_features(img)
        theirs = vit.forward_features(img)
    assert theirs.shape == (1, 197, 768)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 7. coarse / fine
def _gaussian_blur_by_hand(imgs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Full 2-D Gaussian kernel (radius round(3σ)), reflect padding, one depthwise conv."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k2 = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    k2 = (k2 / k2.sum()).to(imgs.dtype)
    c = imgs.shape[1]
    padded = F.pad(imgs, (radius,) * 4, mode="reflect")
    return F.conv2d(padded, k2.expand(c, 1, -1, -1), groups=c)


def _coarse_fine_by_hand(imgs, patch, sigma):
    full = _patchify_by_hand(imgs, patch)
    mean = full.mean(-1, keepdim=True)
    std = torch.sqrt(((full - mean) ** 2).sum(-1, keepdim=True) / (full.shape[-1] - 1) + 1e-6)
    coarse = _patchify_by_hand(_gaussian_blur_by_hand(imgs, sigma), patch)
    return (coarse - mean) / std, (full - coarse) / std


def test_coarse_and_fine_targets_are_a_gaussian_split_summing_to_the_normalised_target():
    imgs = _images(2, seed=14)
    coarse, fine = coarse_fine_targets(imgs, 4, sigma=2.0)
    torch.testing.assert_close(coarse + fine, _normalise_by_hand(_patchify_by_hand(imgs, 4)),
                               rtol=1e-5, atol=1e-5)
    coarse_ref, fine_ref = _coarse_fine_by_hand(imgs, 4, 2.0)
    torch.testing.assert_close(coarse, coarse_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fine, fine_ref, rtol=1e-4, atol=1e-4)
    # Low-pass: the coarse component varies much less within a patch than the fine one.
    assert coarse.var(dim=-1).mean() < 0.5 * fine.var(dim=-1).mean()


@pytest.mark.parametrize("objective, shallow_gets_coarse", [("coarse_to_fine", True),
                                                            ("fine_to_coarse", False)])
def test_coarse_fine_objectives_assign_components_to_shallow_and_deep_halves(objective,
                                                                             shallow_gets_coarse):
    torch.manual_seed(0)
    model = SegmentedAutoencoder(DEEP, objective=objective)   # G = 6: decoders 1-3 vs 4-6
    imgs = _images(2, seed=15)
    with torch.no_grad():
        out = model(imgs, generator=_gen(16))
    coarse, fine = _coarse_fine_by_hand(imgs, 4, model.coarse_sigma)
    shallow, deep = (coarse, fine) if shallow_gets_coarse else (fine, coarse)
    mask = out.batch.mask
    expected = {}
    for g in range(6):
        expected[f"decoder_{g + 1}"] = _masked_mean_mse(out.preds[g], shallow if g < 3 else deep, mask)
    assert sorted(out.terms) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, sum(expected.values()) / 6, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- 8. zoom-in, truncation
ZOOM = [*BASE, "objective.degradation.kind=zoom_in", "objective.degradation.view_size=48"]


@pytest.mark.parametrize("name", ["mae", "mirl"])
def test_zoom_in_input_is_centre_crop_and_target_weights_split_centre_and_border(name):
    extra = MAE_DECODER if name == "mae" else []
    torch.manual_seed(0)
    model = build_pretrain_model(_cfg(*ZOOM, f"objective.name={name}", *extra))
    view = _images(3, size=48, seed=17)
    out = model(view, generator=_gen(18))
    assert torch.isfinite(out.loss)
    assert torch.equal(out.batch.inputs, view[:, :, 8:40, 8:40])      # the centre 32 of 48
    w = out.batch.target.weights.reshape(3, 6, 6)                       # view grid 6 x 6
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    centre_mask = out.batch.mask.reshape(3, 4, 4)
    inner = w[:, 1:5, 1:5]
    n_masked = centre_mask.sum()
    torch.testing.assert_close(inner, 0.8 * centre_mask / n_masked)    # masked centre: 0.8 total
    border = w.clone()
    border[:, 1:5, 1:5] = 0
    n_border = 3 * (36 - 16)
    ring = torch.ones(6, 6)
    ring[1:5, 1:5] = 0
    torch.testing.assert_close(border, 0.2 * ring.expand(3, -1, -1) / n_border)
    # The target is the whole (per-patch normalised) view, not only its centre.
    torch.testing.assert_close(out.batch.target.patches, _normalise_by_hand(_patchify_by_hand(view, 8)),
                               rtol=1e-5, atol=1e-5)


def test_zoom_in_projection_is_linear_so_mirl_pairs_stay_exact():
    model = build_pretrain_model(_cfg(*ZOOM, "objective.name=mirl"))
    out = model(_images(2, size=48, seed=19), generator=_gen(20))
    t = out.batch.target
    a, b = out.preds[0].detach(), out.preds[1].detach()
    assert t.project(a).shape == (2, 36, 8 * 8 * 3)
    torch.testing.assert_close(t.project(a + b), t.project(a) + t.project(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, depth", [
    (["model.preset=vit_tiny_deep", "objective.name=mirl", "objective.pretrain_depth=6"], 6),
    (["model.preset=vit_test", "objective.name=mae", *MAE_DECODER, "objective.pretrain_depth=2"], 2),
])
def test_truncated_pretraining_builds_only_the_first_k_blocks(overrides, depth):
    model = build_pretrain_model(_cfg(*overrides))
    assert len(model.encoder.blocks) == depth
    block_ids = {int(k.split(".")[1]) for k in model.encoder.state_dict() if k.startswith("blocks.")}
    assert block_ids == set(range(depth))
    if isinstance(model, SegmentedAutoencoder):
        assert model.segment_bounds == [(i, i + 1) for i in range(6)]   # G = 6 over 6 blocks
    out = model(_images(2, seed=21), generator=_gen(1))
    assert torch.isfinite(out.loss)


def test_truncated_depth_not_divisible_by_segments_is_refused():
    with pytest.raises(ConfigError, match="pretrain_depth"):
        _cfg("model.preset=vit_tiny_deep", "objective.name=mirl", "objective.pretrain_depth=4")
