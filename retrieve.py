#!/usr/bin/env python
"""Index a folder of your own videos with a CLIP4Clip model, then search it by text (or rank captions for a video).

    python retrieve.py index    --videos DIR --index IDX [--init_model CKPT | --pretrained_clip_name NAME] ...
    python retrieve.py search   --index IDX (--query TEXT | --queries FILE) [--top_k 5] [--json]
    python retrieve.py search   --index IDX --video FILE_OR_ID [--top_k 5] [--json]
    python retrieve.py captions --index IDX --video FILE (--caption TEXT ... | --captions FILE) [--json]
    python retrieve.py serve    --index IDX [--videos DIR] [--host 127.0.0.1] [--port 8000]  (requirements-web.txt)

The command line only: the work is done by the ``search`` package, imported once the flags are parsed (so ``--help``
and a bad flag answer before torch loads). tightTransf scores each (text, video) pair with a cross encoder, so it
cannot be indexed; ``index`` refuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from search.settings import DEFAULT_CLIP, DEFAULT_SAMPLING, SIM_HEADERS

CLIP_CONTEXT = 77  # tokens CLIP's text tower reads, start and end included


def _weights_flags(p: argparse.ArgumentParser, index_time: bool) -> None:
    where = "" if index_time else " (only if the weights moved since indexing)"
    p.add_argument("--init_model", help="a CLIP4Clip checkpoint (pytorch_model.bin.N)" + where)
    p.add_argument(
        "--pretrained_clip_name",
        help=f"CLIP weights: ViT-B/32, ViT-B/16, a tiny random name or a file (default {DEFAULT_CLIP})" + where,
    )


def _index_parser(commands) -> None:
    p = commands.add_parser("index", help="encode every video under a folder into an index (incrementally)")
    p.add_argument("--videos", required=True, help="folder searched recursively for video files")
    p.add_argument("--index", required=True, help="index directory (created, or updated)")
    _weights_flags(p, index_time=True)
    p.add_argument("--sim_header", choices=SIM_HEADERS, help="default: the checkpoint's head, meanP without one")
    p.add_argument("--linear_patch", choices=("2d", "3d"), help="default: the checkpoint's, 2d without one")
    p.add_argument("--max_frames", type=int, help=f"default {DEFAULT_SAMPLING.max_frames}")
    p.add_argument("--feature_framerate", type=int, help=f"default {DEFAULT_SAMPLING.feature_framerate}")
    p.add_argument(
        "--slice_framepos",
        type=int,
        choices=(0, 1, 2),
        help=f"0 first, 1 last, 2 uniform frames (default {DEFAULT_SAMPLING.slice_framepos})",
    )
    p.add_argument("--batch_size", type=int, default=16, help="videos per forward pass")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    p.add_argument(
        "--qb_bank",
        metavar="CAPTIONS.txt",
        help="also store these captions (one a line, e.g. training captions) as the QB-Norm bank `search --qb_norm` uses",
    )
    _repoint_flag(p)


def _repoint_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repoint",
        action="store_true",
        help="--videos is another folder than the index's: index it in its place (the old folder's files are removed)",
    )


def _search_parser(commands) -> None:
    p = commands.add_parser("search", help="text -> the best matching videos of an index")
    p.add_argument("--index", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", help="one text query")
    q.add_argument("--queries", help="a text file, one query per line")
    q.add_argument(
        "--video",
        metavar="FILE_OR_ID",
        help="video -> similar videos: a video file, or an index id (as the search page shows)",
    )
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one {query, results} per query ({video, results} with --video)",
    )
    p.add_argument("--max_words", type=int, default=32, help="text length in tokens, start and end included")
    p.add_argument(
        "--qb_norm",
        action="store_true",
        help="re-score each text query with QB-Norm against the index's bank (index --qb_bank); scores become QB-Norm's",
    )
    _weights_flags(p, index_time=False)


def _captions_parser(commands) -> None:
    p = commands.add_parser("captions", help="video -> captions ranked by how well they describe it")
    p.add_argument("--index", required=True, help="the index whose model (and stored embeddings) to use")
    p.add_argument("--video", required=True, help="a video file, indexed or not")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--caption", nargs="+", help="captions to rank")
    c.add_argument("--captions", help="a text file, one caption per line")
    p.add_argument("--top_k", type=int, default=None, help="default: all captions")
    p.add_argument("--json", action="store_true", help="print a JSON object {video, results}")
    p.add_argument("--max_words", type=int, default=32)
    _weights_flags(p, index_time=False)


def _serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="a local search page (and JSON API) over an index")
    p.add_argument("--index", required=True)
    p.add_argument(
        "--videos",
        help="index (or update) this folder into --index first, as the index command does; "
        "--init_model and --pretrained_clip_name are then the weights to index with",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but the loopback lets other machines read the videos",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_words", type=int, default=32)
    _repoint_flag(p)
    _weights_flags(p, index_time=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_index_parser, _search_parser, _captions_parser, _serve_parser):
        add(commands)
    args = parser.parse_args(argv)
    for name in ("top_k", "max_frames", "feature_framerate", "batch_size", "port"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if getattr(args, "max_words", None) is not None and args.max_words < 3:
        parser.error("--max_words must be at least 3 (the start and end tokens and at least one word)")
    if getattr(args, "max_words", None) is not None and args.max_words > CLIP_CONTEXT:
        parser.error(f"--max_words must be at most {CLIP_CONTEXT} (CLIP's text context, in tokens)")
    if getattr(args, "num_workers", None) is not None and args.num_workers < 0:
        parser.error("--num_workers must be at least 0")
    return args


def _read_lines(path: str, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, one query or caption each; lines end only at \\n, \\r\\n or \\r (not at
    the other separators ``str.splitlines`` knows, which a caption may hold)."""
    from util import UsageError

    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n")]
    except FileNotFoundError:
        raise UsageError(f"{what} file {path} not found") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} file {path}: not UTF-8 text (byte {e.start})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{what} file {path} holds no {what} (one per line expected)")
    return lines


def _nonblank(texts: Sequence[str], flag: str) -> list[str]:
    """``texts`` with their surrounding blanks removed; an empty or whitespace-only one is refused."""
    from util import UsageError

    stripped = [t.strip() for t in texts]
    if not all(stripped):
        raise UsageError(
            f"{flag} is empty (or only whitespace); give the text to {'search for' if flag == '--query' else 'rank'}"
        )
    return stripped


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on (escape sequences, newlines, other control and format
    characters) written as Python escapes, so a file name can neither clear the screen nor forge a row."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def _print_table(title: str, results: list[dict], column: str) -> None:
    """Ranked results as text; a video's index id is shown because ``search --video ID`` takes it."""
    ids = bool(results) and "id" in results[0]
    print(_printable(title))
    print(f"  {'rank':>4}  {'score':>8}  " + (f"{'id':>5}  " if ids else "") + column)
    for r in results:
        print(f"  {r['rank']:>4}  {r['score']:>8.3f}  " + (f"{r['id']:>5}  " if ids else "") + _printable(r[column]))


def _weights(args: argparse.Namespace):
    from search.settings import Weights

    return Weights(args.init_model, args.pretrained_clip_name)


def _index_request(args: argparse.Namespace, videos: str):
    """The ``index`` flags (or ``serve --videos``, which leaves the settings to the index) as one request."""
    from search.build import IndexRequest

    settings = {
        name: getattr(args, name, None)
        for name in ("sim_header", "linear_patch", "max_frames", "feature_framerate", "slice_framepos")
    }
    workers = {"batch_size": args.batch_size, "num_workers": args.num_workers} if args.command == "index" else {}
    return IndexRequest(Path(videos), Path(args.index), _weights(args), **settings, **workers, repoint=args.repoint)


def run_index(args: argparse.Namespace) -> None:
    """``retrieve.py index``: create or update the index and print what changed."""
    from search.build import build_index

    print(build_index(_index_request(args, args.videos)))
    if args.qb_bank:
        from search.querybank import build_bank

        captions = _read_lines(args.qb_bank, "captions")
        print(build_bank(Path(args.index), args.qb_bank, captions, _weights(args)))


def run_search(args: argparse.Namespace) -> None:
    """``retrieve.py search``: text → videos, or video → videos with ``--video``."""
    from search.query import search, search_video

    if args.video is not None:
        if args.qb_norm:
            from util import UsageError

            raise UsageError("--qb_norm re-scores text queries (its bank holds captions); leave it out with --video")
        found = search_video(args.index, args.video, args.top_k, _weights(args))
        if args.json:
            print(json.dumps(found, indent=1))
        else:
            _print_table(f"video: {found['video']}", found["results"], "path")
        return
    queries = _nonblank([args.query], "--query") if args.query is not None else _read_lines(args.queries, "queries")
    found = search(args.index, queries, args.top_k, args.max_words, _weights(args), args.qb_norm)
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        for entry in found:
            _print_table(f"query: {entry['query']}", entry["results"], "path")


def run_captions(args: argparse.Namespace) -> None:
    """``retrieve.py captions``: video → the given captions, best first."""
    from search.query import rank_captions

    texts = _nonblank(args.caption, "--caption") if args.caption else _read_lines(args.captions, "captions")
    ranked = rank_captions(args.index, Path(args.video), texts, args.top_k, args.max_words, _weights(args))
    if args.json:
        print(json.dumps(ranked, indent=1))
    else:
        _print_table(f"video: {ranked['video']}", ranked["results"], "caption")


def run_serve(args: argparse.Namespace) -> None:
    """``retrieve.py serve``: load the index and its model once, then answer the page until interrupted."""
    from util import UsageError

    try:
        import uvicorn

        from search.page import create_app
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise UsageError(
            f"serve needs FastAPI and uvicorn ({e.name} is not installed): pip install -r requirements-web.txt"
        ) from None
    from search.build import build_index
    from search.query import open_index

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: --host {args.host}: every machine that can reach this one can search the index and "
            f"download its videos (there is no login)",
            file=sys.stderr,
        )
    if args.videos is not None:
        print(build_index(_index_request(args, args.videos)), file=sys.stderr)
    index, model = open_index(args.index, _weights(args), args.max_words)
    app = create_app(index, Path(args.index), model, args.max_words, args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"searching {len(index.videos)} videos of {args.index} at http://{host}:{args.port}/ (Ctrl+C stops)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


COMMANDS = {"index": run_index, "search": run_search, "captions": run_captions, "serve": run_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from util import UsageError

    sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 is shown, not a crash
    try:
        COMMANDS[args.command](args)
    except UsageError as e:
        print(f"retrieve.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # an index run has removed what it had not committed; the index is as before
        print(f"retrieve.py {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
