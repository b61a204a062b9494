"""`mirl-ds bench infer`: one row per preset, ratios to the reference measured in the same run."""
import json

import pytest

from mirl_ds.cli import main


def test_infer_bench_reports_one_row_per_preset_with_the_reference_at_ratio_1(tmp_path):
    out = tmp_path / "infer.json"
    assert main(["bench", "infer", "--presets", "vit_test,vit_tiny_deep", "--reference", "vit_test",
                 "--batch", "2", "--rounds", "2", "--extra-rounds", "0", "--warmup", "0",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["preset"]: r for r in data["rows"]}
    assert list(rows) == ["vit_test", "vit_tiny_deep"] and data["reference"] == "vit_test"
    assert rows["vit_test"]["ratio"] == 1.0
    for r in rows.values():
        assert len(r["times_s"]) == 2 and r["best_s"] in r["times_s"] and r["images_per_s"] > 0
        assert r["gflop_per_image"] > 0 and r["params_m"] > 0 and r["paper_v100_ratio"] is None
    # The deeper, wider preset costs more compute per image.
    assert rows["vit_tiny_deep"]["gflop_per_image"] > rows["vit_test"]["gflop_per_image"]


def test_reference_outside_the_presets_is_refused(capsys):
    assert main(["bench", "infer", "--presets", "vit_test", "--reference", "vit_base"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --reference vit_base is not among")
