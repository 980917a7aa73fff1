"""Generated from proto/extauthz/v1/admin.proto by ``python -m extauthz.admin.generate``."""
