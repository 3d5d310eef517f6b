"""The one interface the writer uploads through: local tree or S3."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class ObjectStore(Protocol):
    async def put_file(self, key: str, path: Path) -> None:
        """Store the complete file at `path` under relative `key`, and VERIFY it.

        Returns only when the object is durably stored and checked (size, and ETag/MD5 on
        S3). Raises a `StorageError`: `StorageUnavailable` (try again later),
        `StorageRejected` (configuration/permission problem), `UploadVerificationFailed`.
        The caller deletes its spool copy only after this returns. The local store MOVES
        `path`; the S3 store leaves it in place.
        """
        ...

    def describe(self) -> str:
        """Where data goes, for logs: never contains secrets."""
        ...
