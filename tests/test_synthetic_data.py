"""Tests for the embedded synthetic ImageFolder dataset (mirl_ds.data.synthetic)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirl_ds.data.synthetic import (
    MIRRORS,
    SHAPES,
    TEXTURES,
    SyntheticSpec,
    class_names,
    generate_synthetic_imagefolder,
    render_image,
)

# Big enough that accuracy estimates are tight (8 classes x 32 val images: the
# standard error of an accuracy near chance is ~0.02), small enough to stay ~1-2 s.
SPEC = SyntheticSpec(num_classes=8, train_per_class=64, val_per_class=32, image_size=64, seed=0)
TINY = SyntheticSpec(num_classes=3, train_per_class=4, val_per_class=2, image_size=32, seed=0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    summary = generate_synthetic_imagefolder(root, SPEC)
    return root, summary


@pytest.fixture(scope="module")
def arrays(tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images float32 [N,H,W,3] as read back from the JPEGs, labels [N])."""
    root, _ = tree
    names = class_names(SPEC.num_classes)
    out = {}
    for split in ("train", "val"):
        xs, ys = [], []
        for ci, name in enumerate(names):
            for f in sorted((root / split / name).glob("*.JPEG")):
                xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))
                ys.append(ci)
        out[split] = (np.stack(xs), np.asarray(ys))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _nearest_class_mean_accuracy(f_tr, y_tr, f_va, y_va, num_classes) -> float:
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_va = (f_tr - mu) / sd, (f_va - mu) / sd
    centroids = np.stack([f_tr[y_tr == c].mean(0) for c in range(num_classes)])
    pred = ((f_va[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y_va).mean())


def _structural_features(x: np.ndarray) -> np.ndarray:
    """Colour-free, translation/rotation-tolerant descriptors of shape and texture."""
    g = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-3)
    gy, gx = np.gradient(g, axis=(1, 2))
    mag = np.hypot(gx, gy)
    theta2 = 2.0 * np.arctan2(gy, gx)
    # How much edge there is (textures add many internal edges).
    mag_hist = np.stack([np.histogram(m, bins=np.linspace(0.0, 3.0, 13))[0] for m in mag]) / mag[0].size
    # Rotation-invariant orientation structure: harmonics of the edge-orientation
    # distribution (square/cross edges are 90 deg apart, triangle 60 deg, disc none).
    w = mag**2
    harm = [np.hypot((w * np.cos(k * theta2)).sum((1, 2)), (w * np.sin(k * theta2)).sum((1, 2))) for k in range(1, 7)]
    harm = np.stack(harm, 1) / w.sum((1, 2))[:, None]
    # Translation/rotation-invariant spectrum: radially binned power (texture period).
    n = g.shape[1]
    f = np.fft.fftfreq(n) * n
    radius = np.hypot(f[None, :], f[:, None]).astype(int).ravel()
    power = np.abs(np.fft.fft2(g)) ** 2
    radial = np.stack([np.bincount(radius, weights=p.ravel())[: n // 2 + 1] for p in power])
    return np.concatenate([mag_hist, harm, np.log(radial + 1e-3)], 1)


# ----------------------------------------------------------------------------- naming


def test_class_names_are_sorted_shape_texture_pairs_in_fixed_order():
    names8 = class_names(8)
    assert names8 == sorted(names8) and len(set(names8)) == 8
    # Default 8 classes = 4 shapes x 2 textures.
    assert {n.split("_")[0] for n in names8} == set(SHAPES)
    assert {n.split("_")[1] for n in names8} == set(TEXTURES[:2])
    assert "disc_stripes" in names8
    # Growing num_classes only adds classes (fixed combination order), up to 16.
    assert set(class_names(5)) < set(names8) < set(class_names(16))
    assert len(set(class_names(16))) == 16
    with pytest.raises(ValueError):
        class_names(17)


def test_render_image_shape_dtype_and_determinism():
    a = render_image(3, np.random.default_rng(7), 48, 8)
    b = render_image(3, np.random.default_rng(7), 48, 8)
    c = render_image(3, np.random.default_rng(8), 48, 8)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------- layout


def test_layout_matches_torchvision_imagefolder(tree):
    from torchvision.datasets import ImageFolder

    root, summary = tree
    names = class_names(SPEC.num_classes)
    classes_json = json.loads((root / "classes.json").read_text())
    assert classes_json == {str(i): n for i, n in enumerate(names)}
    assert summary["classes"] == names
    assert summary["counts"] == {"train": 8 * 64, "val": 8 * 32}

    for split, per_class in (("train", SPEC.train_per_class), ("val", SPEC.val_per_class)):
        ds = ImageFolder(str(root / split))
        assert len(ds.classes) == SPEC.num_classes
        assert ds.classes == names
        # class_to_idx agrees with classes.json (index -> name).
        assert {str(i): n for n, i in ds.class_to_idx.items()} == classes_json
        assert np.bincount(ds.targets, minlength=SPEC.num_classes).tolist() == [per_class] * SPEC.num_classes
        for path, target in ds.samples[:: max(1, len(ds) // 20)]:
            p = Path(path)
            assert p.parent.name == classes_json[str(target)]
            assert re.fullmatch(rf"{split}_{p.parent.name}_\d{{5}}\.JPEG", p.name)
            with Image.open(p) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
        img, target = ds[0]
        assert img.size == (64, 64) and target == 0


# ----------------------------------------------------------------------------- determinism


def test_same_spec_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    a = _files(Path(generate_synthetic_imagefolder(tmp_path / "a", TINY)["root"]))
    # Different directory and a different worker count: still byte-identical.
    b = _files(Path(generate_synthetic_imagefolder(tmp_path / "b", TINY, workers=3)["root"]))
    assert a.keys() == b.keys()
    assert len([k for k in a if k.endswith(".JPEG")]) == 3 * (4 + 2)
    assert all(a[k] == b[k] for k in a)

    other = SyntheticSpec(**{**TINY.__dict__, "seed": 1})
    c = _files(Path(generate_synthetic_imagefolder(tmp_path / "c", other)["root"]))
    jpegs = [k for k in a if k.endswith(".JPEG")]
    assert sorted(k for k in c if k.endswith(".JPEG")) == sorted(jpegs)
    assert all(a[k] != c[k] for k in jpegs)


# ----------------------------------------------------------------------------- content


def test_classes_separable_by_shape_texture_not_by_mean_colour(arrays):
    x_tr, y_tr = arrays["train"]
    x_va, y_va = arrays["val"]
    k = SPEC.num_classes
    chance = 1.0 / k

    # Mean colour alone: nearest-class-mean is near chance ...
    acc_colour = _nearest_class_mean_accuracy(x_tr.mean((1, 2)), y_tr, x_va.mean((1, 2)), y_va, k)
    assert acc_colour < 2.0 * chance, f"mean colour predicts the class: {acc_colour:.3f}"
    # ... because class-conditional mean colours are close compared with their spread.
    m = x_tr.mean((1, 2))
    class_means = np.stack([m[y_tr == c].mean(0) for c in range(k)])
    assert np.abs(class_means - m.mean(0)).max() < 0.5 * m.std(0).min()

    # Shape/texture descriptors (colour-free): the same classifier clearly beats chance.
    acc_struct = _nearest_class_mean_accuracy(
        _structural_features(x_tr), y_tr, _structural_features(x_va), y_va, k
    )
    assert acc_struct > 3.0 * chance, f"shape/texture does not identify the class: {acc_struct:.3f}"


def test_images_vary_within_a_class(arrays):
    x, y = arrays["train"]
    overall = x.std(0).mean()  # per-pixel std across all images
    assert overall > 30.0
    for c in range(SPEC.num_classes):
        xc = x[y == c]
        within = xc.std(0).mean()  # per-pixel std across images of one class
        # Colour / position / background vary about as much within a class as overall.
        assert within > 0.8 * overall, (c, within, overall)
        flat = xc.reshape(len(xc), -1)
        assert len(np.unique(flat, axis=0)) == len(xc)  # no duplicates


# ----------------------------------------------------------------------------- reuse


def test_rerun_on_complete_tree_is_noop(tmp_path):
    root = tmp_path / "d"
    assert generate_synthetic_imagefolder(root, TINY)["generated"] is True
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    summary = generate_synthetic_imagefolder(root, SyntheticSpec(**TINY.__dict__))
    assert summary["generated"] is False
    assert summary["counts"] == {"train": 12, "val": 6}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_different_spec_on_same_root_raises_with_root_in_message(tmp_path):
    root = tmp_path / "d"
    generate_synthetic_imagefolder(root, TINY)
    before = _files(root)
    for change in ({"seed": 1}, {"num_classes": 4}, {"image_size": 48}, {"val_per_class": 3}):
        with pytest.raises(ValueError, match=re.escape(str(root))):
            generate_synthetic_imagefolder(root, SyntheticSpec(**{**TINY.__dict__, **change}))
    assert _files(root) == before  # nothing was touched


def test_interrupted_tree_is_completed_to_identical_bytes(tmp_path):
    ref = _files(Path(generate_synthetic_imagefolder(tmp_path / "ref", TINY)["root"]))
    root = tmp_path / "d"
    generate_synthetic_imagefolder(root, TINY)
    # Simulate an interrupted run: spec.json (written last) missing, a file truncated,
    # one missing, and a leftover image that this spec would not write.
    (root / "spec.json").unlink()
    first = sorted((root / "train").rglob("*.JPEG"))
    first[0].write_bytes(b"")
    first[1].unlink()
    stray_dir = first[2].parent
    (stray_dir / f"train_{stray_dir.name}_00099.JPEG").write_bytes(b"x")
    assert generate_synthetic_imagefolder(root, TINY)["generated"] is True
    assert _files(root) == ref


def test_foreign_directory_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "imagenet"
    (root / "train" / "n01440764").mkdir(parents=True)
    (root / "train" / "n01440764" / "a.JPEG").write_bytes(b"real data")
    with pytest.raises(ValueError, match=re.escape(str(root))):
        generate_synthetic_imagefolder(root, TINY)
    assert (root / "train" / "n01440764" / "a.JPEG").read_bytes() == b"real data"
    assert sorted(p.name for p in root.iterdir()) == ["train"]


# ----------------------------------------------------------------------------- README


def test_readme_says_synthetic_and_how_generated(tree):
    root, _ = tree
    text = (root / "README.txt").read_text()
    assert "SYNTHETIC" in text and "NOT ImageNet" in text
    assert f"seed: {SPEC.seed}" in text
    assert f"{SPEC.train_per_class} per class" in text and f"{SPEC.val_per_class} per class" in text
    for name in class_names(SPEC.num_classes):
        assert name in text
    spec_json = json.loads((root / "spec.json").read_text())
    expected = {k: v for k, v in SPEC.__dict__.items() if k != "layout"}
    assert {k: spec_json[k] for k in expected} == expected
    assert "layout" not in spec_json  # the default layout: trees written before layouts existed stay valid


# ----------------------------------------------------------------------------- mirror layout


def _mirror_errors(img: np.ndarray) -> dict[str, float]:
    """Mean absolute difference of an image and each of its mirror images (JPEG leaves a few levels)."""
    return {"leftright": float(np.abs(img - img[:, ::-1]).mean()),
            "topbottom": float(np.abs(img - img[::-1]).mean()),
            "point": float(np.abs(img - img[::-1, ::-1]).mean())}


@pytest.mark.parametrize("size", [32, 33])
def test_mirror_layout_labels_each_image_with_its_symmetry(tmp_path, size):
    spec = SyntheticSpec(num_classes=4, train_per_class=6, val_per_class=2, image_size=size, layout="mirror")
    root = Path(generate_synthetic_imagefolder(tmp_path / "m", spec)["root"])
    assert class_names(4, "mirror") == sorted(f"mirror_{m}" for m in MIRRORS)
    assert json.loads((root / "classes.json").read_text()) == {str(i): n for i, n in enumerate(class_names(4, "mirror"))}
    assert sorted(p.name for p in (root / "train").iterdir()) == class_names(4, "mirror")
    for name in class_names(4, "mirror"):
        for f in sorted((root / "train" / name).glob("*.JPEG")):
            errors = _mirror_errors(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))
            own = name[len("mirror_"):]
            for kind, err in errors.items():
                if kind == own:
                    assert err < 6, (f.name, errors)
                else:
                    assert err > 15, (f.name, errors)
    assert json.loads((root / "spec.json").read_text())["layout"] == "mirror"
    assert "layout: mirror" in (root / "README.txt").read_text()


def test_a_tree_of_one_layout_is_not_reused_for_another(tmp_path):
    root = tmp_path / "d"
    generate_synthetic_imagefolder(root, SyntheticSpec(num_classes=3, train_per_class=2, val_per_class=1,
                                                       image_size=32, layout="mirror"))
    with pytest.raises(ValueError, match=re.escape(str(root))):
        generate_synthetic_imagefolder(root, SyntheticSpec(num_classes=3, train_per_class=2, val_per_class=1,
                                                           image_size=32))


def test_mirror_layout_has_four_classes_and_unknown_layouts_are_named():
    with pytest.raises(ValueError, match=r"num_classes must be in \[1, 4\] for layout mirror"):
        SyntheticSpec(num_classes=5, layout="mirror").validate()
    with pytest.raises(ValueError, match="layout must be one of objects, mirror, got 'stripes'"):
        SyntheticSpec(layout="stripes").validate()
