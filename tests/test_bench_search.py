"""bench/bench_search.py and bench/bench_search_page.py at a toy size, so neither bench can rot."""

import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_search  # noqa: E402


def _ms(out: str, label: str) -> float:
    return float(re.search(re.escape(label) + r"\s*:\s*([0-9.]+) ms", out).group(1))


def test_bench_search_runs_on_a_synthetic_index(capsys):
    bench_search.main(["--videos", "40", "--dim", "16", "--repeats", "2", "--text_layers", "1"])
    out = capsys.readouterr().out
    assert out.startswith("search over 40 videos x 16-d")
    figures = {label: _ms(out, label) for label in ("load index + 1 query", "1 query (index open)", "100 queries")}
    assert all(t > 0 for t in figures.values())
    # The total is the load-and-search time plus the query's encoding, as printed.
    total = _ms(out, "answer 1 query")
    assert total == pytest.approx(figures["load index + 1 query"] + _ms(out, "encode 1 query (B/32)"), abs=0.02)


def test_bench_search_page_serves_a_synthetic_index(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import bench_search_page

    bench_search_page.main(["--videos", "30", "--repeats", "2", "--dim", "64", "--text_layers", "1"])
    out = capsys.readouterr().out
    http = _ms(out, "text query over HTTP (/api/search)")
    direct = _ms(out, "same ranking in-process (rank_texts)")
    overhead = float(re.search(r"bare ranking: x([0-9.]+)", out).group(1))
    assert overhead == pytest.approx(http / direct, rel=0.02, abs=0.02)
