"""What every config section shares: its strictness, its URI and number checks, and the
one error type every problem is reported as."""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict

# ``scheme://user[:password]@`` in a URL: credentials that must never be stored or printed.
# A password may hold '/' and '+' (AWS secret keys do), so after a ':' anything up to '@' counts.
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/@\s:]+|[^/@\s:]*:[^@\s]*?)@")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _URL_USERINFO.sub(r"\1***@", text)


def check_uri(uri: str) -> str:
    """A usable storage URI: not blank, and no credentials in it (they come from the environment)."""
    if not uri.strip():
        raise ValueError("must not be empty")
    if _URL_USERINFO.search(uri):
        raise ValueError(f"credentials in the URI are not allowed ({redact(uri)}): remove "
                         f"them and set them in the environment (e.g. AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY) or the filesystem's own config")
    return uri


def check_finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def switch(value):
    """A section given as ``true`` (its defaults) or ``false`` (off), or as a mapping."""
    if value is True:
        return {}
    return None if value is False else value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


