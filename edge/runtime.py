"""On-device inference: the LiteRT interpreter (or tflite-runtime) behind one small class."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.errors import BundleError

log = logging.getLogger(__name__)

MAX_TENSOR_BYTES = 64 * 1024 * 1024
"""The bytes of all a model's tensors together, from its own shapes, before they are allocated:
a detector's network takes well under 1 MB (the autoencoder's 46 tensors: 130 KB), and a model
that declares a tensor of gigabytes would take the Pi's memory (the security review)."""


def _interpreter_class() -> Any:
    """LiteRT's Interpreter, or tflite-runtime's where LiteRT is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise BundleError(
                "no TFLite runtime: install ai-edge-litert (or tflite-runtime on older systems)"
            ) from None
    return Interpreter


def runtime_name() -> str:
    """Which interpreter package this process uses, with its version."""
    cls = _interpreter_class()
    top = cls.__module__.split(".")[0]
    try:
        from importlib.metadata import version

        return f"{top} {version(top.replace('_', '-'))}"
    except Exception:  # metadata can be missing in odd installs; the name is enough
        return top


@dataclass(frozen=True)
class Quantization:
    """Affine int8 quantisation of a tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float to int8, rounded and clipped."""
        q = np.round(x / self.scale) + self.zero_point
        return np.clip(q, -128, 127).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """int8 to float32."""
        return (self.scale * (q.astype(np.float32) - self.zero_point)).astype(np.float32)


class TfliteModel:
    """A loaded .tflite model taking and returning float arrays, quantising where needed."""

    def __init__(self, content: bytes, num_threads: int = 1, name: str = "model") -> None:
        cls = _interpreter_class()
        try:
            with _quiet_stderr():
                self._interp = cls(model_content=content, num_threads=num_threads)
                _check_tensor_bytes(self._interp, name)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            said = _first_line(exc)
            if "Didn't find op" in said and "tflite_runtime" in runtime_name():  # stops at 2.14
                said += "; tflite-runtime lacks operations this model uses: install ai-edge-litert"
            raise BundleError(f"{name}: not a loadable TFLite model ({said})") from None
        inputs, outputs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:  # a second input was never fed: wrong scores
            raise BundleError(
                f"{name}: a model of {len(inputs)} inputs and {len(outputs)} outputs; a detector's "
                "network has one of each"
            )
        self._in, self._out = inputs[0], outputs[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self.output_shape = tuple(int(d) for d in self._out["shape"])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        self.input_quant = _quant(self._in)
        self.output_quant = _quant(self._out)

    @property
    def output_size(self) -> int:
        """Values in one output (classes of a classifier)."""
        return int(np.prod(self.output_shape))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (shape = input_shape) of float input; return float output."""
        if self.input_quant is not None:
            x = self.input_quant.quantize(x)
        self._interp.set_tensor(self._in["index"], x.astype(self.input_dtype, copy=False))
        self._interp.invoke()
        y = self._interp.get_tensor(self._out["index"])
        return self.output_quant.dequantize(y) if self.output_quant else y.astype(np.float32)


def _check_tensor_bytes(interp: Any, name: str) -> None:
    """Refuse a model whose tensors, as its shapes declare them, would take more than
    MAX_TENSOR_BYTES (checked before `allocate_tensors`), and one of several subgraphs: the
    tensors of a loop's body are not among the main graph's, and a WHILE that broadcast to
    128 MB passed the count (the second review); a detector's network is one graph."""
    count = getattr(getattr(interp, "_interpreter", None), "NumSubgraphs", None)
    subgraphs = count() if callable(count) else 1
    if subgraphs != 1:
        raise BundleError(
            f"{name}: a model of {subgraphs} subgraphs (control flow); a detector's network is "
            "one graph; refused"
        )
    total = 0
    for tensor in interp.get_tensor_details():
        size = int(np.prod([max(int(d), 0) for d in tensor["shape"]], dtype=np.float64))
        total += size * np.dtype(tensor["dtype"]).itemsize
    if total > MAX_TENSOR_BYTES:
        raise BundleError(
            f"{name}: its tensors would take {total / 2**20:.0f} MB, more than a detector's "
            f"network ever needs ({MAX_TENSOR_BYTES // 2**20} MB); refused"
        )


def _quant(detail: dict[str, Any]) -> Quantization | None:
    """The tensor's quantisation, or None for a float tensor."""
    if np.dtype(detail["dtype"]) not in (np.int8, np.uint8):
        return None
    scale, zero = detail["quantization"]
    return Quantization(float(scale), int(zero))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the runtime's C++ banner ("Created TensorFlow Lite XNNPACK delegate") on fd 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded use): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
