"""The trainer: ``python -m worker.trainer`` trains one job in one process (see docs/ARCHITECTURE.md)."""
