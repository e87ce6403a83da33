"""The course's deep-network experiments, reproduced with gpuyard's own jobs, and their report.

Six families (a sigmoid MLP with Xavier, a ReLU MLP with He, a ReLU MLP with BatchNorm, Highway with
transform bias -2, residual dense blocks, an SNN) at depth 8, 16 and 32, on scikit-learn's digits and
breast-cancer sets, trained with plain SGD. Usage (from the repository root)::

    python examples/course/run.py specs              # (re)write examples/course/specs/*.json
    python examples/course/run.py run                # train every job, then write the report
    python examples/course/run.py run --service http://127.0.0.1:8000 --token TOKEN
    python examples/course/run.py run --service http://127.0.0.1:8000 --token TOKEN --study  # a grid study each
    python examples/course/run.py report             # rewrite docs/course/report.md from the runs

Without ``--service`` each job runs in the trainer process gpuyard's workers start
(``python -m worker.trainer --gpu cpu``), one after the other; with it, the jobs go through the service's
Python client (``service.client.Client``) to a running ``gpuyard up``, and their artifacts are downloaded.
With ``--study`` the family × depth grid of each data set is one grid study (docs/studies.md): the space is
``architecture``, a choice of the 18 architectures, no pruning (the course studies the vanishing nets), and
each trial's artifacts are downloaded once the study has ended. Either way a job's folder under ``--work``
holds its ``events.jsonl``, ``history.json``,
``diagnostics.json`` and ``summary.json``; the report reads only those.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from core import names  # noqa: E402
from models.health import HealthWatch, health_events, thresholds_from  # noqa: E402

SPEC_DIR = Path(__file__).resolve().parent / "specs"
REPORT_DIR = ROOT / "docs" / "course"
DEPTHS = (8, 16, 32)
WIDTH = 32
DATASETS = ("digits", "breast_cancer")
TRAINING = {
    "epochs": 20,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "learning_rate": 0.02},
    "validation_split": 0.15,
    "seed": 0,
}
FAMILIES = {
    "a_sigmoid_xavier": "(a) sigmoid MLP, Xavier",
    "b_relu_he": "(b) ReLU MLP, He",
    "c_relu_batchnorm": "(c) ReLU MLP, He + BatchNorm",
    "d_highway": "(d) Highway, transform bias -2",
    "e_residual": "(e) residual dense blocks",
    "f_snn": "(f) SNN (selu, lecun_normal)",
}


def architecture(family: str, depth: int) -> dict[str, Any]:
    """The spec's ``architecture`` of one course family with ``depth`` weighted hidden layers."""
    common = {"input_normalization": "standardize"}
    if family == "a_sigmoid_xavier":
        return {
            "family": "mlp",
            "widths": [WIDTH] * depth,
            "activation": "sigmoid",
            "kernel_initializer": "glorot_uniform",
            **common,
        }
    if family == "b_relu_he":
        return {
            "family": "mlp",
            "widths": [WIDTH] * depth,
            "activation": "relu",
            "kernel_initializer": "he_normal",
            **common,
        }
    if family == "c_relu_batchnorm":
        return {
            "family": "mlp",
            "widths": [WIDTH] * depth,
            "activation": "relu",
            "kernel_initializer": "he_normal",
            "batch_norm": True,
            **common,
        }
    if family == "d_highway":
        return {
            "family": "highway",
            "depth": depth,
            "width": WIDTH,
            "activation": "relu",
            "transform_bias": -2.0,
            **common,
        }
    if family == "e_residual":  # two Dense layers per block: depth/2 blocks
        return {
            "family": "resnet",
            "variant": "dense",
            "blocks": depth // 2,
            "width": WIDTH,
            "activation": "relu",
            "batch_norm": True,
            **common,
        }
    if family == "f_snn":
        return {"family": "snn", "widths": [WIDTH] * depth, "alpha_dropout": 0.0}
    raise ValueError(f"Expected one of {', '.join(FAMILIES)}. Received: family={family!r}")


def course_specs() -> dict[str, dict[str, Any]]:
    """Spec name → spec, every family at every depth."""
    return {
        f"{family}_{depth}": {
            "name": f"course {family} depth {depth}",
            "architecture": architecture(family, depth),
            "training": TRAINING,
            "resources": {"gpu": "cpu"},
        }
        for family in FAMILIES
        for depth in DEPTHS
    }


def write_specs() -> None:
    SPEC_DIR.mkdir(parents=True, exist_ok=True)
    for name, spec in course_specs().items():
        (SPEC_DIR / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {len(course_specs())} specs to {SPEC_DIR}")


def write_datasets(work: Path) -> dict[str, Path]:
    from models.data.breast_cancer import write_breast_cancer_h5
    from models.data.digits import write_digits_h5

    return {
        "digits": write_digits_h5(work / "data" / "digits.h5"),
        "breast_cancer": write_breast_cancer_h5(work / "data" / "breast_cancer.h5"),
    }


def load_specs() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(SPEC_DIR.glob("*.json"))}


# ── running ──
def run_direct(spec_path: Path, data: Path, out: Path) -> int:
    """One job in the trainer process the workers start, on the CPU; its events saved beside its artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    with open(out / "events.jsonl", "wb") as events, open(out / "trainer.log", "wb") as log:
        command = [
            sys.executable,
            "-m",
            "worker.trainer",
            "--spec",
            str(spec_path),
            "--data",
            str(data),
            "--out",
            str(out),
            "--gpu",
            "cpu",
        ]
        return subprocess.run(command, stdout=events, stderr=log, cwd=ROOT, env=environ).returncode


def run_service(client: Any, dataset_id: str, spec: dict[str, Any], out: Path) -> str:
    """One job through the service: submit, follow its events to the end, download its artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    job = client.submit(dataset_id, spec)
    with open(out / "events.jsonl", "w") as events:
        for event in client.events(job["id"]):
            data = event.json()
            if isinstance(data, dict) and "event" in data:
                events.write(json.dumps(data) + "\n")
            if event.is_terminal:
                break
    final = client.job(job["id"])
    (out / "job.json").write_text(json.dumps(final, indent=2, default=str))
    for name in (names.HISTORY, names.DIAGNOSTICS, names.SUMMARY):
        try:
            client.download(job["id"], name, out / name)
        except Exception as exc:  # a failed job has no artifacts; the report says so
            print(f"  {name}: {exc}", file=sys.stderr)
    return str(final["state"])


def run_study(client: Any, dataset: str, dataset_id: str, specs: dict[str, dict[str, Any]], work: Path) -> None:
    """The data set's family × depth grid as one grid study; each trial's events and artifacts saved under
    the name of the spec whose architecture it tried."""
    names_by_arch = {json.dumps(spec["architecture"], sort_keys=True): name for name, spec in specs.items()}
    base = {k: v for k, v in next(iter(specs.values())).items() if k != "architecture"}
    body = {
        "name": f"course {dataset}",
        "dataset": dataset_id,
        "spec": {**base, "name": f"course {dataset}"},
        "space": {"architecture": {"choice": [spec["architecture"] for spec in specs.values()]}},
        "sampler": "grid",
        "pruner": "none",
        "prune_on": [],
        "max_parallel": 4,
    }
    study = client.create_study(body)
    print(f"{dataset:>13} study {study['id']}: {study['trials_total']} trials", flush=True)
    while (found := client.study(study["id"]))["finished_at"] is None:
        time.sleep(5)
    for trial in found["trials"]:
        name = names_by_arch[json.dumps(trial["params"]["architecture"], sort_keys=True)]
        out = work / "runs" / dataset / name
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "events.jsonl", "w") as events:
            for event in client.events(trial["job"]):  # replayed from the job DB, ends at its final state
                data = event.json()
                if isinstance(data, dict) and "event" in data:
                    events.write(json.dumps(data) + "\n")
                if event.is_terminal:
                    break
        (out / "job.json").write_text(json.dumps(client.job(trial["job"]), indent=2, default=str))
        for artifact in (names.HISTORY, names.DIAGNOSTICS, names.SUMMARY):
            try:
                client.download(trial["job"], artifact, out / artifact)
            except Exception as exc:  # a failed trial has no artifacts; the report says so
                print(f"  {name} {artifact}: {exc}", file=sys.stderr)
        print(f"{dataset:>13} {name:<22} {trial['state']:<10}", flush=True)


def run_all(args: argparse.Namespace) -> None:
    work: Path = args.work
    datasets = write_datasets(work)
    specs = load_specs()
    if args.only:
        specs = {k: v for k, v in specs.items() if any(k.startswith(o) for o in args.only)}
    client = None
    dataset_ids: dict[str, str] = {}
    if args.service:
        from service.client import Client

        client = Client(args.service, args.token)
        for name, path in datasets.items():
            dataset_ids[name] = client.upload_dataset(path, name=f"course {name}")["id"]
    started = time.monotonic()
    if args.study:
        if client is None:
            raise SystemExit("--study needs --service (a running gpuyard)")
        for dataset in DATASETS:
            run_study(client, dataset, dataset_ids[dataset], specs, work)
        print(f"all studies: {time.monotonic() - started:.0f} s")
        write_report(work, mode="study")
        return
    for dataset in DATASETS:
        for name, spec in specs.items():
            out = work / "runs" / dataset / name
            t0 = time.monotonic()
            if client is not None:
                outcome = run_service(client, dataset_ids[dataset], spec, out)
            else:
                outcome = f"exit {run_direct(SPEC_DIR / f'{name}.json', datasets[dataset], out)}"
            print(f"{dataset:>13} {name:<22} {outcome:<10} {time.monotonic() - t0:6.1f} s", flush=True)
    print(f"all jobs: {time.monotonic() - started:.0f} s")
    write_report(work, mode="service" if client is not None else "trainer")


# ── the report ──
def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _events(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def hidden_norms(record: dict[str, Any]) -> list[float]:
    """Gradient norm of each hidden block with weights, input to output (the output layer left out)."""
    blocks = record.get("blocks") or {}
    return [
        b["gradient_norm"]
        for name, b in blocks.items()
        if name != "output" and isinstance(b.get("gradient_norm"), int | float) and b["gradient_norm"] > 0
    ]


def first_last_ratio(record: dict[str, Any]) -> float | None:
    norms = hidden_norms(record)
    return norms[0] / norms[-1] if len(norms) >= 2 else None


def replay_health(
    records: list[dict[str, Any]], history: dict[str, Any], *, family: str, thresholds: Any
) -> list[dict[str, Any]]:
    """The ``health`` events the trainer emits for these diagnostics records, replayed with today's rules.

    The same calls as ``worker.trainer.callbacks.HealthMonitor``: each record with that epoch's training loss,
    through a :class:`models.health.HealthWatch`.
    """
    losses = dict(zip(history.get("epoch") or [], history.get("loss") or [], strict=False))
    watch = HealthWatch()
    events = []
    for record in records:
        epoch = int(record["epoch"])
        train_loss = losses.get(epoch) if epoch > 0 else None
        if epoch > 0 and train_loss is None and epoch in losses:
            train_loss = float("nan")  # null in history.json: the loss was not finite
        findings = health_events(record, family=family, thresholds=thresholds, epoch=epoch, train_loss=train_loss)
        if watch.update(findings):
            events.append({"event": "health", "epoch": epoch, "findings": findings})
    return events


def collect(work: Path) -> list[dict[str, Any]]:
    """One row per job: spec name, dataset, family, depth, diagnostics, history, test accuracy, health."""
    thresholds = thresholds_from(None)
    rows = []
    for dataset in DATASETS:
        for name, spec in load_specs().items():
            out = work / "runs" / dataset / name
            family, depth = name.rsplit("_", 1)
            records = _read(out / names.DIAGNOSTICS) or []
            summary = _read(out / names.SUMMARY) or {}
            events = _events(out / "events.jsonl")
            history = _read(out / names.HISTORY) or {}
            health = replay_health(records, history, family=spec["architecture"]["family"], thresholds=thresholds)
            test = ((summary.get("metrics") or {}).get("test") or {}).get("accuracy")
            rows.append(
                {
                    "dataset": dataset,
                    "name": name,
                    "family": family,
                    "depth": int(depth),
                    "records": records,
                    "history": _read(out / names.HISTORY) or {},
                    "test_accuracy": test,
                    "health": health,
                    "failed": [e for e in events if e.get("event") == "failed"],
                }
            )
    return rows


def _plot_gradients(rows: list[dict[str, Any]], dataset: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DEPTHS), figsize=(5 * len(DEPTHS), 4), sharey=True)
    for ax, depth in zip(axes, DEPTHS, strict=True):
        for row in rows:
            if row["dataset"] == dataset and row["depth"] == depth and row["records"]:
                norms = hidden_norms(row["records"][0])
                ax.semilogy(range(1, len(norms) + 1), norms, marker=".", label=FAMILIES[row["family"]])
        ax.set_title(f"{dataset}, depth {depth}: epoch 0")
        ax.set_xlabel("hidden block (input → output)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("gradient L2 norm")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_ratios(rows: list[dict[str, Any]], dataset: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DEPTHS), figsize=(5 * len(DEPTHS), 4), sharey=True)
    for ax, depth in zip(axes, DEPTHS, strict=True):
        for row in rows:
            if row["dataset"] == dataset and row["depth"] == depth:
                points = [(r["epoch"], q) for r in row["records"] if (q := first_last_ratio(r)) is not None]
                if points:
                    ax.semilogy(*zip(*points, strict=True), marker=".", label=FAMILIES[row["family"]])
        ax.axhline(1e-3, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{dataset}, depth {depth}")
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("first / last hidden block gradient norm")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_losses(rows: list[dict[str, Any]], dataset: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DEPTHS), len(FAMILIES), figsize=(3 * len(FAMILIES), 2.4 * len(DEPTHS)))
    for i, depth in enumerate(DEPTHS):
        for j, family in enumerate(FAMILIES):
            ax = axes[i][j]
            row = next(r for r in rows if r["dataset"] == dataset and r["depth"] == depth and r["family"] == family)
            history = row["history"]
            for key, style in (("loss", "-"), ("val_loss", "--")):
                values = [v if isinstance(v, int | float) else math.nan for v in history.get(key) or []]
                if values:
                    ax.plot(history.get("epoch") or range(1, len(values) + 1), values, style, label=key)
            ax.set_yscale("log")  # BatchNorm's first validation losses reach 1e19 (moving statistics)
            ax.set_title(f"{FAMILIES[family].split(', ')[0].split(' (selu')[0]} d={depth}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: training (solid) and validation (dashed) loss per epoch, log scale")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(6 * len(DATASETS), 4), sharey=True)
    for ax, dataset in zip(axes, DATASETS, strict=True):
        for family in FAMILIES:
            values = [
                next(
                    (
                        r["test_accuracy"]
                        for r in rows
                        if r["dataset"] == dataset and r["family"] == family and r["depth"] == depth
                    ),
                    None,
                )
                or 0.0
                for depth in DEPTHS
            ]
            ax.plot(DEPTHS, values, marker="o", label=FAMILIES[family])
        ax.set_xticks(DEPTHS)
        ax.set_title(f"{dataset}: test accuracy")
        ax.set_xlabel("depth (hidden layers)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "–"


_MODES = {
    "service": "jobs submitted through the service",
    "study": "one grid study per data set through the service, docs/studies.md",
    "trainer": "each job in the trainer process, python -m worker.trainer --gpu cpu",
}


def write_report(work: Path, *, mode: str, report_dir: Path = REPORT_DIR) -> Path:
    """``report.md`` and its PNGs in ``report_dir`` (default docs/course/) from the runs under ``work``."""
    import matplotlib

    matplotlib.use("Agg")
    rows = collect(work)
    report_dir.mkdir(parents=True, exist_ok=True)
    for dataset in DATASETS:
        _plot_gradients(rows, dataset, report_dir / f"gradients_epoch0_{dataset}.png")
        _plot_ratios(rows, dataset, report_dir / f"ratio_per_epoch_{dataset}.png")
        _plot_losses(rows, dataset, report_dir / f"loss_{dataset}.png")
    _plot_accuracy(rows, report_dir / "test_accuracy.png")

    lines = [
        "# The course's deep-network experiments, reproduced with gpuyard jobs",
        "",
        "Made by `python examples/course/run.py run` "
        f"({_MODES.get(mode, mode)}); "
        "the specs are in `examples/course/specs/`. Every job: "
        f"{WIDTH} units per hidden layer, plain SGD (learning rate {TRAINING['optimizer']['learning_rate']}, "
        f"no momentum), batch {TRAINING['batch_size']}, {TRAINING['epochs']} epochs, "
        f"{int(TRAINING['validation_split'] * 100)} % of the training rows held out for validation, seed 0, "
        "inputs standardized. Depth counts the hidden Dense layers (residual: depth/2 blocks of two).",
        "",
        "Plain SGD on purpose, as the course does: Adam divides each parameter's step by the running size of "
        "its own gradient, so a layer whose gradient is 1e-9 of the last one's still moves at full speed; it "
        "hides a vanishing gradient instead of showing it.",
        "",
        "## Final test accuracy by family and depth",
        "",
        "![test accuracy](test_accuracy.png)",
        "",
        "| family | " + " | ".join(f"{d} depth {n}" for d in ("digits", "cancer") for n in DEPTHS) + " |",
        "|---|" + "---|" * (len(DATASETS) * len(DEPTHS)),
    ]
    for family, label in FAMILIES.items():
        cells = [
            _fmt(
                next(
                    (
                        r["test_accuracy"]
                        for r in rows
                        if r["dataset"] == dataset and r["family"] == family and r["depth"] == depth
                    ),
                    None,
                )
            )
            for dataset in DATASETS
            for depth in DEPTHS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Chance level: 0.10 on digits (10 balanced classes); 0.63 on breast cancer (the majority class).",
        "",
        "## Gradient norm by layer at epoch 0",
        "",
        "Measured by the trainer on its fixed probe batch before the first step (`diagnostics.json`, epoch 0).",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"![gradient norms at epoch 0, {dataset}](gradients_epoch0_{dataset}.png)", ""]
    lines += [
        "| family | " + " | ".join(f"{d} depth {n}" for d in ("digits", "cancer") for n in DEPTHS) + " |",
        "|---|" + "---|" * (len(DATASETS) * len(DEPTHS)),
    ]
    for family, label in FAMILIES.items():
        cells = []
        for dataset in DATASETS:
            for depth in DEPTHS:
                row = next(r for r in rows if r["dataset"] == dataset and r["family"] == family and r["depth"] == depth)
                cells.append(_fmt(first_last_ratio(row["records"][0]) if row["records"] else None, ".1e"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "First/last hidden-block gradient-norm ratio at epoch 0; gpuyard raises `vanishing_gradient` below "
        "1e-3 (`GPUYARD_HEALTH_VANISHING_RATIO`).",
        "",
        "## First/last ratio per epoch",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"![ratio per epoch, {dataset}](ratio_per_epoch_{dataset}.png)", ""]
    lines += ["## Training and validation loss", ""]
    for dataset in DATASETS:
        lines += [f"![loss curves, {dataset}](loss_{dataset}.png)", ""]
    lines += [
        "## Health events",
        "",
        "What gpuyard tells each job's owner (the `health` events: kind and epoch), replayed from each job's "
        "`diagnostics.json` and `history.json` with the trainer's rules (`models/health.py`).",
        "",
    ]
    lines += ["| dataset | job | health events |", "|---|---|---|"]
    for row in rows:
        found = "; ".join(
            f"epoch {h.get('epoch')}: " + ", ".join(sorted({f["kind"] for f in h.get("findings") or []}) or ["cleared"])
            for h in row["health"]
        )
        failed = "; ".join(f"failed: {f.get('reason')}" for f in row["failed"])
        lines.append(f"| {row['dataset']} | {row['name']} | {found or 'none'}{(' ' + failed) if failed else ''} |")
    lines += ["", *_conclusions(rows), ""]
    report = report_dir / "report.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report}")
    return report


def _conclusions(rows: list[dict[str, Any]]) -> list[str]:
    def row(dataset: str, family: str, depth: int) -> dict[str, Any]:
        return next(r for r in rows if r["dataset"] == dataset and r["family"] == family and r["depth"] == depth)

    def ratio(dataset: str, family: str, depth: int) -> float | None:
        records = row(dataset, family, depth)["records"]
        return first_last_ratio(records[0]) if records else None

    lines = ["## What the runs show", ""]
    for dataset in DATASETS:
        snn8, snn32 = row(dataset, "f_snn", 8)["test_accuracy"], row(dataset, "f_snn", 32)["test_accuracy"]
        sig8 = row(dataset, "a_sigmoid_xavier", 8)["test_accuracy"]
        sig32 = row(dataset, "a_sigmoid_xavier", 32)["test_accuracy"]
        lines.append(
            f"- **{dataset}**: the SNN reaches test accuracy {_fmt(snn8)} at depth 8 and {_fmt(snn32)} at depth 32; "
            f"the sigmoid MLP {_fmt(sig8)} at depth 8 and {_fmt(sig32)} at depth 32, its first hidden layer "
            f"getting {_fmt(ratio(dataset, 'a_sigmoid_xavier', 32), '.1e')} of the last one's gradient at depth 32 "
            f"(SNN: {_fmt(ratio(dataset, 'f_snn', 32), '.2g')}, "
            f"residual: {_fmt(ratio(dataset, 'e_residual', 32), '.2g')}, "
            f"Highway: {_fmt(ratio(dataset, 'd_highway', 32), '.2g')})."
        )
    lines += [
        "- The skip connections and SELU keep the gradient's scale from the first layer to the last at every "
        "depth; sigmoid loses about a factor 4 per layer, as the course says (the sigmoid's slope is at most 1/4).",
        "- The plain ReLU MLP with He initialisation starts with a healthy gradient but trains less reliably as it "
        "gets deeper with plain SGD; BatchNorm (evaluated on its moving statistics at epoch 0, hence the same "
        "epoch-0 curve) does not rescue depth 32 in 20 epochs here.",
        "- Highway's gradient reaches its first block, and its loss falls steadily, but with plain SGD at this "
        "learning rate it is the slowest learner: 20 epochs are not enough at depth 16 and 32.",
        "- Diagnostics run the model in inference mode (BatchNorm on its moving statistics, as the model is "
        "used). In the deepest BatchNorm networks the moving statistics lag the batch statistics far behind after "
        "the first epochs, so the evaluated model's loss overflows (see its validation loss) while the training "
        "loss looks fine: the `exploding_gradient` and `loss_not_finite` findings there describe the model as it "
        "would be used, and clear once the statistics catch up.",
        "- `dead_units` fires at initialisation on the plain deep ReLU MLPs (depth 32): more than half of some "
        "blocks' units never fire on the probe batch, the ReLU failure the course warns of; it clears as "
        "training moves the biases.",
        "",
        "Each row of the health table is what the job's owner saw during training; a `vanishing_gradient` at "
        "epoch 0 on every sigmoid MLP, and no finding at all for any Highway or SNN job, is the rule working as meant.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("specs", "run", "report"))
    parser.add_argument("--work", type=Path, default=ROOT / ".gpuyard" / "course", help="runs and data go here")
    parser.add_argument("--service", help="the API's URL; default: run the trainer directly")
    parser.add_argument("--token", default=os.environ.get("GPUYARD_TOKEN"), help="API token (or GPUYARD_TOKEN)")
    parser.add_argument("--only", nargs="*", help="run only the specs whose names start with these")
    parser.add_argument("--study", action="store_true", help="with --service: each data set's grid as one study")
    args = parser.parse_args(argv)
    if args.command == "specs":
        write_specs()
    elif args.command == "run":
        run_all(args)
    else:
        write_report(args.work, mode="service" if args.service else "trainer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
