"""The config tree: loading, merging, overrides, and one sentence per configuration error."""
import subprocess
import sys

import pytest

from mirl_ds.config import ConfigError, dump_config, load_config
from mirl_ds.config.loader import shipped_configs


def problems_of(overrides, files=None):
    with pytest.raises(ConfigError) as info:
        load_config(files, overrides)
    return info.value.problems


def test_defaults_and_every_shipped_config_are_valid():
    load_config(None, [])
    for name in shipped_configs():
        load_config([name], [])


def test_default_normalisation_is_timms_imagenet_mean_and_std():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    data = load_config(None, []).data
    assert tuple(data.mean) == IMAGENET_DEFAULT_MEAN and tuple(data.std) == IMAGENET_DEFAULT_STD


def test_dotted_overrides_are_typed_from_yaml():
    cfg = load_config(["demo"], ["objective.mask_ratio=0.6", "optim.betas=[0.9, 0.99]",
                                 "objective.did=off", "model.decoder_dim=64", "optim.epochs=3"])
    assert cfg.objective.mask_ratio == 0.6
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.objective.did == "off"
    assert cfg.model.decoder_dim == 64
    assert isinstance(cfg.optim.epochs, float)  # an int is accepted where a number is declared


def test_misspelt_key_is_rejected_naming_the_nearest_valid_key():
    (problem,) = problems_of(["objective.mask_ratoi=0.5"])
    assert "unknown key 'objective.mask_ratoi'" in problem
    assert "did you mean 'objective.mask_ratio'" in problem


def test_misspelt_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  prest: vit_test\n")
    (problem,) = problems_of([], [str(path)])
    assert str(path) in problem and "'model.preset'" in problem


def test_a_key_written_twice_in_one_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("objective:\n  mask_ratio: 0.5\n  mask_ratio: 0.6\n")
    (problem,) = problems_of([], [str(path)])
    assert "mask_ratio" in problem and "twice" in problem


def test_a_key_set_in_two_merged_files_is_refused(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("objective: {mask_ratio: 0.5}\n")
    b.write_text("objective: {mask_ratio: 0.6}\nseed: 3\n")
    (problem,) = problems_of([], [str(a), str(b)])
    assert "'objective.mask_ratio' is already set in" in problem and str(a) in problem


def test_wrong_value_type_names_key_and_expected_type():
    (problem,) = problems_of(["model.depth=twelve"])
    assert "model.depth" in problem and "expected an integer" in problem


def test_depth_not_divisible_by_segments():
    (problem,) = problems_of(["model.preset=vit_demo", "objective.segments=5",
                              "objective.name=multi_decoder"])
    assert problem.startswith("model depth 12 is not divisible by objective.segments=5")


def test_odd_segment_count_is_refused_for_mirl_pairing():
    problems = problems_of(["model.preset=vit_demo", "objective.segments=3"])
    assert any("objective.segments=3 is odd" in p and "G-g+1" in p for p in problems)


def test_odd_segment_count_is_fine_for_the_multi_decoder_ablation():
    load_config(None, ["model.preset=vit_demo", "objective.segments=3", "objective.name=multi_decoder"])


def test_decoder_widths_that_differ_between_segments():
    (problem,) = problems_of(["model.preset=vit_demo", "model.decoder_dim=[128, 128, 64, 128]"])
    assert "model.decoder_dim=[128, 128, 64, 128] differs between segments" in problem


def test_mask_ratio_leaving_no_visible_token():
    (problem,) = problems_of(["model.preset=vit_test", "objective.mask_ratio=0.95"])
    assert problem.startswith("objective.mask_ratio=0.95 leaves 0 of 16 tokens visible")


def test_mirl_refuses_unnormalised_targets():
    (problem,) = problems_of(["objective.norm_pix_loss=false"])
    assert "always per-patch normalised" in problem


def test_truncated_depth_must_divide_into_segments():
    (problem,) = problems_of(["model.preset=vit_demo", "objective.pretrain_depth=6"])
    assert "objective.pretrain_depth 6 is not divisible by objective.segments=4" in problem


def test_perceptual_loss_without_weights_file_is_refused(tmp_path):
    (problem,) = problems_of(["objective.perceptual_loss.enabled=true",
                              f"objective.perceptual_loss.weights_path={tmp_path}/vgg.pth"])
    assert f"{tmp_path}/vgg.pth does not exist" in problem


def test_zoom_in_view_must_extend_the_input_by_whole_patches():
    (problem,) = problems_of(["model.preset=vit_test", "objective.degradation.kind=zoom_in",
                              "objective.degradation.view_size=40"])
    assert "objective.degradation.view_size=40" in problem


def test_crop_scales_must_be_an_area_range_within_the_image():
    (problem,) = problems_of(["finetune.crop_scale=[0.5]"])
    assert problem.startswith("finetune.crop_scale=[0.5] must be [low, high]")
    (problem,) = problems_of(["data.crop_scale=[0.9, 0.2]"])
    assert problem.startswith("data.crop_scale=[0.9, 0.2] must be [low, high]")


def test_synthetic_layout_is_checked_with_the_config():
    (problem,) = problems_of(["data.synthetic.layout=stripes"])
    assert problem == "data.synthetic: layout must be one of objects, mirror, got 'stripes'"


def test_unknown_preset_lists_the_presets():
    (problem,) = problems_of(["model.preset=vit_huge"])
    assert "vit_huge" in problem and "vit_b48" in problem


def test_every_problem_is_reported_at_once():
    problems = problems_of(["model.preset=vit_demo", "objective.segments=5", "optim.schedule=linear"])
    assert len(problems) == 3  # depth % G, odd G, schedule


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(["demo"], ["objective.segments=2", "model.decoder_dim=[64, 64]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config([str(path)], []) == cfg


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mirl_ds", *args], capture_output=True, text=True)


def test_check_config_prints_the_resolved_config():
    result = run_cli("check-config", "demo", "objective.mask_ratio=0.5")
    assert result.returncode == 0, result.stderr
    assert "mask_ratio: 0.5" in result.stdout


def test_check_config_reports_errors_as_sentences_with_nonzero_exit():
    result = run_cli("check-config", "demo", "objective.segments=3", "model.deptth=4")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), result.stderr
    assert any("did you mean 'model.depth'" in line for line in lines)
    # The misspelt key does not hide the other problem: both are named in one run.
    assert any("objective.segments=3 is odd" in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_writes_the_resolved_config(tmp_path):
    out = tmp_path / "resolved.yaml"
    result = run_cli("check-config", "demo", "--write", str(out))
    assert result.returncode == 0, result.stderr
    assert load_config([str(out)], []) == load_config(["demo"], [])


def test_checking_a_config_does_not_import_torch_or_timm():
    # check-config runs on login nodes and before every launch: it must not pay ~5 s for torch.
    code = ("import sys; from mirl_ds.cli import main; rc = main(['check-config', 'demo', "
            "'objective.degradation.kind=blur', 'objective.did=first']); "
            "print(rc, sorted(m for m in ('torch', 'timm', 'deepspeed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 []"


def test_bench_subcommands_list_their_own_options():
    result = run_cli("bench", "infer", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mirl-ds bench infer") and "--presets" in result.stdout
    result = run_cli("bench", "nope")
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr


def test_exponent_numbers_without_a_dot_are_numbers():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.eps=1e-08", "objective.mask_ratio=5e-1"])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.objective.mask_ratio) == (1e-3, 1e-8, 0.5)
