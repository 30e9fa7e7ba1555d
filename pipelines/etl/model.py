"""The one model a run uses: backend, precision and device kind, resolved once by the driver.

Why the driver resolves for the actors: ``model.backend=auto`` and ``model.precision=auto``
depend on the machine (a GPU, a CPU with native bf16), and the driver's machine is not the
actors'. Left to each actor, a cluster that gains or loses GPUs between a run and its resume
would mix fp16-torch and fp32-ONNX parts in one output. So the driver asks a probe task that
Ray schedules like an actor (same GPUs per actor) what ``auto`` means there, ships the
resolved values to every actor, and records them with the encoder fingerprint in the plan: a
resume that would resolve differently is refused, and an actor that reports another encoder
fails the run (:mod:`pipelines.etl.commit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines import storage as pio
from pipelines.config import PipelineConfig


@dataclass(frozen=True)
class ResolvedModel:
    """What every actor of the run builds."""

    backend: str  # torch | torchscript | onnx | onnx-int8
    precision: str  # fp32 | fp16 | bf16 | int8
    device: str  # cpu | cuda (the kind; each actor takes its own GPU)
    fingerprint: str  # of the encoder those settings give
    # the actor node's CPU model and fast-path flags that ``auto`` was decided on: recorded in
    # _run.json, not compared on resume (another CPU that resolves alike gives the same numbers)
    cpu: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The settings a resume must match (what the plan records and the actors report)."""
        return {"backend": self.backend, "precision": self.precision, "device": self.device,
                "fingerprint": self.fingerprint}


def probe_resolution(backend: str, precision: str, device: str) -> dict[str, Any]:
    """What ``auto`` resolves to on the machine this runs on, and that machine's CPU (body of the probe task)."""
    from clip_core.encoders import cpu_info, resolve_backend, resolve_device, resolve_precision

    backend = resolve_backend(backend, device, precision)
    device = resolve_device(device, backend)
    return {"backend": backend, "device": device.split(":")[0],
            "precision": resolve_precision(precision, backend, device), "cpu": cpu_info()}


def requested_backend(cfg: PipelineConfig, s3: pio.S3Options) -> str:
    """``model.backend``, except that an export directory runs the backend it was exported for."""
    from clip_core.export import is_export_dir, read_export_config

    from pipelines.etl.embed import localize_checkpoint

    path = localize_checkpoint(cfg.model.checkpoint, s3)
    return read_export_config(path)["backend"] if is_export_dir(path) else cfg.model.backend


def resolve_on_actor_node(backend: str, precision: str, gpus: float):
    """Start :func:`probe_resolution` in a Ray task that has the resources of one model actor;
    returns its ObjectRef (``ray.get`` it), so the driver can work while the probe's worker starts."""
    import ray

    device = "auto" if gpus > 0 else "cpu"
    task = ray.remote(num_cpus=0, num_gpus=gpus, max_retries=2)(probe_resolution)
    return task.remote(backend, precision, device)


def expected_fingerprint(encoder: Any, backend: str, precision: str) -> str:
    """The fingerprint an actor's encoder will report; the driver's CPU copy may run another
    precision (fp16 needs CUDA), so it is derived from the weights' fingerprint then."""
    from clip_core.export import derived_fingerprint

    if (encoder.backend, encoder.precision) == (backend, precision):
        return encoder.fingerprint
    return derived_fingerprint(encoder.source_fingerprint, backend, precision)


def driver_precision(resolved: dict[str, str]) -> str:
    """The precision the driver's CPU check loads with: the actors' own, unless only CUDA has it."""
    return "fp32" if resolved["precision"] == "fp16" else resolved["precision"]


def resolve_model(cfg: PipelineConfig, gpus: float, s3: pio.S3Options, load) -> tuple[ResolvedModel, Any]:
    """(the resolved model, the driver's CPU encoder for checks); ``load(backend, precision)``
    loads the checkpoint on the driver.

    The driver loads its copy while the probe runs, with what ``auto`` means on the driver's own
    machine (CPU-only), and loads again only when the actors' machine resolves otherwise: on a
    single machine or a uniform CPU cluster the probe's worker start costs no extra time.
    """
    import ray

    requested = requested_backend(cfg, s3)
    probe = resolve_on_actor_node(requested, cfg.model.precision, gpus)
    guess = probe_resolution(requested, cfg.model.precision, "cpu") if gpus == 0 else None
    encoder = load(guess["backend"], driver_precision(guess)) if guess else None
    resolved = ray.get(probe, timeout=600)
    if guess is None or (guess["backend"], guess["precision"]) != (resolved["backend"], resolved["precision"]):
        encoder = load(resolved["backend"], driver_precision(resolved))
    fp = expected_fingerprint(encoder, resolved["backend"], resolved["precision"])
    return ResolvedModel(resolved["backend"], resolved["precision"], resolved["device"], fp, resolved["cpu"]), encoder


__all__ = ["ResolvedModel", "expected_fingerprint", "probe_resolution", "requested_backend", "resolve_model",
           "resolve_on_actor_node"]
