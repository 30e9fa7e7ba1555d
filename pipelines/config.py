"""The pipeline's configuration: dataclasses with defaults, loaded from YAML plus dotted overrides.

Why dataclasses and a strict loader: a batch job that runs for hours must not start with a typo
(``label.clases``) silently ignored or a string where a number belongs. Every key is checked
against the dataclass fields and every value against the field's annotation before any work
starts; an error names the key. The YAML files in ``conf/`` mirror these defaults, so an
installed package runs from any directory without them.

Load order: dataclass defaults <- the ``-c`` file (if any) <- ``key=value`` overrides. Override
values are parsed as YAML (``index.enabled=false``, ``label.classes=[cat,dog]``), except that a
field annotated as a string keeps the raw text (``model.checkpoint=123`` is the file ``"123"``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pydantic
import yaml

# A job name -> which stages it runs; see :func:`apply_job`.
JOBS = ("run", "embed", "label", "caption", "index", "dedup")
BACKENDS = ("auto", "torch", "torchscript", "onnx", "onnx-int8")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
INPUT_FORMATS = ("parquet", "webdataset")
# A head's output activation, its activation between layers, and the embedding it reads.
HEAD_ACTIVATIONS = ("none", "sigmoid", "softmax")
HEAD_HIDDEN_ACTIVATIONS = ("relu", "none")
HEAD_INPUTS = ("image_embedding", "text_embedding")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class InputConfig:
    """Where the manifest is and which of its columns mean what."""

    # Manifest Parquet: a file, a directory (all *.parquet below it), a glob, an s3:// URI of
    # any of those, or a list of them. Required.
    path: Optional[Union[str, list[str]]] = None
    # parquet: a manifest of rows. webdataset: tar shards of samples as img2dataset writes them
    # (jpg/jpeg/png/webp with txt/json siblings), named in input.path like Parquet files or by a
    # brace pattern (shards/{00000..00099}.tar); each tar is one shard, ids are the sample keys,
    # and the id/image/text column keys below do not apply.
    format: str = "parquet"
    # Column with a unique row id. When the manifest has no such column, ids are derived as
    # "<manifest path relative to the inputs' common folder>:<row number in that file>".
    id_column: str = "id"
    # Column with the image: a local path, a path relative to the manifest file, an s3:// URI,
    # or the encoded bytes. A manifest without this column is a text-only manifest.
    image_column: str = "image"
    # Column with the text. A manifest without this column is an image-only manifest.
    text_column: str = "text"
    # Process only the first N rows of the manifest (smoke runs). null: all rows.
    max_rows: Optional[int] = None
    # Read the id column up front and refuse duplicate or null ids (costs one column scan).
    check_unique_ids: bool = True
    # Folders (local) or s3:// prefixes that image paths must lie in, checked after resolving
    # symlinks and ".."; a path outside them is the row error image.not_allowed. null: any path.
    allowed_roots: Optional[list[str]] = None


@dataclass
class OutputConfig:
    """Where results go and how they are cut into files."""

    # The job's output root: Parquet under OUTPUT/results/, the index under OUTPUT/index/,
    # OUTPUT/_plan.json, OUTPUT/_run.json and OUTPUT/_SUCCESS. Local path or s3:// URI.
    path: str = "out"
    # Manifest rows per shard = per results/part-XXXXX.parquet file; the unit of resume.
    shard_size: int = 10000
    # Manifest columns copied to the results. null: every column except a bytes image column.
    passthrough: Optional[list[str]] = None
    # Seconds without a heartbeat after which a run's hold on OUTPUT/_lease.json expires, so that
    # a run that was killed can be resumed; a live run renews it every quarter of this.
    lease_timeout_s: float = 60.0
    # Discard what the output holds (results, index, plan, run record) and redo everything. false:
    # a re-run resumes, and a finished output is left as it is (the run does nothing).
    overwrite: bool = False


@dataclass
class ModelConfig:
    """Which CLIP to run and how."""

    # "demo" (the bundled model), a checkpoint file or Hugging Face folder (OpenAI .pt,
    # open_clip, HF CLIPModel, our own .safetensors), or an exported model; s3:// is fetched once
    # per node. Must be readable from every node of the cluster.
    checkpoint: str = "demo"
    # auto | torch | torchscript | onnx | onnx-int8; auto = torch on GPU actors and on CPUs with
    # native bf16 (AVX512-BF16/AMX), else onnx (fp32, exported on first use into each node's cache):
    # the fastest backend whose accuracy holds the bound (mean cosine >= 0.9999 to fp32).
    backend: str = "auto"
    # auto | fp32 | fp16 | bf16 | int8; auto = fp16 on GPU; on CPU, for the torch backend, int8
    # image matmuls (text tower bf16) on AVX512-VNNI + AVX512-BF16 CPUs without AMX, bf16 on other
    # CPUs with native bf16 (AVX512-BF16/AMX), else fp32; ONNX runs fp32 (onnx-int8: int8).
    precision: str = "auto"


@dataclass
class DecodeConfig:
    """The CPU stage that fetches, decodes and preprocesses images and checks texts."""

    # Rows per decode task call.
    batch_size: int = 32
    # Parallel decode tasks. null: as many as the cluster's free CPUs allow.
    concurrency: Optional[int] = None
    # Where images are decoded: "tasks" (CPU tasks feeding the model actors through the object
    # store), "actors" (each model actor decodes its own batches on its model's cores), or "auto"
    # (actors when the model runs on CPUs, tasks beside GPU actors).
    placement: str = "auto"
    # CPUs reserved per decode task: "auto" (1 beside GPU actors; beside CPU actors the share of a
    # node they leave to decoding, at most 1) or a number.
    num_cpus: Union[float, str] = "auto"
    # Files fetched ahead per decode call (hides S3 latency); decoding itself runs on one thread
    # in a decode task, on the model's threads in a CPU actor.
    io_threads: int = 8
    # Largest image in pixels (width * height); bigger ones are errors ("too large").
    max_pixels: int = 2 * 89_478_485
    # Largest encoded image file in bytes; bigger ones are errors ("too large").
    max_image_bytes: int = 64 * 1024 * 1024
    # Apply EXIF orientation (OpenAI's preprocessing does not; off keeps reference numbers).
    exif_transpose: bool = False
    # JPEGs decode at the DCT scale (1/2, 1/4, 1/8) that keeps both sides >= 2x the model's
    # resolution, then take the exact resize: several times faster on photos; false = full decode.
    jpeg_draft: bool = True
    # Texts longer than the model's context are truncated (true) or errors (false).
    truncate_text: bool = True
    # Seconds one image may take to fetch, and again to decode; a slower one is the row error
    # image.timeout and the worker moves on. null: no limit.
    timeout_s: Optional[float] = 60.0


@dataclass
class EmbedConfig:
    """The model actors."""

    # Rows per model call (an integer, so GPU memory use is predictable). "auto": with images 32 on
    # CPU actors (larger batches outgrow the caches) and 64 on GPU actors; 256 for texts alone
    # (short texts batch well: length buckets trim the padding).
    batch_size: Union[int, str] = "auto"
    # Number of model actors (each holds one copy of the model).
    actors: int = 1
    # CPUs reserved per actor: "auto" (1 for a GPU actor; a CPU actor takes its share of a node,
    # less a quarter for decode tasks when they run beside it) or a number. On CPU the model runs
    # ceil(num_cpus) threads.
    num_cpus: Union[float, str] = "auto"
    # GPUs per actor: "auto" = 1 when the cluster has GPUs and 0 otherwise, or a number.
    num_gpus: Union[float, str] = "auto"
    # Embed the image column (when the manifest has one).
    images: bool = True
    # Embed the text column (when the manifest has one).
    texts: bool = True


@dataclass
class LabelConfig:
    """Zero-shot labels computed from the image embeddings."""

    # Run the label stage (adds label, label_score, labels_topk, scores_topk).
    enabled: bool = True
    # Class names: an inline list, a text file with one class per line (local or s3://),
    # "imagenet", "demo" (the demo model's shape classes), or a dataset name from OpenAI's prompt
    # file (e.g. "CIFAR10"). "auto": "demo" with the demo checkpoint, "imagenet" otherwise.
    classes: Union[str, list[str]] = "auto"
    # Prompt templates with one {}: null (auto: "demo" with the demo checkpoint, else "seed"),
    # "seed" (9 templates), "imagenet" (80), "demo", a list, or a file with one template per line.
    templates: Optional[Union[str, list[str]]] = None
    # How many classes labels_topk / scores_topk keep.
    top_k: int = 5


@dataclass
class CaptionConfig:
    """Template/vocabulary captions ranked by CLIP from the image embeddings."""

    # Run the caption stage (adds caption).
    enabled: bool = True
    # Caption vocabulary: null (auto: "demo" with the demo checkpoint, else "seed"), "seed" (the
    # seed's object/scene/action/attribute set), "demo" (shape words), a YAML file
    # (local or s3://), or an inline mapping {categories: {name: {templates, words}}, threshold,
    # joiner, fallback}.
    vocabulary: Optional[Union[str, dict]] = None


@dataclass
class IndexConfig:
    """The FAISS index built from the results after they are complete."""

    # Build OUTPUT/index/ after the results (clip-etl index builds it from existing results).
    enabled: bool = True
    # Results column to index: image_embedding or text_embedding.
    embedding_column: str = "image_embedding"
    # FAISS factory string; null: chosen from the data size and the recall target.
    factory: Optional[str] = None
    # Number of index shards; null: derived from vectors_per_shard / memory.
    shards: Optional[int] = None
    # Vectors per shard; null: derived from memory_budget_gb.
    vectors_per_shard: Optional[int] = None
    # Memory the search side may use for one shard, in GiB.
    memory_budget_gb: float = 4.0
    # recall@10 the tuned index must reach against exact search.
    target_recall: float = 0.95
    # Real queries to tune on: a .npy or a Parquet file with an embedding_column (local or s3://);
    # null: the index's held-out rows perturbed off the data.
    tuning_queries: Optional[str] = None
    # Also write one merged index next to the shards.
    merge: bool = False


@dataclass
class DedupConfig:
    """Semantic dedup of the results (SemDeDup): k-means, then all pairs inside each cluster."""

    # Run the dedup step at the end of `clip-etl run` (clip-etl dedup OUTPUT runs it on its own).
    enabled: bool = False
    # Cosine similarity at or above which two embeddings are near-duplicates. 0.9: resized,
    # recompressed, cropped and recoloured copies scored >= 0.94 with the demo model, distinct
    # images <= 0.87 (docs/curation.md); tune it per model.
    threshold: float = 0.9
    # k-means clusters; pairs are compared only inside a cluster. null: sqrt(rows), at most one
    # per 39 rows.
    clusters: Optional[int] = None
    # Embeddings sampled (seeded) to train k-means.
    sample_rows: int = 100_000
    # Rows per block of the pairwise comparison and most rows per group task: bounds a task's
    # memory to about 2 * block_rows * dim * 4 + block_rows^2 * 4 bytes, whatever the data.
    block_rows: int = 4096
    # Results column to deduplicate: image_embedding or text_embedding.
    embedding_column: str = "image_embedding"


@dataclass
class FilterConfig:
    """CLIP-score filtering: a keep flag per result row in OUTPUT/filter/ (rows are never dropped).

    Set either key to turn the filter on; rows without a clip_score (no image or no text, or one
    of them failed) are then keep=false with reason no_clip_score.
    """

    # Keep rows whose clip_score (cosine of the image and text embeddings) is >= this. null: off.
    min_clip_score: Optional[float] = None
    # Keep the best fraction of the scored rows of the whole output, by clip_score: exactly
    # floor(top_fraction * scored + 0.5) rows, ties at the threshold broken by output order. null: off.
    top_fraction: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.min_clip_score is not None or self.top_fraction is not None


@dataclass
class HeadConfig:
    """`heads` is a list (default empty); each item is a linear or small MLP head run in the model
    actors on each row's embedding and written as its own results column (docs/curation.md).
    The keys below are an item's: `heads.name` is the `name` of each item."""

    # The output column (unique, not a result column or passthrough column). Required.
    name: str = ""
    # The head's weights: a .safetensors, .pt/.pth/.bin state dict or .npz file, local or s3://. Required.
    path: str = ""
    # Applied to the last layer's output: none, sigmoid or softmax.
    activation: str = "none"
    # Between layers: relu, or none (the LAION aesthetic MLP has no activations).
    hidden_activation: str = "relu"
    # The L2-normalized embedding the head reads: image_embedding or text_embedding.
    input: str = "image_embedding"


@dataclass
class S3Config:
    """S3 access; empty fields use the standard AWS environment and config chain."""

    # Endpoint URL for S3-compatible stores (also AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3).
    endpoint_url: Optional[str] = None
    # AWS region.
    region: Optional[str] = None
    # Access key id (prefer AWS_ACCESS_KEY_ID or a profile). Never printed or recorded.
    access_key_id: Optional[str] = field(default=None, repr=False)
    # Secret access key (prefer AWS_SECRET_ACCESS_KEY or a profile). Never printed or recorded.
    secret_access_key: Optional[str] = field(default=None, repr=False)
    # Session token of temporary credentials (prefer AWS_SESSION_TOKEN). Never printed or recorded.
    session_token: Optional[str] = field(default=None, repr=False)
    # Unsigned requests (public buckets).
    anonymous: bool = False
    # Attempts per request, with adaptive backoff on throttling and transient errors.
    max_attempts: int = 10


@dataclass
class RayConfig:
    """Where the job runs."""

    # Cluster address ("auto", "ray://host:10001", ...). null: RAY_ADDRESS if set (as under
    # `ray job submit`), else an embedded local Ray started and stopped by the job.
    address: Optional[str] = None
    # CPUs of the embedded local Ray. null: all CPUs of the machine.
    num_cpus: Optional[int] = None
    # Object store of the embedded local Ray in MiB. null: Ray's default.
    object_store_mb: Optional[int] = None
    # Times a task whose worker died (killed, out of memory, a crash) is retried, and a model
    # actor that died is restarted; past that the job fails with the cause instead of retrying
    # forever (Ray Data's default, which hangs on a model that crashes every time it loads).
    max_retries: int = 3


@dataclass
class PipelineConfig:
    """The whole job; one section per stage."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    # A list of HeadConfig mappings, e.g. [{name: aesthetic, path: head.safetensors}]; [] = none.
    heads: list[HeadConfig] = field(default_factory=list)
    s3: S3Config = field(default_factory=S3Config)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """The config as plain data; ``redact`` replaces every credential that is set with
        ``<redacted>`` (what ``--print-config`` prints and ``_run.json`` records)."""
        data = dataclasses.asdict(self)
        if redact:
            for key in SECRET_KEYS:
                section, name = key.split(".")
                if data[section].get(name) is not None:
                    data[section][name] = REDACTED
        return data

    def s3_options(self):
        """The S3 settings as :class:`pipelines.storage.S3Options`."""
        from pipelines.storage import S3Options

        return S3Options(**dataclasses.asdict(self.s3))


# --------------------------------------------------------------------------------------------
# Type checking
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("null")
        return " or ".join(names)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return "a list of strings" if arg is str else f"a list of ({_type_name(arg)})"
    if origin is dict or tp is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(tp, str(tp))


@functools.lru_cache(maxsize=None)
def _validator(tp: Any) -> pydantic.TypeAdapter:
    # strict: no coercion a YAML author would not mean ("1" is no integer, true is no 1), except
    # int -> float, which is lossless
    return pydantic.TypeAdapter(tp, config=pydantic.ConfigDict(strict=True))


def _check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, the value as ``tp`` holds it, e.g. int -> float), by pydantic's strict validation."""
    try:
        return True, _validator(tp).validate_python(value)
    except pydantic.ValidationError:
        return False, value


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def list_item_class(tp: Any) -> Any:
    """The dataclass of a ``list[SomeConfig]`` annotation (the ``heads:`` list), else None."""
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return arg if dataclasses.is_dataclass(arg) else None
    return None


def section_class(tp: Any) -> Any:
    """A section's dataclass: the annotation itself, or a list section's item class."""
    return list_item_class(tp) or tp


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Config keys that hold credentials: their values never appear in printed configs, records,
# reprs or error messages.
SECRET_KEYS = ("s3.access_key_id", "s3.secret_access_key", "s3.session_token")
REDACTED = "<redacted>"


def _shown(key: str, value: Any) -> str:
    """``value`` as an error message may show it: credentials are redacted."""
    return REDACTED if key in SECRET_KEYS else repr(value)


def _build(cls, data: Any, where: str):
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _section_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}{_suggest(str(key), names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
            continue
        item = list_item_class(tp)
        if item is not None:
            if not isinstance(value, list):
                raise ConfigError(f"config key {full!r} must be a list of mappings, got {_shown(full, value)}")
            kwargs[key] = [_build(item, v, f"{full}[{i}]") for i, v in enumerate(value)]
            continue
        ok, converted = _check_value(value, tp)
        if not ok:
            raise ConfigError(f"config key {full!r} must be {_type_name(tp)}, got {_shown(full, value)}")
        kwargs[key] = converted
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted key, or a ConfigError naming the unknown part."""
    cls: Any = PipelineConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[:i])!r} is not a section")
        hints = _section_types(cls)
        if part not in hints:
            where = ".".join(parts[:i])
            prefix = f"{where}." if where else ""
            choices = [prefix + n for n in hints]
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(dotted, choices)}")
        cls = hints[part]
    return cls


def _accepts(tp: Any, kind: type) -> bool:
    if tp is kind:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(tp))
    return False


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> (``"a.b"``, parsed value); see the module docstring for the rules."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    tp = _field_type(key)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key {key!r} is a section; set one of its keys (e.g. {key}.<name>=...)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        detail = "" if key in SECRET_KEYS else f" {raw!r} ({e})"
        raise ConfigError(f"config key {key!r}: cannot parse value{detail}") from None
    if _accepts(tp, str) and raw.strip() and not isinstance(value, (str, list, dict)):
        if not _check_value(value, tp)[0]:
            value = raw.strip()  # a string field: keep the text as typed ("123", "yes")
    if isinstance(value, str) and _accepts(tp, float) and not _accepts(tp, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path: str) -> dict:
    """A config file as a mapping (local or s3://); a clear error when missing or malformed."""
    from pipelines import storage as pio

    try:
        text = pio.read_bytes(path).decode("utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in config file {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> PipelineConfig:
    """Defaults <- YAML file (or ``base``, a mapping of the same shape) <- dotted overrides, validated."""
    data: dict = read_yaml(os.fspath(path)) if path else copy.deepcopy(base or {})
    for text in overrides:
        key, value = parse_override(text)
        data = _merge(data, _nest(key, value))
    cfg = _build(PipelineConfig, data, "")
    validate(cfg)
    return cfg


def from_dict(data: dict) -> PipelineConfig:
    """A validated config from a nested mapping (e.g. the ``config`` of a ``_run.json``)."""
    cfg = _build(PipelineConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: PipelineConfig) -> None:
    """Value checks that types alone cannot express; each error names its key."""
    _validate_counts(cfg)
    _validate_input(cfg.input)
    _validate_model(cfg.model)
    _validate_resources(cfg)
    _validate_index(cfg.index)
    if not (cfg.embed.images or cfg.embed.texts):
        raise ConfigError("config keys 'embed.images' and 'embed.texts' are both false: nothing to do")
    if not cfg.output.path:
        raise ConfigError("config key 'output.path' must not be empty")
    if cfg.output.lease_timeout_s <= 0:
        raise ConfigError(f"config key 'output.lease_timeout_s' must be > 0, got {cfg.output.lease_timeout_s}")
    _validate_dedup(cfg.dedup)
    _validate_filter(cfg.filter)
    _validate_heads(cfg.heads)


def _validate_counts(cfg: PipelineConfig) -> None:
    """Counts that must be at least 1 (some may also be null)."""
    positive = {
        "output.shard_size": cfg.output.shard_size,
        "decode.batch_size": cfg.decode.batch_size,
        "decode.io_threads": cfg.decode.io_threads,
        "decode.max_pixels": cfg.decode.max_pixels,
        "decode.max_image_bytes": cfg.decode.max_image_bytes,
        "embed.actors": cfg.embed.actors,
        "label.top_k": cfg.label.top_k,
        "s3.max_attempts": cfg.s3.max_attempts,
    }
    if cfg.ray.max_retries < 0:
        raise ConfigError(f"config key 'ray.max_retries' must be >= 0, got {cfg.ray.max_retries}")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
    for key, value in {
        "input.max_rows": cfg.input.max_rows,
        "decode.concurrency": cfg.decode.concurrency,
        "ray.num_cpus": cfg.ray.num_cpus,
        "ray.object_store_mb": cfg.ray.object_store_mb,
        "index.shards": cfg.index.shards,
        "index.vectors_per_shard": cfg.index.vectors_per_shard,
        "dedup.clusters": cfg.dedup.clusters,
    }.items():
        if value is not None and value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1 or null, got {value}")


def _validate_input(inp: InputConfig) -> None:
    if inp.allowed_roots is not None and not all(isinstance(r, str) and r for r in inp.allowed_roots):
        raise ConfigError("config key 'input.allowed_roots' must be a list of folders or s3:// prefixes, or null")
    if inp.format not in INPUT_FORMATS:
        raise ConfigError(f"config key 'input.format' must be one of {', '.join(INPUT_FORMATS)}; got {inp.format!r}")
    if isinstance(inp.path, list) and not inp.path:
        raise ConfigError("config key 'input.path' is an empty list")
    cols = {"input.id_column": inp.id_column, "input.image_column": inp.image_column,
            "input.text_column": inp.text_column}
    for key, value in cols.items():
        if not value:
            raise ConfigError(f"config key {key!r} must not be empty")
    if len(set(cols.values())) != len(cols):
        raise ConfigError("config keys 'input.id_column', 'input.image_column' and 'input.text_column' must differ")


def _validate_model(model: ModelConfig) -> None:
    if model.backend not in BACKENDS:
        raise ConfigError(f"config key 'model.backend' must be one of {', '.join(BACKENDS)}; got {model.backend!r}")
    if model.precision not in PRECISIONS:
        raise ConfigError(
            f"config key 'model.precision' must be one of {', '.join(PRECISIONS)}; got {model.precision!r}"
        )


def _validate_resources(cfg: PipelineConfig) -> None:
    """Placement, batch sizes, CPU/GPU reservations and time limits of the decode and embed stages."""
    if cfg.decode.timeout_s is not None and cfg.decode.timeout_s <= 0:
        raise ConfigError(f"config key 'decode.timeout_s' must be > 0 or null, got {cfg.decode.timeout_s}")
    if cfg.decode.placement not in ("auto", "tasks", "actors"):
        raise ConfigError(f"config key 'decode.placement' must be auto, tasks or actors; got {cfg.decode.placement!r}")
    if isinstance(cfg.embed.batch_size, str) and cfg.embed.batch_size != "auto":
        raise ConfigError(f"config key 'embed.batch_size' must be 'auto' or an integer, got {cfg.embed.batch_size!r}")
    if not isinstance(cfg.embed.batch_size, str) and cfg.embed.batch_size < 1:
        raise ConfigError(f"config key 'embed.batch_size' must be >= 1, got {cfg.embed.batch_size}")
    for key, value, least in (("decode.num_cpus", cfg.decode.num_cpus, "> 0"),
                              ("embed.num_cpus", cfg.embed.num_cpus, "> 0"),
                              ("embed.num_gpus", cfg.embed.num_gpus, ">= 0")):
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f"config key {key!r} must be 'auto' or a number, got {value!r}")
        if not isinstance(value, str) and (value < 0 or (value == 0 and least == "> 0")):
            raise ConfigError(f"config key {key!r} must be {least}, got {value}")


def _validate_index(index: IndexConfig) -> None:
    if not 0.0 < index.target_recall <= 1.0:
        raise ConfigError(f"config key 'index.target_recall' must be in (0, 1], got {index.target_recall}")
    if index.memory_budget_gb <= 0:
        raise ConfigError(f"config key 'index.memory_budget_gb' must be > 0, got {index.memory_budget_gb}")
    if index.tuning_queries is not None and not str(index.tuning_queries).endswith((".parquet", ".npy")):
        raise ConfigError("config key 'index.tuning_queries' must be a .parquet or .npy file or null, "
                          f"got {index.tuning_queries!r}")
    if index.embedding_column not in ("image_embedding", "text_embedding"):
        raise ConfigError(
            "config key 'index.embedding_column' must be image_embedding or text_embedding, "
            f"got {index.embedding_column!r}"
        )


def _validate_filter(f: FilterConfig) -> None:
    if f.min_clip_score is not None and not -1.0 <= f.min_clip_score <= 1.0:
        raise ConfigError(f"config key 'filter.min_clip_score' must be in [-1, 1] or null, got {f.min_clip_score}")
    if f.top_fraction is not None and not 0.0 < f.top_fraction <= 1.0:
        raise ConfigError(f"config key 'filter.top_fraction' must be in (0, 1] or null, got {f.top_fraction}")


# Names a head's column may not take beyond the result columns (checked against the manifest's
# columns by the job): Python-identifier-like, so they read well in Parquet, SQL and pandas.
_HEAD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _validate_heads(heads: list[HeadConfig]) -> None:
    seen: set[str] = set()
    for i, h in enumerate(heads):
        key = f"heads[{i}]"
        if not _HEAD_NAME.match(h.name or "") or h.name.startswith("__"):
            raise ConfigError(f"config key '{key}.name' must be a column name (letters, digits, _; not "
                              f"starting with __), got {h.name!r}")
        if h.name in seen:
            raise ConfigError(f"config key '{key}.name': {h.name!r} names two heads; head names must be unique")
        seen.add(h.name)
        if not h.path:
            raise ConfigError(f"config key '{key}.path' is required (a .safetensors, .pt or .npz file)")
        for field_name, value, allowed in (("activation", h.activation, HEAD_ACTIVATIONS),
                                           ("hidden_activation", h.hidden_activation, HEAD_HIDDEN_ACTIVATIONS),
                                           ("input", h.input, HEAD_INPUTS)):
            if value not in allowed:
                raise ConfigError(f"config key '{key}.{field_name}' must be one of {', '.join(allowed)}; got {value!r}")


def _validate_dedup(dedup: DedupConfig) -> None:
    if not 0.0 < dedup.threshold <= 1.0:
        raise ConfigError(f"config key 'dedup.threshold' must be a cosine similarity in (0, 1], got {dedup.threshold}")
    for key, value, least in (("dedup.sample_rows", dedup.sample_rows, 1), ("dedup.block_rows", dedup.block_rows, 2)):
        if value < least:
            raise ConfigError(f"config key {key!r} must be >= {least}, got {value}")
    if dedup.embedding_column not in ("image_embedding", "text_embedding"):
        raise ConfigError("config key 'dedup.embedding_column' must be image_embedding or text_embedding, "
                          f"got {dedup.embedding_column!r}")


def apply_job(cfg: PipelineConfig, job: str) -> PipelineConfig:
    """Switch stages for a subcommand: ``embed`` = embeddings only, ``label`` = + labels,
    ``caption`` = + captions, ``run`` = as configured (``dedup`` as well: it only reads the
    results). The subcommand wins over the file, so ``clip-etl embed -c conf/pipeline.yaml``
    never builds an index."""
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
    cfg = dataclasses.replace(
        cfg,
        label=dataclasses.replace(cfg.label),
        caption=dataclasses.replace(cfg.caption),
        index=dataclasses.replace(cfg.index),
    )
    if job == "embed":
        cfg.label.enabled = cfg.caption.enabled = cfg.index.enabled = False
    elif job == "label":
        cfg.label.enabled, cfg.caption.enabled, cfg.index.enabled = True, False, False
    elif job == "caption":
        cfg.label.enabled, cfg.caption.enabled, cfg.index.enabled = False, True, False
    elif job == "index":
        cfg.index.enabled = True
    return cfg


def to_yaml(cfg: PipelineConfig) -> str:
    """The config as YAML, credentials redacted (``--print-config``)."""
    return yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False, default_flow_style=False)


def config_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, type, default) for every key; used by ``clip-etl run --list-keys`` and docs."""
    out = []
    defaults = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        tp = _section_types(PipelineConfig)[section.name]
        cls = section_class(tp)
        hints = _section_types(cls)
        values = cls() if cls is not tp else getattr(defaults, section.name)  # a list section: an item's defaults
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), getattr(values, f.name)))
    return out


__all__ = [
    "BACKENDS",
    "CaptionConfig",
    "ConfigError",
    "DecodeConfig",
    "DedupConfig",
    "EmbedConfig",
    "FilterConfig",
    "HeadConfig",
    "IndexConfig",
    "InputConfig",
    "JOBS",
    "LabelConfig",
    "ModelConfig",
    "OutputConfig",
    "PipelineConfig",
    "RayConfig",
    "S3Config",
    "apply_job",
    "config_keys",
    "list_item_class",
    "section_class",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "REDACTED",
    "SECRET_KEYS",
    "to_yaml",
    "validate",
]
