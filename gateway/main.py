"""Composition root of `iot run gateway` (being built for issue 3)."""

from __future__ import annotations

from iot.settings import Settings


async def run(settings: Settings) -> None:
    raise RuntimeError("this component is not built yet (issue 3)")
