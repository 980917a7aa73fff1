"""``extauthz demo`` as its tests run it: up once it says how to stop it, stopped with Ctrl-C, nothing left running."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from extauthz.demo.processes import free_port


@contextlib.contextmanager
def running_demo(background: bool = False) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The demo on free ports and what it printed up to "Press Ctrl-C"; interrupted on leaving.

    ``background`` starts it with SIGINT ignored, as a shell starts a background job.
    """
    command = [sys.executable, "-m", "extauthz", "demo", "--port", str(free_port()), "--idp-port", str(free_port())]
    if background:
        command = ["sh", "-c", f"trap '' INT; exec {shlex.join(command)}"]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert demo.stdout is not None
        output: list[str] = []
        while not (output and output[-1].startswith("Press Ctrl-C")):
            line = demo.stdout.readline()
            assert line, "demo exited early:\n" + "".join(output)
            output.append(line)
        yield demo, "".join(output)
    finally:
        interrupt(demo)


def interrupt(demo: subprocess.Popen[str]) -> None:
    """Ctrl-C, and the demo has stopped within 20 s; killed with what it started (and the test failed) if not."""
    demo.send_signal(signal.SIGINT)
    try:
        demo.wait(20)
    except subprocess.TimeoutExpired:
        for child in children_of(demo.pid):  # the sidecar and Envoy would outlive it
            os.kill(int(child.name), signal.SIGKILL)
        demo.kill()
        demo.wait(10)
        raise


def children_of(pid: int) -> list[Path]:
    """The ``/proc`` entries of the processes ``pid`` started."""
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_of(p) == pid]


def _parent_of(process: Path) -> int:
    try:
        return int((process / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):  # gone meanwhile
        return 0
