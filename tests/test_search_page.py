"""search/page.py: the JSON API against retrieve.py's rankings, refusals, a missing file, and the page in a real
headless browser (Debian's chromium driven by selenium; skipped with the reason where either is absent)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the search page needs FastAPI: pip install -r requirements-web.txt")
uvicorn = pytest.importorskip("uvicorn", reason="the search page needs uvicorn: pip install -r requirements-web.txt")

from conftest import write_video  # noqa: E402

import retrieve  # noqa: E402
from search.build import IndexRequest, build_index  # noqa: E402
from search.index import load_index  # noqa: E402
from search.page import bound_hosts, create_app, host_name  # noqa: E402
from search.query import open_index, search, search_video  # noqa: E402
from search.settings import AS_STORED, Weights  # noqa: E402

SCRIPT_NAME = "<script>alert(1)</script>.mp4"  # a folder "<script>alert(1)<" holding "script>.mp4"
IMG_NAME = "<img src=x onerror=document.title='pwned'>.mp4"
QUERY = "a red circle moves left"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_clip_file):
    """An index of five videos (one gone since indexing) behind a real uvicorn server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a.mp4", n_frames=12, fps=4, seed=1)
    write_video(root / SCRIPT_NAME, n_frames=12, fps=4, seed=2)
    write_video(root / IMG_NAME, n_frames=12, fps=4, seed=3)
    write_video(root / "play.webm", n_frames=24, fps=8, seed=4, fourcc="VP80")  # VP8: every chromium plays it
    write_video(root / "gone.mp4", n_frames=12, fps=4, seed=5)
    index_dir = tmp_path_factory.mktemp("index")
    build_index(
        IndexRequest(root, index_dir, Weights(pretrained_clip_name=str(tiny_clip_file)), max_frames=4, progress=False)
    )
    (root / "gone.mp4").unlink()

    yield from _serving(root, index_dir)


def _serving(root, index_dir):
    """A real uvicorn server on 127.0.0.1 over ``index_dir``, for the duration of a fixture."""
    index, model = open_index(index_dir, AS_STORED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(index, index_dir, model), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield {"root": root, "index_dir": index_dir, "index": index, "port": port}
    server.should_exit = True
    thread.join(timeout=10)


def get(served, path: str, host: str | None = None):
    """(status, body) of a GET sent as written (no client-side normalisation of ``..``), with ``host`` as the Host
    header (default: 127.0.0.1 and the port)."""
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    try:
        if host is None:
            conn.request("GET", path)
        else:
            conn.putrequest("GET", path, skip_host=True)
            conn.putheader("Host", host)
            conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        return response.status, body, response.getheader("content-type")
    finally:
        conn.close()


def api(served, path: str):
    status, body, _ = get(served, path)
    assert status == 200, body
    return json.loads(body)


def row(served, name: str) -> int:
    return [v["path"] for v in served["index"].videos].index(name)


def test_api_gives_retrieve_search_rankings(served):
    found = api(served, f"/api/search?q={urllib.parse.quote(QUERY)}&k=3")
    (expected,) = search(served["index_dir"], [QUERY], top=3)
    assert [r["id"] for r in found["results"]] == [r["id"] for r in expected["results"]]
    np.testing.assert_allclose(
        [r["score"] for r in found["results"]], [r["score"] for r in expected["results"]], rtol=1e-5
    )
    assert [r["path"] for r in found["results"]] == [r["path"] for r in expected["results"]]

    similar = api(served, "/api/similar?id=0&k=10")
    expected = search_video(served["index_dir"], "0", top=10)
    assert [r["id"] for r in similar["results"]] == [r["id"] for r in expected["results"]]
    assert 0 not in [r["id"] for r in similar["results"]] and len(similar["results"]) == 4


def test_only_indexed_files_by_id_are_served(served):
    status, body, kind = get(served, f"/thumbs/{row(served, 'a.mp4')}.jpg")
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert list((served["index_dir"] / "thumbs").glob("*.jpg"))  # cached in the index folder
    status, body, kind = get(served, f"/video/{row(served, 'play.webm')}")
    assert status == 200 and kind == "video/webm" and body == (served["root"] / "play.webm").read_bytes()
    for path in (
        "/video/../../etc/passwd",
        "/video/..%2F..%2Fetc%2Fpasswd",
        "/video/%2Fetc%2Fpasswd",
        "/video/99",
        "/video/-1",
        "/thumbs/99.jpg",
        "/video/a.mp4",
        "/static/../retrieve.py",
        "/api/similar?id=99",
    ):
        status, body, _ = get(served, path)
        assert status in (404, 422), (path, status)
        assert b"root:" not in body and b"import" not in body


def test_playable_means_a_codec_browsers_decode(served):
    """cv2's "mp4v" writes MPEG-4 Part 2 into an .mp4: the container browsers know, a codec they do not."""
    found = {r["name"]: r for r in api(served, "/api/search?q=anything&k=10")["results"]}
    assert (found["a.mp4"]["codec"], found["a.mp4"]["playable"]) == ("FMP4", False)
    assert (found["play.webm"]["codec"], found["play.webm"]["playable"]) == ("VP80", True)
    assert found["gone.mp4"]["playable"] is False
    similar = api(served, f"/api/similar?id={row(served, 'play.webm')}&k=1")
    assert similar["query_video"] == {
        "id": row(served, "play.webm"),
        "path": str(served["root"] / "play.webm"),
        "name": "play.webm",
        "missing": False,
        "codec": "VP80",
        "playable": True,
    }


def test_a_file_gone_since_indexing_is_shown_missing(served):
    gone = row(served, "gone.mp4")
    found = api(served, "/api/search?q=anything&k=10")
    by_id = {r["id"]: r for r in found["results"]}
    assert by_id[gone]["missing"] is True and not any(r["missing"] for i, r in by_id.items() if i != gone)
    status, body, _ = get(served, f"/video/{gone}")
    assert status == 404 and b"gone since indexing" in body
    assert api(served, f"/api/similar?id={gone}&k=2")["results"]  # its stored embedding still answers


def test_only_requests_for_a_bound_host_name_are_answered(served):
    port = served["port"]
    for host in ("evil.com", f"evil.com:{port}", f"127.0.0.1.evil.com:{port}", "localhost.:80", "[::2]", ""):
        status, body, _ = get(served, "/api/search?q=a&k=1", host=host)
        assert status == 421 and b"results" not in body, (host, status)
        status, body, _ = get(served, "/video/0", host=host)
        assert status == 421 and len(body) < 200, host
    for host in (f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", f"[::1]:{port}", "[::1]"):
        status, body, _ = get(served, "/api/search?q=a&k=1", host=host)
        assert status == 200 and json.loads(body)["results"], host


def test_host_names_are_compared_without_the_port():
    assert bound_hosts("0.0.0.0") == {"localhost", "127.0.0.1", "[::1]", "0.0.0.0"}
    assert bound_hosts("::") == {"localhost", "127.0.0.1", "[::1]", "[::]"}
    assert [host_name(h) for h in ("[::1]:8000", "Example.org:80", "x", "[::1]", "::1")] == [
        "[::1]",
        "example.org",
        "x",
        "[::1]",
        "::1",
    ]


ODD = os.fsdecode(b"odd\xff.mp4")  # a file name that is not UTF-8


@pytest.fixture(scope="module")
def linked(tmp_path_factory, tiny_clip_file):
    """A folder of symlinks to a data drive (one to a file whose name is not UTF-8), and a plain file; served."""
    drive = tmp_path_factory.mktemp("drive")
    write_video(drive / "one.mp4", n_frames=12, fps=4, seed=1)
    write_video(drive / "two.mp4", n_frames=12, fps=4, seed=2)
    os.link(drive / "two.mp4", os.fsencode(drive / ODD))
    (drive / "secret.txt").write_bytes(b"root:x:0:0 secret")
    root = tmp_path_factory.mktemp("links")
    (root / "one.mp4").symlink_to(drive / "one.mp4")
    (root / ODD).symlink_to(drive / ODD)
    write_video(root / "plain.mp4", n_frames=12, fps=4, seed=3)
    index_dir = tmp_path_factory.mktemp("links_index")
    build_index(
        IndexRequest(root, index_dir, Weights(pretrained_clip_name=str(tiny_clip_file)), max_frames=4, progress=False)
    )
    serving = _serving(root, index_dir)
    served = next(serving)
    served["drive"] = drive
    yield served
    next(serving, None)  # stops the server


def test_links_to_a_data_drive_are_served_while_they_lead_where_they_did(linked):
    one = row(linked, "one.mp4")
    status, body, _ = get(linked, f"/video/{one}")
    assert status == 200 and body == (linked["drive"] / "one.mp4").read_bytes()
    # The link swapped for one to another file (ln -sfn): refused, and the page says to re-index.
    (linked["root"] / "one.mp4").unlink()
    (linked["root"] / "one.mp4").symlink_to(linked["drive"] / "secret.txt")
    status, body, _ = get(linked, f"/video/{one}")
    assert status == 409 and b"secret" not in body and b"re-index" in body
    status, body, _ = get(linked, f"/thumbs/{one}.jpg")
    assert status in (200, 409) and b"secret" not in body  # 200 only from the cache of the indexed file
    found = api(linked, "/api/search?q=a&k=3")
    assert {r["id"]: r["missing"] for r in found["results"]}[one] is True
    # The same size and time but another place: still refused.
    (linked["root"] / "one.mp4").unlink()
    copy = linked["drive"] / "copy.mp4"
    copy.write_bytes((linked["drive"] / "one.mp4").read_bytes())
    st = (linked["drive"] / "one.mp4").stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    (linked["root"] / "one.mp4").symlink_to(copy)
    assert get(linked, f"/video/{one}")[0] == 409
    # A plain file rewritten since indexing.
    plain = row(linked, "plain.mp4")
    (linked["root"] / "plain.mp4").write_bytes(b"other content")
    status, body, _ = get(linked, f"/video/{plain}")
    assert status == 409 and b"other content" not in body


def test_a_file_name_that_is_not_utf8_is_answered_escaped(linked):
    odd = row(linked, ODD)
    found = api(linked, "/api/search?q=a&k=3")
    (entry,) = [r for r in found["results"] if r["id"] == odd]
    assert entry["name"] == "odd\\udcff.mp4" and entry["path"].endswith("odd\\udcff.mp4") and not entry["missing"]
    similar = api(linked, f"/api/similar?id={odd}&k=2")
    assert similar["name"] == "odd\\udcff.mp4" and len(similar["results"]) == 2
    status, body, kind = get(linked, f"/thumbs/{odd}.jpg")
    assert status == 200 and body[:2] == b"\xff\xd8"
    status, body, _ = get(linked, f"/video/{odd}")
    assert status == 200 and body == (linked["drive"] / "two.mp4").read_bytes()


def test_serve_warns_off_loopback_and_names_missing_packages(served, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert retrieve.main(["serve", "--index", str(served["index_dir"]), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert calls == [{"host": "0.0.0.0", "port": 8123, "log_level": "warning"}]
    assert "warning: --host 0.0.0.0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert retrieve.main(["serve", "--index", str(served["index_dir"])]) == 2
    assert capsys.readouterr().err.strip() == (
        "retrieve.py serve: error: serve needs FastAPI and uvicorn (uvicorn is "
        "not installed): pip install -r requirements-web.txt"
    )


def test_serve_indexes_a_folder_first_when_given_one(served, tiny_clip_file, tmp_path, monkeypatch):
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    index_dir = tmp_path / "fresh_index"
    videos = tmp_path / "videos"
    write_video(videos / "x.mp4", n_frames=12, fps=4, seed=7)
    assert (
        retrieve.main(
            ["serve", "--videos", str(videos), "--index", str(index_dir), "--pretrained_clip_name", str(tiny_clip_file)]
        )
        == 0
    )
    assert len(apps) == 1 and [v["path"] for v in load_index(index_dir).videos] == ["x.mp4"]


# ------------------------------------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_script_timeout(20)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 15):
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def card_ids(driver):
    return [
        int(i) for i in driver.execute_script("return [...document.querySelectorAll('.card')].map(c => c.dataset.id)")
    ]


def test_the_page_in_a_browser(served, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{served['port']}"
    browser.get(base + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys(QUERY)
    box.submit()
    wait_for(browser, "document.querySelectorAll('.card').length == 5")
    (expected,) = search(served["index_dir"], [QUERY], top=5)
    assert card_ids(browser) == [r["id"] for r in expected["results"]]

    # Thumbnails load for every file still there; the gone one says so.
    gone = row(served, "gone.mp4")
    wait_for(
        browser,
        "[...document.querySelectorAll('.card')].filter(c => c.dataset.id != '%d')"
        ".every(c => { const i = c.querySelector('img'); return i && i.complete && i.naturalWidth > 0 })" % gone,
    )
    assert (
        browser.find_element(By.CSS_SELECTOR, f".card[data-id='{gone}'] .missing").text == "file missing since indexing"
    )

    # Hostile file names are text: shown as written, nothing runs.
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .name")]
    assert SCRIPT_NAME in names and IMG_NAME in names
    assert browser.title == "CLIP4Clip search" and not browser.find_elements(By.CSS_SELECTOR, ".card .name *")
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text

    # Play the VP8 file in the page.
    playable = row(served, "play.webm")
    browser.find_element(By.CSS_SELECTOR, f".card[data-id='{playable}'] .media").click()
    wait_for(
        browser,
        f"(v => v && v.readyState >= 2 && v.videoWidth == 64)"
        f"(document.querySelector(\".card[data-id='{playable}'] video\"))",
    )

    # An MPEG-4 Part 2 file is not handed to the player: the page says why and offers the file.
    mp4v = row(served, "a.mp4")
    browser.find_element(By.CSS_SELECTOR, f".card[data-id='{mp4v}'] .media").click()
    why = browser.find_element(By.CSS_SELECTOR, f".card[data-id='{mp4v}'] .why")
    assert why.text == "Browsers do not play MPEG-4 Part 2 (FMP4) video: download the file"
    link = why.find_element(By.TAG_NAME, "a")
    assert link.get_attribute("href") == f"{base}/video/{mp4v}" and link.get_attribute("download") == "a.mp4"
    assert not browser.find_elements(By.CSS_SELECTOR, f".card[data-id='{mp4v}'] video")
    assert get(served, f"/video/{mp4v}")[1] == (served["root"] / "a.mp4").read_bytes()

    # More like this: the page shows retrieve.py search --video's ranking under the query video, and the box no
    # longer holds the text it is not showing results for.
    first = card_ids(browser)[0]
    browser.find_element(By.CSS_SELECTOR, f"#results .card[data-id='{first}'] button.more").click()
    wait_for(
        browser, f"location.search == '?similar={first}' && document.querySelectorAll('#results .card').length == 4"
    )
    expected = search_video(served["index_dir"], str(first), top=12)
    assert card_ids(browser) == [first] + [r["id"] for r in expected["results"]]
    query_card = browser.find_element(By.CSS_SELECTOR, "#query .card")
    assert (
        query_card.is_displayed()
        and query_card.find_element(By.CSS_SELECTOR, ".meta").text == f"the query video · id {first}"
    )
    assert browser.find_element(By.ID, "q").get_attribute("value") == ""

    # Back to the text search: its text returns and the query video goes.
    browser.back()
    wait_for(
        browser, "document.querySelectorAll('#results .card').length == 5 && document.getElementById('query').hidden"
    )
    assert browser.find_element(By.ID, "q").get_attribute("value") == QUERY


def test_a_narrow_window_keeps_the_search_button(served, browser):
    from selenium.webdriver.common.by import By

    browser.set_window_size(420, 800)
    try:
        browser.get(f"http://127.0.0.1:{served['port']}/")
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert width <= 420
        button = browser.find_element(By.CSS_SELECTOR, "form button")
        box = browser.find_element(By.ID, "q")
        for element in (button, box):
            rect = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", element)
            assert rect["left"] >= 0 and rect["right"] <= width and rect["width"] > 40, rect
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        box.send_keys(QUERY)
        button.click()
        wait_for(browser, "document.querySelectorAll('.card').length == 5")
    finally:
        browser.set_window_size(1200, 900)
