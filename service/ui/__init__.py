"""The web dashboard: server-rendered pages under /ui, refreshed with htmx, curves drawn with uPlot.

One module per page group; each adds its routes to :data:`bp` (service.ui.base).
"""

from __future__ import annotations

from service.ui import datasets, gpus, jobs, session, studies, usage
from service.ui.base import bp, root

__all__ = ["bp", "datasets", "gpus", "jobs", "root", "session", "studies", "usage"]
