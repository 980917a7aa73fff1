"""The policy watcher and ``RuntimeHolder.reload`` without Envoy: what triggers a reload, what keeps the old policy."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import socket
import time
from pathlib import Path

import pytest

from extauthz.core.request import HttpRequest
from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import free_port
from extauthz.server.reload import PolicyWatcher
from extauthz.server.runtime import ReloadOutcome, Runtime, RuntimeHolder
from tests.e2e.ops_stack import kubelet_layout, kubelet_update

VALID = "proxies: [{name: a}]\n"


class Recorder:
    """Stands in for the sidecar: records reload calls and answers with a scripted outcome."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.calls = 0
        self.outcome = ReloadOutcome.RELOADED
        self.path: Path | None = None

    async def reload(self) -> ReloadOutcome:
        self.calls += 1
        if self.outcome is ReloadOutcome.RELOADED and self.path is not None:
            self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        return self.outcome


def test_watcher_reloads_on_content_changes_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        kubelet_layout(tmp_path, {"policy.yaml": VALID})
        path = tmp_path / "policy.yaml"
        sidecar = Recorder(hashlib.sha256(VALID.encode()).hexdigest()[:16])
        sidecar.path = path
        watcher = PolicyWatcher(path, sidecar.reload, lambda: sidecar.digest, interval=0.01)

        assert await watcher.poll() is None  # nothing changed
        kubelet_update(tmp_path, {"policy.yaml": VALID, "other.yaml": "x: 1\n"}, version=2)
        assert await watcher.poll() is None and sidecar.calls == 0  # ..data swapped, same policy

        kubelet_update(tmp_path, {"policy.yaml": VALID + "# edited\n"}, version=3)
        assert await watcher.poll() is ReloadOutcome.RELOADED and sidecar.calls == 1
        assert await watcher.poll() is None and sidecar.calls == 1

        # A broken version is tried once, not again for every re-link of the same content.
        sidecar.outcome = ReloadOutcome.INVALID
        kubelet_update(tmp_path, {"policy.yaml": "broken: ["}, version=4)
        assert await watcher.poll() is ReloadOutcome.INVALID
        kubelet_update(tmp_path, {"policy.yaml": "broken: ["}, version=5)
        assert await watcher.poll() is None and sidecar.calls == 2

        # The next edit is tried again; a missing file never is.
        sidecar.outcome = ReloadOutcome.RELOADED
        kubelet_update(tmp_path, {"policy.yaml": VALID + "# fixed\n"}, version=6)
        assert await watcher.poll() is ReloadOutcome.RELOADED and sidecar.calls == 3
        (tmp_path / "..data").unlink()
        assert await watcher.poll() is None and sidecar.calls == 3

    asyncio.run(scenario())


POLICY = """providers:
  - {{name: idp, issuer: {issuer}, jwksUri: {jwks}, audiences: [api]}}
proxies:
  - name: api
    rules: [{{effect: allow, methods: [{method}]}}]
"""


def test_reload_keeps_the_running_policy_when_the_new_one_cannot_get_keys(tmp_path: Path) -> None:
    async def scenario() -> None:
        with IdentityProvider() as idp:
            path = tmp_path / "policy.yaml"
            path.write_text(POLICY.format(issuer=idp.issuer, jwks=idp.jwks_uri, method="GET"))
            sidecar = await RuntimeHolder.start(path)
            try:
                first = sidecar.runtime.policy.digest
                old = sidecar.authorizer()
                # Valid policy, but its keys cannot be fetched: serving it would answer 503.
                dead = f"http://127.0.0.1:{free_port()}/jwks"
                path.write_text(POLICY.format(issuer=idp.issuer, jwks=dead, method="DELETE"))
                assert await sidecar.reload() is ReloadOutcome.UNAVAILABLE
                assert sidecar.runtime.policy.digest == first
                assert sidecar.last_reload is not None
                assert sidecar.last_reload.errors[0].startswith(f"provider idp: no signing keys ({dead}: ConnectError")

                path.write_text(POLICY.format(issuer=idp.issuer, jwks=idp.jwks_uri, method="DELETE"))
                assert await sidecar.reload() is ReloadOutcome.RELOADED
                assert sidecar.runtime.policy.digest != first
                assert await sidecar.reload() is ReloadOutcome.UNCHANGED

                # A request that started on the old policy finishes on it, keys and all.
                token = idp.token(audience="api", sub="u")
                request = HttpRequest("GET", "/", headers={"authorization": f"Bearer {token}"})
                decided_old = await old.check(request)
                assert decided_old.allowed and decided_old.policy == first
                decided_new = await sidecar.authorizer().check(request)
                assert not decided_new.allowed and decided_new.policy == sidecar.runtime.policy.digest
            finally:
                await sidecar.close()
            # Shutdown also closes the runtime the reload replaced (before its 30 s grace ran out):
            # no JWKS refresh of either policy is left running.
            left = [t for t in asyncio.all_tasks() if t.get_name().startswith("jwks:") and not t.done()]
            assert left == []

    asyncio.run(scenario())


def test_sighup_reloads_at_once_when_the_watcher_is_off(tmp_path: Path) -> None:
    import signal
    import time

    from tests.e2e.ops_stack import ops_stack

    text = POLICY.format(issuer="ISSUER", jwks="JWKS_URI", method="GET")
    with ops_stack(tmp_path, text, with_envoy=False, extra_args=["--watch-interval", "0"]) as stack:
        path = tmp_path / "policy.yaml"
        first = stack.readyz()["policy"]["digest"]
        path.write_text(path.read_text().replace("[GET]", "[DELETE]"))
        assert stack.readyz()["policy"]["digest"] == first  # nobody is watching
        stack.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while stack.readyz()["policy"]["digest"] == first:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.05)
        assert stack.readyz()["lastReload"]["result"] == "reloaded"


def _other_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


def test_shutdown_closes_the_runtime_a_reload_replaced_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The old runtime's close is held by the sidecar, not left to a timer nobody owns."""
    closed: list[str] = []
    close = Runtime.close

    async def recording_close(self: Runtime) -> None:
        closed.append(self.policy.digest)
        await close(self)

    monkeypatch.setattr(Runtime, "close", recording_close)

    async def scenario() -> None:
        with IdentityProvider() as idp:
            path = tmp_path / "policy.yaml"
            path.write_text(POLICY.format(issuer=idp.issuer, jwks=idp.jwks_uri, method="GET"))
            sidecar = await RuntimeHolder.start(path)
            first = sidecar.runtime.policy.digest
            path.write_text(POLICY.format(issuer=idp.issuer, jwks=idp.jwks_uri, method="DELETE"))
            assert await sidecar.reload() is ReloadOutcome.RELOADED
            second = sidecar.runtime.policy.digest
            assert closed == []  # requests may still be running on the first policy: kept for its grace
            started = time.monotonic()
            await sidecar.close()
            assert time.monotonic() - started < 5  # not the 30 s grace
            assert closed == [first, second]
            assert _other_tasks() == []  # no key refresh, no close task, nothing left behind
            with pytest.raises(RuntimeError, match="closed"):
                await sidecar.reload()

    caplog.set_level(logging.WARNING, logger="asyncio")
    asyncio.run(scenario())
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_shutdown_cancels_a_sighup_reload_midway_and_leaks_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reload still fetching keys at shutdown is cancelled; the key refresh it had started is stopped."""

    async def scenario() -> None:
        with IdentityProvider() as idp, socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()  # accepts connections (the backlog), never answers: the JWKS fetch hangs
            path = tmp_path / "policy.yaml"
            path.write_text(POLICY.format(issuer=idp.issuer, jwks=idp.jwks_uri, method="GET"))
            sidecar = await RuntimeHolder.start(path)
            first = sidecar.runtime.policy.digest
            path.write_text(f"""providers:
  - {{name: fresh, issuer: {idp.issuer}, jwksUri: {idp.jwks_uri}, audiences: [api]}}
  - {{name: silent, issuer: https://silent.example, jwksUri: "http://127.0.0.1:{silent.getsockname()[1]}/jwks",
     audiences: [api]}}
proxies:
  - {{name: api, rules: [{{effect: allow}}]}}
""")
            sidecar.reload_soon()
            deadline = time.monotonic() + 10
            while not any(t.get_name() == "jwks:fresh" for t in _other_tasks()):  # first keys in, second hanging
                assert time.monotonic() < deadline, "the reload never got to the second provider"
                await asyncio.sleep(0.01)
            await sidecar.close()
            assert sidecar.runtime.policy.digest == first  # the reload never finished
            assert _other_tasks() == []
            sidecar.reload_soon()  # after shutdown: nothing starts
            assert _other_tasks() == []

    caplog.set_level(logging.WARNING, logger="asyncio")
    asyncio.run(scenario())
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_a_sidecar_that_cannot_build_its_first_runtime_closes_its_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    closed: list[httpx.AsyncClient] = []
    aclose = httpx.AsyncClient.aclose

    async def recording_aclose(self: httpx.AsyncClient) -> None:
        closed.append(self)
        await aclose(self)

    async def failing_build(policy: object, http: httpx.AsyncClient) -> Runtime:
        raise OSError("no keys today")

    monkeypatch.setattr(httpx.AsyncClient, "aclose", recording_aclose)
    monkeypatch.setattr(Runtime, "build", failing_build)
    path = tmp_path / "policy.yaml"
    path.write_text(VALID)

    async def scenario() -> None:
        with pytest.raises(OSError, match="no keys today"):
            await RuntimeHolder.start(path)
        assert len(closed) == 1 and closed[0].is_closed

    asyncio.run(scenario())
