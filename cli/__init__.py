"""The ``gpuyard`` command line (``cli.main:main``): the top floor, above service, worker, models and core."""
