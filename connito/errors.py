"""Every error connito raises on purpose.

Each class also inherits the builtin it resembles, so callers that only know the standard
library still catch it. Messages are one line: what failed, where, the value and the rule.
"""

from __future__ import annotations

__all__ = [
    "ConnitoError",
    "ConfigError",
    "InvalidSubmission",
    "ChainError",
    "StoreError",
    "UnsupportedModelError",
    "CommitmentDecodeError",
    "StateError",
    "LibraryError",
    "FatalNodeError",
]


class ConnitoError(Exception):
    """Base class: anything connito raises deliberately."""


class ConfigError(ConnitoError, ValueError):
    """A domain YAML, selection file or flag is invalid.

    The message reads ``<path>: <field>: <reason>``.
    """

    def __init__(self, reason: str, *, path: str | None = None, field: str | None = None) -> None:
        self.path = path
        self.field = field
        self.reason = reason
        parts = [p for p in (path, field) if p]
        super().__init__(": ".join([*parts, reason]))


class InvalidSubmission(ConnitoError, ValueError):
    """An untrusted checkpoint, manifest or reveal violates the protocol.

    ``reason`` is a short stable code (``nan``, ``extra_key``, ``shape``...) that validators record
    and tests assert; the message adds the submission and the detail.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        hotkey: str | None = None,
        cycle: int | None = None,
        revision: str | None = None,
        key: str | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.hotkey = hotkey
        self.cycle = cycle
        self.revision = revision
        self.key = key
        where = " ".join(
            f"{name}={value}"
            for name, value in (("hotkey", hotkey), ("cycle", cycle), ("rev", revision))
            if value is not None
        )
        prefix = f"submission {where}: " if where else ""
        key_part = f"{key}: " if key else ""
        super().__init__(f"{prefix}{reason}: {key_part}{detail}")


class ChainError(ConnitoError, ConnectionError):
    """The chain could not be reached or refused a read or write."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        super().__init__(message)


class StoreError(ConnitoError, OSError):
    """The checkpoint store (Hub or local directory) failed or refused a request."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = "error",
        repo: str | None = None,
        revision: str | None = None,
    ) -> None:
        # reason: "missing" | "too_large" | "unreachable" | "refused" | "error"
        self.reason = reason
        self.repo = repo
        self.revision = revision
        super().__init__(message)


class UnsupportedModelError(ConnitoError, ValueError):
    """The model architecture has no MoE adapter."""


class CommitmentDecodeError(ConnitoError, ValueError):
    """A chain commitment is malformed, foreign or from an unknown protocol version."""


class StateError(ConnitoError, ValueError):
    """A node's own durable state file (e.g. outer optimizer momentum) is unreadable or inconsistent."""


class LibraryError(ConnitoError, ValueError):
    """An expert-library request cannot be served.

    An unknown or removed version, two lanes changing one expert, a blob that does not match its
    digest, or a base model the library cannot find. The message names the version or lanes.
    """


class FatalNodeError(ConnitoError, RuntimeError):
    """A fault a running neuron cannot heal by retrying: it stops with this one line (exit 1).

    An outdated protocol version, a selection built for another model, a state file naming a
    global folder that is gone. The message says what to do (upgrade, fix the file).
    """
