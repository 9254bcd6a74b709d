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
    members: int = 1,
) -> Any:
    """Mirror-image dense encoder/decoder; linear output so any scaled value can be rebuilt.

    With `visible` (`training.forecast`: the indices of the context features) the encoder
    sees only those: a fixed, untrained linear layer selects them, so the model predicts
    the features it does not see. A plain Dense layer, so Keras's safe loading and the
    numpy runtime take it as they are.

    With `members` > 1 (`training.ensemble`), that many independent stacks read the same
    input and their outputs are concatenated: the model to train, whose target is the input
    repeated `members` times (`ensemble_target`). `merge_members` then folds it into one
    plain model of this builder whose output is the members' mean.
    """
    import keras

    inputs = keras.Input(shape=(n_features,), name="features")
    x = inputs
    select = None
    if visible is not None:
        select = keras.layers.Dense(len(visible), trainable=False, name="context")
        x = select(x)
    outputs = _members(
        keras,
        x,
        members,
        lambda y, p: _dense_stack(keras, y, hidden_units, bottleneck, n_features, p),
    )
    model = keras.Model(inputs, outputs, name="dense_autoencoder")
    if select is not None and visible is not None:
        kernel = np.zeros((n_features, len(visible)), np.float32)
        kernel[visible, np.arange(len(visible))] = 1.0
        select.set_weights([kernel, np.zeros(len(visible), np.float32)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return model


def _dense_stack(
    keras: Any, x: Any, hidden_units: list[int], bottleneck: int, width: int, prefix: str
) -> Any:
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}encode_{i}")(x)
    x = keras.layers.Dense(bottleneck, activation="relu", name=f"{prefix}bottleneck")(x)
    for i, units in enumerate(reversed(hidden_units)):
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}decode_{i}")(x)
    return keras.layers.Dense(width, activation="linear", name=f"{prefix}reconstruction")(x)


def _members(keras: Any, x: Any, members: int, stack: Any) -> Any:
    """One stack (unprefixed names: the bundle's model) or `members` stacks named m0_, m1_,
    ... concatenated along the last axis."""
    if members == 1:
        return stack(x, "")
    outs = [stack(x, f"m{k}_") for k in range(members)]
    return keras.layers.Concatenate(axis=-1, name="members")(outs)


def ensemble_target(x: np.ndarray, members: int) -> np.ndarray:
    """The training target of a model built with `members`: the input once per member."""
    return x if members == 1 else np.concatenate([x] * members, axis=-1)


def merge_members(trained: Any, plain: Any, members: int) -> None:
    """Set `plain` (the same builder with every trainable width times `members`, members=1)
    to the exact mean of `trained`'s members.

    Parallel stacks are one wider stack with block-diagonal weights: the first layer's
    kernels side by side (all members read the same input), the middle ones on the
    diagonal, the last one's stacked and divided by `members` (the mean of the outputs).
    So the bundle holds one plain dense model that Keras's safe loading, the numpy runtime
    and the parity check take as they are.
    """
    targets = [layer for layer in plain.layers if _is_trained_dense(layer)]
    stacks = [
        [layer for layer in trained.layers if layer.name.startswith(f"m{k}_")
         and _is_trained_dense(layer)]
        for k in range(members)
    ]  # fmt: skip
    if any(len(stack) != len(targets) for stack in stacks):
        raise ValueError(f"{len(targets)} dense layers to fill, members have {stacks}")
    last = len(targets) - 1
    for j, target in enumerate(targets):
        kernels = [stack[j].get_weights()[0] for stack in stacks]
        biases = [stack[j].get_weights()[1] for stack in stacks]
        if j == last:
            kernel, bias = np.vstack(kernels) / members, np.mean(biases, axis=0)
        elif j == 0:
            kernel, bias = np.hstack(kernels), np.concatenate(biases)
        else:
            kernel = np.zeros((sum(k.shape[0] for k in kernels), sum(k.shape[1] for k in kernels)),
                              kernels[0].dtype)  # fmt: skip
            r = c = 0
            for k in kernels:
                kernel[r : r + k.shape[0], c : c + k.shape[1]] = k
                r, c = r + k.shape[0], c + k.shape[1]
            bias = np.concatenate(biases)
        target.set_weights([kernel, bias])
    shared = {layer.name: layer for layer in trained.layers if layer.name == "context"}
    for layer in plain.layers:
        if layer.name in shared:
            layer.set_weights(shared[layer.name].get_weights())


def _is_trained_dense(layer: Any) -> bool:
    return layer.__class__.__name__ == "Dense" and layer.name != "context"


def build_dense_window_autoencoder(
    n_features: int,
    window_length: int,
    hidden_units: list[int],
    bottleneck: int,
    learning_rate: float,
    forecast: bool = False,
    members: int = 1,
) -> Any:
    """The dense autoencoder of `build_dense_autoencoder` over a window flattened to
    window_length * n_features values, its output reshaped back to (window_length, n_features).
    With `forecast` the window's last row is cropped off the input (`training.forecast`): the
    model still outputs the whole window, the last row rebuilt from the rows before it.

    Input and output are windows, as the LSTM's are, so the per-entity window machinery
    (streamer/windows.py) serves it unchanged. With a bottleneck narrower than the window it
    cannot copy its input; each value is rebuilt from its recent neighbours (level and shape).
    The numpy runtime (streamer/lean.py: NumpyDenseWindowScorer) flattens and reshapes alike.
    `members`: as in `build_dense_autoencoder`, each member's windows concatenated along the
    feature axis.
    """
    import keras

    inputs = keras.Input(shape=(window_length, n_features), name="windows")
    x = inputs
    if forecast:
        x = keras.layers.Cropping1D((0, 1), name="past")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    width = window_length * n_features

    def stack(y: Any, prefix: str) -> Any:
        y = _dense_stack(keras, y, hidden_units, bottleneck, width, prefix)
        return keras.layers.Reshape((window_length, n_features), name=f"{prefix}windows_out")(y)

    outputs = _members(keras, x, members, stack)
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
