"""`kitelm bench params`: parameter counts of every preset (built on the meta device: no memory, no time)."""

from __future__ import annotations

from ...presets import preset_rows

NOTE = "Every preset, built on the meta device."


def run(settings, machine: dict, log) -> list[dict]:
    rows = preset_rows()
    log(f"params: {len(rows)} presets")
    return rows
