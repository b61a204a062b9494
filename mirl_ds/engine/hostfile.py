"""DeepSpeed hostfiles (``<host> slots=<n>`` per line) and ``--include``/``--exclude`` filters.

DeepSpeed's own parser accepts ``host slots=4junk`` and reports a bad line without its number;
this one is strict and says file:line, so a typo is fixed before ssh-ing into any node. The
filter syntax and its rules (mutually exclusive, hosts and slots must exist) follow
``deepspeed.launcher.runner.parse_resource_filter``, so the world size computed here is the one
the launcher will start.
"""
import re
from pathlib import Path

_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")


class HostfileError(ValueError):
    """A hostfile or a host filter DeepSpeed would misread or refuse: one sentence."""


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Host -> slots, in file order (the order DeepSpeed assigns ranks in)."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist; see hostfiles/README.md")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()      # a comment may also follow an entry
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise HostfileError(f"{path}:{number}: {raw.strip()!r} is not of the form "
                                f"'<host> slots=<n>'")
        host, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise HostfileError(f"{path}:{number}: {raw.strip()!r} has slots={slots}; "
                                f"slots must be a positive integer")
        if host in hosts:
            raise HostfileError(f"{path}:{number}: {raw.strip()!r} lists host {host} a second "
                                f"time; give each host one line")
        hosts[host] = int(slots)
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts; add '<host> slots=<n>' lines")
    return hosts


def total_slots(hosts: dict[str, int]) -> int:
    return sum(hosts.values())


def _parse_filter(text: str, flag: str) -> dict[str, list[int]]:
    """``host1:0,1@host2`` -> {host1: [0, 1], host2: []} (empty = every slot)."""
    spec: dict[str, list[int]] = {}
    for part in text.split("@"):
        host, colon, slots = part.partition(":")
        if not host or (colon and not slots):
            raise HostfileError(f"{flag} {text!r}: {part!r} is not of the form host or "
                                f"host:slot[,slot…] (hosts separated by @)")
        try:
            ids = [int(s) for s in slots.split(",")] if slots else []
        except ValueError:
            raise HostfileError(f"{flag} {text!r}: the slots of {host} must be integers, "
                                f"e.g. {host}:0,1") from None
        spec.setdefault(host, []).extend(ids)
    return spec


def filter_hosts(hosts: dict[str, int], include: str | None = None, exclude: str | None = None,
                 source: str = "the hostfile") -> dict[str, int]:
    """Host -> number of slots used after ``--include`` or ``--exclude`` (DeepSpeed's syntax)."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together; use one")
    text, flag = (include, "--include") if include else (exclude, "--exclude")
    if not text:
        return dict(hosts)
    spec = _parse_filter(text, flag)
    for host, ids in spec.items():
        if host not in hosts:
            raise HostfileError(f"{flag} names host {host}, which is not in {source} "
                                f"({', '.join(hosts)})")
        bad = [i for i in ids if not 0 <= i < hosts[host]]
        if bad:
            raise HostfileError(f"{flag} names slot {bad[0]} on {host}, which has slots "
                                f"0..{hosts[host] - 1} in {source}")
    used = {}
    for host, n in hosts.items():               # file order: DeepSpeed keeps it for rank order
        ids = set(spec.get(host, ()))
        if include:
            count = (len(ids) or n) if host in spec else 0
        else:
            count = 0 if host in spec and not ids else n - len(ids)
        if count:
            used[host] = count
    if not used:
        raise HostfileError(f"{flag} {text!r} leaves no slots to run on")
    return used
