"""extauthz: an Envoy ext_authz / ext_proc sidecar that verifies JWTs, applies
claim, path and relationship rules, and filters JSON responses per caller."""

__version__ = "0.1.0"
