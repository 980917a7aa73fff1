"""The README's promise: `extauthz demo` prints curls that get 200, 403 and 401 through Envoy."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import socket
from pathlib import Path

from extauthz.demo.processes import free_port
from tests.demo_process import children_of, running_demo


def run_curl(command: str) -> tuple[int, bytes]:
    """Execute one printed `curl -i URL [-H 'name: value']` line with http.client."""
    args = shlex.split(command)
    url = next(a for a in args if a.startswith("http://"))
    headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args) if a == "-H"))
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request("GET", "/" + rest, headers=headers)
    response = conn.getresponse()
    answer = response.status, response.read()
    conn.close()
    return answer


def test_demo_prints_working_curls() -> None:
    with running_demo() as (demo, text):
        expected = [int(m) for m in re.findall(r"^# (\d{3}):", text, re.M)]
        curls = [ln for ln in text.splitlines() if ln.startswith("curl ")]
        assert expected == [200, 403, 401, 200]
        answers = [run_curl(c) for c in curls]
        assert [status for status, _ in answers] == expected
        # The first curl reads orders: the sample filter leaves only user-123's, and only allowed fields.
        orders = json.loads(answers[0][1])["orders"]
        assert {o["userId"] for o in orders} == {"user-123"} and len(orders) == 2
        assert all(set(o) == {"orderId", "userId", "amount", "status"} for o in orders)
    assert demo.returncode == 0


def test_demo_stops_on_ctrl_c_when_started_as_a_background_job() -> None:
    # A shell starts a background job with SIGINT ignored; the demo must still stop on it and stop what it started.
    with running_demo(background=True) as (demo, _):
        children = children_of(demo.pid)
        assert len(children) == 2  # the sidecar and Envoy
    assert demo.returncode == 0
    assert not [p for p in children if p.exists()]


def test_free_ports_are_never_ones_the_kernel_hands_out_nor_twice_the_same() -> None:
    # A port from the ephemeral range can be taken by any bind(0) or outgoing connection before the
    # caller's server binds it (Envoy then exits with "Address already in use").
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]
    for port in ports[:20]:  # and each is free to bind
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_forked_process_walks_other_free_ports_than_its_parent() -> None:
    free_port()  # the parent's walk has started before the fork
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only reports its ports
        os.write(writer, json.dumps([free_port() for _ in range(20)]).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        theirs = set(json.loads(pipe.read()))
    assert not theirs & {free_port() for _ in range(20)}
