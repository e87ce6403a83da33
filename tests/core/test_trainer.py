"""The trainer's command line, built once (core/trainer.py) and parsed once (worker/trainer/cli.py): they agree."""

from __future__ import annotations

import sys
from pathlib import Path

from core.trainer import ops_argv, trainer_argv, trainer_command
from worker.trainer.cli import build_parser


def test_every_argument_built_is_parsed_back_as_given(tmp_path: Path) -> None:
    argv = trainer_argv(
        spec=tmp_path / "spec.json",
        data=tmp_path / "d.h5",
        out=tmp_path / "out",
        summary=tmp_path / "dataset.json",
        gpu="GPU-1",
        memory_fraction=0.25,
        backend="jax",
        resume=True,
        dry_run=True,
    )
    assert argv[:3] == [sys.executable, "-m", "worker.trainer"] == trainer_command()
    args = build_parser().parse_args(argv[3:])
    assert (args.spec, args.data, args.out, args.summary) == (
        tmp_path / "spec.json",
        tmp_path / "d.h5",
        tmp_path / "out",
        tmp_path / "dataset.json",
    )
    wanted = ("GPU-1", 0.25, "jax", True, True)
    assert (args.gpu, args.memory_fraction, args.backend, args.resume, args.dry_run) == wanted


def test_the_defaults_add_nothing_and_a_substitute_command_is_kept(tmp_path: Path) -> None:
    argv = trainer_argv(spec=tmp_path / "s", data=tmp_path / "d", out=tmp_path / "o", command=["fake", "trainer"])
    assert argv == ["fake", "trainer", "--spec", str(tmp_path / "s"), "--data", str(tmp_path / "d"), "--out",
                    str(tmp_path / "o")]  # fmt: skip
    args = build_parser().parse_args(argv[2:])
    assert (args.summary, args.gpu, args.memory_fraction, args.backend, args.resume, args.dry_run) == (
        None, None, None, None, False, False,
    )  # fmt: skip


def test_an_operation_runs_the_ops_module() -> None:
    argv = ops_argv(Path("/x/request.json"))
    assert argv == [sys.executable, "-m", "worker.trainer.ops", "--request", "/x/request.json"]
