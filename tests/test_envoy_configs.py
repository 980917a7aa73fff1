"""Every Envoy config we ship passes `envoy --mode validate`, and keeps its fail-closed settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extauthz.demo.processes import ENVOY_DIR, validate_envoy_config

CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))


def http_filters(config: dict) -> list[dict]:  # type: ignore[type-arg]
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_fails_closed(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] in {"UNESCAPE_AND_REDIRECT", "REJECT_REQUEST"}
    authz = next(f for f in http_filters(config) if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["transport_api_version"] == "V3"
    assert (authz.get("grpc_service") or authz["http_service"]["server_uri"])["timeout"]  # gRPC or HTTP transport
    names = [f["name"] for f in http_filters(config)]
    assert names[0] == "envoy.filters.http.ext_authz" and names[-1] == "envoy.filters.http.router"


def test_a_broken_config_is_rejected(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(CONFIGS[0].read_text().replace("failure_mode_allow: false", "failure_mode_allow: maybe"))
    assert validate_envoy_config(broken).returncode != 0
