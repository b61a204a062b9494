"""YAML -> ``RunConfig``: several files merged (a key set twice is refused), ``a.b=c``
overrides, unknown keys rejected with the nearest valid name, every value type-checked, then
validated as a whole. All problems are reported together, one sentence each."""
import dataclasses
import difflib
import tempfile
import re
import types
import typing
from pathlib import Path

import yaml

from .schema import RunConfig
from .validate import validate_config

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """Bad configuration: ``problems`` holds one sentence per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping (yaml keeps the last),
    and reads booleans as YAML 1.2 does: only true/false, so ``did: off`` stays a string."""


_REPLACED_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 floats: ``1e-3`` is a number (YAML 1.1 wants a dot, ``1.0e-3``, and reads it as text).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError([f"{node.start_mark.name}: key {key!r} is set twice in one mapping "
                               f"(line {key_node.start_mark.line + 1}); keep one"])
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a config shipped in mirl_ds/configs (e.g. ``demo``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError([f"config file {name_or_path} does not exist and is not a shipped config "
                       f"({', '.join(shipped_configs())})"])


def read_yaml(path: str | Path) -> dict:
    path = resolve_config_path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e.__class__.__name__} "
                           f"{getattr(e, 'problem_mark', '')}); fix the syntax"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _valid_keys(cls=RunConfig, prefix: str = "") -> dict[str, type]:
    """Every settable dotted key of the schema -> its declared type."""
    keys = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.update(_valid_keys(tp, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = tp
    return keys


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form key.path=value"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _check_type(value, tp, where: str) -> tuple[object, str | None]:
    """Coerce ``value`` to ``tp`` (ints are accepted as floats) or say why not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            if alt is type(None):
                if value is None:
                    return None, None
                continue
            coerced, problem = _check_type(value, alt, where)
            if problem is None:
                return coerced, None
        return value, f"{where}: expected {_type_name(tp)}, got {value!r}"
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return value, f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}"
        out = []
        for i, item in enumerate(value):
            coerced, problem = _check_type(item, item_tp, f"{where}[{i}]")
            if problem:
                return value, problem
            out.append(coerced)
        return out, None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    if tp is int and isinstance(value, bool):
        return value, f"{where}: expected an integer, got {value!r}"
    if isinstance(value, tp):
        return value, None
    return value, f"{where}: expected {_type_name(tp)}, got {value!r}"


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls, flat: dict[str, object], prefix: str = ""):
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, flat, dotted + ".")
        elif dotted in flat:
            kwargs[f.name] = flat[dotted]
    return cls(**kwargs)


def load_config(paths: str | Path | list | None = None, overrides: list[str] | None = None,
                validate: bool = True) -> RunConfig:
    """Merge YAML files and overrides into a validated ``RunConfig``."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for path in paths or []:
        for key, value in _flatten(read_yaml(path)).items():
            if key in origin:
                problems.append(f"{path}: key {key!r} is already set in {origin[key]}; "
                                f"set it in one file only (or override it on the command line)")
            values[key], origin[key] = value, str(path)
    for text in overrides or []:
        key, value = _parse_override(text)
        values[key], origin[key] = value, COMMAND_LINE

    valid = _valid_keys()
    for key in list(values):
        if key not in valid:
            nearest = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else "; see `mirl-ds check-config --show-defaults`"
            problems.append(f"{origin[key]}: unknown key {key!r}{hint}")
            del values[key]
            continue
        values[key], problem = _check_type(values[key], valid[key], f"{origin[key]}: {key}")
        if problem:
            problems.append(problem)
            del values[key]
    # The rest is still checked, keys that could not be read keeping their defaults, so that one
    # run of check-config names every problem rather than one at a time.
    cfg = _build(RunConfig, values)
    if validate:
        problems += validate_config(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_text(text: str, validate: bool = False) -> RunConfig:
    """A config from YAML text written by :func:`dump_config` (e.g. the copy a checkpoint keeps)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config([f.name], validate=validate)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, loadable again by ``load_config``."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=None)
