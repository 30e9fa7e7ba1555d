"""One inference interface over every way this product runs CLIP: torch, TorchScript, ONNX, int8 ONNX.

Why one interface: the pipeline's model actors, zero-shot labelling and the search tool all need
"pixels or texts in, L2-normalized float32 embeddings out", plus the preprocessing, tokenizer and a
fingerprint to record in outputs. Which runtime does the arithmetic is a deployment choice
(``model.backend`` / ``model.precision`` in the pipeline config), not something callers should see.

What each backend runs:

- ``torch``: the model itself (the same tower modules that are exported). fp32; bf16 weights on
  CPUs with native bf16 instructions (``precision="bf16"`` forces it anywhere); int8 image
  matmuls on AVX512-VNNI CPUs without AMX (``precision="int8"``, :mod:`clip_core.int8`); fp16 on CUDA.
- ``torchscript``: the traced towers of an export directory, frozen and optimised for the host.
- ``onnx``: onnxruntime on the exported fp32 graphs (CUDA provider when present, else CPU).
- ``onnx-int8``: the same with int8-quantized MatMul/Gemm weights.

``source`` is anything ``load_model`` takes or a directory written by :mod:`clip_core.export`.
ONNX and TorchScript backends given a checkpoint export it once into a cache directory
(``$CLIP_ETL_CACHE_DIR``, default ``~/.cache/clip-etl``) keyed by the weights' fingerprint, so many
actors on one machine share one export.

Texts are trimmed per batch to the longest sequence (up to and including its EOT) before the
transformer: the causal mask makes the tokens after EOT irrelevant to the pooled feature, so the
result is the same and short captions run several times faster than at 77 tokens.

Threads: every encoder uses exactly the CPUs it is given (``num_threads``, else the CPUs a Ray
actor was assigned, else the CPUs this process may run on), for torch's intra-op pool and for
onnxruntime's, so several actors on one node never oversubscribe it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import CLIPConfig
from .model import CLIP
from .zero_shot import l2_normalize

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Encoder",
    "EncoderError",
    "available_cpus",
    "cpu_has_native_bf16",
    "cpu_prefers_int8_images",
    "cpu_info",
    "describe_flags",
    "encoder_for_model",
    "load_encoder",
    "resolve_backend",
    "resolve_num_threads",
    "retain_freed_memory",
]

BACKENDS = ("auto", "torch", "torchscript", "onnx", "onnx-int8")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# Intra-op scaling of one batch flattens out well before this; more threads only contend.
MAX_AUTO_THREADS = 32
CACHE_ENV = "CLIP_ETL_CACHE_DIR"
# Bump when the export code changes what a cached export contains.
CACHE_VERSION = "1"


class EncoderError(ValueError):
    """An encoder that cannot be built as asked, or an input it cannot encode; says which and why."""


# --------------------------------------------------------------------------------------------
# Resolving device, precision and threads.
# --------------------------------------------------------------------------------------------
# The CPU flags that decide a fast path; recorded with the run's resolved model.
FAST_PATH_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """This CPU's model name and which of :data:`FAST_PATH_FLAGS` it has (from /proc/cpuinfo);
    every throughput figure is recorded with it (``_run.json``, the benchmarks)."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": name, "cpus": available_cpus(), "flags": [f for f in FAST_PATH_FLAGS if f in flags]}


def describe_flags(info: dict[str, Any]) -> str:
    """``avx2=yes, fma=yes, ..., amx_int8=no`` for a :func:`cpu_info` result: what a benchmark prints."""
    return ", ".join(f"{f}={'yes' if f in info['flags'] else 'no'}" for f in FAST_PATH_FLAGS)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    Without them torch emulates bf16 matmuls, far slower than fp32 (on an AVX2-only CPU a bf16
    matmul measured 16x slower, the ViT-B/32 image tower 7x), so ``precision="auto"`` picks bf16
    only where this is true.
    """
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


def cpu_prefers_int8_images() -> bool:
    """True where ``precision="auto"`` runs the image tower in int8 (:mod:`clip_core.int8`): a CPU
    with int8 and bf16 dot products (AVX512-VNNI, AVX512-BF16) but no AMX, whose int8 matmul
    passes :func:`clip_core.int8.int8_matmul_is_exact`.

    There int8 images measured 1.4x the bf16 tower at a mean cosine of 0.99993 to fp32 (AVX512-BF16
    EPYC, BENCHMARKS.md). With AMX the bf16 tower is 4.2x fp32 already and quantizing every
    activation would cost more than the matmuls it speeds up; without bf16 the text tower would
    fall back to fp32, slower than the ONNX fp32 that such CPUs run.
    """
    from . import int8

    flags = set(cpu_info()["flags"])
    return {"avx512_vnni", "avx512_bf16"} <= flags and "amx_bf16" not in flags and int8.int8_matmul_is_exact()


def retain_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 256 << 20) -> bool:
    """Make glibc keep freed heap memory for reuse instead of handing it back to the OS after each
    batch; for long-lived inference processes (the pipeline's model actors, benchmarks).

    A forward allocates and frees tens of MB per layer. Under glibc's adaptive thresholds, once a
    process has freed other large blocks (decoded images, another model), it trims its heap after
    a layer and faults the same pages back in on the next: the int8 ViT-B/32 image tower measured
    ~70,000 page faults per batch of 32 and ran 1.2-1.3x slower inside a model actor (BENCHMARKS.md).
    Fixed thresholds stop that; the process then holds at most its own peak. Returns False (and
    changes nothing) without glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, reduced by a cgroup v2 CPU quota if one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _ray_assigned_cpus() -> int | None:
    """CPUs Ray reserved for the current worker, or None outside a Ray worker.

    Ray is only consulted when something already imported it: clip_core never requires Ray.
    An actor that reserved no CPU gets Ray's own thread setting (OMP_NUM_THREADS) or 1.
    """
    ray = sys.modules.get("ray")
    if ray is None:
        return None
    try:
        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray._private.worker.WORKER_MODE:
            return None  # the driver: its CPUs are not a reservation
        cpus = ctx.get_assigned_resources().get("CPU", 0.0)
    except Exception:  # any Ray internals drift: fall back to the process's CPUs
        return None
    if cpus > 0:
        return max(1, math.ceil(cpus))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else 1


def resolve_num_threads(num_threads: int | None = None) -> int:
    """Explicit ``num_threads``, else the Ray actor's CPUs, else :func:`available_cpus` (capped at 32)."""
    if num_threads is not None:
        if int(num_threads) < 1:
            raise EncoderError(f"num_threads must be >= 1, got {num_threads}")
        return int(num_threads)
    ray_cpus = _ray_assigned_cpus()
    if ray_cpus is not None:
        return ray_cpus
    return min(available_cpus(), MAX_AUTO_THREADS)


def _onnx_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_backend(backend: str, device: str = "auto", precision: str = "auto") -> str:
    """``auto`` -> the fastest backend whose accuracy holds our bound (mean cosine >= 0.9999 to
    fp32, BENCHMARKS.md) on this device, for the precision asked.

    - CUDA: ``torch`` (fp16 weights, SDPA kernels).
    - A CPU with native bf16 (AVX512-BF16, AMX), precision auto, bf16 or int8: ``torch`` with bf16
      weights, 2-4x fp32; with int8 images where :func:`cpu_prefers_int8_images` (2.6x fp32).
    - Any other CPU, or fp32 asked: ``onnx``, fp32 like torch and within ~2e-7 of it, 1.2x its
      image and 1.1-2.4x its caption throughput. Without onnxruntime/onnx installed, ``torch``.
    - Never ``onnx-int8``: fast on VNNI/AMX, but its cosines (0.99986 images, 0.9992 texts) miss
      the bound (per-tensor activation scales; the torch int8 image tower scales per row).

    Other names pass through.
    """
    if backend != "auto":
        return backend
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "torch"
    if precision in ("bf16", "int8") or (precision == "auto" and cpu_has_native_bf16()):
        return "torch"
    try:
        import onnx  # noqa: F401  (the export needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def resolve_device(device: str, backend: str) -> str:
    """``auto`` -> ``cuda`` when this backend can use a GPU here, else ``cpu``."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise EncoderError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    onnx = backend.startswith("onnx")
    cuda_ok = _onnx_cuda_available() if onnx else torch.cuda.is_available()
    if device == "auto":
        return "cuda" if cuda_ok else "cpu"
    if device.startswith("cuda") and not cuda_ok:
        what = "onnxruntime has no CUDAExecutionProvider" if onnx else "torch sees no CUDA device"
        raise EncoderError(f"device={device!r} asked for, but {what}")
    return device


def resolve_precision(precision: str, backend: str, device: str) -> str:
    """The precision a backend runs at; ``auto`` is the fastest one whose accuracy is measured to hold.

    torch: fp16 on CUDA; on CPU int8 (int8 image matmuls, bf16 text tower) where
    :func:`cpu_prefers_int8_images`, else bf16 where the CPU has native bf16, else fp32.
    torchscript and onnx: fp32. onnx-int8: int8.
    """
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.startswith("cuda")
    if backend == "torch":
        if precision == "auto":
            if cuda:
                return "fp16"
            return "int8" if cpu_prefers_int8_images() else ("bf16" if cpu_has_native_bf16() else "fp32")
        if precision == "fp16" and not cuda:
            raise EncoderError("precision='fp16' needs a CUDA device; on CPU use 'bf16', 'int8' or 'fp32'")
        if precision == "int8" and cuda:
            raise EncoderError("precision='int8' (int8 image matmuls) runs on CPUs; on CUDA use 'fp16' or 'fp32'")
        if precision == "int8":
            from . import int8

            try:
                int8.require_exact_int8()
            except int8.Int8Unsupported as e:
                raise EncoderError(str(e)) from None
        return precision
    native = "int8" if backend == "onnx-int8" else "fp32"
    if precision not in ("auto", native):
        raise EncoderError(f"backend {backend!r} runs at {native} only, got precision={precision!r}")
    return native


# --------------------------------------------------------------------------------------------
# The interface.
# --------------------------------------------------------------------------------------------
class Encoder:
    """L2-normalized float32 embeddings of images and texts, whatever runtime computes them.

    Subclasses implement ``_image_batch`` and ``_text_batch`` on validated, non-empty inputs;
    everything callers touch (input checks, tokenization, trimming, normalization) lives here.
    """

    name: str
    backend: str
    precision: str
    device: str
    embed_dim: int
    image_size: int
    context_length: int
    logit_scale: float
    fingerprint: str  # of this encoder: weights, backend, precision (and quantization details)
    source_fingerprint: str | None = None  # of the weights alone, whatever runs them
    num_threads: int

    def __init__(self, *, name: str, backend: str, precision: str, device: str, config: CLIPConfig,
                 logit_scale: float, fingerprint: str, num_threads: int, preprocess: Any, tokenizer: Any):
        self.name = name
        self.backend = backend
        self.precision = precision
        self.device = device
        self.config = config
        self.embed_dim = config.embed_dim
        self.image_size = config.vision.image_size
        self.context_length = config.text.context_length
        self.eot_token_id = config.text.eot_token_id
        self.logit_scale = float(logit_scale)
        self.fingerprint = fingerprint
        self.num_threads = num_threads
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self.trim_text = True  # False runs every text at the full input length (for checking the trim)
        # Rows per length bucket: small on CPU (fewer padded tokens), large on GPUs (bigger kernels).
        self.text_bucket_rows = 256 if device.startswith("cuda") else 16
        self._apply_threads()

    # -- threads ---------------------------------------------------------------------------
    def _apply_threads(self) -> None:
        """Set torch's intra-op pool to our CPUs (cheap to repeat: others may have changed it)."""
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str] | str, truncate: bool = True) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (int64) with this model's tokenizer and context length."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts), context_length=self.context_length, truncate=truncate)

    def _as_tokens(self, texts: Any) -> torch.Tensor:
        if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str)):
            return self.tokenize(texts, truncate=True)
        if isinstance(texts, (list, tuple)) and not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        tokens = torch.as_tensor(np.asarray(texts) if not isinstance(texts, torch.Tensor) else texts)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dtype.is_complex:
            raise EncoderError(f"token ids must be integers, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise EncoderError(f"token ids must be [N, L], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise EncoderError(f"token ids have length {tokens.shape[1]} > context_length {self.context_length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.text.vocab_size):
            raise EncoderError(f"token ids must lie in [0, {self.config.text.vocab_size}), "
                               f"got {int(tokens.min())}..{int(tokens.max())}")
        return tokens.to(torch.long)

    def text_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per row, the number of leading tokens that determine its embedding (up to and including EOT)."""
        from .export import eot_positions

        return eot_positions(tokens, self.eot_token_id).to(torch.long) + 1

    def encode_texts(self, texts: Sequence[str] | str | torch.Tensor | np.ndarray) -> np.ndarray:
        """Strings (tokenized with truncation) or token ids ``[N, L]`` -> ``[N, D]`` float32, L2-normalized.

        Rows are sorted by length and run in buckets of ``text_bucket_rows``, each trimmed to its
        longest row: with the causal mask this changes nothing in fp32 (rows are independent), and
        a batch of mixed short captions runs on far fewer tokens than at full length.
        """
        tokens = self._as_tokens(texts)
        n = tokens.shape[0]
        if n == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        self._apply_threads()
        if not self.trim_text:
            return l2_normalize(self._text_batch(tokens.contiguous()))
        lengths = self.text_lengths(tokens)
        if n <= self.text_bucket_rows:
            return l2_normalize(self._text_batch(tokens[:, : int(lengths.max())].contiguous()))
        order = torch.argsort(lengths, stable=True)
        out = np.empty((n, self.embed_dim), dtype=np.float32)
        for idx in torch.tensor_split(order, math.ceil(n / self.text_bucket_rows)):
            out[idx.numpy()] = self._text_batch(tokens[idx, : int(lengths[idx].max())].contiguous())
        return l2_normalize(out)

    # -- images ----------------------------------------------------------------------------
    def _as_pixels(self, pixels: Any) -> torch.Tensor:
        if isinstance(pixels, (list, tuple)):  # a list of [3, R, R] tensors, as preprocess returns them
            empty = torch.zeros(0, 3, self.image_size, self.image_size)
            pixels = torch.stack([torch.as_tensor(p) for p in pixels]) if pixels else empty
        x = torch.as_tensor(pixels) if not isinstance(pixels, torch.Tensor) else pixels
        expected = (3, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise EncoderError(f"pixels must be [N, {', '.join(map(str, expected))}], got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise EncoderError(f"pixels must be floating point (preprocessed), got dtype {x.dtype}")
        return x.to(torch.float32).contiguous()

    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """Preprocessed pixels ``[N, 3, R, R]`` -> ``[N, D]`` float32, L2-normalized."""
        x = self._as_pixels(pixels)
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        self._apply_threads()
        return l2_normalize(self._image_batch(x))

    # -- backend hooks ---------------------------------------------------------------------
    def _image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _text_batch(self, tokens: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def warmup(self) -> "Encoder":
        """Run one tiny batch through both towers: sessions and kernels are ready before real work,
        and a broken export fails at actor start rather than on the first batch."""
        self.encode_images(torch.zeros(1, 3, self.image_size, self.image_size))
        self.encode_texts(torch.tensor([[self.eot_token_id]], dtype=torch.long))
        return self

    # -- description -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What to record next to the embeddings (``_run.json``, Parquet metadata)."""
        return {"name": self.name, "backend": self.backend, "precision": self.precision, "device": self.device,
                "fingerprint": self.fingerprint, "embed_dim": self.embed_dim, "image_size": self.image_size,
                "context_length": self.context_length, "logit_scale": self.logit_scale,
                "num_threads": self.num_threads}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"device={self.device!r}, fingerprint={self.fingerprint!r})")


# --------------------------------------------------------------------------------------------
# Backends.
# --------------------------------------------------------------------------------------------
class TorchEncoder(Encoder):
    """The model in eager torch under ``inference_mode``; bf16 and fp16 by weights converted once;
    int8 by the image tower's linear layers quantized once (:mod:`clip_core.int8`) with the text
    tower in bf16 where the CPU has it natively (its int8 cosine, 0.99965, misses the bound).

    Converted weights, not autocast: autocast re-casts every weight on every call, which on a
    CPU with AMX cost more than the matmuls (ViT-B/32, 1 thread, Sapphire Rapids: 16.9 images/s
    by autocast, 33.4 converted, 11.5 fp32). The numbers are the same either way: LayerNorm
    computes in fp32 inside the model, and the towers normalize in fp32 (BENCHMARKS.md has the
    cosine to fp32). On CUDA fp16 is OpenAI's own choice, halving memory traffic.
    """

    def __init__(self, model: CLIP, *, device: str, precision: str, **kw: Any):
        from .export import ImageTower, TextTower
        from .int8 import quantize_image_tower

        model = model.eval().to(device)
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)  # pixels'
        if precision == "int8":
            model = quantize_image_tower(model.float())
            model.text_to(torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
        elif self._dtype != torch.float32:
            model = model.to(self._dtype)
        self._image = ImageTower(model).eval()
        self._text = TextTower(model).eval()
        super().__init__(device=device, precision=precision, config=model.config, **kw)

    def _image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self._image(pixels.to(self.device, self._dtype))
        return out.float().cpu().numpy()

    def _text_batch(self, tokens: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self._text(tokens.to(self.device))
        return out.float().cpu().numpy()


class TorchScriptEncoder(Encoder):
    """Traced towers from an export directory, frozen and optimised for this host at load time."""

    def __init__(self, folder: Path, doc: dict[str, Any], *, device: str, **kw: Any):
        self._image = _load_script(folder / doc["graphs"]["image"], device)
        self._text = _load_script(folder / doc["graphs"]["text"], device)
        super().__init__(device=device, config=CLIPConfig.from_dict(doc["model"]), **kw)

    def _image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self._image(pixels.to(self.device)).float().cpu().numpy()

    def _text_batch(self, tokens: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self._text(tokens.to(self.device)).float().cpu().numpy()


def _load_script(path: Path, device: str) -> torch.jit.ScriptModule:
    """Load, freeze (weights become constants) and let torch fuse/prepack for this host, as the seed does.

    TorchScript is deprecated in favour of torch.export/compile; the warnings say so on every load,
    which is noise in job logs, so they are silenced here (the format works and is tested).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device).eval()
        return torch.jit.optimize_for_inference(torch.jit.freeze(module))


class OnnxEncoder(Encoder):
    """onnxruntime sessions over the exported graphs, created on first use of each tower.

    Lazy sessions mean an image-only actor never loads the text graph (and the reverse).
    """

    def __init__(self, folder: Path, doc: dict[str, Any], *, device: str, num_threads: int, **kw: Any):
        self._folder = folder
        self._doc = doc
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        super().__init__(device=device, num_threads=num_threads, config=CLIPConfig.from_dict(doc["model"]), **kw)

    def session_options(self):
        """Full graph optimisation; intra-op threads = our CPUs; one inter-op thread (the graph is a chain)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.num_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initializers etc. are noise in job logs
        return so

    def providers(self) -> list[Any]:
        if self.device.startswith("cuda"):
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session(self, tower: str):
        """The onnxruntime session of ``tower`` ("image" or "text"), created once."""
        with self._lock:
            if tower not in self._sessions:
                import onnxruntime as ort

                path = self._folder / self._doc["graphs"][tower]
                self._sessions[tower] = ort.InferenceSession(str(path), self.session_options(),
                                                             providers=self.providers())
            return self._sessions[tower]

    def _run(self, tower: str, array: np.ndarray) -> np.ndarray:
        name = self._doc["inputs"][tower]
        return self.session(tower).run(None, {name: array})[0]

    def _image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        return self._run("image", pixels.cpu().numpy())

    def _text_batch(self, tokens: torch.Tensor) -> np.ndarray:
        return self._run("text", tokens.cpu().numpy().astype(np.int64, copy=False))


# --------------------------------------------------------------------------------------------
# Construction.
# --------------------------------------------------------------------------------------------
def _tokenizer_for(folder: Path | None, doc: dict[str, Any] | None):
    """The shared default tokenizer, unless an export directory carries a different vocabulary."""
    from .tokenizer import DEFAULT_BPE_PATH, Tokenizer, get_default_tokenizer

    if doc is None or folder is None:
        return get_default_tokenizer()
    vocab = folder / doc["tokenizer"]["vocabulary"]
    if _sha256(vocab) == _sha256(DEFAULT_BPE_PATH):
        return get_default_tokenizer()
    return Tokenizer(vocab, context_length=doc["tokenizer"]["context_length"])


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """File hash, memoised by (path, size, mtime): many encoders in one process share one vocabulary."""
    from .export import _file_sha256

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _file_sha256(path)
    return _SHA_CACHE[key]


def cache_dir(*parts: str) -> Path:
    """The one cache root of the project (``$CLIP_ETL_CACHE_DIR``, default ``~/.cache/clip-etl``):
    model exports here, fetched checkpoints and local copies of S3 indexes in the pipelines."""
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/clip-etl")).joinpath(*parts)


def _export_for(model: CLIP, name: str, source_fp: str, fmt: str) -> tuple[Path, Any]:
    """An export of ``model`` in ``fmt``: from the shared cache, made now if missing.

    Returns (directory, keep-alive object); the second is a TemporaryDirectory when the cache is
    not writable and the export had to go to a private temporary directory.
    """
    from .export import ExportError, export_model, is_export_dir

    key = f"{source_fp}-{fmt}-v{CACHE_VERSION}"
    target = cache_dir("exports", key)
    if is_export_dir(target):
        return target, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        export_model(model, target, fmt, source_name=name, source_fingerprint=source_fp)
        return target, None
    except (ExportError, OSError):
        if is_export_dir(target):  # another process finished the same export first
            return target, None
        if target.parent.is_dir() and os.access(target.parent, os.W_OK):
            raise  # the cache was usable: this is a real export failure
    tmp = tempfile.TemporaryDirectory(prefix="clip-etl-export-")
    out = Path(tmp.name) / key
    export_model(model, out, fmt, source_name=name, source_fingerprint=source_fp)
    return out, tmp


def encoder_for_model(model: CLIP) -> Encoder:
    """A torch fp32 :class:`Encoder` over ``model`` itself, e.g. to evaluate a model while it trains.

    Unlike ``load_encoder(model)`` it neither copies nor hashes the weights (both cost as much as
    the evaluation, and the weights change every step), so its fingerprint is a placeholder. It
    runs on the model's own device, so the model is not moved, and keeps torch's current thread
    count, which the training chose. The model is put in eval mode (the caller restores its mode).
    """
    from .preprocess import image_transform

    return TorchEncoder(
        model, device=str(next(model.parameters()).device), precision="fp32",
        name="<in-memory model>", backend="torch", num_threads=torch.get_num_threads(),
        logit_scale=float(model.logit_scale.detach().float().exp()), fingerprint="unfingerprinted",
        preprocess=image_transform(model.config.vision.image_size), tokenizer=_tokenizer_for(None, None),
    )


def load_encoder(source: str | os.PathLike | CLIP, backend: str = "torch", precision: str = "auto",
                 device: str = "auto", num_threads: int | None = None) -> Encoder:
    """Build an :class:`Encoder` from a checkpoint (anything ``load_model`` takes) or an export directory.

    An export directory runs with the backend it was exported for; ``backend`` may name it or be
    ``torch``/``auto``. ``backend="auto"`` picks ``torch`` on CUDA and on CPUs with native bf16,
    else ``onnx`` (:func:`resolve_backend`). A ``CLIP`` instance is accepted too (for notebooks and tests).
    """
    from .checkpoints import load_model, model_fingerprint
    from .export import derived_fingerprint, is_export_dir, read_export_config
    from .preprocess import image_transform

    if backend not in BACKENDS:
        raise EncoderError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    threads = resolve_num_threads(num_threads)
    name = "<in-memory model>" if isinstance(source, CLIP) else str(source)

    folder: Path | None = None
    doc: dict[str, Any] | None = None
    if not isinstance(source, CLIP) and is_export_dir(source):
        folder = Path(os.path.expanduser(str(source)))
        doc = read_export_config(folder)
        if backend not in (doc["backend"], "torch", "auto"):
            raise EncoderError(f"{folder} holds a {doc['backend']!r} export; it cannot run as backend {backend!r}")
        backend = doc["backend"]
    backend = resolve_backend(backend, device, precision)
    # Settle device and precision before any slow work (loading, exporting) so a bad request fails fast.
    device = resolve_device(device, backend)
    precision = resolve_precision(precision, backend, device)
    common: dict[str, Any] = {"name": name, "backend": backend, "precision": precision, "num_threads": threads}

    if backend == "torch":
        if isinstance(source, CLIP):
            # dtype conversion and device moves happen in place: leave the caller's model as it was.
            model = copy.deepcopy(source) if (precision in ("fp16", "bf16", "int8") or device != "cpu") else source
        else:
            model = load_model(source)
        source_fp = model_fingerprint(model)
        encoder = TorchEncoder(
            model, device=device,
            logit_scale=float(model.logit_scale.detach().float().exp()),
            fingerprint=derived_fingerprint(source_fp, "torch", precision),
            preprocess=image_transform(model.config.vision.image_size),
            tokenizer=_tokenizer_for(None, None), **common,
        )
        encoder.source_fingerprint = source_fp
        return encoder

    keep_alive = None
    if doc is None:
        model = source if isinstance(source, CLIP) else load_model(source)
        folder, keep_alive = _export_for(model, name, model_fingerprint(model), backend)
        doc = read_export_config(folder)
        del model  # the runtime reads the graphs; the torch weights are no longer needed
    assert folder is not None
    pre = doc["preprocess"]
    kw = dict(device=device, logit_scale=doc["logit_scale"], fingerprint=doc["fingerprint"],
              preprocess=image_transform(pre["image_size"], pre["mean"], pre["std"]),
              tokenizer=_tokenizer_for(folder, doc), **common)
    if backend == "torchscript":
        encoder: Encoder = TorchScriptEncoder(folder, doc, **kw)
    else:
        encoder = OnnxEncoder(folder, doc, **kw)
    encoder._keep_alive = keep_alive  # type: ignore[attr-defined]  # a temp export lives as long as its encoder
    encoder.source_fingerprint = (doc.get("source") or {}).get("fingerprint")
    return encoder
