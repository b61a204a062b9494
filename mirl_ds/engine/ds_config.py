"""The YAML run config and a DeepSpeed JSON config reconciled in one place.

The YAML owns what the model and the schedule depend on (micro batch, gradient clipping,
pipeline stages, optimizer, LR schedule); the JSON owns how DeepSpeed runs it (ZeRO stage,
precision, communication knobs). ``resolve_ds_config`` fills what the JSON leaves open from the
YAML and refuses every contradiction with one sentence, so a mismatch is found at launch time
and not as an assertion inside ``deepspeed.initialize`` on every rank.
"""
import copy
import importlib.util
import os
import json
from pathlib import Path

from ..config.loader import ConfigError
from ..config.schema import RunConfig
from ..config.validate import encoder_spec

# The project logs itself (mirl_ds.log); DeepSpeed's own per-step print would duplicate it.
QUIET_STEPS_PER_PRINT = 1_000_000_000
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
PIPELINE_ZERO_STAGES = (0, 1)     # DeepSpeed's PipelineEngine refuses ZeRO-2/3 partitioning
PIPELINE_JSON = "ds_configs/pipeline_zero1_bf16.json"


class DsConfigError(ConfigError):
    """A DeepSpeed JSON that contradicts the run config (or itself): one sentence per problem.

    A ``ConfigError`` (hence a ``ValueError``) so the CLI prints each problem as one line."""


def load_ds_json(path: str | Path) -> dict:
    """The JSON file as a dict; a missing file, bad syntax or a key written twice is one sentence."""
    path = Path(path)
    if not path.is_file():
        raise DsConfigError([f"DeepSpeed config {path} does not exist; pass one of the files in "
                             f"ds_configs/ (e.g. ds_configs/cpu_test.json)"])
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_refuse_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise DsConfigError([f"{path}: not valid JSON at line {e.lineno} column {e.colno} "
                             f"({e.msg}); fix the syntax"]) from None
    if not isinstance(data, dict):
        raise DsConfigError([f"{path}: the top level must be a JSON object, got {type(data).__name__}"])
    return data


def _refuse_duplicate_keys(path: Path):
    # json keeps the last of two equal keys silently; DeepSpeed's hjson loader refuses them, so
    # refuse here too rather than validate a different dict from the one the ranks will read.
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise DsConfigError([f"{path}: key {key!r} is set twice in one object; keep one"])
            seen[key] = value
        return seen
    return hook


def segments_of(cfg: RunConfig) -> int:
    """G, the number of MIRL segments (MAE is one segment: the whole encoder, one decoder)."""
    return 1 if cfg.objective.name == "mae" else encoder_spec(cfg).segments


def resolve_ds_config(cfg: RunConfig, ds_json: dict | str | Path, world_size: int,
                      ds_path_for_messages: str | None = None,
                      accelerator: str | None = None) -> dict:
    """The DeepSpeed dict to hand ``deepspeed.initialize``: ``ds_json`` (a dict or a path) with
    batch sizes, gradient clipping and ``steps_per_print`` filled from ``cfg``.

    ``accelerator`` is DeepSpeed's accelerator name (``cpu``, ``cuda``…); None asks DeepSpeed.
    Raises ``DsConfigError`` listing every contradiction, one sentence each."""
    if isinstance(ds_json, (str, Path)):
        ds_path_for_messages = ds_path_for_messages or str(ds_json)
        ds_json = load_ds_json(ds_json)
    where = ds_path_for_messages or "the DeepSpeed config"
    ds = copy.deepcopy(ds_json)       # the caller's dict stays as written (it may be logged)
    problems: list[str] = []

    dp = _parallel_problems(cfg, ds, world_size, where, problems)
    if dp is not None:
        _resolve_batch(cfg, ds, dp, where, problems)
    _zero_problems(cfg, ds, where, problems)
    _precision_problems(ds, where, accelerator, problems)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(f"{where} has a {section!r} section: remove it: mirl_ds builds AdamW "
                            f"and the schedule from optim.* in the YAML")
    _resolve_clipping(cfg, ds, where, problems)
    _resolve_monitors(cfg, ds, where, problems)
    if problems:
        raise DsConfigError(problems)
    ds.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    return ds


def _parallel_problems(cfg, ds, world_size, where, problems) -> int | None:
    """Check pipeline stages against the world size, G and the JSON; the data-parallel degree."""
    pp, g = cfg.parallel.pipeline_stages, segments_of(cfg)
    if world_size < 1:
        problems.append(f"world size {world_size} must be at least 1; check --hostfile/--num_gpus")
        return None
    if pp < 1:
        problems.append(f"parallel.pipeline_stages={pp} must be at least 1 (1 = no pipeline)")
        return None
    pipe = ds.get("pipeline") if isinstance(ds.get("pipeline"), dict) else {}
    if "stages" in pipe and pipe["stages"] not in ("auto", pp):
        problems.append(f"{where} sets pipeline.stages={pipe['stages']!r}, but the YAML sets "
                        f"parallel.pipeline_stages={pp}: remove pipeline.stages from the JSON "
                        f"(the YAML decides)")
    interval = pipe.get("activation_checkpoint_interval")
    if interval not in (None, "auto") and bool(interval) != cfg.parallel.activation_checkpointing:
        problems.append(f"{where} sets pipeline.activation_checkpoint_interval={interval!r}, but the "
                        f"YAML sets parallel.activation_checkpointing="
                        f"{str(cfg.parallel.activation_checkpointing).lower()}: remove the key from "
                        f"the JSON (the YAML decides)")
    ok = True
    if g % pp:
        # A stage boundary inside a segment would split an encoder segment from its decoder.
        what = ("objective.name=mae has a single segment" if cfg.objective.name == "mae"
                else f"the {g} MIRL segments (objective.segments)")
        divisors = [d for d in range(1, g + 1) if g % d == 0]
        problems.append(f"parallel.pipeline_stages={pp} must divide {what}: use {_either(divisors)}")
        ok = False
    if world_size % pp:
        problems.append(f"world size {world_size} is not a multiple of parallel.pipeline_stages="
                        f"{pp}: launch a multiple of {pp} ranks or change parallel.pipeline_stages")
        ok = False
    return world_size // pp if ok else None


def _positive_int_or_auto(ds, key, where, problems):
    value = ds.get(key, "auto")
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{where} sets {key}={value!r}: use a positive integer or \"auto\"")
        return None
    return value


def _resolve_batch(cfg, ds, dp, where, problems):
    """Fill the three batch keys so train_batch_size == micro × grad_accum × dp."""
    micro = cfg.data.micro_batch_size
    n_before = len(problems)
    json_micro, accum, total = (_positive_int_or_auto(ds, k, where, problems) for k in BATCH_KEYS)
    if len(problems) > n_before:
        return
    if json_micro is not None and json_micro != micro:
        problems.append(f"{where} sets train_micro_batch_size_per_gpu={json_micro}, but the YAML "
                        f"sets data.micro_batch_size={micro}: set it to \"auto\" or remove it "
                        f"(the YAML decides)")
        return
    per_step = micro * dp     # samples in one micro step over all data-parallel ranks
    if accum is not None and total is not None:
        if total != per_step * accum:
            problems.append(f"{where} sets train_batch_size={total}, but data.micro_batch_size "
                            f"{micro} × gradient_accumulation_steps {accum} × {dp} data-parallel "
                            f"ranks = {per_step * accum}: set train_batch_size to "
                            f"{per_step * accum} or \"auto\"")
            return
    elif total is not None:
        if total % per_step:
            problems.append(f"{where} sets train_batch_size={total}, which is not a multiple of "
                            f"data.micro_batch_size {micro} × {dp} data-parallel ranks = {per_step}: "
                            f"use a multiple of {per_step} or \"auto\"")
            return
        accum = total // per_step
    else:
        accum = accum or 1
        total = per_step * accum
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              train_batch_size=total)


def _zero_problems(cfg, ds, where, problems):
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"{where} sets zero_optimization={zero!r}: it must be an object "
                        f"such as {{\"stage\": 1}}")
        return
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        problems.append(f"{where} sets zero_optimization.stage={stage!r}: use 0, 1, 2 or 3")
    elif cfg.parallel.pipeline_stages > 1 and stage not in PIPELINE_ZERO_STAGES:
        problems.append(f"{where} sets zero_optimization.stage={stage}, but DeepSpeed pipelines "
                        f"support ZeRO stage 0 or 1 only: use {PIPELINE_JSON} or "
                        f"parallel.pipeline_stages: 1")


def _enabled(ds, section, where, problems) -> bool:
    sub = ds.get(section, {})
    value = sub.get("enabled", False) if isinstance(sub, dict) else sub
    if not isinstance(value, bool):
        problems.append(f"{where} sets {section}.enabled={value!r}: use true or false")
        return False
    return value


def _precision_problems(ds, where, accelerator, problems):
    bf16, fp16 = _enabled(ds, "bf16", where, problems), _enabled(ds, "fp16", where, problems)
    if bf16 and fp16:
        problems.append(f"{where} enables both bf16.enabled and fp16.enabled: keep one "
                        f"(bf16 needs no loss scaling)")
    elif fp16 and _accelerator_name(accelerator) == "cpu":
        problems.append(f"{where} sets fp16.enabled=true, but fp16 is not supported by "
                        f"DeepSpeed's CPU accelerator: use bf16")


def _accelerator_name(accelerator: str | None) -> str:
    if accelerator is not None:
        return accelerator
    # Imported only when needed: deepspeed takes seconds to import and probes the hardware.
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def _resolve_clipping(cfg, ds, where, problems):
    clip, json_clip = cfg.optim.grad_clip, ds.get("gradient_clipping")
    if json_clip is None:
        if clip is not None:
            ds["gradient_clipping"] = clip
        return
    if clip is None and json_clip == 0:
        return                      # 0 is DeepSpeed's "off", the same as an unset optim.grad_clip
    if clip is None or json_clip != clip:
        yaml_value = "unset" if clip is None else f"optim.grad_clip={clip}"
        problems.append(f"{where} sets gradient_clipping={json_clip!r}, but the YAML has "
                        f"{yaml_value}: remove gradient_clipping from the JSON and set "
                        f"optim.grad_clip in the YAML (the YAML decides)")


def _resolve_monitors(cfg, ds, where, problems):
    """DeepSpeed's monitor (CSV, TensorBoard) from ``logging.csv`` / ``logging.tensorboard``,
    writing under ``<run_dir>/monitor/pretrain``."""
    for section, key in (("csv_monitor", "csv"), ("tensorboard", "tensorboard")):
        if section in ds:
            problems.append(f"{where} has a {section!r} section: remove it and set logging.{key} in the YAML "
                            f"(the YAML decides; the files go to logging.run_dir/monitor)")
            continue
        on = getattr(cfg.logging, key)
        if on and key == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            problems.append("logging.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                            "or set logging.tensorboard=false (logging.csv writes the same scalars as CSV)")
            continue
        ds[section] = {"enabled": on, "output_path": os.path.join(cfg.logging.run_dir, "monitor"),
                       "job_name": "pretrain"}


def _either(values: list[int]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
