"""The ``gpuyard`` command line: one group, every command family imported here (as ``celery/bin/`` does).

::

    cli/data.py      check-data
    cli/jobs.py      datasets, submit, status, logs, cancel, download   (talk to the API)
    cli/studies.py   study create|status|best|cancel                    (studies: many trials as one unit)
    cli/modeluse.py  evaluate, predict, export                          (use a succeeded job's model)
    cli/serve.py     api, up                                            (run the API, the local stack)
    cli/workers.py   worker, janitor                                    (run the Celery side)
    cli/users.py     users                                              (accounts and tokens)
    cli/db.py        db                                                 (the job DB's schema: upgrade, current)
    cli/compose.py   compose                                            (docker compose for this host's GPUs)
    cli/tensorboard.py tensorboard                                      (download jobs' TensorBoard logs, open them)
    cli/demo.py      demo                                               (the Highway example, no service)
    cli/smoke.py     smoke                                              (a CI pipeline's check of a spec, CPU)
    cli/render.py    the one renderer of a job's events (logs -f, submit --follow, demo)
"""

from __future__ import annotations

import click

from cli import compose, data, db, demo, jobs, modeluse, serve, smoke, studies, tensorboard, usage, users, workers


@click.group()
@click.version_option(package_name="gpuyard")
def main() -> None:
    """gpuyard: train Keras models on shared GPUs from HDF5 data sets."""


for command in (
    data.check_data,
    users.users,
    usage.usage_command,
    db.db,
    workers.worker_command,
    workers.janitor_command,
    demo.demo_command,
    jobs.datasets,
    jobs.submit,
    jobs.status,
    jobs.logs,
    jobs.cancel,
    jobs.download,
    studies.study,
    tensorboard.tensorboard_command,
    modeluse.evaluate,
    modeluse.predict,
    modeluse.export,
    serve.api,
    serve.up,
    compose.compose_command,
    smoke.smoke_command,
):
    main.add_command(command)
