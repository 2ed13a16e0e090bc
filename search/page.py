"""The local search page of ``retrieve.py serve``: a FastAPI app over one index and the model that built it.

    GET /                       the page (search/static/search.html): a query box, results as a grid
    GET /api/search?q=TEXT&k=N  text -> videos, the ranking of ``retrieve.py search --query``
    GET /api/similar?id=I&k=N   video -> videos ("more like this"), the ranking of ``retrieve.py search --video I``
    GET /thumbs/I.jpg           a few of the frames the model saw of video I, side by side
    GET /video/I                video I itself, for the page's player

A file is only ever asked for by its index id, never by a path, so nothing outside the index can be read. Results
say ``missing`` for a file gone since indexing; its thumbnails still show if they were cached, its video is a 404.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, Response

from dataloaders.rawvideo_util import kept_frames_uint8, thumbnail_strip
from search.encode import frame_reader, logit_scale
from search.index import Index
from search.rank import rank_similar, rank_texts

STATIC = Path(__file__).resolve().parent / "static"
THUMBS = "thumbs"  # folder in the index directory that caches the thumbnail strips
MAX_K = 200  # results one request may ask for
# Containers a browser's <video> may play; the page still falls back to thumbnails when the codec is not one it has.
PLAYABLE = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg", ".mov": "video/mp4"}


class SearchState:
    """What the app holds for its lifetime: the index, its model (loaded once) and where thumbnails are cached."""

    def __init__(self, index: Index, index_dir: Path, model, max_words: int):
        self.index, self.model, self.max_words = index, model, max_words
        self.scale = logit_scale(model)
        self.thumb_dir = Path(index_dir) / THUMBS
        self.extractor = frame_reader(model, index.settings.sampling)

    def file(self, row: int) -> Path:
        if not 0 <= row < len(self.index.videos):
            raise HTTPException(404, f"no video with id {row} (the index holds ids 0 to {len(self.index.videos) - 1})")
        return self.index.root / self.index.videos[row]["path"]

    def annotate(self, results: list) -> list:
        """Results as the page shows them: the path relative to the indexed folder, and whether the file is gone."""
        for r in results:
            rel = self.index.videos[r["id"]]["path"]
            r["name"] = rel
            r["missing"] = not (self.index.root / rel).is_file()
            r["playable"] = Path(rel).suffix.lower() in PLAYABLE
        return results

    def thumbnail(self, row: int) -> bytes | None:
        """The JPEG strip of video ``row``, from the cache or decoded now (None when the file cannot be read)."""
        v = self.index.videos[row]
        key = hashlib.sha256(f"{v['path']}\0{v['size']}\0{v['mtime_ns']}".encode()).hexdigest()[:24]
        cached = self.thumb_dir / f"{key}.jpg"
        if cached.is_file():
            return cached.read_bytes()
        path = self.file(row)
        if not path.is_file():
            return None
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


def create_app(index: Index, index_dir: Path, model, max_words: int = 32) -> FastAPI:
    """The app over ``index``; ``model`` must be the one that built it (``search.encode.index_model`` checks that)."""
    state = SearchState(index, index_dir, model, max_words)
    app = FastAPI(title="CLIP4Clip search", docs_url=None, redoc_url=None, openapi_url=None)
    page = (STATIC / "search.html").read_text(encoding="utf-8")

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
            "video": str(path),
            "name": state.index.videos[id]["path"],
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
        path = state.file(row)
        if not path.is_file():
            raise HTTPException(404, f"video {row} ({state.index.videos[row]['path']}) is gone since indexing")
        kind = PLAYABLE.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind)

    return app
