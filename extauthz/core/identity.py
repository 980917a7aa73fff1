"""The identity phase's contract: what the pipeline asks of a token verifier, and how it says no.

The decision core depends on this protocol, not on :mod:`extauthz.identity`
(which implements it with JWKS key sets, PyJWT and a verified-token cache), so
the pipeline can be read, tested and reused without knowing how keys are
fetched, and the import graph points one way: adapters -> core.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from extauthz.core.claims import Claims
from extauthz.errors import ExtauthzError


class TokenError(ExtauthzError):
    """Why a token was refused. ``code`` is stable and safe to show; ``reason`` is for logs."""

    def __init__(self, code: str, reason: str, status: int = 401) -> None:
        # Reasons quote token contents; a lone surrogate in one could be neither logged nor sent.
        reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status

    @property
    def rfc6750_error(self) -> str:
        return "" if self.code == "token_missing" else "invalid_token"


class TokenVerifier(Protocol):
    async def verify(self, token: str, trusted: Iterable[str]) -> Claims:
        """The verified claims of ``token`` for one of the ``trusted`` providers; raises :class:`TokenError`.

        A status other than 401 on the error (503 while keys are unavailable) is
        the pipeline's answer as is.
        """
        ...
