"""Errors a user can cause and fix. Their message is shown as is: one line that names the problem."""


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
