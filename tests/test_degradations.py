"""Beyond-Masking input degradations: each test name states the property it protects."""
import colorsys

import pytest
import torch
import torch.nn.functional as F

from mirl_ds.models.degradations import (
    KINDS,
    Degradation,
    centre_crop,
    decolorize,
    depthwise_blur,
    fisheye,
    noisy_box_kernels,
    random_kernel_blur,
    sample_blur_sizes,
    sample_fisheye,
    sample_saturation,
    sample_zoom_out,
    zoom_out,
)

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=gen(seed))


# ------------------------------------------------------------------------------ centre crop

def test_centre_crop_is_the_exact_centre_slice():
    x = images(2, 40)
    out = centre_crop(x, 32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out, x[:, :, 4:36, 4:36])


@pytest.mark.parametrize("size, match", [(48, "between 1 and"), (31, "odd")])
def test_centre_crop_rejects_oversized_or_off_centre_sizes(size, match):
    with pytest.raises(ValueError, match=match):
        centre_crop(images(1, 40), size)


# ------------------------------------------------------------------------------ zoom-out

def test_zoom_out_places_the_antialiased_resize_exactly():
    x = images(3, 32)
    sizes, top, left = torch.tensor([8, 16, 8]), torch.tensor([0, 5, 24]), torch.tensor([3, 16, 1])
    out = zoom_out(x, sizes, top, left)
    assert out.shape == x.shape
    for n in range(3):
        s, t, l = int(sizes[n]), int(top[n]), int(left[n])
        ref = F.interpolate(x[n:n + 1], size=(s, s), mode="bilinear", align_corners=False,
                            antialias=True)[0]
        torch.testing.assert_close(out[n, :, t:t + s, l:l + s], ref, rtol=0, atol=1e-6)


def test_zoom_out_border_is_the_mirror_image():
    x = images(2, 32)
    sizes, top, left = torch.tensor([10, 12]), torch.tensor([7, 15]), torch.tensor([13, 4])
    out = zoom_out(x, sizes, top, left)
    for n in range(2):
        s, t, l = int(sizes[n]), int(top[n]), int(left[n])
        c = out[n]
        b, r = t + s, l + s  # first row / column past the placed square
        for k in range(min(t, s)):  # above: row t-1-k mirrors row t+k
            assert torch.equal(c[:, t - 1 - k, :], c[:, t + k, :])
        for k in range(min(32 - b, s)):  # below: row b+k mirrors row b-1-k
            assert torch.equal(c[:, b + k, :], c[:, b - 1 - k, :])
        for k in range(min(l, s)):  # left
            assert torch.equal(c[:, :, l - 1 - k], c[:, :, l + k])
        for k in range(min(32 - r, s)):  # right
            assert torch.equal(c[:, :, r + k], c[:, :, r - 1 - k])


def test_zoom_out_mirror_repeats_with_period_twice_the_size_to_fill_any_canvas():
    x = images(1, 32)
    s = 4
    out = zoom_out(x, torch.tensor([s]), torch.tensor([13]), torch.tensor([2]))[0]
    # Far from the square, where a single reflection would run out, the pattern repeats.
    assert torch.equal(out[:, : 32 - 2 * s, :], out[:, 2 * s:, :])
    assert torch.equal(out[:, :, : 32 - 2 * s], out[:, :, 2 * s:])


def test_zoom_out_rejects_squares_outside_the_canvas():
    x = images(2, 32)
    with pytest.raises(ValueError, match="inside the 32x32 canvas"):
        zoom_out(x, torch.tensor([16, 16]), torch.tensor([0, 17]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="inside the 32x32 canvas"):
        zoom_out(x, torch.tensor([16, 16]), torch.tensor([0, 0]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="between 1 and min"):
        zoom_out(x, torch.tensor([40, 16]), torch.tensor([0, 0]), torch.tensor([0, 0]))


def test_sample_zoom_out_draws_per_sample_sizes_and_positions_inside_the_canvas():
    sizes, top, left = sample_zoom_out(64, 32, 24, sizes=(8, 12, 16), generator=gen(1))
    assert sizes.dtype == top.dtype == left.dtype == torch.long
    assert set(sizes.tolist()) == {8, 12, 16}
    assert len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1
    assert (top >= 0).all() and (top + sizes <= 32).all()
    assert (left >= 0).all() and (left + sizes <= 24).all()
    fixed, _, _ = sample_zoom_out(8, 32, 32, sizes=16, generator=gen(1))
    assert (fixed == 16).all()


# ------------------------------------------------------------------------------ fisheye

def test_fisheye_with_zero_twist_is_identity():
    x = images(3, 32)
    centres, _ = sample_fisheye(3, generator=gen(2))
    out = fisheye(x, centres, torch.zeros(3))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_fisheye_changes_image_but_keeps_centre_pixel_fixed():
    x = images(2, 32)
    rows, cols = torch.tensor([10, 25]), torch.tensor([20, 6])
    # Normalised (x, y) of those pixel centres under align_corners=False.
    centres = torch.stack([(2 * cols + 1) / 32 - 1, (2 * rows + 1) / 32 - 1], dim=1).float()
    out = fisheye(x, centres, torch.full((2,), 0.25))
    assert (out - x).abs().mean() > 0.05
    for n in range(2):
        torch.testing.assert_close(out[n, :, rows[n], cols[n]], x[n, :, rows[n], cols[n]],
                                   rtol=0, atol=1e-5)


def test_sample_fisheye_draws_different_centres_per_sample_within_range():
    centres, twist = sample_fisheye(8, twist_range=(0.2, 0.25), generator=gen(3))
    assert centres.shape == (8, 2) and twist.shape == (8,)
    assert len(set(map(tuple, centres.tolist()))) == 8
    assert (centres.abs() <= 1).all()
    assert ((twist >= 0.2) & (twist <= 0.25)).all() and len(set(twist.tolist())) == 8


# ------------------------------------------------------------------------------ blur

def test_blur_kernel_size_one_is_identity():
    x = images(3, 16)
    out = random_kernel_blur(x, torch.ones(3, dtype=torch.long), generator=gen(4))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_blur_keeps_constant_image_constant_including_borders():
    x = torch.full((3, 3, 16, 16), 0.7)
    out = random_kernel_blur(x, torch.tensor([3, 5, 9]), noise_std=0.5, generator=gen(5))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_blur_draws_a_fresh_kernel_per_image_and_per_channel():
    grey = images(1, 16)[:, :1].expand(1, 3, 16, 16)
    x = torch.cat([grey, grey])  # the same image twice, with three equal channels
    out = random_kernel_blur(x, torch.tensor([5, 5]), generator=gen(6))
    assert (out[0] - out[1]).abs().max() > 1e-3  # different images, different kernels
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-3  # different channels, different kernels


def test_blur_kernels_are_centred_noisy_boxes_of_each_samples_size_summing_to_one():
    k = noisy_box_kernels(torch.tensor([1, 3, 7]), channels=3, generator=gen(7))
    assert k.shape == (3, 3, 7, 7)
    torch.testing.assert_close(k.sum(dim=(-2, -1)), torch.ones(3, 3))
    for n, size in enumerate((1, 3, 7)):
        lo, hi = 3 - size // 2, 3 + size // 2 + 1
        inner = k[n, :, lo:hi, lo:hi]
        assert (inner > 0).all()  # |1 + 0.5 eps| is almost surely nonzero
        assert k[n].sum() == pytest.approx(inner.sum().item())  # nothing outside the support


def test_blur_mixed_kernel_sizes_in_one_batch_match_per_image_convolution():
    x = images(3, 16)
    sizes = torch.tensor([3, 1, 9])
    out = random_kernel_blur(x, sizes, generator=gen(8))
    kernels = noisy_box_kernels(sizes, 3, generator=gen(8))  # the same draw
    for n, size in enumerate(sizes.tolist()):
        lo, p = 4 - size // 2, size // 2
        w = kernels[n, :, lo:lo + size, lo:lo + size].reshape(3, 1, size, size)
        xn = F.pad(x[n:n + 1], (p, p, p, p), mode="reflect") if p else x[n:n + 1]
        ref = F.conv2d(xn, w, groups=3)
        torch.testing.assert_close(out[n:n + 1], ref, rtol=0, atol=1e-5)
    assert torch.equal(depthwise_blur(x, kernels), out)


def test_blur_rejects_even_kernel_sizes():
    with pytest.raises(ValueError, match="odd"):
        random_kernel_blur(images(2, 16), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="odd"):
        sample_blur_sizes(4, (5, 6))


def test_sample_blur_sizes_fixed_or_uniform_over_options():
    assert sample_blur_sizes(5, 9, generator=gen(9)).tolist() == [9] * 5
    drawn = sample_blur_sizes(64, (5, 7, 9, 11), generator=gen(9))
    assert drawn.dtype == torch.long and set(drawn.tolist()) == {5, 7, 9, 11}


# ------------------------------------------------------------------------------ de-colorise

def test_decolorize_factor_zero_gives_equal_channels():
    out = decolorize(images(2, 8), torch.zeros(2))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_decolorize_factor_one_is_identity():
    x = images(2, 8)
    torch.testing.assert_close(decolorize(x, torch.ones(2)), x, rtol=0, atol=1e-7)


def test_decolorize_matches_colorsys_hsv_round_trip():
    x = images(2, 6, seed=10).double()
    f = torch.tensor([0.3, 0.6], dtype=torch.float64)
    out = decolorize(x, f)
    for n in range(2):
        for i in range(6):
            for j in range(6):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                ref = colorsys.hsv_to_rgb(h, s * float(f[n]), v)
                assert out[n, :, i, j].tolist() == pytest.approx(ref, abs=1e-12)


def test_sample_saturation_draws_from_the_choices_per_sample():
    f = sample_saturation(64, generator=gen(11))
    assert f.shape == (64,)
    assert set(round(v, 6) for v in f.tolist()) == {0.0, 0.3, 0.6}


def test_degradation_decolorize_on_normalised_tensors_gives_grey_pixels():
    pixels = images(3, 16)
    module = Degradation("decolorize", input_size=16, saturations=(0.0,))
    out = module((pixels - MEAN) / STD, generator=gen(12)) * STD + MEAN
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 1], out[:, 2], rtol=0, atol=1e-6)
    # Grey at the pixel's own brightness V (HSV keeps the value), not at some other level.
    torch.testing.assert_close(out[:, 0], pixels.amax(dim=1), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ module

SMALL = dict(zoom_out_sizes=(8, 12, 16), blur_kernel_sizes=(3, 5), saturations=(0.0, 0.3, 0.6))


def module_input(kind: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = 40 if kind == "zoom_in" else 32
    return (images(n, size, seed) - MEAN) / STD


@pytest.mark.parametrize("kind", KINDS)
def test_degradation_returns_input_size_images(kind):
    out = Degradation(kind, input_size=32, **SMALL)(module_input(kind), generator=gen(0))
    assert out.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_degradation_is_deterministic_given_a_seeded_generator(kind):
    module = Degradation(kind, input_size=32, **SMALL)
    x = module_input(kind)
    assert torch.equal(module(x, generator=gen(13)), module(x, generator=gen(13)))


@pytest.mark.parametrize("kind", ["zoom_out", "fisheye", "blur", "decolorize"])
def test_degradation_draws_different_parameters_per_image(kind):
    module = Degradation(kind, input_size=32, **SMALL)
    x = module_input(kind, n=1).expand(8, 3, 32, 32)  # the same image eight times
    out = module(x, generator=gen(14))
    differs = [(out[n] - out[0]).abs().max() > 1e-4 for n in range(1, 8)]
    assert any(differs)
    # Different seeds give different degradations too (no hidden global state).
    assert not torch.equal(out, module(x, generator=gen(15)))


def test_degradation_none_is_identity_and_module_has_no_parameters_or_state():
    module = Degradation("none", input_size=32)
    x = module_input("none")
    assert torch.equal(module(x), x)
    for kind in KINDS:
        m = Degradation(kind, input_size=32, **SMALL)
        assert list(m.parameters()) == [] and m.state_dict() == {}


def test_degradation_rejects_unknown_kind_naming_the_valid_ones():
    with pytest.raises(ValueError, match="zoom_in, zoom_out, fisheye, blur, decolorize"):
        Degradation("masking", input_size=32)


@pytest.mark.parametrize("kind", ["none", "zoom_out", "fisheye", "blur", "decolorize"])
def test_degradation_rejects_images_not_of_input_size(kind):
    with pytest.raises(ValueError, match="expects 32x32 images"):
        Degradation(kind, input_size=32, **SMALL)(images(2, 40))


def test_degradation_rejects_zoom_out_sizes_larger_than_the_input():
    with pytest.raises(ValueError, match="zoom_out_sizes"):
        Degradation("zoom_out", input_size=32)  # default sizes (96, ...) do not fit 32
