"""The local search page of ``retrieve.py serve``: a FastAPI app over one index and the model that built it.

    GET /                       the page (search/static/search.html): a query box, results as a grid
    GET /api/search?q=TEXT&k=N  text -> videos, the ranking of ``retrieve.py search --query``
    GET /api/similar?id=I&k=N   video -> videos ("more like this"), the ranking of ``retrieve.py search --video I``
    GET /thumbs/I.jpg           a few of the frames the model saw of video I, side by side
    GET /video/I                video I itself, for the page's player

A file is only ever asked for by its index id, never by a path, and is served only while it is still the file that
was indexed (same real path, size and time), so nothing outside the index can be read. Only requests naming this
machine in their Host header are answered, so a web page elsewhere cannot reach the server through DNS rebinding.
Results say ``missing`` for a file gone or changed since indexing; its thumbnails still show if they were cached,
its video is a 404 (gone) or a 409 (changed).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
import tempfile
from pathlib import Path

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response

from dataloaders.rawvideo_util import kept_frames_uint8, thumbnail_strip
from search.encode import frame_reader, logit_scale
from search.index import Index
from search.rank import rank_similar, rank_texts

STATIC = Path(__file__).resolve().parent / "static"
THUMBS = "thumbs"  # folder in the index directory that caches the thumbnail strips
MAX_K = 200  # results one request may ask for
# Containers a browser's <video> may play; the page still falls back to thumbnails when the codec is not one it has.
PLAYABLE = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg", ".mov": "video/mp4"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
REINDEX = "re-index with `retrieve.py index` to serve it"


def shown(name: str) -> str:
    """A file name as JSON (UTF-8) can carry it: bytes that are not UTF-8, which the OS hands over as lone
    surrogates, are written as ``\\udcXX``, as the command line prints them."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def host_name(header: str) -> str:
    """A Host header without its port: ``[::1]:8000`` -> ``[::1]``, ``LocalHost:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def bound_hosts(host: str) -> frozenset[str]:
    """The names a request may give in its Host header: the loopback names and the address the server listens on."""
    host = host.lower()
    return frozenset((*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host))


# Codecs (cv2's FOURCC, upper case) that browsers decode: H.264, VP8, VP9, AV1, Theora. The container alone says
# nothing: cv2's "mp4v" writes MPEG-4 Part 2 ("FMP4") into an .mp4, which no current browser plays.
BROWSER_CODECS = {"AVC1", "AVC3", "H264", "X264", "VP80", "VP90", "AV01", "THEO"}


def video_codec(path: Path) -> str:
    """The FOURCC of the file's video stream as cv2 reports it ("" when it cannot be read)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 crashes cv2; unknown codec, so the page offers the file
        return ""
    capture = cv2.VideoCapture(name)
    try:
        code = int(capture.get(cv2.CAP_PROP_FOURCC)) if capture.isOpened() else 0
    finally:
        capture.release()
    return code.to_bytes(4, "little").decode("latin-1").strip("\0 ").upper() if code > 0 else ""


class SearchState:
    """What the app holds for its lifetime: the index, its model (loaded once) and where thumbnails are cached."""

    def __init__(self, index: Index, index_dir: Path, model, max_words: int):
        self.index, self.model, self.max_words = index, model, max_words
        self.scale = logit_scale(model)
        self.thumb_dir = Path(index_dir) / THUMBS
        self.extractor = frame_reader(model, index.settings.sampling)
        self.real_root = os.path.join(os.path.realpath(index.root), "")
        self.codecs: dict[int, str] = {}  # row -> FOURCC, probed when a result first shows it

    def file(self, row: int) -> Path:
        if not 0 <= row < len(self.index.videos):
            raise HTTPException(404, f"no video with id {row} (the index holds ids 0 to {len(self.index.videos) - 1})")
        return self.index.root / self.index.videos[row]["path"]

    def verified(self, row: int) -> tuple[str, os.stat_result]:
        """(real path, stat) of video ``row`` while it is the file that was indexed: a 404 once it is gone, a 409 once
        it changed (another size or time, or its name now leads elsewhere, as a symlink swapped for another)."""
        path, entry = self.file(row), self.index.videos[row]
        try:
            st = path.stat()
        except OSError:
            raise HTTPException(404, f"video {row} ({shown(entry['path'])}) is gone since indexing") from None
        real = os.path.realpath(path)
        # An index from before real paths were recorded: the file must at least lie inside the indexed folder.
        same_place = real == entry["real"] if "real" in entry else real.startswith(self.real_root)
        unchanged = (st.st_size, st.st_mtime_ns) == (entry["size"], entry["mtime_ns"])
        if not (same_place and unchanged and stat.S_ISREG(st.st_mode)):
            raise HTTPException(409, f"video {row} ({shown(entry['path'])}) changed since indexing; {REINDEX}")
        return real, st

    def served(self, row: int) -> bool:
        try:
            self.verified(row)
        except HTTPException:
            return False
        return True

    def annotate(self, results: list) -> list:
        """Results as the page shows them: the path relative to the indexed folder, and whether the file is gone
        (or changed) since indexing."""
        for r in results:
            rel = self.index.videos[r["id"]]["path"]
            r["name"], r["path"] = shown(rel), shown(r["path"])
            r["missing"] = not self.served(r["id"])
            if not r["missing"] and r["id"] not in self.codecs:
                self.codecs[r["id"]] = video_codec(self.index.root / rel)
            r["codec"] = self.codecs.get(r["id"], "")
            r["playable"] = Path(rel).suffix.lower() in PLAYABLE and r["codec"] in BROWSER_CODECS
        return results

    def thumbnail(self, row: int) -> bytes | None:
        """The JPEG strip of video ``row``, from the cache or decoded now (None when the file cannot be decoded; a
        404 or 409 when it is gone or changed since indexing)."""
        v = self.index.videos[row]
        key = hashlib.sha256(f"{v['path']}\0{v['size']}\0{v['mtime_ns']}".encode("utf-8", "surrogatepass"))
        cached = self.thumb_dir / f"{key.hexdigest()[:24]}.jpg"
        if cached.is_file():
            return cached.read_bytes()
        path, _ = self.verified(row)
        sampling = self.index.settings.sampling
        try:
            frames = kept_frames_uint8(self.extractor, str(path), sampling.max_frames, sampling.slice_framepos)
        except (OSError, ValueError):
            return None
        if len(frames) == 0:
            return None
        jpeg = thumbnail_strip(frames)
        _cache(jpeg, cached)
        return jpeg


def _cache(data: bytes, path: Path) -> None:
    """Best effort: a read-only index folder only means thumbnails are decoded again next time."""
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


def create_app(index: Index, index_dir: Path, model, max_words: int = 32, host: str = "127.0.0.1") -> FastAPI:
    """The app over ``index``; ``model`` must be the one that built it (``search.encode.index_model`` checks that).
    ``host`` is the address the server listens on."""
    state = SearchState(index, index_dir, model, max_words)
    app = FastAPI(title="CLIP4Clip search", docs_url=None, redoc_url=None, openapi_url=None)
    page = (STATIC / "search.html").read_text(encoding="utf-8")
    hosts = bound_hosts(host)

    @app.middleware("http")
    async def only_bound_hosts(request: Request, call_next):
        if host_name(request.headers.get("host", "")) not in hosts:
            names = ", ".join(sorted(hosts))
            return PlainTextResponse(f"this server answers requests for {names} only", status_code=421)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/search")
    def api_search(q: str = Query(..., min_length=1, max_length=1000), k: int = Query(12, ge=1, le=MAX_K)) -> dict:
        (found,) = rank_texts(state.index, state.model, [q], k, state.max_words)
        return {"query": q, "results": state.annotate(found["results"])}

    @app.get("/api/similar")
    def api_similar(id: int = Query(..., ge=0), k: int = Query(12, ge=1, le=MAX_K)) -> dict:  # noqa: A002
        path = state.file(id)
        emb = np.asarray(state.index.embeddings[id])
        results = rank_similar(state.index, emb, k, state.scale, exclude=id)
        return {
            "id": id,
            "video": shown(str(path)),
            "name": shown(state.index.videos[id]["path"]),
            "query_video": state.annotate([{"id": id, "path": str(path)}])[0],
            "results": state.annotate(results),
        }

    @app.get("/thumbs/{row}.jpg")
    def thumbs(row: int) -> Response:
        state.file(row)
        jpeg = state.thumbnail(row)
        if jpeg is None:
            raise HTTPException(404, f"video {row} is missing or unreadable")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/video/{row}")
    def video(row: int) -> FileResponse:
        name = state.file(row).name
        real, st = state.verified(row)
        kind = PLAYABLE.get(Path(name).suffix.lower()) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        return FileResponse(real, media_type=kind, stat_result=st)

    return app
