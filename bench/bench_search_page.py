"""Answer time of ``retrieve.py serve`` over 10,000 indexed videos on CPU (the budget is well under a second).

The app is served for real (uvicorn on 127.0.0.1, requests over HTTP) with its model loaded once, as ``serve`` does:
CLIP4Clip meanP whose text tower is ViT-B/32-sized (12 layers, width 512; random weights cost the same as real
ones; the vision tower is never run by a query, one layer keeps the build cheap). Synthetic unit-norm 512-d
embeddings stand in for the encoded videos. Timed side by side: a text query through HTTP, the same ranking called
in-process (``search.rank.rank_texts``), and "more like this" (``/api/similar``, no text to encode).

    python bench/bench_search_page.py [--videos 10000] [--repeats 20] [--dim 512] [--text_layers 12]
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_search import text_clip  # noqa: E402  (this folder: the same text tower)

from search.encode import fingerprint, load_model  # noqa: E402
from search.index import Index, load_index, save_index  # noqa: E402
from search.page import create_app  # noqa: E402
from search.rank import rank_texts  # noqa: E402
from search.settings import DEFAULT_SAMPLING, IndexSettings, ModelSpec  # noqa: E402

BUDGET_S = 1.0
QUERIES = ["a red circle moves to the left", "a person is cooking pasta in a kitchen", "two dogs play in the snow"]


def timings(repeats: int, fn) -> list:
    out = []
    for k in range(repeats):
        start = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - start)
    return out


def model_and_index(args: argparse.Namespace, tmp: str) -> tuple:
    """The meanP model (text tower of ``args.dim`` x ``args.text_layers``) and a synthetic index in ``tmp``."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clip_file = Path(tmp) / "clip-b32-text.pt"
    torch.save(text_clip(args.dim, args.text_layers).state_dict(), clip_file)
    spec = ModelSpec(pretrained_clip_name=str(clip_file), sim_header="meanP", linear_patch="2d")
    model = load_model(spec, None, DEFAULT_SAMPLING.max_frames, torch.device("cpu"))
    spec = replace(spec, fingerprint=fingerprint(model))
    emb = rng.standard_normal((args.videos, args.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    videos = [{"path": f"v{i:06d}.mp4", "size": 1, "mtime_ns": 0, "frames": 12} for i in range(args.videos)]
    index_dir = Path(tmp) / "index"
    save_index(index_dir, Index(IndexSettings(tmp, spec, DEFAULT_SAMPLING), videos, [], emb))
    return model, index_dir, load_index(index_dir, mmap=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dim", type=int, default=512, help="text tower width and embedding size (512: ViT-B/32's)")
    parser.add_argument("--text_layers", type=int, default=12, help="text tower depth (12: ViT-B/32's)")
    args = parser.parse_args(argv)
    import uvicorn

    with tempfile.TemporaryDirectory() as tmp:
        model, index_dir, index = model_and_index(args, tmp)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(index, index_dir, model), host="127.0.0.1", port=port, log_level="warning")
        )
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)

        def get(path: str) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
            conn.close()

        def q(k: int) -> str:
            return QUERIES[k % len(QUERIES)].replace(" ", "%20")

        get(f"/api/search?q={q(0)}&k=12")  # warm-up
        http_text = timings(args.repeats, lambda k: get(f"/api/search?q={q(k)}&k=12"))
        direct = timings(args.repeats, lambda k: rank_texts(index, model, [QUERIES[k % 3]], 12))
        similar = timings(args.repeats, lambda k: get(f"/api/similar?id={k}&k=12"))
        server.should_exit = True

    print(
        f"retrieve.py serve over {args.videos:,} videos, CPU ({torch.get_num_threads()} threads), "
        f"median of {args.repeats}:"
    )
    for name, t in (
        ("text query over HTTP (/api/search)", http_text),
        ("same ranking in-process (rank_texts)", direct),
        ("more like this over HTTP (/api/similar)", similar),
    ):
        m = statistics.median(t)
        print(f"  {name:<40}: {1e3 * m:8.2f} ms  ({m / BUDGET_S:.1%} of the 1 s budget)")
    overhead = statistics.median(http_text) / statistics.median(direct)
    print(f"  HTTP + page bookkeeping over the bare ranking: x{overhead:.2f}")
    if statistics.median(http_text) >= BUDGET_S:
        raise SystemExit("FAIL: a text query takes over the 1 s budget")


if __name__ == "__main__":
    main()
