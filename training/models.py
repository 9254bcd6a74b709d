"""Keras autoencoders. TensorFlow is imported only here and where a bundle is loaded."""

from __future__ import annotations

from typing import Any

import numpy as np


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

    inputs = keras.Input(shape=(n_features,), name="features")
    x = inputs
    select = None
    if visible is not None:
        select = keras.layers.Dense(len(visible), trainable=False, name="context")
        x = select(x)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"encode_{i}")(x)
    x = keras.layers.Dense(bottleneck, activation="relu", name="bottleneck")(x)
    for i, units in enumerate(reversed(hidden_units)):
        x = keras.layers.Dense(units, activation="relu", name=f"decode_{i}")(x)
    outputs = keras.layers.Dense(n_features, activation="linear", name="reconstruction")(x)
    model = keras.Model(inputs, outputs, name="dense_autoencoder")
    if select is not None and visible is not None:
        kernel = np.zeros((n_features, len(visible)), np.float32)
        kernel[visible, np.arange(len(visible))] = 1.0
        select.set_weights([kernel, np.zeros(len(visible), np.float32)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return model


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
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"encode_{i}")(x)
    x = keras.layers.Dense(bottleneck, activation="relu", name="bottleneck")(x)
    for i, units in enumerate(reversed(hidden_units)):
        x = keras.layers.Dense(units, activation="relu", name=f"decode_{i}")(x)
    width = window_length * n_features
    x = keras.layers.Dense(width, activation="linear", name="reconstruction")(x)
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
