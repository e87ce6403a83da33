"""The ``gpuyard`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="gpuyard")
def main() -> None:
    """gpuyard: train Keras models on shared GPUs from HDF5 data sets."""
