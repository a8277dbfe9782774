"""`iot run projector NAME`: dispatch to one projection's composition root."""

from __future__ import annotations

import importlib

from infra.settings import Settings

PROJECTORS = {
    "timeseries": "projections.timeseries",
    "views": "projections.views",
    "auth": "projections.auth",
}


async def run_projector(name: str, settings: Settings) -> None:
    module = importlib.import_module(PROJECTORS[name])
    await module.run(settings)
