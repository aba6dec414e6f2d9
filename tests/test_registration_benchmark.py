"""The small CI version of ``benchmarks/registration.py``: simulated X-rays with other physics than the model (another
kVp, quantum and electronic noise), starts perturbed by up to ±10° / ±20 mm, recovered to a final mTRE < 2 mm."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "registration.py"


def test_quick_registration_benchmark_recovers_every_case(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("registration_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "registration.json"
    assert module.main(["--quick", "--device", "cpu", "--quiet", "--success-mm", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["torchdrr"]
    assert len(rows) == 3
    for row in rows:
        assert row["start_mtre_mm"] > 10  # the starts really are far off
        assert row["mtre_mm"] < 2.0, row
    assert record["summaries"][0]["success_rate"] == 1.0
