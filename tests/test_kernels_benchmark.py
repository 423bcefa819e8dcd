"""benchmarks/kernels.py runs end to end at tiny sizes and writes well-formed JSON + PNG
(no timing is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.kernels import doc_lengths

ROOT = Path(__file__).resolve().parent.parent


def test_doc_lengths_cover_the_packed_sequence():
    for kind in ("uniform256", "mixed"):
        for total in (1000, 8192):
            lengths = doc_lengths(kind, total)
            assert sum(lengths) == total and min(lengths) >= 1
    assert max(doc_lengths("mixed", 32768)) <= 2048


def test_kernels_benchmark_writes_its_results(tmp_path):
    cmd = [sys.executable, "benchmarks/kernels.py", "--sizes", "512", "--repeats", "1", "--moe-tokens", "32"]
    subprocess.run([*cmd, "--out-dir", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert {row["docs"] for row in result["softmax"]} == {"uniform256", "mixed"}
    assert {row["ranks"] for row in result["softmax"]} == {1, 4}
    for row in result["softmax"]:
        methods = {"per_doc", "one_by_one"} | ({"dense"} if row["ranks"] == 1 else {"per_doc_window"})
        for key in ("ratio_to_one_by_one", "min_ratio_to_one_by_one", "cpu_ratio_to_one_by_one"):
            assert set(row[key]) == methods
        assert all(len(t["cpu_samples_s"]) == len(t["samples_s"]) == 1 for t in row["timing"].values())
    assert set(result["partial_piece"]["timing"]) == {"split", "masked", "whole_doc"}
    assert {row["shape"] for row in result["moe"]} == {"tiny-cpu", "fine-grained", "wide"}
    assert all(set(row["tokens_per_s"]) == {"loop", "grouped"} for row in result["moe"])
    assert result["machine"]["git_revision"]
