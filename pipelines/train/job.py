"""``clip-etl train``: fit or fine-tune a CLIP on the (image, text) pairs of a Parquet manifest.

The loop itself is :func:`clip_core.train.train`; this module is the job around it: read the
manifest (local or ``s3://``; relative image paths resolve against the manifest's folder), pick
the model (a preset with fresh weights, or a checkpoint to fine-tune), optionally measure
zero-shot accuracy on labelled held-out rows while training, and write a native checkpoint.

``--synthetic-pairs N`` trains on N freshly generated pairs of the demo's generator instead of
the manifest's rows (the manifest then only supplies the evaluation rows): how the bundled demo
model is trained, since a small ViT memorises a fixed set of images long before it learns shapes.

``--workers N`` (N > 1) runs the same loop under Ray Train's ``TorchTrainer``: N workers with
DistributedDataParallel over gloo, so it scales across CPU nodes of a Ray cluster; rank 0 reports
the trained weights back as a Ray Train checkpoint and the driver writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage as pio

DTYPES = ("float32", "float16")
EVAL_BATCH = 256  # evaluation images per forward: bounds activation memory on a large split


@dataclass
class TrainData:
    """The rows a run trains and evaluates on, resolved to local paths or encoded bytes."""

    images: list[Any]  # per training row: a local path (str) or encoded image bytes
    captions: list[str]  # per training row: the caption
    eval_sets: dict[str, tuple[list[Any], list[str]]] = field(default_factory=dict)  # split -> (images, labels)
    skipped: int = 0  # rows dropped for a missing image or text


# ----------------------------------------------------------------------------- arguments


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``clip-etl train`` options to ``parser`` (also used by ``python -m pipelines.train.job``)."""
    p = parser
    p.add_argument("manifest", help="Parquet manifest of (image, text) pairs, local or s3://")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors, native format)")
    p.add_argument("--model", default="demo-shapes",
                   help="preset name (fresh weights) or checkpoint path (fine-tune); default demo-shapes")
    p.add_argument("--image-column", default="image", help="column with image paths, URIs or bytes")
    p.add_argument("--text-column", default="text", help="column with captions")
    p.add_argument("--split-column", default="split", help="column naming each row's split")
    p.add_argument("--split", default=None, help="train only on rows whose split column equals this (default: all rows)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step per worker")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's choice)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--no-augment", action="store_true", help="disable the light random-crop augmentation")
    p.add_argument("--synthetic-pairs", type=int, default=0, metavar="N",
                   help="train on N freshly generated demo pairs (pipelines.train.synthetic_pairs, seen shape-color "
                        "pairs only) instead of the manifest's rows; the manifest still gives the evaluation rows")
    p.add_argument("--synthetic-group", type=int, default=8, metavar="G",
                   help="with --synthetic-pairs: groups of G consecutive pairs share a color and background "
                        "(hard negatives in every batch; 1 = independent pairs)")
    p.add_argument("--synthetic-variety", type=float, default=0.0, metavar="P",
                   help="with --synthetic-pairs: share of pairs drawn as another renderer might (other sizes, "
                        "edges, outlines, blur, tone, JPEG quality), so the model learns shapes, not one renderer")
    p.add_argument("--pca-patch-init", action="store_true",
                   help="start the patch embedding from whitened PCA of training patches (fresh presets only)")
    p.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers; <= 1 trains in this process")
    p.add_argument("--save-dtype", choices=DTYPES, default="float32", help="weight dtype in the checkpoint")
    p.add_argument("--eval-prompts", default=None,
                   help='JSON {"classes": [...], "templates": [...]}: report zero-shot top-1 on --eval-splits')
    p.add_argument("--eval-splits", default="val,test_unseen", help="comma-separated splits to evaluate")
    p.add_argument("--label-column", default="true_label", help="column with each row's true class name")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--history", default=None, help="write the training history (JSON) here")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write --out every N steps, so an interrupted run keeps its latest weights (local runs)")
    return p


def train_config_from_args(args: argparse.Namespace):
    from clip_core.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
        seed=args.seed, num_threads=args.threads, loader_workers=args.loader_workers, log_every=args.log_every,
        eval_every=args.eval_every, pca_patch_init=args.pca_patch_init, checkpoint_every=args.save_every,
        shuffle=not args.synthetic_pairs,  # generated pairs are random already, and grouped in order
    )


# ----------------------------------------------------------------------------- data


def _resolve_image(value: Any, base: str, manifest_is_s3: bool) -> Any:
    """A local path or bytes for one manifest cell: bytes stay, URIs are fetched, relative paths join ``base``."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return value
    value = str(value)
    if pio.is_s3(value):
        return pio.read_bytes(value)
    if manifest_is_s3 and not os.path.isabs(value):
        return pio.read_bytes(pio.join(base, value))
    return value if os.path.isabs(value) else os.path.join(base, value)


def read_manifest(path: str) -> pa.Table:
    fs = pio.filesystem_for(path)
    with fs.open_input_file(pio.strip_scheme(path)) as f:
        return pq.read_table(f)


def load_train_data(args: argparse.Namespace, eval_splits: Sequence[str] = ()) -> TrainData:
    """Training rows (filtered by ``--split``) and labelled evaluation rows of the manifest."""
    table = read_manifest(args.manifest)
    for col in (args.image_column, args.text_column):
        if col not in table.column_names:
            raise ValueError(f"{args.manifest}: no column {col!r} (columns: {', '.join(table.column_names)})")
    is_s3 = pio.is_s3(args.manifest)
    base = args.manifest.rsplit("/", 1)[0] if is_s3 else str(Path(args.manifest).resolve().parent)
    rows = table.to_pydict()
    n = table.num_rows
    splits = rows.get(args.split_column, [None] * n)
    if args.split is not None and args.split_column not in rows:
        raise ValueError(f"{args.manifest}: --split given but there is no column {args.split_column!r}")

    data = TrainData(images=[], captions=[])
    synthetic = getattr(args, "synthetic_pairs", 0)
    for i in range(n if not synthetic else 0):
        if args.split is not None and splits[i] != args.split:
            continue
        image, text = rows[args.image_column][i], rows[args.text_column][i]
        if image is None or text is None or not str(text).strip():
            data.skipped += 1
            continue
        data.images.append(_resolve_image(image, base, is_s3))
        data.captions.append(str(text))
    if eval_splits:
        if args.label_column not in rows or args.split_column not in rows:
            raise ValueError(f"{args.manifest}: evaluation needs columns {args.split_column!r} and {args.label_column!r}")
        for name in eval_splits:
            idx = [i for i in range(n) if splits[i] == name and rows[args.image_column][i] is not None]
            data.eval_sets[name] = ([_resolve_image(rows[args.image_column][i], base, is_s3) for i in idx],
                                    [rows[args.label_column][i] for i in idx])
    if len(data.images) < 2 and not synthetic:
        raise ValueError(f"{args.manifest}: {len(data.images)} usable training rows; need at least 2")
    return data


def load_prompts(path: str | None) -> dict[str, list[str]] | None:
    if path is None:
        return None
    from clip_core.prompts import validate_templates

    spec = json.loads(Path(path).read_text())
    if not spec.get("classes") or not spec.get("templates"):
        raise ValueError(f"{path}: needs non-empty 'classes' and 'templates'")
    # checked now, as the classifier will check them, rather than at the first evaluation mid-training
    return {"classes": list(spec["classes"]), "templates": validate_templates(spec["templates"], source=path)}


# ----------------------------------------------------------------------------- model and eval


def build_model(spec: str, seed: int):
    """A checkpoint to fine-tune when ``spec`` is an existing path, else a preset with fresh weights."""
    import torch

    from clip_core import create_model, load_model

    if os.path.exists(spec):
        return load_model(spec)
    torch.manual_seed(seed)
    return create_model(spec)


def make_eval_fn(model, eval_sets: dict[str, tuple[list[Any], list[str]]], prompts: dict[str, list[str]] | None):
    """Zero-shot top-1 per evaluation split (``zeroshot_top1/<split>``), or None when nothing to evaluate.

    Scored by the product's own classifier (:class:`clip_core.zero_shot.ZeroShotClassifier`) over
    an encoder on the model being trained, so the figure is what labelling with it would give.
    """
    import numpy as np

    from clip_core.encoders import encoder_for_model
    from clip_core.preprocess import image_transform
    from clip_core.train import load_pixels
    from clip_core.zero_shot import ZeroShotClassifier

    if not prompts or not any(imgs for imgs, _ in eval_sets.values()):
        return None
    classes = prompts["classes"]
    index = {c: i for i, c in enumerate(classes)}
    transform = image_transform(model.image_size)
    prepared = {}
    for name, (imgs, labels) in eval_sets.items():
        unknown = sorted({l for l in labels if l not in index})
        if unknown:
            raise ValueError(f"split {name!r} has labels missing from the prompt classes: {', '.join(unknown[:5])}")
        if imgs:
            prepared[name] = (load_pixels(imgs, transform).split(EVAL_BATCH), np.array([index[l] for l in labels]))

    def eval_fn(m) -> dict[str, float]:
        encoder = encoder_for_model(m)  # built per call: it sets eval mode, which train() undoes after
        classifier = ZeroShotClassifier(encoder, classes, prompts["templates"])
        out = {}
        for name, (batches, targets) in prepared.items():
            embeddings = np.concatenate([encoder.encode_images(b) for b in batches])  # [N, D]
            predicted = classifier.predict(embeddings, top_k=1).indices[:, 0]  # [N]
            out[f"zeroshot_top1/{name}"] = float((predicted == targets).mean())
        return out

    return eval_fn


def synthetic_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``SyntheticPairs`` keyword arguments from the ``--synthetic-*`` flags; None without them."""
    if not args.synthetic_pairs:
        return None
    return {"length": args.synthetic_pairs, "group_size": args.synthetic_group, "variety": args.synthetic_variety}


def make_dataset(model, data: TrainData, augment: bool, synthetic: dict[str, Any] | None = None, seed: int = 0):
    """The manifest's pairs, or freshly generated ones (``synthetic_options``; no crop: every image is new)."""
    from clip_core.preprocess import image_transform
    from clip_core.train import PairsDataset

    transform = image_transform(model.image_size)
    if synthetic:
        from pipelines.train.synthetic_pairs import SyntheticPairs

        return SyntheticPairs(transform=transform, seed=seed, context_length=model.context_length, **synthetic)
    return PairsDataset(data.images, data.captions, transform, context_length=model.context_length, augment=augment)


def _fit_local(model, data: TrainData, cfg, augment: bool, prompts, out: str | None = None,
               save_dtype: str = "float32", synthetic: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from clip_core.checkpoints import save_model
    from clip_core.train import train

    def checkpoint(m, step: int) -> None:
        save_model(m, out, dtype=getattr(torch, save_dtype))
        print(f"step {step}: saved {out}", flush=True)

    dataset = make_dataset(model, data, augment, synthetic, cfg.seed)
    return train(model, dataset, cfg, eval_fn=make_eval_fn(model, data.eval_sets, prompts),
                 checkpoint_fn=checkpoint if out else None)


# ----------------------------------------------------------------------------- Ray Train


def _stdout_line(message: str) -> None:
    """Write progress straight to stdout: Ray Train's patched ``print`` would log each line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: same model init and loop; rank 0 reports the weights."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from clip_core.checkpoints import save_model
    from clip_core.train import TrainConfig, train

    cfg = TrainConfig(**config["train_config"])
    if cfg.num_threads is None:
        torch.set_num_threads(1)  # Ray gives each worker one CPU; more threads only contend
    model = build_model(config["model"], cfg.seed)
    data: TrainData = config["data"]
    dataset = make_dataset(model, data, config["augment"], config["synthetic"], cfg.seed)
    rank = ray.train.get_context().get_world_rank()
    eval_fn = make_eval_fn(model, data.eval_sets, config["prompts"]) if rank == 0 else None
    history = train(model, dataset, cfg, eval_fn=eval_fn, log_fn=_stdout_line)
    metrics = {"history": json.dumps(history)}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, os.path.join(tmp, "model.safetensors"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def _fit_ray(args: argparse.Namespace, data: TrainData, cfg, prompts):
    """Train with ``args.workers`` Ray Train workers; return (trained model, history)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from clip_core import load_model

    started_ray = not ray.is_initialized()
    if started_ray:  # a local Ray, or the cluster named by RAY_ADDRESS
        ray.init(include_dashboard=False, log_to_driver=True)
    storage = tempfile.mkdtemp(prefix="clip-etl-train-")
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"train_config": cfg.to_dict(), "model": args.model, "data": data,
                               "augment": not args.no_augment, "prompts": prompts,
                               "synthetic": synthetic_options(args)},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="clip-etl-train", storage_path=storage),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("Ray Train finished without a checkpoint from rank 0")
        with result.checkpoint.as_directory() as ckpt_dir:
            model = load_model(os.path.join(ckpt_dir, "model.safetensors"))
        return model, json.loads(result.metrics["history"])
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()


# ----------------------------------------------------------------------------- job


def run_train(args: argparse.Namespace) -> int:
    """Run the job; 0 on success, non-zero with one line on stderr for a job-level failure."""
    t0 = time.time()
    try:
        import torch

        from clip_core.checkpoints import save_model

        cfg = train_config_from_args(args)
        if args.pca_patch_init and os.path.exists(args.model):
            raise ValueError("--pca-patch-init re-initialises the patch embedding; use it with a preset, not a checkpoint")
        prompts = load_prompts(args.eval_prompts)
        eval_splits = [s for s in args.eval_splits.split(",") if s] if prompts else []
        data = load_train_data(args, eval_splits)
        print(f"manifest {args.manifest}: "
              + (f"{args.synthetic_pairs} generated training pairs instead of its rows" if args.synthetic_pairs
                 else f"{len(data.images)} training pairs")
              + (f" (split {args.split!r})" if args.split else "")
              + (f", {data.skipped} rows skipped (no image or text)" if data.skipped else "")
              + "".join(f", {len(v[0])} {k} rows for evaluation" for k, v in data.eval_sets.items()), flush=True)
        if args.workers > 1:
            model, history = _fit_ray(args, data, cfg, prompts)
        else:
            model = build_model(args.model, cfg.seed)
            history = _fit_local(model, data, cfg, not args.no_augment, prompts, args.out, args.save_dtype,
                                 synthetic_options(args))
        save_model(model, args.out, dtype=getattr(torch, args.save_dtype))
    except Exception as e:  # a job-level failure: one clear line, non-zero exit
        print(f"clip-etl train: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    history["manifest"] = args.manifest
    history["model"] = args.model
    history["workers"] = max(1, args.workers)
    history["job_wall_time_s"] = time.time() - t0
    if args.history:
        Path(args.history).parent.mkdir(parents=True, exist_ok=True)
        Path(args.history).write_text(json.dumps(history, indent=1) + "\n")
    size_mb = os.path.getsize(args.out) / 1e6
    final = history["eval"][-1] if history.get("eval") else {}
    print(f"wrote {args.out} ({size_mb:.1f} MB) after {history['steps']} steps in {history['job_wall_time_s']:.0f}s"
          + "".join(f"; {k} {v:.3f}" for k, v in final.items() if k != "step"), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-etl train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
