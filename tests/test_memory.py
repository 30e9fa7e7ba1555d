"""Memory that stays flat: the whole job's peak memory (driver, Ray's processes and every worker,
summed from the OS) must not grow with the rows it processes. Measured by ``benchmarks/soak.py``,
which runs the real job and samples the PSS of its whole process tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline_fixtures import REPO, cli_env

pytestmark = pytest.mark.e2e


def test_whole_job_peak_memory_is_flat_from_2k_to_20k_rows(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "benchmarks/soak.py", "--sizes", "2000,20000", "--interval", "0.5",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=cli_env())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    doc = json.loads(out.read_text())
    small, large = doc["runs"]
    assert (small["rows"], large["rows"]) == (2000, 20000)
    for r in (small, large):
        # the whole tree was sampled: the driver, GCS, raylet and at least one worker
        assert r["max_processes"] >= 4 and len(r["timeline"]) >= 3
        assert r["peak_pss_mb"] > 100
    print(f"peak job PSS: {small['peak_pss_mb']:.0f} MB at 2k rows, {large['peak_pss_mb']:.0f} MB at 20k "
          f"({doc['ratio']:.2f}x)")
    assert doc["ratio"] < 1.30
