"""Per-layer gradient norms and block activations, on TensorFlow and (in a subprocess) JAX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from worker.trainer.diagnostics import Diagnostics, gradient_norms, weighted_layers  # noqa: E402

JAX_AVAILABLE = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True).returncode == 0


def small_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="tanh", name="dense_a")(inputs)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense_b")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def probe(rows: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(rows, 8)).astype("float32"), rng.integers(0, 3, size=rows)


def test_gradient_norms_match_a_direct_tape() -> None:
    import tensorflow as tf

    model = small_model()
    x, y = probe()
    norms = gradient_norms(model, x, y)
    assert list(norms) == ["dense_a", "bn", "dense_b", "head"]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
    grads = tape.gradient(loss, model.get_layer("dense_a").trainable_weights)
    expected = float(np.sqrt(sum(np.sum(np.square(g.numpy())) for g in grads)))
    assert norms["dense_a"] == pytest.approx(expected, rel=1e-5)
    assert all(value > 0 for value in norms.values())
    # Deterministic (training=False: no dropout noise) and no random state consumed.
    assert gradient_norms(model, x, y) == norms


def test_records_have_blocks_with_activation_statistics() -> None:
    model = small_model()
    x, y = probe()
    blocks = {"block_1": ["dense_a", "drop", "bn"], "block_2": ["dense_b"], "output": ["head"]}
    record = Diagnostics(model, blocks, x, y).record(0)
    assert record["epoch"] == 0 and record["probe_rows"] == 32
    norms = record["gradient_norms"]
    block_1 = record["blocks"]["block_1"]
    assert block_1["gradient_norm"] == pytest.approx(np.hypot(norms["dense_a"], norms["bn"]))
    bn_out = keras.Model(model.inputs[0], model.get_layer("bn").output)(x, training=False).numpy()
    assert block_1["activation_mean"] == pytest.approx(float(bn_out.mean()), rel=1e-5, abs=1e-6)
    assert block_1["activation_std"] == pytest.approx(float(bn_out.std()), rel=1e-5)
    head = record["blocks"]["output"]
    assert head["activation_mean"] == pytest.approx(1 / 3, rel=1e-5)  # softmax rows sum to 1
    json.dumps(record, allow_nan=False)


def test_default_blocks_are_the_weighted_layers() -> None:
    model = small_model()
    x, y = probe()
    record = Diagnostics(model, None, x, y).record(3)
    assert list(record["blocks"]) == [layer.name for layer in weighted_layers(model)]


@pytest.mark.skipif(not JAX_AVAILABLE, reason="jax not installed")
def test_jax_backend_gives_the_same_norms(tmp_path: Path) -> None:
    model = small_model()
    x, y = probe()
    path = tmp_path / "m.keras"
    model.save(path)
    np.savez(tmp_path / "probe.npz", x=x, y=y)
    tf_norms = gradient_norms(model, x, y)
    script = textwrap.dedent(
        f"""
        import json, numpy as np, keras
        from worker.trainer.diagnostics import gradient_norms
        assert keras.backend.backend() == "jax"
        model = keras.models.load_model({str(path)!r})
        data = np.load({str(tmp_path / "probe.npz")!r})
        print(json.dumps(gradient_norms(model, data["x"], data["y"])))
        """
    )
    environ = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    jax_norms = json.loads(out.stdout.strip().splitlines()[-1])
    assert jax_norms.keys() == tf_norms.keys()
    for name, value in tf_norms.items():
        assert jax_norms[name] == pytest.approx(value, rel=1e-4), name
