"""User-facing errors: each carries one line that names the file or key and the fix."""

from __future__ import annotations


class StackerError(Exception):
    """Base class for errors reported to the user as one line, without a traceback."""

    exit_code = 1


class ConfigError(StackerError):
    """A configuration key or value is invalid (usage error, exit code 2)."""

    exit_code = 2


class InputError(StackerError):
    """Inputs are missing or unusable (e.g. no frames found in the configured folders)."""

    exit_code = 2


class MemoryBudgetError(StackerError):
    """The memory budget cannot hold one row of every frame of a group."""

    exit_code = 2


class BuildError(StackerError):
    """One master could not be built; other masters go on."""


class FrameReadError(BuildError):
    """The pixels of one input frame cannot be read (damaged, vanished, undecodable).

    Attributes
    ----------
    path : str
        The frame, so that validation can leave it out and name it.
    reason : str
        Why, in a few words, without the path.
    """

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class OutputLockedError(StackerError):
    """Another stacker run holds the output folder (exit code 2: nothing was started)."""

    exit_code = 2
