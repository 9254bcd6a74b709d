"""A numpy forward pass for dense autoencoders: serve without importing TensorFlow.

TensorFlow costs about 600 MB of RSS and 2.4 s of start-up before a single event is scored.
A dense autoencoder is a few matrix products, so training also exports its weights as plain
arrays (`dense_weights.npz`, loaded with `allow_pickle=False`) and the daemon scores with
numpy. `tests/contract/test_scorers.py` checks it against Keras on the same inputs.

>>> import numpy as np
>>> scorer = NumpyDenseScorer([np.eye(2, dtype=np.float32)], [np.zeros(2, np.float32)],
...                           ["linear"])
>>> scorer.reconstruct(np.array([[1.0, -2.0]], dtype=np.float32)).tolist()
[[1.0, -2.0]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ACTIVATIONS = {"relu", "linear"}


class NumpyDenseScorer:
    kind = "dense"

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
            n = int(data["layers"])
            activations = [str(a) for a in data["activations"]]
            kernels = [data[f"kernel_{i}"] for i in range(n)]
            biases = [data[f"bias_{i}"] for i in range(n)]
        return cls(kernels, biases, activations)

    @staticmethod
    def save_from_keras(model: Any, path: Path) -> None:
        """Export a Keras model made only of Dense layers (training/models.py builds those)."""
        arrays: dict[str, np.ndarray] = {}
        activations: list[str] = []
        for layer in model.layers:
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
        with path.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwargs
