"""Paths that users give: where a relative one was looked for, and when a value can only be a Hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

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
