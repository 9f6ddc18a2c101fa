"""Run ``reid`` in a fresh interpreter that kills itself with SIGKILL at a chosen point: the tests' real
``kill -9`` (no cleanup, no ``finally``), so resuming is tested against what a crash really leaves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = """
import importlib, os, signal, sys
{setup}
owner = getattr(importlib.import_module({module!r}), {owner!r})
real, calls = getattr(owner, {method!r}), []
def wrapped(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == {calls}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(owner, {method!r}, wrapped)
import cli
sys.argv = ["reid", *{argv!r}]
cli.app()
"""


def reid_killed_after(target: str, calls: int, argv: list, *, setup: str = "", timeout: float = 180
                      ) -> subprocess.CompletedProcess:
    """``reid ARGV`` killed right after the ``calls``-th call of ``target`` (``module:Class.method``) returned;
    ``setup`` is Python run first (e.g. registering a test detector)."""
    module, _, attr = target.partition(":")
    owner, method = attr.split(".")
    script = _SCRIPT.format(setup=textwrap.dedent(setup), module=module, owner=owner, method=method, calls=calls,
                            argv=[str(a) for a in argv])
    import cli

    return subprocess.run([sys.executable, "-c", script], cwd=Path(cli.__file__).parent, capture_output=True,
                          timeout=timeout, env=os.environ.copy())
