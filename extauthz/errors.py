"""The package's exception base: one ``except ExtauthzError`` catches every error extauthz raises on purpose.

Each subclass names one kind of refusal and carries what a person on call needs
(a stable code, the file and line, the address); anything else that escapes is a
bug, and the adapters turn it into a fail-closed answer.
"""

from __future__ import annotations


class ExtauthzError(Exception):
    """Base of the errors extauthz raises deliberately."""
