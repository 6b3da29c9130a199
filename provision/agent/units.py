"""Quantities as people read them. Standard library only (shipped in the agent zipapp)."""

from __future__ import annotations


def human_bytes(n: float, sep: str = " ") -> str:
    """1536 -> '1.5 KiB' (`sep=""`: '1.5KiB', for narrow table cells)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{sep}{unit}" if unit == "B" else f"{n:.1f}{sep}{unit}"
        n /= 1024
    return f"{n:.1f}{sep}TiB"
