"""Shard into a real S3 server (SeaweedFS), then stream the shards back with 2 loader workers."""
import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from mirl_ds.data.manifest import load_manifest
from mirl_ds.data.synthetic import SyntheticSpec, generate_synthetic_imagefolder
from mirl_ds.data.sharding import shard_dataset
from mirl_ds.data.stream import StreamingLoader


def source_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "train").rglob("*.JPEG")}


def test_shard_to_s3_then_stream_back_with_two_workers(tmp_path, s3_server):
    bucket = s3_server.bucket("roundtrip")
    root = tmp_path / "synthetic"
    generate_synthetic_imagefolder(root, SyntheticSpec(num_classes=4, train_per_class=12,
                                                       val_per_class=1, image_size=16))
    dest = f"s3://{bucket}/synthetic/train"
    shard_dataset(root / "train", dest, max_count=10, workers=2, progress=False)

    manifest = load_manifest(f"{dest}/train.manifest.json")
    assert manifest.total_samples == 48 and len(manifest.shards) == 5
    assert all(s.url.startswith(f"{dest}/train-") for s in manifest.shards)

    loader = StreamingLoader(manifest, batch_size=4, num_workers=2, seed=1)
    keys, images = [], []
    for batch in loader:
        keys += batch["keys"]
        images.append(batch["images"])
    assert len(keys) == len(set(keys)) == loader.epoch_steps * 4 == 48
    assert loader.skipped.get("decode_error", 0) == 0
    # Every streamed image decodes to the same pixels as its source file.
    originals = {Path(k).stem: v for k, v in source_bytes(root).items()}
    first = images[0][0]
    matches = [k for k, data in originals.items()
               if (Image.open(io.BytesIO(data)).convert("RGB").tobytes()
                   == first.permute(1, 2, 0).contiguous().numpy().tobytes())]
    assert matches, "the first streamed image matches no source image"


def test_shard_command_reports_a_missing_source_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mirl_ds", "shard", str(tmp_path / "nope"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert str(tmp_path / "nope") in result.stderr and "Traceback" not in result.stderr
