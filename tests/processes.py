"""Processes a test left behind, on a machine where `make test`'s other worker runs jobs of its own at the same
time: a look over every process would count that worker's live children as this test's leftovers."""

from __future__ import annotations

from collections.abc import Callable

import psutil


def left_behind(matches: Callable[[str, str], bool]) -> list[psutil.Process]:
    """The live processes for which `matches(name, command line)` holds, but for another pytest worker's: those
    below this process count, and so do orphans (a child that outlived its job is reparented above pytest); a
    process whose nearest ancestor shared with this one is a pytest process other than this one is not ours."""
    me = psutil.Process()
    ours = {p.pid: p for p in [me, *me.parents()]}
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.pid == me.pid or not matches(proc.info["name"] or "", " ".join(proc.info["cmdline"] or [])):
                continue
            shared = next((ours[p.pid] for p in proc.parents() if p.pid in ours), None)
            if shared is None or shared.pid == me.pid or "pytest" not in " ".join(shared.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
