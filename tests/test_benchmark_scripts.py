"""The throughput benchmarks run end to end on tiny sizes: their figures come from real runs of the
product and of the baselines, and a script that stopped working would put no figures anywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline_fixtures import REPO, cli_env

pytestmark = pytest.mark.e2e


def test_decode_benchmark_compares_draft_and_full_decodes(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, "benchmarks/decode.py", "--quick", "--images", "4",
                           "--data-dir", str(tmp_path / "data"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    figures = [v for v in doc.values() if isinstance(v, dict)]
    assert len(figures) == 2  # the trained demo model and a random one
    for f in figures:
        assert f["draft_images_per_s"] > 0 and f["exact_images_per_s"] > 0
        assert 0.9 < f["mean_cosine"] <= 1.0 + 1e-6 and f["psnr_db"] > 25


def test_pipeline_benchmark_runs_all_three_sides(tmp_path):
    out = tmp_path / "pipeline.json"
    proc = subprocess.run([sys.executable, "benchmarks/pipeline.py", "--quick", "--images", "3", "--texts", "40",
                           "--loop-texts", "16", "--rounds", "1", "--data-dir", str(tmp_path / "data"),
                           "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=cli_env())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    doc = json.loads(out.read_text())
    for kind in ("images", "texts"):
        part = doc[kind]
        assert part["b"]["check"]["not_ok"] == 0 and not part["b"]["check"]["problems"]
        assert part["a"]["per_s"] > 0 and part["b"]["per_s"] > 0 and part["c"]["per_s"] > 0
        assert part["ratios"]["b/c"] == pytest.approx(part["b"]["per_s"] / part["c"]["per_s"])
    assert "ratio b/c" in proc.stdout
    # (d): the bound for any code; the job, doing more than decode floor + forward, stays under it
    bound = doc["images"]["d"]
    assert 0 < bound["decode_share"] < 1 and bound["decode_floor"]["files"] == 3
    assert doc["images"]["b"]["loop_per_s"] < bound["per_s"]
    assert doc["images"]["ratios"]["d/c"] == pytest.approx(bound["per_s"] / doc["images"]["c"]["per_s"])


def test_dedup_benchmark_agrees_with_exact_search(tmp_path):
    out = tmp_path / "dedup.json"
    proc = subprocess.run([sys.executable, "benchmarks/dedup.py", "--quick", "--cpus", "2",
                           "--data-dir", str(tmp_path / "data"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    doc = json.loads(out.read_text())
    assert doc["rows"] >= 4000 and doc["exact_pairs"] > 100  # planted groups were found by the baseline
    assert doc["agreement"]["f1"] >= 0.99 and doc["ours"]["clusters"] > 1
    assert doc["ours"]["peak_bytes"] > 0 and doc["exact"]["peak_bytes"] > 0
    assert doc["speedup_exact/ours"] == pytest.approx(doc["exact"]["seconds"] / doc["ours"]["seconds"])
    assert "ratio exact/ours" in proc.stdout
