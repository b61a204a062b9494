"""One typed configuration tree for every job, loaded from YAML (see ``schema.py``)."""
from .loader import ConfigError, dump_config, load_config
from .schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "dump_config", "load_config"]
