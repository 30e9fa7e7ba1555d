"""``clip-etl demo``: the whole product on bundled parts, offline, in about a minute.

It generates the sample set (captioned shape images the bundled demo model never saw), runs the
real job on it (``conf/demo.yaml``: embedded Ray, labels, captions, index), runs one text and one
image search against the index, and reports what a user would check first: counts, errors, label
accuracy against the generator's truth (also on shape-color pairs the model never saw together
in training), a few captions, the hits. A contact sheet (PNG and HTML) shows the same at a
glance.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq

DEMO_TEXT_QUERY = "a red star"
SHEET_IMAGES = 24  # images on the contact sheet
SHEET_THUMB = 128  # thumbnail side in pixels


def demo_overrides(manifest: str, output: str) -> list[str]:
    """The overrides that point ``conf/demo.yaml`` (or the built-in equivalent) at this run."""
    return [f"input.path={manifest}", f"output.path={output}"]


def demo_config_dict() -> dict[str, Any]:
    """The demo job's config; ``conf/demo.yaml`` holds the same values (a test keeps them equal)."""
    return {
        "input": {"path": "demo_output/data/manifest.parquet"},
        "output": {"path": "demo_output/run", "shard_size": 100},
        "model": {"checkpoint": "demo", "backend": "auto", "precision": "auto"},
        "embed": {"batch_size": "auto", "actors": 1},
        "label": {"enabled": True, "classes": "demo", "templates": "demo", "top_k": 3},
        "caption": {"enabled": True, "vocabulary": "demo"},
        "index": {"enabled": True, "target_recall": 0.95},
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="folder for the sample data and all outputs")
    parser.add_argument("--n", type=int, default=300, help="number of sample images to generate")
    parser.add_argument("--seed", type=int, default=2026, help="sample generator seed (not a training seed)")
    parser.add_argument("-c", "--config", default=None,
                        help="job config (default: conf/demo.yaml when present, else the built-in demo config)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra config overrides")


def load_demo_config(config_path: str | None, manifest: str, output: str, extra: list[str]):
    from pipelines.config import load_config

    if config_path is None and Path("conf/demo.yaml").is_file():
        config_path = "conf/demo.yaml"
    overrides = demo_overrides(manifest, output) + list(extra)
    if config_path:
        return load_config(config_path, overrides), config_path
    return load_config(None, overrides, base=demo_config_dict()), "built-in demo config"


def evaluate(results_dir: Path, manifest: Path) -> dict[str, Any]:
    """Label accuracy against the generator's truth, overall and per split."""
    res = pads.dataset(str(results_dir), format="parquet").to_table(
        columns=["id", "status", "error", "label", "label_score", "caption"]).to_pandas()
    truth = pq.read_table(manifest, columns=["id", "true_label", "split", "image"]).to_pandas()
    df = res.merge(truth, on="id", how="left", validate="one_to_one")
    ok = df[df.status == "ok"]
    acc = {"all": float((ok.label == ok.true_label).mean()) if len(ok) else 0.0}
    for split, part in ok.groupby("split"):
        acc[str(split)] = float((part.label == part.true_label).mean())
    return {"rows": len(df), "ok": int((df.status == "ok").sum()), "errors": int((df.status != "ok").sum()),
            "accuracy": acc, "frame": df}


def run_searches(index_dir: Path, data_dir: Path, frame) -> dict[str, Any]:
    """One text query and one image query (an image of a never-seen pair) against the index."""
    from clip_core.encoders import load_encoder
    from clip_core.preprocess import load_image

    from pipelines.index import open_index

    index = open_index(str(index_dir))
    encoder = load_encoder(index.meta.get("model", {}).get("name") or "demo")
    text_vec = encoder.encode_texts([DEMO_TEXT_QUERY])
    scores, ids = index.search(text_vec, 5)
    text_hits = list(zip(ids[0].tolist(), scores[0].tolist()))

    unseen = frame[frame.split == "test_unseen"]
    query_row = (unseen if len(unseen) else frame).iloc[0]
    query_path = data_dir / query_row.image
    pixels = encoder.preprocess(load_image(str(query_path)))[None]
    scores, ids = index.search(encoder.encode_images(pixels), 5)
    image_hits = list(zip(ids[0].tolist(), scores[0].tolist()))
    return {"text_query": DEMO_TEXT_QUERY, "text_hits": text_hits, "image_query": str(query_path),
            "image_query_label": query_row.true_label, "image_hits": image_hits, "factory": index.factory}


def write_contact_sheet(out: Path, data_dir: Path, frame, searches: dict[str, Any]) -> tuple[Path, Path]:
    """A PNG grid (prediction in green when right, red when wrong; caption under it) and an HTML page."""
    from PIL import Image, ImageDraw

    rows = frame.sort_values("id").head(SHEET_IMAGES)
    by_id = frame.set_index("id")
    cols, cell_w, cell_h = 6, SHEET_THUMB + 16, SHEET_THUMB + 58
    hit_rows = 2
    grid_rows = -(-len(rows) // cols)
    sheet = Image.new("RGB", (cols * cell_w, 28 + grid_rows * cell_h + 28 + hit_rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), "clip-etl demo: predicted label (green = right, red = wrong) and caption", fill="black")

    def cell(x: int, y: int, image_rel: str, lines: list[tuple[str, str]]) -> None:
        try:
            with Image.open(data_dir / image_rel) as im:
                thumb = im.convert("RGB").resize((SHEET_THUMB, SHEET_THUMB))
            sheet.paste(thumb, (x + 8, y))
        except OSError:
            draw.rectangle([x + 8, y, x + 8 + SHEET_THUMB, y + SHEET_THUMB], outline="red")
        for i, (text, color) in enumerate(lines):
            draw.text((x + 8, y + SHEET_THUMB + 4 + 12 * i), text[:24], fill=color)

    for i, r in enumerate(rows.itertuples()):
        x, y = (i % cols) * cell_w, 28 + (i // cols) * cell_h
        right = r.label == r.true_label
        caption = (r.caption or "")
        cell(x, y, r.image, [(f"{r.label} {r.label_score:.2f}" if r.status == "ok" else "error",
                              "green" if right else "red"), (caption[:24], "black"), (caption[24:48], "black")])
    y0 = 28 + grid_rows * cell_h
    draw.text((8, y0 + 8), f"text search: \"{searches['text_query']}\" (top row) | image search: "
                            f"{searches['image_query_label']} (bottom row, query first)", fill="black")
    hit_sets = [searches["text_hits"], [("<query>", 1.0)] + searches["image_hits"][:cols - 1]]
    for row_i, hits in enumerate(hit_sets):
        for j, (hid, score) in enumerate(hits[:cols]):
            x, y = j * cell_w, y0 + 28 + row_i * cell_h
            if hid == "<query>":
                rel = os.path.relpath(searches["image_query"], data_dir)
                cell(x, y, rel, [("query", "blue")])
            elif hid in by_id.index:
                cell(x, y, by_id.loc[hid].image, [(f"{by_id.loc[hid].true_label}", "black"), (f"score {score:.3f}", "black")])
    png = out / "contact_sheet.png"
    sheet.save(png)

    def img(rel: str) -> str:
        return html.escape(os.path.relpath(data_dir / rel, out))

    parts = ["<!doctype html><meta charset=utf-8><title>clip-etl demo</title>",
             "<style>body{font-family:sans-serif}figure{display:inline-block;width:160px;margin:6px;vertical-align:top}"
             "img{width:128px;image-rendering:pixelated}.ok{color:green}.bad{color:red}</style>",
             "<h1>clip-etl demo</h1><h2>Labels and captions</h2>"]
    for r in rows.itertuples():
        cls = "ok" if r.label == r.true_label else "bad"
        parts.append(f"<figure><img src='{img(r.image)}'><figcaption class={cls}>{html.escape(str(r.label))} "
                     f"({r.label_score:.2f})</figcaption><figcaption>{html.escape(str(r.caption))}</figcaption>"
                     f"<figcaption><small>truth: {html.escape(str(r.true_label))}</small></figcaption></figure>")
    parts.append(f"<h2>Text search: “{html.escape(searches['text_query'])}”</h2>")
    for hid, score in searches["text_hits"]:
        if hid in by_id.index:
            parts.append(f"<figure><img src='{img(by_id.loc[hid].image)}'><figcaption>{html.escape(hid)} "
                         f"{score:.3f}</figcaption></figure>")
    parts.append(f"<h2>Image search (query: {html.escape(searches['image_query_label'])})</h2>")
    parts.append(f"<figure><img src='{html.escape(os.path.relpath(searches['image_query'], out))}'>"
                 "<figcaption>query</figcaption></figure>")
    for hid, score in searches["image_hits"]:
        if hid in by_id.index:
            parts.append(f"<figure><img src='{img(by_id.loc[hid].image)}'><figcaption>{html.escape(hid)} "
                         f"{score:.3f}</figcaption></figure>")
    page = out / "contact_sheet.html"
    page.write_text("\n".join(parts) + "\n")
    return png, page


def run_demo(args: argparse.Namespace) -> int:
    from pipelines.etl.job import run_job
    from pipelines.demo.sample_data import generate_sample_set

    out = Path(args.out).resolve()
    data_dir, run_dir = out / "data", out / "run"
    t0 = time.perf_counter()
    _log(f"[1/4] generating {args.n} sample images (seed {args.seed}) in {data_dir}")
    manifest = generate_sample_set(data_dir, args.n, seed=args.seed, fmt="mixed")
    cfg, source = load_demo_config(args.config, str(manifest), str(run_dir), args.overrides)
    _log(f"[2/4] running the pipeline ({source}): model={cfg.model.checkpoint} backend={cfg.model.backend}")
    t1 = time.perf_counter()
    record = run_job(cfg, "run")
    pipeline_s = time.perf_counter() - t1
    _log("[3/4] checking labels against the generator's truth")
    ev = evaluate(run_dir / "results", manifest)
    frame = ev.pop("frame")
    _log("[4/4] searching the index and drawing the contact sheet")
    searches = run_searches(run_dir / "index", data_dir, frame)
    png, page = write_contact_sheet(out, data_dir, frame, searches)

    acc = ev["accuracy"]
    print()
    print("clip-etl demo summary")
    print(f"  rows: {ev['rows']} in, {ev['ok']} ok, {ev['errors']} errors")
    print(f"  label accuracy: {acc['all']:.1%} overall"
          + "".join(f", {acc[s]:.1%} on {s}" for s in ("val", "test_unseen", "train") if s in acc)
          + "  (test_unseen: shape-color pairs never seen together in training)")
    print("  captions:")
    for r in frame.sort_values("id").head(4).itertuples():
        print(f"    {r.id}: {r.caption!r}  (truth: {r.true_label})")
    print(f"  index: {searches['factory']} over {record.get('counts', {}).get('rows_ok', ev['ok'])} vectors")
    print(f"  text search {searches['text_query']!r}:")
    by_id = frame.set_index("id")
    for hid, score in searches["text_hits"]:
        truth = by_id.loc[hid].true_label if hid in by_id.index else "?"
        print(f"    {score:.3f}  {hid}  ({truth})")
    print(f"  image search (query {Path(searches['image_query']).name}, a {searches['image_query_label']}):")
    for hid, score in searches["image_hits"]:
        truth = by_id.loc[hid].true_label if hid in by_id.index else "?"
        print(f"    {score:.3f}  {hid}  ({truth})")
    print(f"  pipeline time: {pipeline_s:.1f}s; total {time.perf_counter() - t0:.1f}s")
    print(f"  outputs: {run_dir}/results/ (Parquet), {run_dir}/index/, {run_dir}/_run.json")
    print(f"  contact sheet: {png}  and  {page}")
    return 0
