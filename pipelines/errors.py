"""Errors a user can cause and fix. Their message is shown as is: one line that names the problem."""

from __future__ import annotations

import errno
import zipfile


class BlockStudioError(ValueError):
    """Bad input or an unavailable resource; the message says which and what to do."""


class ModelNotAvailable(BlockStudioError):
    """A model is neither local nor reachable."""


class InvalidImage(BlockStudioError):
    """An upload that is not a usable image."""


class InvalidAdapter(BlockStudioError):
    """An adapter file whose format, keys or shapes do not fit."""


class UnsafeName(BlockStudioError):
    """A token or name that could escape its folder or break a prompt."""


class InvalidSetting(BlockStudioError):
    """A number or choice outside what the method can use (NaN, infinite, out of range, wrong type)."""


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def explain(exc: BaseException) -> str | None:
    """One line saying what went wrong and what to do, for failures that are not the user's input.

    Covers what the machine can run into whatever the request (a full disk, an unreadable file, a damaged zip,
    a number too large for the library underneath); None for anything else, which is a bug to log.
    """
    if is_disk_full(exc):
        return "the server's disk is full, so nothing could be saved; free some space (or ask the admin to), then try again"
    if isinstance(exc, zipfile.BadZipFile):
        return f"the zip file is damaged ({exc}); make the zip again and upload it once more"
    if isinstance(exc, OverflowError):
        return f"a number is too large to use ({exc}); use a smaller value"
    if isinstance(exc, MemoryError):
        return "the server ran out of memory; try a smaller size or fewer images, or try again later"
    if isinstance(exc, PermissionError):
        return "the server may not read or write one of its files (permission denied); ask the admin to check its data folder"
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return f"the server could not read or write a file ({reason}); try again, and tell the admin if it persists"
    return None
