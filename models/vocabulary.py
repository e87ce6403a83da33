"""The spec's vocabulary of losses and metrics: the names a job may ask for, and the aliases it may use.

Kept apart from ``models/spec.py`` (which imports them) so the spec's models read as a table of contents.
"""

from __future__ import annotations

# Losses are stored under their full Keras names: a model compiled with a short alias ("mse") saves to
# .h5 but then fails `load_model(..., compile=True)` on Keras >= 3.11 (FACTS.md, ".h5 loss-alias trap").
LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error",
    "huber",
    "log_cosh",
    "kl_divergence",
    "poisson",
    "hinge",
    "squared_hinge",
    "categorical_hinge",
    "cosine_similarity",
)
LOSS_ALIASES = {
    "mse": "mean_squared_error",
    "mae": "mean_absolute_error",
    "mape": "mean_absolute_percentage_error",
    "msle": "mean_squared_logarithmic_error",
    "kld": "kl_divergence",
    "kullback_leibler_divergence": "kl_divergence",
    "logcosh": "log_cosh",
    "huber_loss": "huber",
    "bce": "binary_crossentropy",
    "cce": "categorical_crossentropy",
    "scce": "sparse_categorical_crossentropy",
}
CLASSIFICATION_METRICS = (
    "accuracy",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "binary_accuracy",
    "top_k_categorical_accuracy",
    "sparse_top_k_categorical_accuracy",
    "auc",
)
METRICS = (
    *CLASSIFICATION_METRICS,
    "mean_absolute_error",
    "mean_squared_error",
    "root_mean_squared_error",
    "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error",
)
# Metric aliases load fine from .h5, but one spelling per metric keeps histories comparable across jobs.
METRIC_ALIASES = {
    "acc": "accuracy",
    "mae": "mean_absolute_error",
    "mse": "mean_squared_error",
    "rmse": "root_mean_squared_error",
    "mape": "mean_absolute_percentage_error",
    "msle": "mean_squared_logarithmic_error",
}
