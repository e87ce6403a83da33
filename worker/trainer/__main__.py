"""Entry point of ``python -m worker.trainer``."""

from __future__ import annotations

import sys

from worker.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
