"""Encoder throughput: every backend and precision against ``transformers.CLIPModel`` in fp32.

Why this baseline: it is what users run today for "CLIP embeddings in Python". Both sides get the
same weights, the same batch size and the same threads, in one process, and the candidates are
timed interleaved (one batch of each per round, median over rounds), so load from other processes
on the machine hits all of them alike.

Texts are short captions (5-20 words). The baseline gets them as ``tokenize`` returns them, padded
to the context length (77), which is what a CLIP pipeline feeds; a second baseline line pads only
to the longest caption of the batch, to show how much of the text speed-up is trimming alone.

    python benchmarks/encoders.py            # ViT-B/32 shape, random weights (a few minutes)
    python benchmarks/encoders.py --quick    # tiny model, seconds: a smoke test

Accuracy columns are mean cosine to the torch fp32 embeddings of the same inputs. With random
weights they only show fp32 parity; the bf16/int8 bounds on a trained model are measured by the
test suite (``tests/test_encoders.py``) and written in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_core import create_model  # noqa: E402
from clip_core.checkpoints import config_to_hf, openai_to_hf  # noqa: E402
from clip_core.encoders import (  # noqa: E402
    Encoder, cpu_has_native_bf16, load_encoder, resolve_num_threads, retain_freed_memory,
)
from clip_core.export import export_model  # noqa: E402
from clip_core.int8 import int8_matmul_is_exact  # noqa: E402

WORDS = (
    "a the photo picture of on in with near under above small large red blue green yellow old new "
    "dog cat bird horse car bus bike tree house street field river beach mountain city sky water "
    "man woman child people group sitting running standing playing walking eating wooden metal "
    "bright dark sunny snowy night morning close view top side front table chair window door"
).split()


def captions(n: int, seed: int = 0) -> list[str]:
    """Short captions of 5 to 20 words, reproducible."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(5, 21)))) for _ in range(n)]


def photo_like(n: int, size: int, seed: int = 0):
    """Smooth gradients, a few filled shapes and sensor-like noise: image statistics, not white noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        base = rng.uniform(0, 255, 3) * (1 - t[..., None]) + rng.uniform(0, 255, 3) * t[..., None]
        img = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.uniform(0, size * 0.7, 2)
            w = rng.uniform(size * 0.15, size * 0.5)
            box = [x0, y0, x0 + w, y0 + w * rng.uniform(0.5, 1.5)]
            fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


def hf_baseline(model):
    """transformers.CLIPModel with the same weights (our names mapped to theirs)."""
    from transformers import CLIPConfig, CLIPModel

    hf = CLIPModel(CLIPConfig(**config_to_hf(model.config))).eval()
    missing, unexpected = hf.load_state_dict(openai_to_hf(model.state_dict()), strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise RuntimeError(f"baseline weights did not map: missing={missing} unexpected={unexpected}")
    return hf


def timed_rounds(cands: dict[str, Callable[[], object]], rounds: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call; one call of every candidate per round (after one warm-up call each)."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    for f in cands.values():
        f()
    for _ in range(rounds):
        for name, f in cands.items():
            start = clock()
            f()
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    ap.add_argument("--model", default=None, help="preset to benchmark (default ViT-B-32; tiny-test with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="images and texts per batch (default 32; 8 quick)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate (default 5; 2 quick)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every candidate (default: all given)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default); cpu: this process's CPU time, which on a machine shared "
                         "with other jobs measures the work itself (use with --threads 1)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    preset = args.model or ("tiny-test" if args.quick else "ViT-B-32")
    batch = args.batch_size or (8 if args.quick else 32)
    rounds = args.rounds or (2 if args.quick else 5)
    threads = resolve_num_threads(args.threads)
    if args.clock == "cpu" and threads != 1:
        ap.error("--clock cpu needs --threads 1 (idle threads spinning would count as work)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(threads)
    retain_freed_memory()  # as the pipeline's model actors do; every candidate and the baseline alike
    warnings.simplefilter("ignore")
    load_before = _loadavg()

    torch.manual_seed(0)
    model = create_model(preset).eval()
    baseline = hf_baseline(model)
    print(f"machine: {cpu_name()}, {threads} thread(s), {args.clock} clock, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}, load average before: {load_before}", flush=True)

    work = tempfile.TemporaryDirectory(prefix="clip-etl-bench-")
    encoders: dict[str, Encoder] = {
        "torch fp32": load_encoder(model, "torch", "fp32", num_threads=threads),
        "torch bf16": load_encoder(model, "torch", "bf16", num_threads=threads),
    }
    if int8_matmul_is_exact():  # int8 images, bf16 (or fp32) texts
        encoders["torch int8"] = load_encoder(model, "torch", "int8", num_threads=threads)
    else:
        print("torch int8: not run, this CPU's int8 matmul is not exact (no AVX512-VNNI/AMX-INT8)", flush=True)
    for fmt in ("torchscript", "onnx", "onnx-int8"):
        start = time.perf_counter()
        out = export_model(model, Path(work.name) / fmt, fmt, source_name=preset)
        encoders[f"{fmt} {'int8' if fmt == 'onnx-int8' else 'fp32'}"] = load_encoder(out, num_threads=threads)
        print(f"exported {fmt} in {time.perf_counter() - start:.1f}s", flush=True)

    ref = encoders["torch fp32"]
    R = ref.image_size
    pixels = torch.stack([ref.preprocess(im) for im in photo_like(batch, max(R, 96))])
    texts = captions(batch)
    tokens = ref.tokenize(texts)
    lengths = ref.text_lengths(tokens)
    longest = tokens[:, : int(lengths.max())]
    print(f"model: {preset} (random weights), batch {batch}, {rounds} rounds; captions 5-20 words, "
          f"{float(lengths.float().mean()):.1f} tokens on average (max {int(lengths.max())}, context {tokens.shape[1]})",
          flush=True)

    # bf16 without native instructions is emulated and many times slower: time it on fewer inputs.
    slow_bf16 = not cpu_has_native_bf16() and not args.quick
    bf16_n = min(batch, 4) if slow_bf16 else batch

    results: dict[str, dict] = {"images": {}, "texts": {}}
    with torch.inference_mode():
        ref_img = ref.encode_images(pixels)
        ref_txt = ref.encode_texts(tokens)
        img = {"baseline transformers fp32": lambda: baseline.get_image_features(pixel_values=pixels)}
        txt = {"baseline transformers fp32": lambda: baseline.get_text_features(input_ids=tokens),
               "baseline, padded to longest": lambda: baseline.get_text_features(input_ids=longest)}
        for name, enc in encoders.items():
            if name == "torch bf16" and slow_bf16:
                continue
            img[name] = lambda enc=enc: enc.encode_images(pixels)
            txt[name] = lambda enc=enc: enc.encode_texts(tokens)
        t_img = timed_rounds(img, rounds, clock)
        t_txt = timed_rounds(txt, rounds, clock)
        if slow_bf16:
            bf = encoders["torch bf16"]
            scale = batch / bf16_n
            t_img["torch bf16"] = timed_rounds({"x": lambda: bf.encode_images(pixels[:bf16_n])}, 1, clock)["x"] * scale
            t_txt["torch bf16"] = timed_rounds({"x": lambda: bf.encode_texts(tokens[:bf16_n])}, 1, clock)["x"] * scale

        base = {"images": t_img["baseline transformers fp32"], "texts": t_txt["baseline transformers fp32"]}
        for kind, timing, reference, inputs in (("images", t_img, ref_img, pixels), ("texts", t_txt, ref_txt, tokens)):
            unit = "img/s" if kind == "images" else "texts/s"
            print(f"\n{kind} per second (batch {batch}):")
            for name, sec in timing.items():
                row = {"per_s": batch / sec, "ratio": base[kind] / sec}
                note = ""
                if name in encoders:
                    n = bf16_n if name == "torch bf16" else batch
                    enc = encoders[name]
                    got = enc.encode_images(inputs[:n]) if kind == "images" else enc.encode_texts(inputs[:n])
                    row["mean_cos_vs_torch_fp32"] = float((got * reference[:n]).sum(1).mean())
                    row["max_abs_diff_vs_torch_fp32"] = float(np.abs(got - reference[:n]).max())
                    note = f"  cos {row['mean_cos_vs_torch_fp32']:.6f}  maxdiff {row['max_abs_diff_vs_torch_fp32']:.1e}"
                    if name == "torch bf16" and slow_bf16:
                        note += f"  (emulated bf16, timed on {n})"
                results[kind][name] = row
                print(f"  {name:30s} {row['per_s']:9.1f} {unit}  {row['ratio']:5.2f}x{note}", flush=True)

    print()
    targets = {"images": 4.0, "texts": 5.0}
    for kind in ("images", "texts"):
        ours = {k: v for k, v in results[kind].items() if not k.startswith("baseline")}
        best = max(ours, key=lambda k: ours[k]["ratio"])
        print(f"ratio {kind} best: {best} {ours[best]['ratio']:.2f}x vs baseline transformers fp32 "
              f"(target {targets[kind]:.0f}x)")
        results[f"best_{kind}"] = best
    print(f"load average after: {_loadavg()}")
    if args.json:
        results.update(machine=cpu_name(), threads=threads, clock=args.clock, model=preset, batch=batch, rounds=rounds,
                       load_before=load_before, load_after=_loadavg())
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
