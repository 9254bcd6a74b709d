"""A numpy forward pass for dense and LSTM autoencoders: serve without importing TensorFlow.

TensorFlow costs about 600 MB of RSS and 2.4 s of start-up before a single event is scored.
A dense autoencoder is a few matrix products, and an LSTM autoencoder a few more per time
step, so training also exports the weights as plain arrays (`dense_weights.npz`,
`dense_window_weights.npz` or `lstm_weights.npz`, loaded with `allow_pickle=False`) and the
daemon scores with numpy.
`tests/contract/test_scorers.py` checks both against Keras on the same inputs.

>>> import numpy as np
>>> scorer = NumpyDenseScorer([np.eye(2, dtype=np.float32)], [np.zeros(2, np.float32)],
...                           ["linear"])
>>> scorer.reconstruct(np.array([[1.0, -2.0]], dtype=np.float32)).tolist()
[[1.0, -2.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ACTIVATIONS = {"relu", "linear"}


class NumpyDenseScorer:
    kind = "dense"
    window_length: int | None = None  # one row per event, no window

    def __init__(
        self, kernels: list[np.ndarray], biases: list[np.ndarray], activations: list[str]
    ) -> None:
        if not (len(kernels) == len(biases) == len(activations)) or not kernels:
            raise ValueError("dense weights need one kernel, bias and activation per layer")
        for i, (k, b, a) in enumerate(zip(kernels, biases, activations, strict=True)):
            if a not in ACTIVATIONS:
                raise ValueError(f"layer {i}: activation {a!r} is not one of {sorted(ACTIVATIONS)}")
            if k.ndim != 2 or b.shape != (k.shape[1],):
                raise ValueError(f"layer {i}: kernel {k.shape} and bias {b.shape} do not fit")
            if i and kernels[i - 1].shape[1] != k.shape[0]:
                raise ValueError(
                    f"layer {i}: takes {k.shape[0]} inputs, gets {kernels[i - 1].shape[1]}"
                )
        self._layers = [
            (np.ascontiguousarray(k, np.float32), np.asarray(b, np.float32), a == "relu")
            for k, b, a in zip(kernels, biases, activations, strict=True)
        ]
        self.n_features = int(kernels[0].shape[0])

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        for kernel, bias, relu in self._layers:
            h = h @ kernel
            h += bias
            if relu:
                np.maximum(h, 0.0, out=h)
        return h

    @classmethod
    def load(cls, path: Path) -> NumpyDenseScorer:
        with np.load(path, allow_pickle=False) as data:
            return cls._from_arrays(data)

    @classmethod
    def _from_arrays(cls, data: Any) -> NumpyDenseScorer:
        n = int(data["layers"])
        activations = [str(a) for a in data["activations"]]
        kernels = [data[f"kernel_{i}"] for i in range(n)]
        biases = [data[f"bias_{i}"] for i in range(n)]
        return cls(kernels, biases, activations)

    @staticmethod
    def save_from_keras(model: Any, path: Path) -> None:
        """Export a Keras model made only of Dense layers (training/models.py builds those)."""
        _save(path, _dense_arrays(model.layers))


def _dense_arrays(layers: Sequence[Any]) -> dict[str, np.ndarray]:
    """Keras Dense layers (after an InputLayer) as the arrays NumpyDenseScorer loads."""
    arrays: dict[str, np.ndarray] = {}
    activations: list[str] = []
    for layer in layers:
        if layer.__class__.__name__ == "InputLayer":
            continue
        if layer.__class__.__name__ != "Dense":
            raise ValueError(f"layer {layer.name!r} is not Dense: no numpy export")
        kernel, bias = layer.get_weights()
        i = len(activations)
        arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = kernel, bias
        activations.append(layer.activation.__name__)
    arrays["layers"] = np.array(len(activations))
    arrays["activations"] = np.array(activations)
    return arrays


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwargs


class NumpyDenseWindowScorer:
    """A dense autoencoder over windows (n, window_length, d) flattened to window_length * d
    values, its output reshaped back: training/models.py's build_dense_window_autoencoder.

    >>> import numpy as np
    >>> dense = NumpyDenseScorer([np.eye(4, dtype=np.float32)], [np.zeros(4, np.float32)],
    ...                          ["linear"])
    >>> scorer = NumpyDenseWindowScorer(2, dense)
    >>> scorer.n_features, scorer.window_length
    (2, 2)
    >>> scorer.reconstruct(np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)).tolist()
    [[[1.0, 2.0], [3.0, 4.0]]]
    """

    kind = "dense_window"

    def __init__(self, window_length: int, dense: NumpyDenseScorer) -> None:
        width = dense.n_features
        if window_length < 1 or width % window_length:
            raise ValueError(
                f"a dense layer stack of {width} inputs does not take windows of "
                f"{window_length} rows"
            )
        out = dense._layers[-1][0].shape[1]
        if out != width:
            raise ValueError(f"the last layer gives {out} values, not the window's {width}")
        self.window_length: int | None = window_length  # the Scorer protocol's type
        self.n_features = width // window_length
        self._steps = window_length
        self._dense = dense

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """(n, window_length, d) float32 scaled windows -> their reconstruction, same shape."""
        x = np.asarray(x, dtype=np.float32)
        steps, d = self._steps, self.n_features
        if x.ndim != 3 or x.shape[1:] != (steps, d):
            raise ValueError(f"windows {x.shape} are not (n, {steps}, {d})")
        flat = self._dense.reconstruct(x.reshape(x.shape[0], steps * d))
        return flat.reshape(x.shape)

    @classmethod
    def load(cls, path: Path) -> NumpyDenseWindowScorer:
        with np.load(path, allow_pickle=False) as data:
            return cls(int(data["window_length"]), NumpyDenseScorer._from_arrays(data))

    @staticmethod
    def save_from_keras(model: Any, path: Path) -> None:
        """Export Flatten, Dense layers, Reshape (what the builder makes), after a Cropping1D
        of the last row (a forecast model); refuse the rest."""
        layers = [layer for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
        cropped = bool(layers) and layers[0].__class__.__name__ == "Cropping1D"
        if cropped:
            if tuple(layers[0].cropping) != (0, 1):
                raise ValueError(f"cropping {layers[0].cropping} is not the last row's (0, 1)")
            layers = layers[1:]
        names = [layer.__class__.__name__ for layer in layers]
        if len(names) < 3 or names[0] != "Flatten" or names[-1] != "Reshape":
            raise ValueError(f"layers {names}: not Flatten, Dense..., Reshape; no numpy export")
        shape = tuple(model.inputs[0].shape)
        if len(shape) != 3 or shape[1] is None or tuple(layers[-1].target_shape) != shape[1:]:
            raise ValueError(f"model input {shape} is not (batch, window_length, features)")
        arrays = _dense_arrays(layers[1:-1])
        if cropped:
            # Zero weights for the last row's values: the same product as cropping it off,
            # so the numpy pass needs no layer of its own for it.
            first = arrays["kernel_0"]
            arrays["kernel_0"] = np.vstack(
                [first, np.zeros((shape[2], first.shape[1]), first.dtype)]
            )
        arrays["window_length"] = np.array(int(shape[1]))
        # Build the scorer once: a model the numpy pass cannot run is refused here, at export.
        NumpyDenseWindowScorer(int(shape[1]), NumpyDenseScorer._from_arrays(arrays))
        _save(path, arrays)


@dataclass(frozen=True)
class LSTMLayer:
    """Keras LSTM weights: columns in Keras's gate order i, f, c, o (tanh and sigmoid)."""

    kernel: np.ndarray  # (inputs, 4 * units)
    recurrent_kernel: np.ndarray  # (units, 4 * units)
    bias: np.ndarray  # (4 * units,)
    return_sequences: bool


@dataclass(frozen=True)
class RepeatLayer:
    """Keras RepeatVector: one vector per sample becomes `n` identical time steps."""

    n: int


@dataclass(frozen=True)
class DenseLayer:
    """A linear Dense layer applied to every time step."""

    kernel: np.ndarray  # (inputs, outputs)
    bias: np.ndarray  # (outputs,)


Layer = LSTMLayer | RepeatLayer | DenseLayer


class NumpyLSTMScorer:
    """An LSTM autoencoder over windows (n, window_length, d), as training/models.py builds.

    A chain of LSTM, RepeatVector and (last) linear Dense layers whose output is shaped like
    its input. Per LSTM layer the input projection of all time steps is one matrix product;
    the time loop then runs over the whole batch at once. Inside, a step's values are laid
    out (features, batch): each gate is a contiguous block of rows, so the per-step
    elementwise work runs on contiguous memory (3-4x faster than column slices).

    >>> import numpy as np
    >>> zeros = LSTMLayer(np.zeros((2, 4), np.float32), np.zeros((1, 4), np.float32),
    ...                   np.zeros(4, np.float32), return_sequences=False)
    >>> out = DenseLayer(np.zeros((1, 2), np.float32), np.array([1.0, -1.0], np.float32))
    >>> scorer = NumpyLSTMScorer(3, [zeros, RepeatLayer(3), out])
    >>> scorer.reconstruct(np.zeros((1, 3, 2), np.float32)).tolist()
    [[[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]]]
    """

    kind = "lstm"

    def __init__(self, window_length: int, layers: Sequence[Layer]) -> None:
        if window_length < 1 or not layers or not isinstance(layers[0], LSTMLayer):
            raise ValueError("an LSTM scorer needs window_length >= 1 and an LSTM first layer")
        if not isinstance(layers[-1], DenseLayer):
            raise ValueError("an LSTM scorer's last layer must be Dense (the reconstruction)")
        self.window_length = window_length
        self.n_features = int(layers[0].kernel.shape[0])
        self._plan: list[_Recurrent | RepeatLayer | DenseLayer] = []
        width, sequence = self.n_features, True  # what the next layer is given
        for i, layer in enumerate(layers):
            if isinstance(layer, LSTMLayer):
                units = layer.recurrent_kernel.shape[0]
                k, r, b = layer.kernel, layer.recurrent_kernel, layer.bias
                if k.shape != (width, 4 * units) or r.shape != (units, 4 * units):
                    raise ValueError(f"layer {i}: LSTM kernels {k.shape}, {r.shape} do not fit")
                if b.shape != (4 * units,) or not sequence:
                    raise ValueError(f"layer {i}: LSTM bias {b.shape} or a non-sequence input")
                self._plan.append(
                    _Recurrent(
                        _gates(k).T.copy(), _gates(r).T.copy(), _gates(b)[:, None].copy(),
                        units, layer.return_sequences,
                    )
                )  # fmt: skip
                width, sequence = units, layer.return_sequences
            elif isinstance(layer, RepeatLayer):
                if sequence or layer.n != window_length:
                    raise ValueError(
                        f"layer {i}: RepeatVector({layer.n}) needs one vector per sample and "
                        f"n = window_length = {window_length}"
                    )
                self._plan.append(layer)
                sequence = True
            else:
                if i != len(layers) - 1 or layer.kernel.shape != (width, self.n_features):
                    raise ValueError(
                        f"layer {i}: Dense {layer.kernel.shape} must be last and map "
                        f"{width} to {self.n_features} features"
                    )
                if layer.bias.shape != (self.n_features,):
                    raise ValueError(f"layer {i}: Dense bias {layer.bias.shape} does not fit")
                kernel = np.asarray(layer.kernel, np.float32).T.copy()
                self._plan.append(DenseLayer(kernel, np.asarray(layer.bias, np.float32)[:, None]))
        if not sequence:
            raise ValueError("the last LSTM before Dense must return sequences")

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """(n, window_length, d) float32 scaled windows -> their reconstruction."""
        x = np.asarray(x, dtype=np.float32)
        steps, d = self.window_length, self.n_features
        if x.ndim != 3 or x.shape[1:] != (steps, d):
            raise ValueError(f"windows {x.shape} are not (n, {steps}, {d})")
        n = x.shape[0]
        if n == 0:
            return np.empty((0, steps, d), dtype=np.float32)
        h = np.ascontiguousarray(x.transpose(1, 2, 0))  # (steps, width, n)
        repeated = False  # h is (width, n), the same at every step (after RepeatVector)
        for layer in self._plan:
            if isinstance(layer, _Recurrent):
                h = _lstm(layer, h, repeated, steps)
                repeated = False
            elif isinstance(layer, RepeatLayer):
                repeated = True
            else:  # the last layer
                h = np.matmul(layer.kernel, h)
                h += layer.bias
                if repeated:
                    h = np.broadcast_to(h, (steps, *h.shape))
        return np.ascontiguousarray(h.transpose(2, 0, 1))

    @classmethod
    def load(cls, path: Path) -> NumpyLSTMScorer:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        return cls._from_arrays(arrays)

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray]) -> NumpyLSTMScorer:
        layers: list[Layer] = []
        sequences = [bool(r) for r in arrays["return_sequences"]]
        for i, kind in enumerate(str(k) for k in arrays["layers"]):
            if kind == "lstm":
                k, r = arrays[f"kernel_{i}"], arrays[f"recurrent_kernel_{i}"]
                layers.append(LSTMLayer(k, r, arrays[f"bias_{i}"], sequences[i]))
            elif kind == "repeat":
                layers.append(RepeatLayer(int(arrays[f"repeat_{i}"])))
            elif kind == "dense":
                layers.append(DenseLayer(arrays[f"kernel_{i}"], arrays[f"bias_{i}"]))
            else:
                raise ValueError(f"layer {i}: unknown kind {kind!r}")
        return cls(int(arrays["window_length"]), layers)

    @staticmethod
    def save_from_keras(model: Any, path: Path) -> None:
        """Export a chain of LSTM, RepeatVector and a final linear Dense layer; refuse the rest.

        Only what the numpy pass computes is accepted: default activations, no reversed or
        stateful LSTM. (Dropout only acts in training, so it is allowed.)
        """
        arrays: dict[str, np.ndarray] = {}
        kinds: list[str] = []
        return_sequences: list[bool] = []
        for layer in model.layers:
            name = layer.__class__.__name__
            if name == "InputLayer":
                continue
            i = len(kinds)
            if name == "TimeDistributed" and layer.layer.__class__.__name__ == "Dense":
                layer, name = layer.layer, "Dense"  # the same map applied to every step
            if name == "LSTM":
                activations = (layer.activation.__name__, layer.recurrent_activation.__name__)
                if activations != ("tanh", "sigmoid"):
                    raise ValueError(
                        f"layer {layer.name!r}: LSTM activations {activations}, "
                        "the numpy runtime has only (tanh, sigmoid)"
                    )
                if layer.go_backwards or layer.stateful or layer.return_state:
                    raise ValueError(
                        f"layer {layer.name!r}: go_backwards, stateful and return_state "
                        "LSTMs have no numpy export"
                    )
                weights = layer.get_weights()
                kernel, recurrent = weights[0], weights[1]
                bias = weights[2] if layer.use_bias else np.zeros(kernel.shape[1], np.float32)
                arrays[f"kernel_{i}"], arrays[f"recurrent_kernel_{i}"] = kernel, recurrent
                arrays[f"bias_{i}"] = bias
                kinds.append("lstm")
            elif name == "RepeatVector":
                arrays[f"repeat_{i}"] = np.array(int(layer.n))
                kinds.append("repeat")
            elif name == "Dense":
                if layer.activation.__name__ != "linear":
                    raise ValueError(
                        f"layer {layer.name!r}: Dense with {layer.activation.__name__}; the "
                        "numpy LSTM runtime takes only a final linear Dense"
                    )
                weights = layer.get_weights()
                arrays[f"kernel_{i}"] = weights[0]
                arrays[f"bias_{i}"] = (
                    weights[1] if layer.use_bias else np.zeros(weights[0].shape[1], np.float32)
                )
                kinds.append("dense")
            else:
                raise ValueError(f"layer {layer.name!r} ({name}): no numpy LSTM export")
            return_sequences.append(name == "LSTM" and bool(layer.return_sequences))
        shape = tuple(model.inputs[0].shape)
        if len(shape) != 3 or shape[1] is None:
            raise ValueError(f"model input {shape} is not (batch, window_length, features)")
        arrays["layers"] = np.array(kinds)
        arrays["return_sequences"] = np.array(return_sequences)
        arrays["window_length"] = np.array(int(shape[1]))
        # Build the scorer once: a model the numpy pass cannot run is refused here, at export.
        NumpyLSTMScorer._from_arrays(arrays)
        _save(path, arrays)


def _gates(w: np.ndarray) -> np.ndarray:
    """Keras's i, f, c, o columns as i, f, o, c, the sigmoid gates' halved.

    sigmoid(z) = 0.5 * tanh(z / 2) + 0.5: with the three sigmoid gates' weights halved (exact
    in floating point) and adjacent, one tanh over the whole block computes all four gates,
    and never overflows as exp(-z) would.
    """
    i, f, c, o = np.split(np.asarray(w, dtype=np.float32), 4, axis=-1)
    return np.concatenate([0.5 * i, 0.5 * f, 0.5 * o, c], axis=-1)


@dataclass(frozen=True)
class _Recurrent:
    """An LSTM layer as `_lstm` runs it: transposed, gates reordered by `_gates`."""

    kernel: np.ndarray  # (4 * units, inputs)
    recurrent_kernel: np.ndarray  # (4 * units, units)
    bias: np.ndarray  # (4 * units, 1)
    units: int
    return_sequences: bool


def _lstm(layer: _Recurrent, x: np.ndarray, repeated: bool, steps: int) -> np.ndarray:
    """One LSTM layer: x (steps, width, n), or (width, n) fed at every step when `repeated`.

    Returns (steps, units, n) with return_sequences, else the last step's (units, n).
    """
    u = layer.units
    n = x.shape[-1]
    proj = np.matmul(layer.kernel, x)  # the input's share of the gates, all steps at once
    proj += layer.bias
    c = np.zeros((u, n), dtype=np.float32)
    out = np.empty((steps, u, n), dtype=np.float32) if layer.return_sequences else None
    last = np.empty((u, n), dtype=np.float32)
    z = np.empty((4 * u, n), dtype=np.float32)
    tmp = np.empty((u, n), dtype=np.float32)
    h: np.ndarray | None = None  # the initial state is zero
    for t in range(steps):
        step_proj = proj if repeated else proj[t]
        if h is None:
            z[...] = step_proj
        else:
            np.matmul(layer.recurrent_kernel, h, out=z)
            z += step_proj
        np.tanh(z, out=z)
        gates = z[: 3 * u]  # sigmoid of the halved pre-activations (see _gates)
        gates *= 0.5
        gates += 0.5
        c *= z[u : 2 * u]  # forget gate
        np.multiply(z[:u], z[3 * u :], out=tmp)  # input gate * candidate
        c += tmp
        h = out[t] if out is not None else last
        np.tanh(c, out=h)
        h *= z[2 * u : 3 * u]  # output gate
    return out if out is not None else last
