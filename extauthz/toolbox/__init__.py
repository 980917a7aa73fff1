"""Policy tools for people and CI: ``extauthz explain`` and ``extauthz test`` (and their token minting)."""
