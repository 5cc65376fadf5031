"""Errors a user can act on. The CLI prints their message and exits with status 2;
everything else is a bug and keeps its traceback."""

from __future__ import annotations


class FsmetaError(Exception):
    """Bad input or configuration, with a message that names the file or value at fault."""


class ConfigError(FsmetaError):
    """An unknown key, a wrong type or an inconsistent value in the configuration."""


class DataError(FsmetaError):
    """A missing, corrupt or mismatched data set, image or mask."""


class NonFiniteLossError(FsmetaError):
    """A loss became NaN or infinite; training stops instead of writing garbage weights."""
