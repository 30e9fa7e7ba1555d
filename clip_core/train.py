"""Contrastive training of a CLIP on (image, caption) pairs, as OpenAI and open_clip train theirs.

Used to train the bundled demo model and available to users who want to fit or fine-tune a model
on their own pairs. The recipe is the standard one, so results carry over:

- symmetric InfoNCE: cross-entropy image->text and text->image over the batch, with
  ``logits = logit_scale.exp() * normalize(image) @ normalize(text).T``;
- a learnable temperature clamped to ``ln(100)`` after every step (larger scales destabilise);
- AdamW without weight decay on gains, biases, embeddings and the logit scale (decaying those only
  hurts), linear warmup then cosine decay, gradient-norm clipping.

When ``torch.distributed`` is initialised (e.g. inside a Ray Train worker) the model is wrapped in
DistributedDataParallel and the data sharded with a DistributedSampler; each worker computes the
loss over its own batch (no feature all-gather), and gradients are averaged. Only torch here: the
caller builds the dataset (manifest reading lives in ``pipelines``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

MAX_LOGIT_SCALE = math.log(100.0)  # OpenAI's cap on the learned temperature

TokenizerFn = Callable[..., torch.Tensor]


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (defaults suit the small presets on a CPU)."""

    epochs: int = 1  # passes over the dataset; ignored when ``steps`` is set
    steps: int | None = None  # total optimizer steps (overrides epochs); loops over the data as needed
    batch_size: int = 128  # pairs per step per worker; larger batches give more negatives
    lr: float = 5e-4  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of ``lr`` at the end of the cosine
    weight_decay: float = 0.1  # AdamW decay on weight matrices only
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (CLIP's; 0.98 is steadier for transformers)
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 100  # linear warmup from ~0 to ``lr``
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    seed: int = 0  # seeds shuffling, augmentation and anything random in the loop
    shuffle: bool = True  # shuffle each epoch (off for datasets whose order is random and meaningful)
    num_threads: int | None = None  # torch intra-op threads; None keeps the current setting
    loader_workers: int = 0  # DataLoader worker processes (0 = decode in the training process)
    log_every: int = 20  # print a progress line every N steps (0 = never)
    eval_every: int = 0  # call ``eval_fn`` every N steps (0 = only at the end)
    checkpoint_every: int = 0  # call ``checkpoint_fn`` every N steps (0 = never; the caller saves the result)
    pca_patch_init: bool = False  # start the patch embedding from whitened PCA of training patches (fresh models only)
    pca_images: int = 2000  # images sampled from the dataset for that PCA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- data


def _open_image(src: Any):
    """A PIL image from a path or encoded bytes (``preprocess.load_image`` is the robust decoder)."""
    from .preprocess import load_image

    if isinstance(src, (bytes, bytearray, memoryview)):
        return load_image(bytes(src))
    return load_image(os.fspath(src))


def random_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box covering ``scale`` of the area at aspect ``ratio``."""
    area = width * height
    r = torch.rand(3, generator=generator).tolist()
    target = area * (scale[0] + (scale[1] - scale[0]) * r[0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * r[1])
    w = min(width, max(1, int(round(math.sqrt(target * aspect)))))
    h = min(height, max(1, int(round(math.sqrt(target / aspect)))))
    left = int((width - w) * r[2])
    top = int((height - h) * torch.rand(1, generator=generator).item())
    return left, top, left + w, top + h


class PairsDataset(Dataset):
    """(pixels[3,R,R], tokens[L]) pairs from image paths or encoded bytes and their captions.

    Captions are tokenized once up front (cheap, and keeps the per-item work to image decoding).
    ``augment`` applies a mild random crop (90-100% of the area) before ``transform``: enough to
    vary framing, small enough to keep the whole subject and its position in view. There is no
    flip, because captions may name a side ("near the top left").
    """

    def __init__(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        tokenizer_fn: TokenizerFn | None = None,
        context_length: int = 77,
        augment: bool = False,
        crop_scale: tuple[float, float] = (0.9, 1.0),
    ):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if tokenizer_fn is None:
            from .tokenizer import tokenize as tokenizer_fn
        self.images = list(images)
        self.tokens = tokenizer_fn(list(captions), context_length=context_length, truncate=True)
        self.transform = transform
        self.augment = augment
        self.crop_scale = crop_scale

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = _open_image(self.images[index])
        if self.augment:
            img = img.crop(random_crop_box(img.width, img.height, self.crop_scale, (0.9, 1.1)))
        return self.transform(img), self.tokens[index]


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-padding columns: the causal mask makes the result identical, and faster."""
    used = tokens.ne(0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return tokens[:, :length]


# ----------------------------------------------------------------------------- loss and optimizer


def contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is the positive of row i and column i, every other pair a negative."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep ``exp(logit_scale)`` within [1, 100], as OpenAI does after each step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices decay; gains, biases, embeddings and the logit scale do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- initialisation


@torch.no_grad()
def init_patch_embedding_pca(model: nn.Module, pixels: torch.Tensor, eps: float = 1e-2) -> None:
    """Set ``visual.conv1`` to the whitened principal components of the images' patches.

    A ViT trained from scratch on a small budget spends its first thousand steps discovering edge
    and color-contrast filters in its random linear patch embedding; whitened PCA filters give it a
    complete, decorrelated basis of patch structure at step 0 (each output has unit variance on the
    data). On the demo's shapes this roughly halves the steps a small ViT needs to tell shapes apart.
    Only meaningful for fresh weights: it replaces whatever the patch embedding had learned.
    """
    conv = model.visual.conv1
    p, width = conv.kernel_size[0], conv.out_channels
    patches = F.unfold(pixels.float(), p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p)  # [N*G*G, 3PP]
    patches = patches - patches.mean(dim=0)
    k = min(width, patches.shape[1])
    evals, evecs = torch.linalg.eigh(patches.double().t() @ patches.double() / patches.shape[0])  # ascending
    top = torch.flip(torch.arange(evals.shape[0]), dims=[0])[:k]
    comps = evecs[:, top].t() / (evals[top].clamp_min(0).sqrt()[:, None] + eps)  # [k, 3PP], unit output variance
    weight = torch.zeros_like(conv.weight).view(width, -1)
    weight[:k] = comps.to(weight.dtype)
    if k < width:  # more channels than patch dimensions: keep the remaining random filters
        weight[k:] = conv.weight.view(width, -1)[k:]
    conv.weight.copy_(weight.view_as(conv.weight))


def _sample_pixels(dataset: Dataset, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))].tolist()
    return torch.stack([dataset[i][0] for i in idx])


# ----------------------------------------------------------------------------- loop


def _dist_info() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _parallel(base: nn.Module, dataset: Dataset, cfg: TrainConfig, distributed: bool, rank: int, world: int):
    """(the module to call, the sampler or None): DDP and a distributed sampler on several
    workers, the model itself on one."""
    if not (distributed and world > 1):
        return base, None
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=cfg.shuffle, seed=cfg.seed,
                                 drop_last=True)
    return DistributedDataParallel(base), sampler


def _loader(dataset: Dataset, cfg: TrainConfig, sampler, world: int) -> tuple[DataLoader, int]:
    """(the batch loader, its batch size): at most the pairs one worker has, at least 2 pairs,
    since a contrastive batch of one has no negatives."""
    per_worker = len(dataset) // world if sampler is not None else len(dataset)
    if per_worker < 2:
        raise ValueError(f"need at least 2 pairs per worker to train contrastively, got {per_worker}")
    batch_size = min(cfg.batch_size, per_worker)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None and cfg.shuffle,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.loader_workers,
        generator=torch.Generator().manual_seed(cfg.seed) if sampler is None and cfg.shuffle else None,
        persistent_workers=cfg.loader_workers > 0,
    )
    return loader, batch_size


def _optimizer(base: nn.Module, cfg: TrainConfig, total: int):
    """AdamW over the decay / no-decay groups, with warmup then cosine decay over ``total`` steps."""
    optimizer = torch.optim.AdamW(parameter_groups(base, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.min_lr_ratio)
    )
    return optimizer, scheduler


def _step(net: nn.Module, base: nn.Module, optimizer, scheduler, grad_clip: float | None,
          pixels: torch.Tensor, tokens: torch.Tensor) -> float:
    """One optimizer step on a batch; returns its loss."""
    logits_per_image, logits_per_text = net(pixels, trim_tokens(tokens))
    loss = contrastive_loss(logits_per_image, logits_per_text)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(base.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    clamp_logit_scale(base)
    return float(loss.detach())


@dataclass
class _Window:
    """Throughput and loss since the last logged step."""

    t0: float  # when the window started (perf_counter)
    images: int = 0  # images seen in it, all workers
    loss_sum: float = 0.0  # summed per-step losses

    def add(self, images: int, loss: float) -> None:
        self.images += images
        self.loss_sum += loss

    def reset(self, t0: float) -> None:
        self.t0, self.images, self.loss_sum = t0, 0, 0.0


def _log_window(history: dict[str, Any], window: _Window, step: int, total: int, epoch: int, optimizer,
                base: nn.Module, t_start: float, log: Callable[[str], None]) -> None:
    """Append one logged step to the history, print it, and start a new window."""
    now = time.perf_counter()
    n_logged = step - (history["step"][-1] if history["step"] else 0)
    entry = {
        "step": step,
        "loss": window.loss_sum / max(1, n_logged),
        "lr": optimizer.param_groups[0]["lr"],
        "logit_scale": float(base.logit_scale.detach().exp()),
        "images_per_s": window.images / max(now - window.t0, 1e-9),
    }
    for k, v in entry.items():
        history[k].append(v)
    elapsed = now - t_start
    eta = elapsed / max(1, step) * (total - step)  # at the mean pace so far
    log(f"step {step}/{total} ({100 * step / max(1, total):.0f}%) epoch {epoch} loss {entry['loss']:.4f} "
        f"lr {entry['lr']:.2e} logit_scale {entry['logit_scale']:.1f} {entry['images_per_s']:.0f} img/s "
        f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
    window.reset(now)


def _evaluate(base: nn.Module, eval_fn: Callable[[nn.Module], dict[str, float]] | None, history: dict[str, Any],
              step: int, log: Callable[[str], None]) -> None:
    """``eval_fn`` on the unwrapped model in eval mode, recorded in the history and logged."""
    if eval_fn is None:
        return
    base.eval()
    with torch.no_grad():
        metrics = dict(eval_fn(base))
    base.train()
    history["eval"].append({"step": step, **metrics})
    log(f"eval step {step}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in metrics.items()))


def train(
    model: nn.Module,
    pairs_dataset: Dataset,
    cfg: TrainConfig,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    log_fn: Callable[[str], None] | None = print,
    checkpoint_fn: Callable[[nn.Module, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``pairs_dataset``; return the history.

    The history holds per-logged-step lists (``step``, ``loss``, ``lr``, ``logit_scale``,
    ``images_per_s``), ``eval`` (a list of ``{"step": ..., **eval_fn(model)}``), ``steps``,
    ``images_seen`` and ``wall_time_s``. Under torch.distributed, logging and ``eval_fn`` run on
    rank 0 only and ``images_per_s`` / ``images_seen`` count all workers. ``checkpoint_fn(model,
    step)`` runs on rank 0 every ``cfg.checkpoint_every`` steps, so a long run that is stopped
    leaves its latest weights behind.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    distributed, rank, world = _dist_info()
    log = log_fn if (log_fn is not None and rank == 0) else (lambda _msg: None)

    base = model
    if cfg.pca_patch_init:  # identical on every rank (same seed); DDP also broadcasts rank 0's weights
        init_patch_embedding_pca(base, _sample_pixels(pairs_dataset, cfg.pca_images, cfg.seed))
        log(f"patch embedding initialised from whitened PCA of {min(cfg.pca_images, len(pairs_dataset))} images")
    base.train()
    net, sampler = _parallel(base, pairs_dataset, cfg, distributed, rank, world)
    loader, batch_size = _loader(pairs_dataset, cfg, sampler, world)
    steps_per_epoch = len(loader)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    if total < 1:
        raise ValueError("nothing to train: steps/epochs give 0 optimizer steps")
    optimizer, scheduler = _optimizer(base, cfg, total)

    history: dict[str, Any] = {"step": [], "loss": [], "lr": [], "logit_scale": [], "images_per_s": [], "eval": []}
    n_params = sum(p.numel() for p in base.parameters())
    log(f"training {n_params / 1e6:.2f}M parameters: {total} steps, batch {batch_size} x {world} worker(s), "
        f"{steps_per_epoch} steps/epoch, {len(pairs_dataset)} pairs")

    t_start = time.perf_counter()
    window = _Window(t_start)
    step, epoch = 0, 0
    while step < total:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for pixels, tokens in loader:
            loss = _step(net, base, optimizer, scheduler, cfg.grad_clip, pixels, tokens)
            step += 1
            window.add(pixels.shape[0] * world, loss)
            if cfg.log_every and (step % cfg.log_every == 0 or step == total):
                _log_window(history, window, step, total, epoch, optimizer, base, t_start, log)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total and rank == 0:
                _evaluate(base, eval_fn, history, step, log)
            if checkpoint_fn is not None and rank == 0 and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and step < total:
                checkpoint_fn(base, step)
            if step >= total:
                break
        epoch += 1
    if rank == 0:
        _evaluate(base, eval_fn, history, step, log)
    base.eval()
    history.update(steps=step, images_seen=step * batch_size * world, wall_time_s=time.perf_counter() - t_start,
                   epochs=epoch, batch_size=batch_size, world_size=world)
    return history


# ----------------------------------------------------------------------------- evaluation data


def load_pixels(images: Sequence[Any], transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """[N, 3, R, R] preprocessed pixels of a (small) evaluation set, decoded once."""
    return torch.stack([transform(_open_image(src)) for src in images])


__all__ = [
    "MAX_LOGIT_SCALE",
    "PairsDataset",
    "TrainConfig",
    "clamp_logit_scale",
    "contrastive_loss",
    "init_patch_embedding_pca",
    "load_pixels",
    "lr_factor",
    "parameter_groups",
    "random_crop_box",
    "train",
    "trim_tokens",
]
