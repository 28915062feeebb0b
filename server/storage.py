"""Generated files on the local disk, under names nobody can guess.

Only names this module could have produced are ever served: `path()` refuses anything with a
separator, a leading dot, a traversal, or a symlink, so a URL cannot reach outside the folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

# secrets.token_urlsafe(24) -> 32 characters of [A-Za-z0-9_-]; then one short extension.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,8}")


class LocalStorage:
    def __init__(self, files_dir: Path) -> None:
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str) -> str:
        """Write `data` under a fresh unguessable name; the file appears complete or not at all."""
        extension = extension.lower().lstrip(".")
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"bad file extension {extension!r}")
        final = self.files_dir / name
        partial = self.files_dir / f".{name}.partial"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, final)
        return name

    def path(self, file_name: str) -> Path | None:
        """The file for a name we could have made, or None (bad name, missing, not a plain file)."""
        if not _FILE_NAME.fullmatch(file_name):
            return None
        candidate = self.files_dir / file_name
        try:
            if candidate.is_symlink() or not candidate.is_file():
                return None
        except OSError:
            return None
        return candidate

    def delete(self, file_name: str) -> None:
        candidate = self.path(file_name)
        if candidate is not None:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()

    @staticmethod
    def url(base_url: str, file_name: str) -> str:
        return base_url.rstrip("/") + "/files/" + file_name
