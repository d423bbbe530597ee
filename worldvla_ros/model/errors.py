"""The model core's errors, importable without torch (command-line tools catch them cheaply)."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message says which file and why."""
