"""eval_report.py: ranks, recall curve and gallery checked by hand against a small similarity matrix; the HTML."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install -r requirements-report.txt")
from PIL import Image  # noqa: E402

import eval_report  # noqa: E402

# 5 captions x 4 videos; caption i's right video is TRUTH[i] (two captions for video 0, as in multi-sentence data).
SIM = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],  # right video 0 first: rank 1
        [0.1, 0.5, 0.7, 0.6],  # right video 0 below 1, 2, 3: rank 4
        [0.2, 0.8, 0.1, 0.0],  # right video 1 first: rank 1
        [0.3, 0.4, 0.2, 0.9],  # right video 2 below 3, 1, 0: rank 4
        [0.5, 0.1, 0.6, 0.4],
    ]
)  # right video 3 below 2, 0: rank 3
TRUTH = [0, 0, 1, 2, 3]
RANKS = [1, 4, 1, 4, 3]


def test_ranks_recall_and_worst_by_hand():
    ranks = eval_report.caption_ranks(SIM, np.array(TRUTH))
    assert ranks.tolist() == RANKS
    curve = eval_report.recall_curve(ranks, max_k=5)
    assert curve.tolist() == [40.0, 40.0, 60.0, 100.0, 100.0]
    assert eval_report.worst_captions(ranks, 3) == [1, 3, 4]  # rank 4 (captions 1, 3 in order), then rank 3
    assert eval_report.top_videos(SIM[1], 3) == [2, 3, 1]
    ties = np.array([0.5, 0.7, 0.7, 0.1])
    assert eval_report.top_videos(ties, 4) == [1, 2, 0, 3]
    assert eval_report.caption_ranks(ties[None], np.array([2])).tolist() == [1]  # ties count in its favour


def _solid(j: int) -> np.ndarray:
    """Video j's 'frames': two flat frames of grey level 40 * (j + 1); video 2 cannot be read."""
    if j == 2:
        raise OSError("gone")
    return np.full((2, 3, 8, 8), 40 * (j + 1), dtype=np.uint8)


def _data_uri_image(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_report_holds_the_table_the_plots_and_the_gallery(tmp_path):
    captions = ["a red circle", "<script>alert('x')</script> & co", "a blue square", "two stars", "a green box"]
    names = ["v0", "v<1>", "v2", "v3"]
    metrics = {
        "Text-to-Video": {"R1": 40.0, "R5": 100.0, "R10": 100.0, "MR": 3.0, "MeanR": 2.6},
        "Video-to-Text": {"R1": 25.0, "R5": 100.0, "R10": 100.0, "MR": 2.5, "MeanR": 2.25},
    }
    curves = tmp_path / "metrics.jsonl"
    curves.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"event": "step", "global_step": 1, "loss": 2.0},
                {"event": "step", "global_step": 2, "loss": 1.5},
                {"event": "eval", "global_step": 2, "text_to_video": {"R1": 40.0, "R5": 100.0, "R10": 100.0}},
            ]
        )
        + '\n{"torn'
    )
    out = tmp_path / "eval_report.html"
    eval_report.write_report(out, SIM, TRUTH, captions, names, metrics, _solid, curves=curves, worst=3, top=2)
    page = out.read_text()

    cells = re.findall(r"<tr><td>([^<]+)</td>((?:<td>[^<]+</td>)+)</tr>", page)
    assert [c[0] for c in cells] == ["Text-to-Video", "Video-to-Text"]
    assert re.findall(r"<td>([^<]+)</td>", cells[0][1]) == ["40.0", "100.0", "100.0", "3.0", "2.6"]
    assert re.findall(r"<td>([^<]+)</td>", cells[1][1]) == ["25.0", "100.0", "100.0", "2.5", "2.2"]

    for name in ("rank-plots", "curves"):
        uri = re.search(rf"id='{name}' [^>]*src='([^']+)'", page).group(1)
        assert uri.startswith("data:image/png;base64,") and _data_uri_image(uri).size[0] > 300

    entries = re.findall(
        r'<div class="entry" data-caption="(\d+)" data-rank="(\d+)">(.*?)</div></div></div>', page, flags=re.S
    )
    assert [(int(c), int(r)) for c, r, _ in entries] == [(1, 4), (3, 4), (4, 3)]
    # Each entry: the right video, then the caption's top 2 by the matrix.
    shown = [[int(v) for v in re.findall(r'data-video="(\d+)"', body)] for _, _, body in entries]
    assert shown == [[0, 2, 3], [2, 3, 1], [3, 2, 0]]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page and "<script>" not in page
    assert "v&lt;1&gt;" in page
    assert "(no frames)" in page  # video 2 could not be read: said, not a crash
    thumb = re.search(r'data-video="1"><img src="([^"]+)"', page).group(1)
    grey = np.asarray(_data_uri_image(thumb).convert("L"))
    assert abs(float(grey.mean()) - 80) < 3  # video 1's frames are grey 80


def test_plot_command_writes_a_png(tmp_path, capsys):
    records = [{"event": "step", "global_step": s, "loss": 3.0 / s} for s in range(1, 6)]
    records.append({"event": "eval", "global_step": 5, "text_to_video": {"R1": 10.0, "R5": 30.0, "R10": 50.0}})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert eval_report.main(["plot", "--metrics", str(path), "--out", str(tmp_path / "curves.png")]) == 0
    assert Image.open(tmp_path / "curves.png").format == "PNG"
    assert eval_report.main(["plot", "--metrics", str(tmp_path / "nope.jsonl"), "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.jsonl not found" in err


def test_curves_leave_out_a_later_evaluation_of_the_run(tmp_path):
    records = [{"event": "step", "global_step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    records += [
        {"event": "eval", "global_step": 3, "tag": "epoch0", "text_to_video": {"R1": 10.0, "R5": 30.0, "R10": 50.0}},
        {"event": "eval", "global_step": 0, "tag": "eval", "text_to_video": {"R1": 12.0, "R5": 31.0, "R10": 52.0}},
    ]
    recall_ax = eval_report.plot_curves(records).axes[1]
    assert [list(line.get_xdata()) for line in recall_ax.lines] == [[3], [3], [3]]
    assert [list(line.get_ydata()) for line in recall_ax.lines] == [[10.0], [30.0], [50.0]]


STEP = '{"event": "step", "global_step": 1, "loss": 2.0}\n'


@pytest.mark.parametrize(
    "content, line, problem",
    [
        (STEP + "[1, 2]\n", 2, "a JSON list; expected one JSON object per line"),
        (STEP + "3.5\n" + STEP, 2, "a JSON float; expected one JSON object per line"),
        ("hello\n" + STEP, 1, "not JSON; expected one JSON object per line"),
        (STEP + STEP + "\x00\xff\xfe binary", 3, "not UTF-8 text; expected a run's metrics.jsonl"),
    ],
)
def test_plot_names_the_file_and_line_that_is_not_a_record(tmp_path, capsys, content, line, problem):
    path, out = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
    path.write_bytes(content.encode("latin-1"))
    assert eval_report.main(["plot", "--metrics", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"eval_report.py plot: error: {path}, line {line}: {problem}\n"
    assert not out.exists()


def test_torn_records_are_left_out_wherever_they_are(tmp_path):
    # A run killed mid-write, then a later run appending to the same file: the torn record is inside.
    path = tmp_path / "metrics.jsonl"
    path.write_text(STEP + '{"event": "st' + "\n" + STEP + "\n" + '{"event"')
    assert eval_report.read_jsonl(path) == [json.loads(STEP)] * 2


# ------------------------------------------------------------------------------------------------ in a browser

# Per entry: the tiles' tops, the row's right edge, and for the right video whether its label lies clear of the green
# frame (inside the tile's border) and below the thumbnails.
_LAYOUT = """
return [...document.querySelectorAll('.entry')].map(e => {
  const tiles = [...e.querySelectorAll('.video')].map(v => v.getBoundingClientRect());
  const right = e.querySelector('.video.right');
  const box = right.getBoundingClientRect(), border = parseFloat(getComputedStyle(right).borderTopWidth);
  const img = right.querySelector('img').getBoundingClientRect();
  const labels = [...right.querySelectorAll('div')].map(d => d.getBoundingClientRect());
  return {
    tops: tiles.map(r => Math.round(r.top)),
    rowRight: Math.max(...tiles.map(r => r.right)),
    width: document.documentElement.clientWidth,
    clear: labels.every(l => l.left >= box.left + border && l.right <= box.right - border
                             && l.bottom <= box.bottom - border && l.top >= img.bottom),
    framed: getComputedStyle(right).borderTopColor == 'rgb(22, 163, 74)' && border >= 2,
  };
});
"""


@pytest.fixture(scope="module")
def browser():
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.mark.parametrize("window", [1400, 800, 420])
def test_a_captions_videos_fit_one_row_and_the_frame_leaves_the_label_clear(tmp_path, browser, window):
    n = 8
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(n, n))
    names = [f"video{j}_with_a_rather_long_file_name.mp4" for j in range(n)]
    out = tmp_path / "eval_report.html"
    metrics = {"Text-to-Video": {"R1": 0.0, "R5": 0.0, "R10": 0.0, "MR": 1.0, "MeanR": 1.0}}
    frames = lambda j: np.full((4, 3, 224, 224), 20 * j, dtype=np.uint8)  # noqa: E731
    eval_report.write_report(out, sim, list(range(n)), [f"caption {i}" for i in range(n)], names, metrics, frames)
    browser.set_window_size(window, 900)
    browser.get(out.as_uri())
    entries = browser.execute_script(_LAYOUT)
    assert len(entries) == n
    for e in entries:
        assert len(e["tops"]) == 1 + eval_report.TOP and len(set(e["tops"])) == 1, e
        assert e["rowRight"] <= e["width"] and e["clear"] and e["framed"], e
