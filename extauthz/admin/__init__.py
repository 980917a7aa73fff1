"""The sidecar's loopback admin service (``extauthz.v1.Admin``): live ``explain`` and status."""
