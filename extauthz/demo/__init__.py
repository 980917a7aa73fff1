"""The local playground behind ``extauthz demo``; the tests drive the same pieces."""
