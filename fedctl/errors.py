"""The one exception tree of fedctl: every refusal names its cause and, where a user can act, the fix."""

from __future__ import annotations

import builtins


class FedctlError(Exception):
    """Base class of every error fedctl raises on purpose.

    Parameters
    ----------
    message:
        What went wrong, in one line.
    fix:
        What the user can do about it (optional, shown after the message).
    """

    exit_code: int = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} — {self.fix}" if self.fix else self.message


class ConfigError(FedctlError, ValueError):
    """A user-supplied option or configuration is invalid."""

    exit_code = 2


class TrainingFailed(ConfigError):
    """A worker's local training failed in several rounds in a row; ``diverged``: it produced NaN or infinite values
    (a learning rate too large for the model and data, rather than a broken task)."""

    def __init__(self, message: str, fix: str | None = None, *, diverged: bool = False) -> None:
        super().__init__(message, fix)
        self.diverged = diverged


class DataError(FedctlError, FileNotFoundError):
    """A dataset or shard is missing, corrupt or of the wrong kind."""

    exit_code = 3


class ChecksumError(DataError):
    """A file's SHA-256 does not match the expected digest."""


class DatasetNotFound(DataError):
    """A registered dataset's files are in none of the searched directories.

    Its ``fix`` names no command-line option (the data layer does not know which command runs); a command that
    has ``--source-dir`` or ``--download`` replaces it with one naming those.
    """

    def __init__(self, message: str, fix: str, dataset: str, downloadable: bool) -> None:
        super().__init__(message, fix)
        self.dataset = dataset
        self.downloadable = downloadable


class BackendUnavailable(FedctlError, ImportError):
    """A deep-learning framework (MXNet or PyTorch) is requested but not installed or not usable."""

    exit_code = 4


class ModelMismatch(FedctlError, ValueError):
    """Tensors do not match the model spec (names, shapes or dtypes)."""

    exit_code = 5


class ProtocolError(FedctlError, ValueError):
    """A frame or message violates the wire protocol; carries the wire error code."""

    exit_code = 6

    def __init__(self, code: int, message: str, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.code = int(code)


class TransportError(FedctlError, ConnectionError):
    """A socket could not be bound or connected, or the peer stopped answering."""

    exit_code = 7


class RemoteError(FedctlError, RuntimeError):
    """The peer replied with an error message (code + reason)."""

    exit_code = 8

    def __init__(self, code: int, reason: str, fix: str | None = None) -> None:
        super().__init__(f"broker refused the request (code {code}): {reason}", fix)
        self.code = int(code)
        self.reason = reason


_GROUP: type[BaseException] | None = getattr(builtins, "BaseExceptionGroup", None)


def unwrapped(error: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (what ``asyncio.TaskGroup`` raises), so a
    caller can ``except fedctl.errors.RemoteError``; any other exception as it is."""
    while _GROUP is not None and isinstance(error, _GROUP) and len(getattr(error, "exceptions", ())) == 1:
        error = error.exceptions[0]  # type: ignore[attr-defined]
    return error
