"""The signing roles of the root of trust, apart from the models so that the CLI's help need not
build every pydantic model to name them."""

from __future__ import annotations

import enum

__all__ = ["Role"]


class Role(str, enum.Enum):
    ROOT = "root"
    RELEASE = "release"
    TIMESTAMP = "timestamp"
