"""bench/benchlib.py: the median, ratio and table logic behind docs/BENCHMARKS.md (no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import benchlib

pytestmark = pytest.mark.unit


def test_median_and_ratio() -> None:
    assert benchlib.median([3.0, 1.0, 2.0]) == 2.0
    assert benchlib.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        benchlib.median([])
    assert benchlib.ratio(30.0, 10.0) == "3.00x"  # throughput: higher is better
    assert benchlib.ratio(2.0, 4.0, higher_is_better=False) == "2.00x"  # seconds, bytes
    assert benchlib.ratio(0.0, 1.0) == "n/a"


def test_interleave_alternates_and_keeps_every_value() -> None:
    calls: list[str] = []
    values = iter(range(100))

    def make(name: str) -> benchlib.Callable[[], float]:
        return lambda: calls.append(name) or float(next(values))

    out = benchlib.interleave({"ours": make("ours"), "peer": make("peer")}, 3)
    assert calls == ["ours", "peer"] * 3
    assert out == {"ours": [0.0, 2.0, 4.0], "peer": [1.0, 3.0, 5.0]}


def test_table_formats_numbers() -> None:
    text = benchlib.table(
        ["model", "ours", "ratio"], [["tiny", 1234.5678, "1.50x"], ["20m", 0.01234, "x"]]
    )
    assert text.splitlines() == [
        "| model | ours | ratio |",
        "|---|---|---|",
        "| tiny | 1235 | 1.50x |",
        "| 20m | 0.0123 | x |",
    ]


def test_write_section_replaces_between_markers_or_appends(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    benchlib.write_section("dpo", "DPO", "first", doc)
    benchlib.write_section("sft", "SFT", "other", doc)
    benchlib.write_section("dpo", "DPO", "second\nrun", doc)
    assert doc.read_text() == (
        "# Benchmarks\n\nintro\n\n## DPO\n\n<!-- bench:dpo -->\nsecond\nrun\n<!-- /bench:dpo -->\n"
        "\n## SFT\n\n<!-- bench:sft -->\nother\n<!-- /bench:sft -->\n"
    )
