"""Export a CLIP model as two self-contained inference graphs: ONNX, int8 ONNX or TorchScript.

Why two graphs: a pipeline embeds images and texts in different stages, often on different
workers, so each tower is its own file with its own dynamic axes (batch for images; batch and
sequence length for texts, so a batch of short captions can be trimmed before it runs).

Why a directory: ``load_encoder(DIR)`` must need nothing else. ``DIR`` holds the graphs, a copy of
the BPE vocabulary and ``config.json`` with the architecture, the preprocessing, the tokenizer and
the fingerprint of the weights the graphs were made from::

    DIR/config.json            what load_encoder reads first (format tag "clip-etl-export/1")
    DIR/image.onnx, text.onnx  (or image.pt, text.pt for TorchScript)
    DIR/bpe_simple_vocab_16e6.txt.gz

Both graphs output L2-normalized embeddings. The text graph finds the pooled position by comparing
the ids with the EOT id (``argmax(tokens == eot)``), never by an argmax over the ids themselves,
which in fp16 could not even tell EOT (49407) from its neighbours.

``int8`` is onnxruntime's dynamic quantization of the MatMul/Gemm weights, per channel; with a
calibration set of images the image graph is statically quantized instead (activations too).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .model import CLIP, eot_positions  # eot_positions: re-exported, callers import it from here

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ImageTower",
    "TextTower",
    "add_export_arguments",
    "eot_positions",
    "export",
    "export_model",
    "is_export_dir",
    "read_export_config",
    "run_export",
]

EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")
EXPORT_TAG = "clip-etl-export/1"
CONFIG_NAME = "config.json"
DEFAULT_OPSET = 17
# protobuf cannot hold more than 2 GiB; graphs above this size keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "tokens", "text_embeds"
WEIGHT_TYPES = ("qint8", "quint8")

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """An export that cannot be made or a directory that is not a usable export; says which and why."""


# --------------------------------------------------------------------------------------------
# The two towers as standalone modules: what is traced, and what the torch backend runs too, so
# every backend computes the same function.
# --------------------------------------------------------------------------------------------
class ImageTower(nn.Module):
    """[B, 3, R, R] normalized pixels -> [B, D] L2-normalized float32 image embeddings.

    Both towers normalize in float32 whatever the weights' dtype: a bf16 norm would round every
    embedding to 8 significant bits for no speed (the exported fp32 graphs are unchanged).
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels).float(), dim=-1)  # [B, D] float32


class TextTower(nn.Module):
    """[B, L] token ids (L <= context_length) -> [B, D] L2-normalized text embeddings.

    The forward is the model's own ``CLIP.encode_text``, normalized: one text forward for eager
    torch and every exported graph. The tower registers the text parameters that forward reads
    (the same objects as the model's) rather than the whole model: a traced module keeps every
    parameter registered on it, so holding the model would put the image tower's weights into
    the text graph too. The tracer finds those parameters by identity, so the graph reads them
    from the tower.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self._encode_text = model.encode_text  # a bound method: not registered, so no image weights

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._encode_text(tokens).float(), dim=-1)  # [B, D] float32


# --------------------------------------------------------------------------------------------
# Example inputs for tracing: batch 2 (so nothing specialises to batch 1) and real EOT positions.
# --------------------------------------------------------------------------------------------
def _example_pixels(cfg: CLIPConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


def _example_tokens(cfg: CLIPConfig) -> torch.Tensor:
    t = cfg.text
    tokens = torch.zeros(2, t.context_length, dtype=torch.long)
    for row, n in enumerate((5, 9)):
        n = min(n, t.context_length - 2)
        tokens[row, 0] = t.eot_token_id - 1
        tokens[row, 1 : n + 1] = torch.arange(100, 100 + n)
        tokens[row, n + 1] = t.eot_token_id
    return tokens


# --------------------------------------------------------------------------------------------
# ONNX.
# --------------------------------------------------------------------------------------------
def _onnx_export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                 dynamic_axes: dict[int, str], opset: int) -> None:
    """TorchScript-based exporter: it handles SDPA with a causal mask and dynamic shapes robustly."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings are noise here
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: dynamic_axes, output_name: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as e:  # the exporter raises many types; say which tower and why
            raise ExportError(f"ONNX export of {path.stem} tower failed (opset {opset}): {type(e).__name__}: {e}") from e
    _consolidate_external_data(path)
    _check_onnx(path)


def _graph_bytes(path: Path) -> int:
    """Size of a graph with its side file, if any (what decides whether protobuf can hold it)."""
    return sum(f.stat().st_size for f in _onnx_files(path))


def _consolidate_external_data(path: Path) -> None:
    """Keep graphs over protobuf's 2 GB limit valid and tidy: all weights in one ``NAME.data`` file.

    The exporter writes a graph that large with one file per tensor; those are merged here. Graphs
    under the limit are left as single files.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    scattered = {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    if not scattered and path.stat().st_size <= EXTERNAL_DATA_THRESHOLD:
        return
    side = path.name + ".data"
    proto = onnx.load(str(path))  # with every tensor's data
    for name in scattered - {side}:
        (path.parent / name).unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=side, size_threshold=1024)


def _check_onnx(path: Path) -> None:
    """Run the ONNX checker by path, so graphs with external data are checked too."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:  # onnx raises ValidationError and friends
        raise ExportError(f"{path}: ONNX checker failed: {e}") from e


def export_onnx_graphs(model: CLIP, out: Path, opset: int = DEFAULT_OPSET) -> dict[str, str]:
    """Write ``image.onnx`` and ``text.onnx`` (fp32) into ``out``; returns the graph file names."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: LayerNormalization and SDPA need opset >= 17")
    _onnx_export(ImageTower(model).eval(), _example_pixels(model.config), out / "image.onnx",
                 IMAGE_INPUT, IMAGE_OUTPUT, {0: "batch"}, opset)
    _onnx_export(TextTower(model).eval(), _example_tokens(model.config), out / "text.onnx",
                 TEXT_INPUT, TEXT_OUTPUT, {0: "batch", 1: "sequence"}, opset)
    return {"image": "image.onnx", "text": "text.onnx"}


def _onnx_files(path: Path) -> list[Path]:
    side = path.with_name(path.name + ".data")
    return [path, side] if side.exists() else [path]


class _QuietQuantizer(logging.Filter):
    """Drops onnxruntime's advice to pre-process before quantizing (logged at WARNING for every graph)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer():
    root = logging.getLogger()
    quiet = _QuietQuantizer()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def quantize_dynamic_graph(src: Path, dst: Path, weight_type: str = "qint8") -> None:
    """Dynamic int8: weights of MatMul/Gemm quantized per output channel, activations at run time.

    Signed weights (QInt8) are the default: on AVX2 and VNNI CPUs onnxruntime runs u8 x s8 kernels,
    measured 1.2x faster than QUInt8 weights here at equal accuracy.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qtype = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
    with _quiet_quantizer():
        _quantize_dynamic(quantize_dynamic, qtype, src, dst)
    _consolidate_external_data(dst)
    _check_onnx(dst)


def _quantize_dynamic(quantize_dynamic, qtype, src: Path, dst: Path) -> None:
    quantize_dynamic(
        str(src), str(dst),
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        weight_type=qtype,
        use_external_data_format=_graph_bytes(src) > EXTERNAL_DATA_THRESHOLD,
        extra_options={"MatMulConstBOnly": True},  # activation x activation products (attention) stay fp32
    )


class _PixelReader:
    """Feeds calibration batches to onnxruntime's static quantizer."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self._it = iter([{IMAGE_INPUT: b.numpy()} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        raise NotImplementedError


def quantize_static_image_graph(src: Path, dst: Path, batches: Sequence[torch.Tensor]) -> None:
    """Static int8 for the image graph: activation ranges measured on real calibration images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet_quantizer():
        quantize_static(
            str(src), str(dst), _PixelReader(batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_graph_bytes(src) > EXTERNAL_DATA_THRESHOLD,
            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False},
        )
    _consolidate_external_data(dst)
    _check_onnx(dst)


def calibration_files(spec: str | os.PathLike) -> list[Path]:
    """Image files named by a directory (searched recursively) or a glob pattern, sorted."""
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    p = Path(os.path.expanduser(str(spec)))
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.suffix.lower() in exts and f.is_file()]
    else:
        files = [Path(f) for f in glob.glob(os.path.expanduser(str(spec)), recursive=True) if Path(f).is_file()]
    if not files:
        raise ExportError(f"no calibration images found at {spec}")
    return sorted(files)


def _calibration_batches(files: Sequence[Path], image_size: int, mean, std, batch_size: int = 16,
                         limit: int = 256) -> tuple[list[torch.Tensor], str]:
    """Preprocessed calibration batches and a hash of the pixels (part of the fingerprint)."""
    from .preprocess import ImageDecodeError, image_transform, load_image

    transform = image_transform(image_size, mean, std)
    tensors, skipped = [], 0
    for f in files[:limit]:
        try:
            tensors.append(transform(load_image(f)))
        except ImageDecodeError:
            skipped += 1
    if not tensors:
        raise ExportError(f"none of the {len(files[:limit])} calibration images could be decoded")
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    stacked = torch.stack(tensors)
    return list(stacked.split(batch_size)), h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# TorchScript.
# --------------------------------------------------------------------------------------------
def export_torchscript_graphs(model: CLIP, out: Path) -> dict[str, str]:
    """Trace both towers (as the seed does) and save them; optimisation for the host happens at load.

    The tracer's own check re-traces the module (seconds even for a tiny model); instead each
    traced tower is compared with the eager one on a different batch size and text length, which
    is what matters: that nothing was specialised to the example's shapes.
    """
    import warnings

    image_tower, text_tower = ImageTower(model).eval(), TextTower(model).eval()
    pixels, tokens = _example_pixels(model.config), _example_tokens(model.config)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and torch.jit deprecation warnings
        image = torch.jit.trace(image_tower, (pixels,), check_trace=False)
        text = torch.jit.trace(text_tower, (tokens,), check_trace=False)
        short = tokens[:1, : int(eot_positions(tokens[:1], model.eot_token_id)[0]) + 1]
        for name, traced, eager, x in (("image", image, image_tower, pixels[:1]), ("text", text, text_tower, short)):
            diff = (traced(x) - eager(x)).abs().max().item()
            if not diff <= 1e-5:
                raise ExportError(f"traced {name} tower differs from the model by {diff:.2e} on another input shape")
        image.save(str(out / "image.pt"))
        text.save(str(out / "text.pt"))
    return {"image": "image.pt", "text": "text.pt"}


# --------------------------------------------------------------------------------------------
# The directory and its config.json.
# --------------------------------------------------------------------------------------------
def _preprocess_record(cfg: CLIPConfig) -> dict[str, Any]:
    from .preprocess import OPENAI_MEAN, OPENAI_STD

    return {"image_size": cfg.vision.image_size, "resize": "bicubic, shorter side", "crop": "center",
            "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}


def _tokenizer_record(cfg: CLIPConfig, out: Path) -> dict[str, Any]:
    from .tokenizer import DEFAULT_BPE_PATH

    shutil.copyfile(DEFAULT_BPE_PATH, out / DEFAULT_BPE_PATH.name)
    return {"vocabulary": DEFAULT_BPE_PATH.name, "sha256": _file_sha256(DEFAULT_BPE_PATH),
            "context_length": cfg.text.context_length, "eot_token_id": cfg.text.eot_token_id}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def derived_fingerprint(source_fingerprint: str, backend: str, precision: str,
                        details: dict[str, Any] | None = None) -> str:
    """The encoder fingerprint: weights, backend, precision and how the graphs were quantized."""
    doc = {"source": source_fingerprint, "backend": backend, "precision": precision, "details": details or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by :func:`export` (its config.json carries our format tag)."""
    p = Path(os.path.expanduser(str(path)))
    cfg = p / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == EXPORT_TAG
    except (ValueError, OSError):
        return False


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of an export directory, checked for the files it names."""
    p = Path(os.path.expanduser(str(path)))
    if not is_export_dir(p):
        raise ExportError(f"{p}: not an export directory (no {CONFIG_NAME} with format {EXPORT_TAG!r})")
    doc = json.loads((p / CONFIG_NAME).read_text())
    missing = [name for name in [*doc["graphs"].values(), doc["tokenizer"]["vocabulary"]] if not (p / name).is_file()]
    if missing:
        raise ExportError(f"{p}: export directory is incomplete, missing {', '.join(missing)}")
    return doc


def export_model(model: CLIP, out: str | os.PathLike, fmt: str = "onnx", *, source_name: str = "<model>",
                 source_fingerprint: str | None = None, opset: int = DEFAULT_OPSET, weight_type: str = "qint8",
                 calibration_images: str | os.PathLike | None = None, progress: Progress | None = None) -> Path:
    """Export an in-memory CLIP to ``out`` (created; must be empty or absent). Returns the directory.

    The directory is written under a temporary name and renamed at the end, so a crash never
    leaves something that looks like a finished export.
    """
    from .checkpoints import model_fingerprint

    out = _check_export_args(out, fmt, weight_type, calibration_images)
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    if source_fingerprint is None:
        say("fingerprinting weights")
        source_fingerprint = model_fingerprint(model)
    # Graphs are traced in fp32 and eval mode; the caller's model is left as it was.
    original, was_training = model, model.training
    if model.dtype != torch.float32:
        model = copy.deepcopy(model).float()
    model.eval()

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        details: dict[str, Any] = {}
        if fmt == "torchscript":
            say("tracing image and text towers (TorchScript)")
            graphs, precision = export_torchscript_graphs(model, work), "fp32"
        else:
            say(f"exporting image and text towers to ONNX (opset {opset})")
            graphs, precision = export_onnx_graphs(model, work, opset), "fp32"
            details["opset"] = opset
        if fmt == "onnx-int8":
            graphs, details["quantization"] = _quantize_int8(model.config, work, graphs, weight_type,
                                                             calibration_images, say)
            precision = "int8"
        doc = _export_record(model, work, fmt, precision, graphs, details, source_name, source_fingerprint)
        (work / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        original.train(was_training)
    say(f"wrote {out} ({_dir_size(out) / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return out


def _check_export_args(out: str | os.PathLike, fmt: str, weight_type: str,
                       calibration_images: str | os.PathLike | None) -> Path:
    """Refuse a bad request before any slow work; returns ``out`` as a Path whose parent exists."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"unknown int8 weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    if calibration_images is not None and fmt != "onnx-int8":
        raise ExportError("calibration images only apply to --format onnx-int8")
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: already exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _quantize_int8(cfg: CLIPConfig, work: Path, graphs: dict[str, str], weight_type: str,
                   calibration_images: str | os.PathLike | None, say: Progress) -> tuple[dict[str, str], dict]:
    """Quantize the fp32 graphs in ``work`` (then removed); returns (the int8 graph names, how each
    tower was quantized). The image tower is calibrated statically when images are given."""
    fp32 = {k: work / v for k, v in graphs.items()}
    int8 = {"image": "image.int8.onnx", "text": "text.int8.onnx"}
    how = {"text": f"dynamic/{weight_type}/per-channel"}
    if calibration_images is not None:
        files = calibration_files(calibration_images)
        say(f"calibrating image graph on {min(len(files), 256)} image(s) (static int8)")
        pre = _preprocess_record(cfg)
        batches, pixel_hash = _calibration_batches(files, cfg.vision.image_size, pre["mean"], pre["std"])
        quantize_static_image_graph(fp32["image"], work / int8["image"], batches)
        how["image"] = f"static/qdq/minmax/{pixel_hash}"
    else:
        say(f"quantizing image graph (dynamic int8, {weight_type})")
        quantize_dynamic_graph(fp32["image"], work / int8["image"], weight_type)
        how["image"] = f"dynamic/{weight_type}/per-channel"
    say(f"quantizing text graph (dynamic int8, {weight_type})")
    quantize_dynamic_graph(fp32["text"], work / int8["text"], weight_type)
    for path in fp32.values():
        for f in _onnx_files(path):
            f.unlink()
    return int8, how


def _export_record(model: CLIP, work: Path, fmt: str, precision: str, graphs: dict[str, str], details: dict,
                   source_name: str, source_fingerprint: str) -> dict[str, Any]:
    """The export's config.json: what loads it (graphs, I/O names, preprocessing, tokenizer) and
    where it came from (source fingerprint, versions)."""
    cfg = model.config
    return {
        "format": EXPORT_TAG,
        "backend": fmt,
        "precision": precision,
        "graphs": graphs,
        "inputs": {"image": IMAGE_INPUT, "text": TEXT_INPUT},
        "outputs": {"image": IMAGE_OUTPUT, "text": TEXT_OUTPUT, "normalized": True},
        "model": cfg.to_dict(),
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "preprocess": _preprocess_record(cfg),
        "tokenizer": _tokenizer_record(cfg, work),
        "source": {"name": source_name, "fingerprint": source_fingerprint},
        "details": details,
        "fingerprint": derived_fingerprint(source_fingerprint, fmt, precision, details),
        "versions": {"torch": torch.__version__, **_runtime_versions(fmt)},
    }


def _runtime_versions(fmt: str) -> dict[str, str]:
    if fmt == "torchscript":
        return {}
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "onnx", *, opset: int = DEFAULT_OPSET,
           weight_type: str = "qint8", calibration_images: str | os.PathLike | None = None,
           progress: Progress | None = None) -> Path:
    """Export any checkpoint ``load_model`` takes (a path, ``"demo"``) to the directory ``out``."""
    from .checkpoints import load_model

    say = progress or (lambda msg: None)
    say(f"loading {source}")
    model = load_model(source)
    return export_model(model, out, fmt, source_name=str(source), opset=opset, weight_type=weight_type,
                        calibration_images=calibration_images, progress=progress)


# --------------------------------------------------------------------------------------------
# `clip-etl export`: argparse glue only (stdlib), called by the product CLI.
# --------------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``clip-etl export`` options to ``parser`` (a subparser)."""
    parser.add_argument("--model", required=True, metavar="CKPT",
                        help='checkpoint to export: a path load_model reads, or "demo"')
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="format",
                        help="onnx (fp32), onnx-int8 (onnxruntime int8) or torchscript")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    parser.add_argument("--calibration-images", metavar="GLOB_OR_DIR", default=None,
                        help="images for static int8 quantization of the image graph (onnx-int8 only)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--weight-type", choices=WEIGHT_TYPES, default="qint8",
                        help="int8 weight type for dynamic quantization (default qint8)")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run ``clip-etl export``: progress lines and one clear error line on stderr; 0 on success."""
    from .checkpoints import CheckpointError

    def say(msg: str) -> None:
        print(f"[export] {msg}", file=sys.stderr, flush=True)

    try:
        export(args.model, args.out, args.format, opset=args.opset, weight_type=getattr(args, "weight_type", "qint8"),
               calibration_images=args.calibration_images, progress=say)
    except (ExportError, CheckpointError, FileNotFoundError) as e:
        print(f"clip-etl export: error: {e}", file=sys.stderr)
        return 1
    return 0
