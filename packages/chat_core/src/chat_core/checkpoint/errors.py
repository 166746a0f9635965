"""Errors raised while finding or reading a checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or of a kind we do not support; the message names the path."""
