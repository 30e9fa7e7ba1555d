"""Heads on embeddings: small user-supplied linear or MLP models run on each row's embedding.

Why in the model actors: a head is a few matrix products on the embedding the actor already
holds (the LAION aesthetic and NSFW predictors are heads of this kind), so it costs nothing next
to the model, and the embeddings never travel through the object store a second time.

Why the driver loads the file and ships the arrays: the driver must read the head anyway to
check its input dimension against the model before any work; shipping what it checked (a few
MB at most) means every actor runs exactly those weights, and no node needs access to the file.

Accepted layouts (a layer's weight is ``[out, in]`` as in ``torch.nn.Linear``, unless noted):

- ``weight`` (+ ``bias``): one linear layer (an ``nn.Linear`` state dict);
- ``<prefix><i>.weight`` (+ ``<prefix><i>.bias``) with integer ``i`` and one common prefix: the
  linear layers of an ``nn.Sequential`` in the order of ``i`` (``layers.0.weight``,
  ``layers.2.weight``, ... as in the LAION aesthetic MLP, whose dropouts and activations hold
  no weights; or ``0.weight``; or ``module.net.0.weight``);
- ``.npz`` only: ``W0, b0, W1, b1, ...`` with ``W_i`` of shape ``[in, out]`` (``x @ W + b``).

A ``.pt`` may wrap the state dict in ``{"state_dict": ...}`` (Lightning checkpoints); it is read
with ``torch.load(weights_only=True)``, so a pickled module is refused: save its ``state_dict()``.
Between layers runs ``hidden_activation`` (ReLU by default; ``none`` for the LAION aesthetic MLP,
which has no activations), after the last one ``activation``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage as pio

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
_LAYER_KEY = re.compile(r"^(.*?)(\d+)\.(weight|bias)$")
_NPZ_KEY = re.compile(r"^([Wb])(\d+)$")


class HeadError(ValueError):
    """A head file that cannot be used; the message names the file (and the key)."""


@dataclass
class HeadSpec:
    """A loaded head: plain arrays, so it pickles to every actor."""

    name: str  # the output column
    source: str  # the file it came from (for messages and the run record)
    layers: list[tuple[np.ndarray, np.ndarray]]  # (weight [out, in], bias [out]) float32, in order
    activation: str = "none"  # after the last layer: none | sigmoid | softmax
    hidden_activation: str = "relu"  # between layers: relu | none
    input: str = "image_embedding"  # the embedding column it reads

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.layers[-1][0].shape[0])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``[N, in]`` float32 -> ``[N, out]`` float32."""
        h = np.asarray(x, np.float32)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1 and self.hidden_activation == "relu":
                h = np.maximum(h, 0.0)
        if self.activation == "sigmoid":
            h = 1.0 / (1.0 + np.exp(-h))
        elif self.activation == "softmax":
            h = np.exp(h - h.max(axis=1, keepdims=True))
            h = h / h.sum(axis=1, keepdims=True)
        return h.astype(np.float32, copy=False)

    def field(self) -> pa.Field:
        """float32 for one output, a fixed-size list of float32 for several."""
        return pa.field(self.name, pa.float32() if self.out_dim == 1 else pa.list_(pa.float32(), self.out_dim))

    def column(self, embeddings: np.ndarray, valid: np.ndarray) -> pa.Array:
        """Pure batch function: the head's output for the rows where ``valid``, null elsewhere."""
        from pipelines.etl.embed import fixed_size_list

        out = np.zeros((len(valid), self.out_dim), np.float32)
        if valid.any():
            out[valid] = self.forward(embeddings[valid])
        if self.out_dim == 1:
            return pa.array(out[:, 0], pa.float32(), mask=~valid)
        return fixed_size_list(out, valid)

    def fingerprint(self) -> str:
        """A hash of the weights and settings: what a resume must match."""
        h = hashlib.sha256(f"{self.activation}|{self.hidden_activation}|{self.input}".encode())
        for w, b in self.layers:
            h.update(np.ascontiguousarray(w).tobytes())
            h.update(np.ascontiguousarray(b).tobytes())
        return h.hexdigest()[:16]

    def plan_settings(self) -> dict[str, Any]:
        """What ``OUTPUT/_plan.json`` records: a resume with another head is refused."""
        return {"name": self.name, "input": self.input, "in_dim": self.in_dim, "out_dim": self.out_dim,
                "layers": len(self.layers), "activation": self.activation,
                "hidden_activation": self.hidden_activation, "weights": self.fingerprint()}


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """A local head file's arrays by name (float32), by the file's extension."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise HeadError(f"{path}: a head must be a {', '.join(SUFFIXES)} file")
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(path)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        else:
            arrays = _read_torch(path)
        return {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    except HeadError:
        raise
    except Exception as e:  # a truncated or foreign file: one line naming it
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HeadError(f"{path}: cannot read the head: {why}") from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HeadError(f"{path}: not a state dict of tensors (save the head's state_dict()): "
                        f"{type(e).__name__}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HeadError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k: v.detach().float().numpy() for k, v in obj.items()}


def layers_from_arrays(arrays: dict[str, np.ndarray], source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The linear layers of a head from its named arrays (the layouts in the module docstring)."""
    if not arrays:
        raise HeadError(f"{source}: the file holds no arrays")
    keys = set(arrays)
    if keys <= {"weight", "bias"} and "weight" in keys:
        pairs = [(arrays["weight"], arrays.get("bias"))]
    elif all(_NPZ_KEY.match(k) for k in keys) and source.lower().endswith(".npz"):
        pairs = _numbered(arrays, source, lambda k: (_NPZ_KEY.match(k)[2], "weight" if k[0] == "W" else "bias"))
        pairs = [(w.T, b) for w, b in pairs]  # W_i is [in, out]
    else:
        prefixes = {m[1] for m in map(_LAYER_KEY.match, keys) if m}
        odd = sorted(k for k in keys if not _LAYER_KEY.match(k))
        if odd or len(prefixes) != 1:
            raise HeadError(f"{source}: unexpected key {(odd or sorted(keys))[0]!r}; a head is 'weight'/'bias', "
                            "'<prefix><i>.weight'/'.bias' with one prefix, or (.npz) 'W0, b0, W1, b1, ...'")
        pairs = _numbered(arrays, source, lambda k: _LAYER_KEY.match(k).group(2, 3))
    return _checked(pairs, source)


def _numbered(arrays, source, parse) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Group ``{key: array}`` into (weight, bias) pairs ordered by the layer number ``parse`` finds."""
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        number, kind = parse(key)
        by_layer.setdefault(int(number), {})[kind] = value
    for number, parts in sorted(by_layer.items()):
        if "weight" not in parts:
            raise HeadError(f"{source}: layer {number} has a bias but no weight")
    return [(p["weight"], p.get("bias")) for _, p in sorted(by_layer.items())]


def _checked(pairs, source) -> list[tuple[np.ndarray, np.ndarray]]:
    """Layers with 2-D weights, matching biases, and each layer's input the previous one's output."""
    out = []
    for i, (w, b) in enumerate(pairs):
        if w.ndim != 2:
            raise HeadError(f"{source}: layer {i} weight has shape {list(w.shape)}, expected [out, in]")
        b = np.zeros(w.shape[0], np.float32) if b is None else b.reshape(-1)
        if b.shape[0] != w.shape[0]:
            raise HeadError(f"{source}: layer {i} bias has {b.shape[0]} values for {w.shape[0]} outputs")
        if out and w.shape[1] != out[-1][0].shape[0]:
            raise HeadError(f"{source}: layer {i} takes {w.shape[1]} inputs but layer {i - 1} gives "
                            f"{out[-1][0].shape[0]}")
        out.append((np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)))
    return out


def load_head(cfg: Any, s3: pio.S3Options | None = None) -> HeadSpec:
    """A :class:`HeadSpec` from a ``heads:`` item (:class:`pipelines.config.HeadConfig`); an
    ``s3://`` file is copied to a temporary local file first."""
    path = cfg.path
    if pio.is_s3(path):
        with tempfile.TemporaryDirectory(prefix="clip-etl-head-") as tmp:
            arrays = read_arrays(pio.fetch_to_local(path, os.path.join(tmp, os.path.basename(path)), s3))
    else:
        if not os.path.isfile(path):
            raise HeadError(f"{path}: file not found")
        arrays = read_arrays(path)
    return HeadSpec(name=cfg.name, source=path, layers=layers_from_arrays(arrays, path),
                    activation=cfg.activation, hidden_activation=cfg.hidden_activation, input=cfg.input)


__all__ = [
    "HeadError",
    "HeadSpec",
    "layers_from_arrays",
    "load_head",
    "read_arrays",
]
