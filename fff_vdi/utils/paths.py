"""File names and paths shared by the tools."""

from __future__ import annotations

import re


def natural_key(name: str) -> tuple:
    """Sort '2.jpg' before '10.jpg': digit runs compare as numbers. A total order (never two keys equal
    for different names: '01' and '1' tie on the number, then compare as text), so sorting never
    depends on the order a folder was listed in."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))
