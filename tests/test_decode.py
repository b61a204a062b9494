"""Tests for the JPEG-draft sample decoders (mirl_ds.data.decode), the timm fine-tuning wrappers
(mirl_ds.data.finetune_transforms) and the data benchmark's smoke path (mirl_ds.bench.data_bench)."""
from __future__ import annotations

import dataclasses
import io
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision import transforms as T

from mirl_ds.data.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImage,
    EvalDecoder,
    PretrainDecoder,
    normalize_batch,
    pick_draft_scale,
    rows_to_decode,
    sample_crop,
    sequential_frame,
)


# -- fixtures -------------------------------------------------------------------------------

def smooth_array(width: int, height: int) -> np.ndarray:
    """A smooth RGB test pattern (low-frequency sines and ramps)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / width * 2 * np.pi * 1.5) * np.cos(y / height * np.pi)
    g = 128 + 100 * np.cos(x / width * np.pi + y / height * 2 * np.pi)
    b = 127 * x / width + 127 * y / height
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return jpeg_bytes(Image.fromarray(smooth_array(1600, 1200)))


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    return jpeg_bytes(Image.fromarray(smooth_array(500, 375)))


class DraftSpy:
    """Records every JpegImageFile.draft call: requested size and the size it set."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
        original = JpegImagePlugin.JpegImageFile.draft
        spy = self

        def draft(img, mode, size):
            answer = original(img, mode, size)
            spy.calls.append((size, img.size))
            return answer

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)


# -- JPEG draft: used when the crop allows it, never when it would lose resolution -----------

def test_full_image_crop_of_1600x1200_is_decoded_at_quarter_size(big_jpeg, monkeypatch):
    spy = DraftSpy(monkeypatch)
    # The whole 1600x1200 image as the crop: 1200 / 4 = 300 >= 224 but 1200 / 8 < 224.
    dec = PretrainDecoder(224, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), seed=0)
    out = dec(big_jpeg)
    assert dec.last_params == (0, 0, 1200, 1600)
    assert dec.last_draft_scale == 4
    assert spy.calls and spy.calls[-1][1] == (400, 300)  # libjpeg really decoded 400x300
    assert out.shape == (3, 224, 224)


def test_small_output_from_large_crop_uses_eighth_size_draft(big_jpeg, monkeypatch):
    spy = DraftSpy(monkeypatch)
    dec = PretrainDecoder(64, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), seed=0)
    dec(big_jpeg)
    assert dec.last_draft_scale == 8
    assert spy.calls[-1][1] == (200, 150)


def test_small_crop_is_decoded_at_full_resolution(big_jpeg, monkeypatch):
    spy = DraftSpy(monkeypatch)
    # 2 % of 1600x1200 is about 196x196 pixels: smaller than 224, drafting would lose pixels.
    dec = PretrainDecoder(224, scale=(0.02, 0.02), ratio=(1.0, 1.0), seed=0)
    dec(big_jpeg)
    _, _, h, w = dec.last_params
    assert max(h, w) < 2 * 224
    assert dec.last_draft_scale == 1
    assert spy.calls == []  # draft not even asked for


def test_draft_disabled_decodes_full_resolution(big_jpeg, monkeypatch):
    spy = DraftSpy(monkeypatch)
    dec = PretrainDecoder(64, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), seed=0, draft=False)
    dec(big_jpeg)
    assert dec.last_draft_scale == 1 and spy.calls == []


def test_chosen_draft_scale_is_the_largest_that_keeps_size_pixels_per_side(big_jpeg):
    size = 112
    dec = PretrainDecoder(size, seed=3)
    seen = set()
    for _ in range(60):
        dec(big_jpeg)
        _, _, h, w = dec.last_params
        s = dec.last_draft_scale
        seen.add(s)
        assert w / s >= size and h / s >= size, (w, h, s)          # never loses resolution
        assert s == 8 or w / (2 * s) < size or h / (2 * s) < size  # and is the largest such
    assert len(seen) >= 2  # the test exercised more than one factor


@pytest.mark.parametrize("crop,out,expected", [
    ((1600, 1200), 224, 4), ((448, 448), 224, 2), ((447, 900), 224, 1), ((2000, 2000), 64, 8),
    ((100, 100), 224, 1), ((900, 900), 224, 4),
])
def test_pick_draft_scale_table(crop, out, expected):
    assert pick_draft_scale(crop[0], crop[1], out, out) == expected


# -- output, determinism, crop distribution --------------------------------------------------

def test_output_is_contiguous_uint8_chw_of_requested_size(small_jpeg):
    out = PretrainDecoder(224, seed=0)(small_jpeg)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224) and out.is_contiguous()
    rect = PretrainDecoder((96, 128), seed=0)(small_jpeg)
    assert rect.shape == (3, 96, 128)
    for backend in ("torch", "pil"):
        o = PretrainDecoder(64, seed=0, backend=backend)(small_jpeg)
        assert o.dtype == torch.uint8 and o.shape == (3, 64, 64)


def test_same_seed_gives_identical_stream_and_reseed_restarts_it(big_jpeg):
    a, b = PretrainDecoder(64, seed=7), PretrainDecoder(64, seed=7)
    first = [a(big_jpeg) for _ in range(5)]
    assert all(torch.equal(x, b(big_jpeg)) for x in first)
    other = PretrainDecoder(64, seed=8)
    assert not all(torch.equal(x, other(big_jpeg)) for x in first)
    a.reseed(7)
    assert all(torch.equal(x, a(big_jpeg)) for x in first)
    # worker-style seeds: a tuple is accepted and deterministic, and distinct tuples differ
    a.reseed((0, 1, 2))
    b.reseed((0, 1, 2))
    params_a = [(a(big_jpeg), a.last_params)[1] for _ in range(5)]
    params_b = [(b(big_jpeg), b.last_params)[1] for _ in range(5)]
    assert params_a == params_b
    b.reseed((0, 1, 3))
    assert [(b(big_jpeg), b.last_params)[1] for _ in range(5)] != params_a


def test_decoder_survives_pickling_with_its_stream_position(small_jpeg):
    # DataLoader workers receive a pickled copy of the decoder.
    a = PretrainDecoder(32, seed=5)
    a(small_jpeg)
    b = pickle.loads(pickle.dumps(a))
    assert torch.equal(a(small_jpeg), b(small_jpeg))


class TorchDraws:
    """Draws exactly the numbers torchvision's RandomResizedCrop.get_params draws."""

    def uniform(self, a, b):
        return torch.empty(1).uniform_(a, b).item()

    def randint(self, a, b):
        return int(torch.randint(a, b + 1, size=(1,)).item())


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (1600, 1200), (224, 224),
                                          (1000, 90), (90, 1000), (33, 31)])
def test_sample_crop_reproduces_torchvision_get_params(width, height):
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    dummy = torch.empty(3, height, width)
    torch.manual_seed(123)
    expected = [T.RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(300)]
    torch.manual_seed(123)
    got = [sample_crop(width, height, scale, ratio, TorchDraws()) for _ in range(300)]
    assert got == expected


def test_crop_area_and_aspect_respect_scale_and_ratio_bounds():
    rng = random.Random(0)
    width, height = 500, 375
    fractions = []
    for _ in range(3000):
        i, j, h, w = sample_crop(width, height, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= i and i + h <= height and 0 <= j and j + w <= width
        frac = h * w / (width * height)
        fractions.append(frac)
        # rounding w and h to whole pixels moves area and aspect by less than a pixel's worth
        assert 0.2 - 0.01 <= frac <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    fractions = np.array(fractions)
    assert fractions.min() < 0.25 and fractions.max() > 0.9  # the whole range is used
    # large boxes with extreme aspects do not fit and are redrawn: the median is below 0.6
    assert 0.4 < np.median(fractions) < 0.6


def test_decoder_uses_sample_crop_on_full_resolution_size(big_jpeg):
    dec = PretrainDecoder(64, seed=11)
    rng = random.Random(11)
    for _ in range(10):
        dec(big_jpeg)
        expected = sample_crop(1600, 1200, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        rng.random()  # the flip draw
        assert dec.last_params == expected


def test_flip_mirrors_the_same_crop(big_jpeg):
    flipped = 0
    for seed in range(20):
        # The flip is drawn after the crop, so both decoders' first crops are the same.
        with_flip = PretrainDecoder(64, seed=seed)
        no_flip = PretrainDecoder(64, seed=seed, hflip=False)
        a, b = with_flip(big_jpeg), no_flip(big_jpeg)
        assert with_flip.last_params == no_flip.last_params and not no_flip.last_flip
        if with_flip.last_flip:
            flipped += 1
            assert torch.equal(a, b.flip(-1)) and not torch.equal(a, b)
        else:
            assert torch.equal(a, b)
    assert 3 <= flipped <= 17  # about half


@pytest.mark.parametrize("size", [224, 112, 64])
def test_draft_output_is_close_to_full_resolution_output(big_jpeg, size):
    drafted, plain = PretrainDecoder(size, seed=1), PretrainDecoder(size, seed=1, draft=False)
    used = set()
    for _ in range(12):
        a, b = drafted(big_jpeg).float(), plain(big_jpeg).float()
        assert drafted.last_params == plain.last_params
        used.add(drafted.last_draft_scale)
        assert (a - b).abs().mean() < 1.5  # grey levels out of 255
    assert used != {1}


def test_torch_backend_matches_pil_bicubic_resize(big_jpeg):
    a = PretrainDecoder(112, seed=9, draft=False)
    b = PretrainDecoder(112, seed=9, draft=False, backend="pil")
    for _ in range(6):
        x, y = a(big_jpeg).int(), b(big_jpeg).int()
        assert (x - y).abs().float().mean() < 0.1 and (x - y).abs().max() <= 3


def test_plain_path_equals_torchvision_crop_then_resize(small_jpeg):
    dec = PretrainDecoder(96, seed=0, draft=False, hflip=False, backend="pil")
    out = dec(small_jpeg)
    i, j, h, w = dec.last_params
    img = Image.open(io.BytesIO(small_jpeg)).convert("RGB")
    ref = T.PILToTensor()(T.functional.resized_crop(
        img, i, j, h, w, [96, 96], interpolation=T.InterpolationMode.BICUBIC))
    assert (out.int() - ref.int()).abs().max() <= 1


# -- partial decode: only the rows down to the crop ------------------------------------------

def noisy_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Texture on a ramp: every 8x8 block and chroma row differs, so any row that is decoded
    differently from a full decode shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 120, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 128, (height, width, 3)).astype(np.float32)
    return (noise + ramp).astype(np.uint8)


def frame_height_set_to(data: bytes, rows: int) -> bytes:
    frame = sequential_frame(data)
    return bytes(data[:frame.height_at]) + rows.to_bytes(2, "big") + data[frame.height_at + 2:]


# Each sampling kind libjpeg upsamples differently; restart markers put RSTn markers into the
# part of the scan a partial decode skims over.
JPEG_KINDS = {
    "4:2:0": dict(subsampling=2), "4:2:2": dict(subsampling=1), "4:4:4": dict(subsampling=0),
    "4:2:0 restart markers": dict(subsampling=2, restart_marker_rows=1),
    "4:4:4 restart markers": dict(subsampling=0, restart_marker_blocks=5),
}


def kind_jpeg(kind: str, width: int = 203, height: int = 157) -> bytes:
    if kind == "grey":
        return jpeg_bytes(Image.fromarray(noisy_array(width, height)[..., 0]), quality=90)
    buf = io.BytesIO()
    Image.fromarray(noisy_array(width, height)).save(buf, "JPEG", quality=90, **JPEG_KINDS[kind])
    return buf.getvalue()


def decoded(data: bytes, scale: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        w, h = img.size
        img.draft(img.mode, (w // scale, h // scale))
    return np.asarray(img)


def test_sequential_frame_reads_the_frame_header():
    frame = sequential_frame(kind_jpeg("4:2:0"))
    assert (frame.width, frame.height, frame.components, frame.max_v) == (203, 157, 3, 2)
    assert sequential_frame(kind_jpeg("4:2:2")).max_v == 1
    assert sequential_frame(kind_jpeg("4:4:4")).max_v == 1
    grey = sequential_frame(kind_jpeg("grey"))
    assert (grey.components, grey.max_v) == (1, 1)
    data = kind_jpeg("4:2:0")
    assert data[frame.height_at:frame.height_at + 2] == (157).to_bytes(2, "big")


def test_sequential_frame_refuses_what_must_be_decoded_whole(small_jpeg):
    progressive = io.BytesIO()
    Image.fromarray(smooth_array(200, 150)).save(progressive, "JPEG", progressive=True)
    png = io.BytesIO()
    Image.fromarray(smooth_array(20, 15)).save(png, "PNG")
    cmyk = jpeg_bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0)))
    assert sequential_frame(progressive.getvalue()) is None           # several scans
    assert sequential_frame(small_jpeg[: len(small_jpeg) // 2]) is None  # truncated: no EOI
    assert sequential_frame(small_jpeg[:-2]) is None                   # EOI cut off
    assert sequential_frame(png.getvalue()) is None
    assert sequential_frame(cmyk) is None                              # 4 components
    assert sequential_frame(memoryview(small_jpeg)) is None
    for bad in (b"", b"\xff\xd8", b"\xff\xd8\xff\xc0\x00", b"not an image at all"):
        assert sequential_frame(bad) is None
    for odd in (b"\xff\xd8", b"\xff\xd0", b"\xff\x01", b"\xff\xff"):  # SOI, RST0, TEM, fill
        assert sequential_frame(small_jpeg[:2] + odd + small_jpeg[2:]) is None
    # two frame headers: which one PIL believes is not ours to guess
    at = small_jpeg.index(b"\xff\xc0")
    seg_len = int.from_bytes(small_jpeg[at + 2:at + 4], "big")
    sof = small_jpeg[at:at + 2 + seg_len]
    assert sequential_frame(small_jpeg[:at] + sof + small_jpeg[at:]) is None
    assert sequential_frame(small_jpeg) is not None


@pytest.mark.parametrize("kind", [*JPEG_KINDS, "grey"])
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_rows_to_decode_gives_the_rows_of_a_full_decode_for_every_crop_bottom(kind, scale):
    data = kind_jpeg(kind)
    frame = sequential_frame(data)
    full = decoded(data, scale)
    shorter = 0
    for bottom in range(scale, frame.height + 1):
        rows = rows_to_decode(bottom, frame.height, scale, frame.max_v)
        assert bottom < rows or rows == frame.height
        if rows == frame.height:
            continue
        shorter += 1
        part = decoded(frame_height_set_to(data, rows), scale)
        assert part.shape[0] == -(-rows // scale) < full.shape[0]
        need = -(-bottom // scale)  # drafted rows that hold the crop
        assert np.array_equal(part[:need], full[:need]), (kind, scale, bottom)
    assert shorter > frame.height // 2


def test_a_lower_frame_height_with_no_margin_would_differ():
    # Why rows_to_decode keeps rows below the crop: with 4:2:0 chroma, the last row decoded
    # is interpolated from a replicated chroma row instead of the real one below it.
    data = kind_jpeg("4:2:0")
    full = decoded(data, 1)
    differs = [rows for rows in range(16, 150)
               if not np.array_equal(decoded(frame_height_set_to(data, rows), 1), full[:rows])]
    assert differs


@pytest.mark.parametrize("kind", ["4:2:0", "4:2:2", "grey", "4:2:0 restart markers"])
@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_partial_decode_gives_the_same_tensor_as_a_full_decode(kind, backend):
    data = kind_jpeg(kind, 640, 480)
    for size in (224, 64):
        part = PretrainDecoder(size, seed=3, backend=backend)
        whole = PretrainDecoder(size, seed=3, backend=backend, partial=False)
        saved = 0
        for _ in range(15):
            a, b = part(data), whole(data)
            assert part.last_params == whole.last_params
            assert part.last_draft_scale == whole.last_draft_scale
            assert torch.equal(a, b), (kind, backend, size, part.last_params)
            i, _, h, _ = part.last_params
            assert whole.last_rows == 480 and i + h <= part.last_rows <= 480
            saved += part.last_rows < 480
        assert saved >= 5


def test_partial_decode_decodes_only_the_rows_down_to_the_crop(small_jpeg, monkeypatch):
    sizes = []
    original = JpegImagePlugin.JpegImageFile.load

    def load(img):
        sizes.append(img.size)  # what libjpeg is asked to produce
        return original(img)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    dec = PretrainDecoder(224, scale=(0.3, 0.3), seed=0)  # no draft at 224 on 500 x 375
    for _ in range(20):
        dec(small_jpeg)
        i, _, h, _ = dec.last_params
        assert dec.last_rows == rows_to_decode(i + h, 375, 1, 2) == min(i + h + 3, 375)
        assert sizes[-1] == (500, dec.last_rows)
    assert sum(rows < 375 for _, rows in sizes) >= 15


def test_unexpected_reduced_image_falls_back_to_the_full_decode(small_jpeg, monkeypatch):
    import mirl_ds.data.decode as decode

    ref = PretrainDecoder(224, seed=4, partial=False)
    expected = [ref(small_jpeg) for _ in range(6)]
    # PIL does not see the reduced height (here: the header is not changed at all)
    monkeypatch.setattr(decode, "_with_height", lambda data, frame, rows: bytearray(data))
    dec = PretrainDecoder(224, seed=4)
    for want in expected:
        assert torch.equal(dec(small_jpeg), want) and dec.last_rows == 375
    # the reduced copy cannot be opened at all: the original is, and decodes whole
    monkeypatch.setattr(decode, "_with_height", lambda data, frame, rows: b"garbage")
    dec.reseed(4)
    for want in expected:
        assert torch.equal(dec(small_jpeg), want) and dec.last_rows == 375


def test_header_walk_disagreeing_with_pil_is_a_corrupt_image(small_jpeg, monkeypatch):
    import mirl_ds.data.decode as decode

    real = decode.sequential_frame
    monkeypatch.setattr(decode, "sequential_frame",
                        lambda data: dataclasses.replace(real(data), width=499))
    with pytest.raises(CorruptImage, match="frame header"):
        PretrainDecoder(64, scale=(1.0, 1.0), seed=0, hflip=False)(small_jpeg, key="k")


def test_truncated_jpeg_still_fails_when_the_crop_lies_in_what_is_left(small_jpeg):
    # Crops in the top part only: with the file cut below them, a partial decode would have
    # everything it needs -- it must still be refused like any truncated file.
    truncated = small_jpeg[: int(len(small_jpeg) * 0.9)]
    dec = PretrainDecoder(64, scale=(0.2, 0.2), seed=0)
    for _ in range(10):
        with pytest.raises(CorruptImage, match="truncated"):
            dec(truncated)
    assert sequential_frame(truncated) is None


def test_rgbx_view_is_the_decoded_pixels_without_a_copy(small_jpeg):
    import mirl_ds.data.decode as decode

    img = Image.open(io.BytesIO(small_jpeg))
    img.load()
    view = decode._rgbx_view(img)
    assert view is not None and view.shape == (1, 4, 375, 500)
    assert view.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(view[0, :3].permute(1, 2, 0), torch.from_numpy(np.array(img)))
    del img  # the view keeps PIL's memory alive
    assert view[0, :3].float().mean() > 0
    grey = Image.fromarray(smooth_array(40, 30)[..., 0])
    assert decode._rgbx_view(grey) is None  # not RGB: the caller's packed export


def test_output_without_the_in_place_view_is_identical(small_jpeg, monkeypatch):
    import mirl_ds.data.decode as decode

    a = PretrainDecoder(224, seed=2)
    expected = [(a(small_jpeg), a.last_flip) for _ in range(8)]
    assert {flip for _, flip in expected} == {True, False}
    monkeypatch.setattr(decode, "_rgbx_view", lambda img: None)  # e.g. Pillow < 11.2
    b = PretrainDecoder(224, seed=2)
    for want, _ in expected:
        got = b(small_jpeg)
        assert torch.equal(got, want) and got.is_contiguous()


def test_padded_pixel_rows_are_not_viewed_as_contiguous(small_jpeg):
    import mirl_ds.data.decode as decode

    expected = PretrainDecoder(224, seed=6)(small_jpeg)
    alignment = Image.core.get_alignment()
    Image.core.set_alignment(64)  # 500 * 4 bytes a row: padded to 2048
    try:
        img = Image.open(io.BytesIO(small_jpeg))
        img.load()
        view = decode._rgbx_view(img)
        assert view is None or torch.equal(view[0, :3].permute(1, 2, 0),
                                           torch.from_numpy(np.array(img)))
        assert torch.equal(PretrainDecoder(224, seed=6)(small_jpeg), expected)
    finally:
        Image.core.set_alignment(alignment)


def _write_shard(root, samples) -> str:
    """One tar shard of (key, jpg bytes, label) and its manifest (docs/shard-format.md)."""
    import hashlib
    import json

    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / "t-000000.tar")) as w:
        for key, jpg, cls in samples:
            w.write({"__key__": key, "jpg": jpg, "cls": cls})
    blob = (root / "t-000000.tar").read_bytes()
    manifest = {
        "format": "mirl_ds-shards/1", "prefix": "t", "total_samples": len(samples),
        "shards": [{"name": "t-000000.tar", "samples": len(samples), "bytes": len(blob),
                    "sha256": hashlib.sha256(blob).hexdigest(), "first_key": samples[0][0]}],
        "classes": [{"index": 0, "wnid": "n00000000", "name": "c0"}],
        "source": {"kind": "synthetic", "path": "tests", "label_file": None},
        "seed": 0, "max_count": len(samples), "max_bytes": 10**9, "skipped": [],
    }
    (root / "t.manifest.json").write_text(json.dumps(manifest))
    return str(root / "t.manifest.json")


def test_loader_counts_truncated_and_broken_jpegs_with_the_partial_decoder(tmp_path, small_jpeg):
    from mirl_ds.data.stream import SampleDecoder, StreamingLoader

    good = [kind_jpeg("4:2:0", 120, 90), kind_jpeg("4:2:2", 90, 120), small_jpeg]
    bad = {"cut": small_jpeg[: len(small_jpeg) // 3], "cut_eoi": small_jpeg[:-2][:5000],
           "junk": b"\xff\xd8 not a jpeg"}
    samples = [(f"g{k}", good[k % 3], 0) for k in range(9)] + [(k, v, 0) for k, v in bad.items()]
    loader = StreamingLoader(_write_shard(tmp_path, samples), batch_size=4, seed=0,
                             decode=SampleDecoder(PretrainDecoder(32, seed=0)))
    keys = [k for b in loader for k in b["keys"]]
    assert loader.skipped["decode_error"] == 3
    assert not set(bad) & set(keys) and len(keys) == 12


# -- colour modes and corrupt input ----------------------------------------------------------

def test_grayscale_jpeg_decodes_to_three_equal_channels(big_jpeg):
    gray = jpeg_bytes(Image.fromarray(smooth_array(800, 600)).convert("L"))
    for backend in ("torch", "pil"):
        out = PretrainDecoder(64, seed=0, backend=backend)(gray)
        assert out.shape == (3, 64, 64)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        ev = EvalDecoder(64, backend=backend)(gray)
        assert ev.shape == (3, 64, 64) and torch.equal(ev[0], ev[2])


def test_cmyk_jpeg_decodes_to_rgb_colours():
    # Pure red in CMYK: C=0, M=255, Y=255, K=0.
    cmyk = Image.new("CMYK", (400, 300), (0, 255, 255, 0))
    data = jpeg_bytes(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = PretrainDecoder(64, seed=0)(data).float()
    assert out.shape == (3, 64, 64)
    r, g, b = out.mean(dim=(1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("bad", [b"", b"not an image at all", b"\xff\xd8\xff" + b"\x00" * 50])
def test_undecodable_bytes_raise_corrupt_image(bad):
    with pytest.raises(CorruptImage):
        PretrainDecoder(64, seed=0)(bad)
    with pytest.raises(CorruptImage):
        EvalDecoder(64)(bad)


def test_truncated_jpeg_raises_corrupt_image_naming_the_sample(small_jpeg):
    truncated = small_jpeg[: len(small_jpeg) // 2]
    with pytest.raises(CorruptImage) as info:
        PretrainDecoder(64, seed=0)(truncated, key="n01440764_10026")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "n01440764_10026" in msg and f"{len(truncated)} bytes" in msg and "truncated" in msg


# -- batch normalisation ---------------------------------------------------------------------

def test_normalize_batch_equals_totensor_then_normalize(small_jpeg):
    dec = PretrainDecoder(64, seed=0)
    batch = torch.stack([dec(small_jpeg) for _ in range(4)])
    got = normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD)
    ref_tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ref = torch.stack([ref_tf(Image.fromarray(x.permute(1, 2, 0).numpy())) for x in batch])
    assert got.dtype == torch.float32 and got.shape == batch.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    buf = torch.empty(batch.shape)
    assert normalize_batch(batch, out=buf) is buf
    torch.testing.assert_close(buf, ref, rtol=0, atol=1e-5)


def test_normalize_batch_rejects_float_or_misshaped_input():
    with pytest.raises(TypeError):
        normalize_batch(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError):
        normalize_batch(torch.zeros(3, 8, 8, dtype=torch.uint8))


# -- evaluation decoder ----------------------------------------------------------------------

def _torchvision_eval(data: bytes, size: int) -> torch.Tensor:
    tf = T.Compose([T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(size), T.PILToTensor()])
    return tf(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_eval_decoder_matches_torchvision_resize_centre_crop(small_jpeg, backend):
    ref = _torchvision_eval(small_jpeg, 224).int()
    dec = EvalDecoder(224, draft=False, backend=backend)
    out = dec(small_jpeg)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    diff = (out.int() - ref).abs()
    assert diff.float().mean() < 0.05 and diff.max() <= 2


def test_eval_decoder_drafts_large_images_and_stays_close(big_jpeg, monkeypatch):
    spy = DraftSpy(monkeypatch)
    dec = EvalDecoder(224)
    out = dec(big_jpeg)
    assert dec.resize == 256 and dec.last_draft_scale == 4  # 1200 / 4 = 300 >= 256
    assert spy.calls[-1][1] == (400, 300)
    ref = _torchvision_eval(big_jpeg, 224).int()
    assert (out.int() - ref).abs().float().mean() < 1.5


def test_eval_decoder_does_not_draft_when_shorter_side_would_drop_below_resize(small_jpeg):
    dec = EvalDecoder(224)
    dec(small_jpeg)  # 375 / 2 < 256
    assert dec.last_draft_scale == 1


# -- timm fine-tuning pieces -----------------------------------------------------------------

def test_timm_finetune_and_eval_transforms_build_and_run(small_jpeg):
    from mirl_ds.data.finetune_transforms import build_eval_transform, build_finetune_transform

    img = Image.open(io.BytesIO(small_jpeg)).convert("RGB")
    train_tf = build_finetune_transform(64)
    torch.manual_seed(0)
    x = train_tf(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert "RandAugment" in repr(train_tf) and "RandomErasing" in repr(train_tf)
    ev = build_eval_transform(224)(img)
    ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(_torchvision_eval(small_jpeg, 224).float() / 255)
    torch.testing.assert_close(ev, ref, rtol=0, atol=1e-5)


def test_mixup_turns_labels_into_label_smoothed_soft_targets():
    from timm.loss import SoftTargetCrossEntropy

    from mirl_ds.data.finetune_transforms import build_finetune_criterion, build_mixup

    num_classes = 10
    mixup = build_mixup(num_classes=num_classes)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    torch.manual_seed(0)
    np.random.seed(0)
    xm, target = mixup(x.clone(), y)
    assert xm.shape == x.shape and not torch.equal(xm, x)
    assert target.shape == (8, num_classes)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    off = 0.1 / num_classes
    assert target.min() >= off - 1e-6           # smoothing: every class gets some mass
    assert (target.max(1).values < 1 - 0.1 + off + 1e-6).all()  # never a hard one-hot
    # batch mode: target = lam * smooth(y) + (1 - lam) * smooth(flip(y))
    on = 1 - 0.1 + off
    lam = (target[0, y[0]] - off) / (on - off)
    smooth = lambda labels: torch.full((8, num_classes), off).scatter_(  # noqa: E731
        1, labels[:, None], on)
    torch.testing.assert_close(target, lam * smooth(y) + (1 - lam) * smooth(y.flip(0)))
    assert isinstance(build_finetune_criterion(mixup), SoftTargetCrossEntropy)
    assert build_mixup(mixup=0.0, cutmix=0.0, num_classes=10) is None


def test_draft_decoders_for_timm_transforms_pick_safe_factors(big_jpeg):
    from mirl_ds.data.finetune_transforms import eval_decoder, finetune_decoder

    ev = eval_decoder(224)
    x = ev(big_jpeg)
    assert x.shape == (3, 224, 224) and ev.last_draft_scale == 4  # 300 >= 256
    tr = finetune_decoder(224)
    y = tr(big_jpeg)
    assert y.shape == (3, 224, 224)
    # smallest timm crop of 1600x1200: sqrt(0.08 * 1.92e6 * 3/4) ~ 339 px < 2 * 224
    assert tr.last_draft_scale == 1
    huge = jpeg_bytes(Image.fromarray(smooth_array(4000, 3000)), quality=80)
    tr(huge)
    # sqrt(0.08 * 12e6 * 3/4) ~ 849 px: >= 2 * 224, < 4 * 224
    assert tr.last_draft_scale == 2
    with pytest.raises(CorruptImage):
        tr(b"garbage")


# -- benchmark smoke -------------------------------------------------------------------------

def test_data_bench_runs_end_to_end_and_prints_the_table(capsys, tmp_path):
    from mirl_ds.bench import data_bench

    rc = data_bench.main(["--images", "6", "--size", "32", "--extra-sizes", "--repeats", "1",
                          "--batch", "4", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "baseline img/s" in out and "ours img/s" in out
    row = [line for line in out.splitlines() if line.strip().startswith("32 ")]
    assert row, out
    import json
    numbers = json.loads((tmp_path / "bench.json").read_text())
    assert numbers["images"] == 6 and numbers["rows"][0]["ours"] > 0
    assert math.isfinite(numbers["rows"][0]["ratio"])
