"""Keras autoencoders. TensorFlow is imported only here and where a bundle is loaded."""

from __future__ import annotations

from typing import Any

import numpy as np


def early_stopping(patience: int) -> Any:
    """The callback every training here uses: stop once the held-out loss has not improved
    for `patience` epochs, and keep the best epoch's weights."""
    import keras

    return keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )


def build_dense_autoencoder(
    n_features: int,
    hidden_units: list[int],
    bottleneck: int,
    learning_rate: float,
    visible: list[int] | None = None,
) -> Any:
    """Mirror-image dense encoder/decoder; linear output so any scaled value can be rebuilt.

    With `visible` (`training.forecast`: the indices of the context features) the encoder
    sees only those: a fixed, untrained linear layer selects them, so the model predicts
    the features it does not see. A plain Dense layer, so Keras's safe loading and the
    numpy runtime take it as they are.
    """
    import keras

    inputs, x = _dense_input(keras, n_features, visible)
    outputs = _dense_stack(keras, x, hidden_units, bottleneck, n_features, "")
    model = keras.Model(inputs, outputs, name="dense_autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return model


def build_fold_autoencoders(
    n_features: int,
    hidden_units: list[int],
    bottleneck: int,
    learning_rate: float,
    visible: list[int] | None,
    folds: int,
) -> Any:
    """`folds` dense autoencoders of `build_dense_autoencoder`'s shape side by side, their
    outputs concatenated, trained at once on targets from `fold_target`: member j learns
    from every row outside fold j, and is scored (validation, out-of-fold errors) on fold j.
    One model of k small stacks costs far less than k fits (k = 5 on NAB's histories: about
    2.5 times one bundle model's fit).
    """
    import keras

    inputs, x = _dense_input(keras, n_features, visible)
    outputs = keras.layers.Concatenate(name="folds")(
        [_dense_stack(keras, x, hidden_units, bottleneck, n_features, f"f{j}_")
         for j in range(folds)]
    )  # fmt: skip
    model = keras.Model(inputs, outputs, name="fold_autoencoders")

    def masked_mse(y_true: Any, y_pred: Any) -> Any:
        # y_true: the k targets, then k mask columns (1: this member counts this row).
        ops = keras.ops
        width = folds * n_features
        mask = y_true[:, width:]
        err = ops.reshape(ops.square(y_pred - y_true[:, :width]), (-1, folds, n_features))
        per_member = ops.mean(err, axis=-1)
        return ops.sum(per_member * mask, axis=-1) / ops.maximum(ops.sum(mask, axis=-1), 1.0)

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=masked_mse)
    return model


def fold_target(x: np.ndarray, fold: np.ndarray, folds: int, held_out: bool) -> np.ndarray:
    """The target of `build_fold_autoencoders` for rows `x` in folds `fold`: x once per
    member, then each member's mask: every fold but the row's (`held_out` False, training)
    or the row's own (True, validation).

    >>> fold_target(np.array([[5.0]]), np.array([1]), 2, held_out=False).tolist()
    [[5.0, 5.0, 1.0, 0.0]]
    """
    own = np.eye(folds, dtype=x.dtype)[fold]
    mask = own if held_out else 1 - own
    return np.concatenate([np.tile(x, folds), mask], axis=1)


def _dense_input(keras: Any, n_features: int, visible: list[int] | None) -> tuple[Any, Any]:
    inputs = keras.Input(shape=(n_features,), name="features")
    if visible is None:
        return inputs, inputs
    select = keras.layers.Dense(len(visible), trainable=False, name="context")
    x = select(inputs)
    kernel = np.zeros((n_features, len(visible)), np.float32)
    kernel[visible, np.arange(len(visible))] = 1.0
    select.set_weights([kernel, np.zeros(len(visible), np.float32)])
    return inputs, x


def _dense_stack(
    keras: Any, x: Any, hidden_units: list[int], bottleneck: int, width: int, prefix: str
) -> Any:
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}encode_{i}")(x)
    x = keras.layers.Dense(bottleneck, activation="relu", name=f"{prefix}bottleneck")(x)
    for i, units in enumerate(reversed(hidden_units)):
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}decode_{i}")(x)
    return keras.layers.Dense(width, activation="linear", name=f"{prefix}reconstruction")(x)


def build_dense_window_autoencoder(
    n_features: int,
    window_length: int,
    hidden_units: list[int],
    bottleneck: int,
    learning_rate: float,
    forecast: bool = False,
) -> Any:
    """The dense autoencoder of `build_dense_autoencoder` over a window flattened to
    window_length * n_features values, its output reshaped back to (window_length, n_features).
    With `forecast` the window's last row is cropped off the input (`training.forecast`): the
    model still outputs the whole window, the last row rebuilt from the rows before it.

    Input and output are windows, as the LSTM's are, so the per-entity window machinery
    (streamer/windows.py) serves it unchanged. With a bottleneck narrower than the window it
    cannot copy its input; each value is rebuilt from its recent neighbours (level and shape).
    The numpy runtime (streamer/lean.py: NumpyDenseWindowScorer) flattens and reshapes alike.
    """
    import keras

    inputs = keras.Input(shape=(window_length, n_features), name="windows")
    x = inputs
    if forecast:
        x = keras.layers.Cropping1D((0, 1), name="past")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense_stack(keras, x, hidden_units, bottleneck, window_length * n_features, "")
    outputs = keras.layers.Reshape((window_length, n_features), name="windows_out")(x)
    model = keras.Model(inputs, outputs, name="dense_window_autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return model


def build_lstm_autoencoder(
    n_features: int, window_length: int, units: list[int], learning_rate: float
) -> Any:
    """LSTM encoder to one vector, repeated per step, mirrored LSTM decoder, linear output.

    Default tanh/sigmoid activations and no dropout, so the numpy runtime
    (streamer/lean.py: NumpyLSTMScorer) can rebuild the forward pass exactly.
    """
    import keras

    inputs = keras.Input(shape=(window_length, n_features), name="windows")
    x = inputs
    for i, size in enumerate(units):
        # All but the last encoder layer hand the whole sequence on; the last one summarises.
        x = keras.layers.LSTM(size, return_sequences=i < len(units) - 1, name=f"encode_{i}")(x)
    x = keras.layers.RepeatVector(window_length, name="repeat")(x)
    for i, size in enumerate(reversed(units)):
        x = keras.layers.LSTM(size, return_sequences=True, name=f"decode_{i}")(x)
    outputs = keras.layers.Dense(n_features, activation="linear", name="reconstruction")(x)
    model = keras.Model(inputs, outputs, name="lstm_autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return model
