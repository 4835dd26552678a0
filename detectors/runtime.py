"""ONNX Runtime sessions and spec-driven pre-processing, shared by every ONNX model of detectors/.

Providers: CUDA first where onnxruntime-gpu sees a device, then CPU. A missing, corrupt or
mismatched model file is an error at load time that names the file and the fix, never a silent
fallback: a build whose filters silently stopped filtering would be worse than no build.

On the CUDA provider a batch runs through IO binding: the pre-processed batch is copied into a device
buffer kept per batch shape (no allocation per call), the outputs stay where the run wrote them and
are copied back once. On the CPU provider the session is called exactly as before (`session.run`).
The batch the session sees is `detect.batch_size`; a fractional GPU is `runtime.detector_gpus`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .spec import LoadedSpec, SpecError, Task, file_sha256, load_spec

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")


class DetectorOutputError(RuntimeError):
    """A model returned something unusable (NaN/inf, wrong shape) on a batch."""


def providers(requested: list[str] | None = None) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in (requested or PREFERRED_PROVIDERS) if p in available]
    if not chosen:
        raise SpecError(f"none of the ONNX Runtime providers {requested} is available here (have {sorted(available)})")
    return chosen


class OnnxModel:
    """An ONNX Runtime session plus the spec's pre-processing; subclasses read the outputs."""

    task: Task

    def __init__(
        self,
        spec: LoadedSpec | str,
        threads: int = 0,
        provider_list: list[str] | None = None,
        batch_size: int = 64,
        io_binding: bool | None = None,
    ):
        """`io_binding`: run batches through IO binding (None: exactly when CUDA is the session's provider)."""
        import onnxruntime as ort

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.loaded = spec if isinstance(spec, LoadedSpec) else load_spec(spec, self.task)
        if self.loaded.spec.task != self.task:
            raise SpecError(
                f"detector spec {self.loaded.path} describes a {self.loaded.spec.task} model, not a {self.task}"
            )
        self.spec = self.loaded.spec
        self.name = self.spec.name
        path = self.loaded.model_path
        if not path.is_file():
            raise SpecError(
                f"ONNX model {path} (from spec {self.loaded.path}) does not exist; fix `model:` in the spec, or "
                "rebuild the embedded models with `factory detectors train all`"
            )
        self.sha256 = file_sha256(path)
        if self.spec.sha256 and self.spec.sha256 != self.sha256:
            raise SpecError(
                f"ONNX model {path} is corrupt or was replaced: sha256 {self.sha256[:12]}... but spec "
                f"{self.loaded.path} says {self.spec.sha256[:12]}...; restore the file or update `sha256:`"
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers(provider_list))
        except Exception as err:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SpecError(
                f"ONNX model {path} could not be loaded ({first[:300]}); the file is corrupt or not ONNX - "
                "re-export it, or rebuild the embedded models with `factory detectors train all`"
            ) from None
        self.providers = self.session.get_providers()
        cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = cuda if io_binding is None else io_binding
        device_id = int(self.session.get_provider_options().get(self.providers[0], {}).get("device_id", 0))
        #: where bound inputs and outputs live: (ONNX Runtime device name, device id)
        self.binding_device: tuple[str, int] = ("cuda", device_id) if cuda else ("cpu", 0)
        self._buffers: dict[tuple[int, ...], Any] = {}  # device input buffers by batch shape (OrtValue)
        inputs = self.session.get_inputs()
        self.input_name = self.spec.input.name or inputs[0].name
        if self.input_name not in {i.name for i in inputs}:
            raise SpecError(
                f"spec {self.loaded.path}: input.name {self.input_name!r} is not an input of {path} "
                f"(inputs: {[i.name for i in inputs]})"
            )
        outs = self.session.get_outputs()
        self.output_names: list[str] = []
        self.output_widths: list[int | None] = []
        for k, o in enumerate(self.spec.outputs):
            if o.name is not None:
                match = [x for x in outs if x.name == o.name]
                if not match:
                    raise SpecError(
                        f"spec {self.loaded.path}: output {o.name!r} is not an output of {path} "
                        f"(outputs: {[x.name for x in outs]})"
                    )
                node = match[0]
            else:
                if k >= len(outs):
                    raise SpecError(
                        f"spec {self.loaded.path} lists {len(self.spec.outputs)} outputs; {path} has {len(outs)}"
                    )
                node = outs[k]
            self.output_names.append(node.name)
            width = node.shape[-1] if node.shape and isinstance(node.shape[-1], int) else None
            self.output_widths.append(width)
        self._check_widths()

    # -- to be refined by subclasses
    def expected_width(self, kind: str) -> int | None:
        return None

    def _check_widths(self, observed: list[int] | None = None) -> None:
        widths = observed or self.output_widths
        for o, name, w in zip(self.spec.outputs, self.output_names, widths):
            want = self.expected_width(o.kind)
            if w is not None and want is not None and w != want:
                raise SpecError(
                    f"spec {self.loaded.path} does not match {self.loaded.model_path}: output {name!r} has width "
                    f"{w} but the spec implies {want}{self._width_hint()}"
                )

    def _width_hint(self) -> str:
        return ""

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB -> float32 model input, as the spec says."""
        import torch

        from core.resize import resize_crop

        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be (B, H, W, 3) RGB, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be uint8 (0-255), got {images.dtype}")
        inp = self.spec.input
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255.0)
        x = resize_crop(x, inp.size, inp.resize)
        if inp.channel_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(inp.mean).view(1, 3, 1, 1)
        std = torch.tensor(inp.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        if inp.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """Raw outputs (one array per spec output, shape (B, width)) with NaN/inf and shape checks.

        Any number of images: the session sees them `batch_size` at a time.
        """
        if len(images) == 0:
            return [np.zeros((0, w or 0), np.float32) for w in self.output_widths]
        parts = [self._run_batch(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return [np.concatenate(cols) for cols in zip(*parts)] if len(parts) > 1 else parts[0]

    def _bound(self, x: np.ndarray) -> list[np.ndarray]:
        """One pre-processed batch through IO binding (see the module doc)."""
        import onnxruntime as ort

        device, device_id = self.binding_device
        buf = self._buffers.get(x.shape)
        if buf is None:
            if len(self._buffers) >= 2:  # a full batch and the last remainder; older remainders go
                self._buffers.pop(next(k for k in self._buffers if k[0] != self.batch_size))
            buf = self._buffers[x.shape] = ort.OrtValue.ortvalue_from_shape_and_type(
                list(x.shape), np.float32, device, device_id
            )
        buf.update_inplace(x)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, buf)
        for name in self.output_names:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _run_batch(self, images: np.ndarray) -> list[np.ndarray]:
        b = len(images)
        x = self.preprocess(images)
        outs = self._bound(x) if self.io_binding else self.session.run(self.output_names, {self.input_name: x})
        arrays = []
        for name, arr in zip(self.output_names, outs):
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 1:
                arr = arr[:, None]
            if arr.ndim != 2 or arr.shape[0] != b:
                raise DetectorOutputError(
                    f"{self.name}: output {name!r} has shape {arr.shape} for a batch of {b}; expected ({b}, width)"
                )
            bad = ~np.isfinite(arr).all(axis=1)
            if bad.any():
                raise DetectorOutputError(
                    f"{self.name} ({self.loaded.model_path.name}) returned NaN/inf in output {name!r} for "
                    f"{int(bad.sum())} of {b} images; the model or its input normalisation (spec "
                    f"{self.loaded.path}: input.mean/std) is broken - fix it before building"
                )
            arrays.append(arr)
        if any(w is None for w in self.output_widths):
            self._check_widths([a.shape[1] for a in arrays])
        return arrays

    def describe(self) -> dict[str, Any]:
        """Provenance: what build.json records about this model."""
        return {
            "task": self.task,
            "name": self.name,
            "spec": str(self.loaded.path),
            "model": str(self.loaded.model_path),
            "sha256": self.sha256,
            "providers": list(self.providers),
        }


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def log_providers(model: OnnxModel) -> None:
    log.info("%s: %s on %s", model.task, model.name, ", ".join(model.providers))
