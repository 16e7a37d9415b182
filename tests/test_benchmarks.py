"""The benchmark scripts run (tiny settings, CPU) and print their JSON summary: smoke tests against rot,
not timings (speed is proved by running them, with numbers in docs/results.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "step_overhead": ["--steps", "3", "--warmup", "1", "--repeats", "1"],
    "plain_loop": [
        "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "4", "--modes", "eager",
        "--variants", "float", "w1a4_bcgd", "convnet_d_aqe_w1a1",
    ],
    "gpu_suite": ["--device", "cpu", "--tiny", "--out", "suite"],
    "imagenet_loader": ["--images", "32", "--batches", "2", "--batch-size", "4", "--workers", "0", "--baseline"],
    "cifar_throughput": [
        "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--quant", "w1a4",
        "--json", "result.json",
    ],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs(script: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *CASES[script]],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    for written in ("result.json", "suite/gpu_suite.json"):
        if (tmp_path / written).exists():
            lines.append((tmp_path / written).read_text())
    assert lines, out.stdout[-2000:]
    summary = json.loads(lines[-1])
    assert summary  # a non-empty result record
    if script == "gpu_suite":  # every cell measured (none skipped or failed), and the table written
        cells = [r for rows in summary["measurements"].values() for per in rows.values() for r in per.values()]
        assert len(cells) == 12 and all("images_per_s" in r and r["warmup_s"] >= 0 for r in cells), cells
        assert "| w1a4_bcgd | gpu_fast |" in (tmp_path / "suite" / "gpu_suite.md").read_text()
