#!/usr/bin/env bash
# On a machine with a CUDA GPU: fp16 parity against fp32, the model's images/s alone, and
# `clip-etl run` end to end against the user's transformers loop (benchmarks/pipeline.py).
#
#   bash benchmarks/gpu.sh            # ViT-B/32 shape, random weights; a few minutes
#   IMAGES=128 REPEAT=4 bash benchmarks/gpu.sh
#
# Prints the card's name with every figure; BENCHMARKS.md records them with it. Target for
# ViT-B/32 on one H100/H200-class GPU: >= 5,000 images/s end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
IMAGES=${IMAGES:-512}
REPEAT=${REPEAT:-16}
OUT=${OUT:-gpu-bench}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

"$PY" - <<'EOF' | tee "$OUT/model.txt"
"""fp16 parity against fp32 on the same weights and pixels, and the model alone in images/s."""
import time

import numpy as np
import torch

from clip_core import create_model
from clip_core.encoders import load_encoder

torch.manual_seed(0)
model = create_model("ViT-B-32")
fp32 = load_encoder(model, "torch", "fp32", device="cuda")
fp16 = load_encoder(model, "torch", "fp16", device="cuda")
pixels = torch.randn(256, 3, 224, 224)
a, b = fp32.encode_images(pixels), fp16.encode_images(pixels)
cos = (a * b).sum(1)
print(f"{torch.cuda.get_device_name()}: fp16 vs fp32 image cosine mean {cos.mean():.6f}, min {cos.min():.6f}")
texts = [f"a photo of a thing number {i}" for i in range(512)]
ta, tb = fp32.encode_texts(texts), fp16.encode_texts(texts)
print(f"fp16 vs fp32 text cosine mean {(ta * tb).sum(1).mean():.6f}")

uint8 = torch.randint(0, 256, (1024, 224, 224, 3), dtype=torch.uint8)
for name, enc in (("fp32", fp32), ("fp16", fp16)):
    for batch in (256, 1024):
        x = enc.preprocess.normalize(uint8[:batch], device="cuda")  # [B, 3, R, R] on the GPU
        enc.encode_images(x)  # warm-up
        torch.cuda.synchronize()
        t0, rounds = time.perf_counter(), 20
        for _ in range(rounds):
            enc.encode_images(x)
        rate = batch * rounds / (time.perf_counter() - t0)
        print(f"model alone, torch {name}, batch {batch}: {rate:,.0f} images/s")
EOF

# End to end on generated photos, against the user's loop on the same files (one run).
"$PY" benchmarks/pipeline.py --images "$IMAGES" --repeat "$REPEAT" --skip-texts \
    --override embed.batch_size=256 --json "$OUT/pipeline.json" | tee "$OUT/pipeline.txt"
