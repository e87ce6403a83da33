"""What a checked HDF5 data set looks like: the keys to read and the summary the checks produce."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

Role = Literal["x_train", "y_train", "x_val", "y_val", "x_test", "y_test"]
TargetKind = Literal["integer_labels", "one_hot", "regression"]


class DataKeys(BaseModel):
    """Which HDF5 keys hold which array. Defaults follow the course's naming (``X_train``/``Y_train``)."""

    model_config = ConfigDict(extra="forbid")

    x_train: str = "X_train"
    y_train: str = "Y_train"
    x_val: str = "X_val"
    y_val: str = "Y_val"
    x_test: str = "X_test"
    y_test: str = "Y_test"
    num_classes: Annotated[int, Strict()] | None = Field(  # strict: "10" is not 10 (the job spec's data keys)
        None, ge=2, description="Declared number of classes; labels must lie in [0, num_classes)."
    )

    def role_keys(self) -> dict[str, str]:
        """Role → HDF5 key, for the six array roles."""
        return {role: getattr(self, role) for role in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}


class ArrayInfo(BaseModel):
    """One checked array."""

    key: str
    shape: list[int]
    dtype: str
    rows: int


class DatasetSummary(BaseModel):
    """The result of checking a data set: enough to build a model's input and output without reading it."""

    sha256: str
    size_bytes: int
    keys: DataKeys
    arrays: dict[str, ArrayInfo] = Field(description="By role (x_train, y_train, x_val, ...); absent roles left out.")
    rows: dict[str, int] = Field(description="Rows per split: train, and val/test where present.")
    input_shape: list[int] = Field(description="X_train's shape without the row axis.")
    target: TargetKind
    num_classes: int | None = Field(None, description="Classes for integer labels or one-hot rows.")
    classes: list[int] | None = Field(None, description="Distinct integer labels seen (at most 1000 listed).")
    output_dim: int = Field(description="Units of the output layer the data asks for.")

    def has(self, split: Literal["val", "test"]) -> bool:
        return split in self.rows
