"""The names of the files a job leaves behind, spelled once: artifacts, the trainer's log, its inputs.

A job's folder (``jobs/<job_id>/`` in storage, the trainer's ``--out``)::

    model.h5  model.keras  history.json  diagnostics.json  summary.json     the artifacts (downloadable)
    tensorboard.zip                                                         the TensorBoard logs, zipped
    tensorboard/                                                            the logs while the trainer writes
    model.onnx  saved_model.zip                                             exports, when asked for
    trainer.log                                                             the trainer's stderr
    spec.json  dataset.json  trainer.pid                                    what the worker hands the trainer
    checkpoint/state.json + checkpoint/model-NNNN.keras                     what --resume continues from
"""

from __future__ import annotations

MODEL_H5 = "model.h5"
MODEL_KERAS = "model.keras"
HISTORY = "history.json"
DIAGNOSTICS = "diagnostics.json"
SUMMARY = "summary.json"
#: The TensorBoard event files (worker/trainer/tensorboard.py), zipped at the end of every attempt.
TENSORBOARD_ZIP = "tensorboard.zip"
#: Exports of the trained model (``output.export`` in the spec, or ``gpuyard export`` afterwards).
MODEL_ONNX = "model.onnx"
SAVED_MODEL_ZIP = "saved_model.zip"
#: Export format (as the spec and the API name it) → the artifact it writes.
EXPORT_ARTIFACTS = {"onnx": MODEL_ONNX, "saved_model": SAVED_MODEL_ZIP}
EXPORT_FORMATS = tuple(EXPORT_ARTIFACTS)
#: What every successful training run writes (and tensorboard.zip, which every attempt leaves).
TRAINED_ARTIFACTS = (MODEL_H5, MODEL_KERAS, HISTORY, DIAGNOSTICS, SUMMARY)
#: Every artifact a finished job may offer for download (exports only once made), in the API's order.
ARTIFACT_NAMES = (*TRAINED_ARTIFACTS, TENSORBOARD_ZIP, *EXPORT_ARTIFACTS.values())
#: The Content-Type each artifact downloads with (a .keras file is a zip archive Keras defines no type for).
ARTIFACT_MEDIA_TYPES = {
    MODEL_H5: "application/x-hdf5",
    MODEL_KERAS: "application/octet-stream",
    HISTORY: "application/json",
    DIAGNOSTICS: "application/json",
    SUMMARY: "application/json",
    TENSORBOARD_ZIP: "application/zip",
    MODEL_ONNX: "application/octet-stream",
    SAVED_MODEL_ZIP: "application/zip",
}

#: The trainer's stderr, appended to by every attempt.
TRAINER_LOG = "trainer.log"
#: The spec the worker hands the trainer.
SPEC_FILE = "spec.json"
#: The data set's stored summary (sha256-verified by the trainer instead of checking the data again).
DATASET_SUMMARY_FILE = "dataset.json"
#: The running trainer's pid, so a later attempt on the same host can stop an orphan.
PID_FILE = "trainer.pid"
#: The checkpoint folder and its index file.
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "state.json"
#: The folder the trainer writes TensorBoard event files into (zipped into TENSORBOARD_ZIP).
TENSORBOARD_DIR = "tensorboard"
#: A job's model operations (evaluate, predict, export): ``operations/<op_id>/`` holds each one's input.
OPERATIONS_DIR = "operations"
