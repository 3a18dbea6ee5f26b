"""File names and paths shared by the tools: natural order, whether an output can be written, and
where a path the user gave was looked for (or whether it can only be a Hub id)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def natural_key(name: str) -> tuple:
    """Sort '2.jpg' before '10.jpg': digit runs compare as numbers. A total order (never two keys equal
    for different names: '01' and '1' tie on the number, then compare as text), so sorting never
    depends on the order a folder was listed in."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be made in `folder` (created first where missing), or None. Asks the file
    system itself: a nameless file is created and at once removed in `folder`, or where it does not
    exist yet in the nearest folder above it. Permission bits would not do: they say nothing for root,
    and /proc or /sys refuse even root."""
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # "." or "/" at the end
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror})"
    return None


def os_error_text(error: OSError, path: str | os.PathLike | None = None) -> str:
    """'PATH: reason' of an OS error, naming `path` where the error names no file (a failed write)."""
    return f"{error.filename or path}: {error.strerror or error}"


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looked_for_at(path: str | os.PathLike) -> str:
    """The absolute path a (relative) `path` names, for messages: relative paths start at the
    current folder, which is not always the one the user has in mind."""
    given = Path(path).expanduser()
    return str(given) if given.is_absolute() else f"{Path.cwd() / given} (relative to the current folder)"


def is_hub_repo_id(source: str) -> bool:
    """True when `source` exists nowhere here and reads as a Hugging Face repo id (owner/name) whose
    owner is no local folder either: `runs/x/pipeline` or `out/pipeline` with out/ present is a
    missing folder, not a repo."""
    path = Path(source).expanduser()
    return not path.exists() and bool(HUB_REPO_ID.match(source)) and not path.parent.is_dir()
