"""retrieve.py over the search package: indexing, searching and ranking captions end to end, scores against the
model's own logits, and the command line's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_clip_state_dict, write_video

import retrieve
import search.build as search_build
from dataloaders.dataset_util import encode_caption
from dataloaders.rawvideo_util import RawVideoExtractor
from dataloaders.sampling import VideoSampling
from modules.modeling import SIM_HEADERS, CLIP4Clip, CLIP4ClipConfig, implied_by_state_dict
from modules.tokenization_clip import SimpleTokenizer
from search.build import IndexRequest
from search.encode import VideoFiles, logit_scale, text_embeddings, video_embeddings
from search.index import Index, load_index, save_index, scan_videos
from search.query import rank_captions, search, search_video
from search.settings import DEFAULT_SAMPLING, IndexSettings, ModelSpec, Weights
from util import UsageError

MAX_FRAMES = 4
CONTENT = {"red/a.mp4": 1, "blue/b.avi": 2, "c.mp4": 3}  # relative path -> write_video seed (distinct frames)


def build_index(videos, index, init_model=None, pretrained_clip_name=None, **settings):
    """An ``index`` run with the flags as keywords."""
    weights = Weights(init_model, pretrained_clip_name)
    return search_build.build_index(IndexRequest(Path(videos), Path(index), weights, **settings))


def _one_video_index() -> Index:
    settings = IndexSettings("/videos", ModelSpec(None, "ViT-B/32", "meanP", "2d", "0" * 64), DEFAULT_SAMPLING)
    videos = [{"path": "v0.mp4", "size": 10, "mtime_ns": 100, "frames": 3}]
    return Index(settings, videos, [], np.ones((1, 4), dtype=np.float32))


# ----------------------------------------------------------------------------------------------- model-based tests
def _reference_model(clip_file: Path, head: str = "meanP", temporal_layers: int = 4, tuning: str = "full"):
    """CLIP4Clip built directly, as main_task_retrieval.py does, for independent logits."""
    config = CLIP4ClipConfig(
        pretrained_clip_name=str(clip_file),
        sim_header=head,
        cross_num_hidden_layers=temporal_layers,
        max_words=32,
        max_frames=MAX_FRAMES,
        precision="fp32",
        tuning=tuning,
    )
    torch.manual_seed(123)
    return CLIP4Clip.from_config(config).eval()


@pytest.fixture(scope="module")
def reference(tiny_clip_file):
    """The zero-shot meanP model of the tiny CLIP, built without retrieve.py."""
    return _reference_model(tiny_clip_file)


def _reference_logits(model, texts, video, video_mask):
    tok = SimpleTokenizer()
    ids, mask, seg = (torch.from_numpy(np.stack(x)) for x in zip(*[encode_caption(tok, t, 32) for t in texts]))
    with torch.no_grad():
        seq = model.get_sequence_output(ids, seg, mask)
        vis = model.get_visual_output(video, video_mask)
        logits, _ = model.get_similarity_logits(seq, vis, mask, video_mask, loose_type=model.loose_type)
    return logits.numpy()


@pytest.mark.parametrize("head", ["seqLSTM", "seqTransf"])  # meanP: see the search tests
def test_video_embeddings_give_the_models_logits(tiny_clip_file, head):
    model = _reference_model(tiny_clip_file, head)
    g = torch.Generator().manual_seed(1)
    video = torch.randn(3, 1, MAX_FRAMES, 1, 3, 32, 32, generator=g).double()
    video_mask = torch.tensor([[[1, 1, 1, 1]], [[1, 1, 0, 0]], [[1, 0, 0, 0]]])
    texts = ["a red circle moves left", "first a blue square then a green triangle"]
    emb = video_embeddings(model, video, video_mask)
    np.testing.assert_allclose(emb.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    scores = logit_scale(model) * (text_embeddings(model, texts) @ emb.T).numpy()
    np.testing.assert_allclose(scores, _reference_logits(model, texts, video, video_mask), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- index, then search
def _write_videos(root: Path) -> Path:
    for rel, seed in CONTENT.items():
        write_video(root / rel, n_frames=12, fps=4, seed=seed)
    (root / "broken.mp4").write_bytes(b"this is not a video file" * 10)
    (root / "notes.txt").write_text("not a video, ignored")
    return root


def _decode(paths, size: int = 32):
    """The frames the index used, decoded here with the data pipeline directly (defaults: 1 fps, uniform slice)."""
    extractor = RawVideoExtractor(centercrop=False, size=size, framerate=1, cache_dir=None)
    samples = [extractor.get_video_sample(str(p), MAX_FRAMES, slice_framepos=2, frame_order=0) for p in paths]
    video = torch.stack([torch.as_tensor(s[0]) for s in samples])
    mask = torch.stack([torch.as_tensor(s[1]) for s in samples])
    return video, mask


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_file):
    """Three distinct videos (one in a sub-folder, one .avi), a corrupt file, a text file; indexed once."""
    root = _write_videos(tmp_path_factory.mktemp("videos"))
    index_dir = tmp_path_factory.mktemp("index")
    report = build_index(
        root, index_dir, pretrained_clip_name=str(tiny_clip_file), max_frames=MAX_FRAMES, num_workers=1, progress=False
    )
    return root, index_dir, report


def test_index_reports_encoded_and_unreadable_files(built):
    root, index_dir, report = built
    assert report.encoded == sorted(CONTENT) and report.total == 3 and report.unchanged == 0
    assert [u["path"] for u in report.unreadable] == ["broken.mp4"] and report.unreadable[0]["error"]
    assert "broken.mp4: " in str(report) and "3 videos (3 encoded" in str(report)
    index = load_index(index_dir)
    assert [v["path"] for v in index.videos] == sorted(CONTENT)
    assert index.settings.sampling == VideoSampling(max_frames=MAX_FRAMES, feature_framerate=1, slice_framepos=2)
    assert index.settings.model.sim_header == "meanP"


def test_search_scores_are_the_models_logits_and_ranked_by_them(built, reference):
    root, index_dir, _ = built
    queries = ["a red circle moves left", "a blue square", "first a green triangle then a yellow star"]
    found = search(index_dir, queries, top=3)

    paths = [root / rel for rel in sorted(CONTENT)]
    logits = _reference_logits(reference, queries, *_decode(paths))
    for q, entry in enumerate(found):
        assert entry["query"] == queries[q]
        got = [(r["path"], r["score"]) for r in entry["results"]]
        expected_order = np.argsort(-logits[q], kind="stable")
        assert [p for p, _ in got] == [str(paths[i]) for i in expected_order]
        np.testing.assert_allclose([s for _, s in got], logits[q, expected_order], rtol=1e-5, atol=1e-5)


def test_search_cli_json_and_table(built, tmp_path, capsys):
    _, index_dir, _ = built
    assert (
        retrieve.main(["search", "--index", str(index_dir), "--query", "a red circle", "--top_k", "2", "--json"]) == 0
    )
    parsed = json.loads(capsys.readouterr().out)
    assert len(parsed) == 1 and parsed[0]["query"] == "a red circle"
    assert [r["rank"] for r in parsed[0]["results"]] == [1, 2]
    assert parsed[0]["results"][0]["score"] >= parsed[0]["results"][1]["score"]

    queries = tmp_path / "queries.txt"
    queries.write_text("a red circle\n\na blue square\n")
    assert retrieve.main(["search", "--index", str(index_dir), "--queries", str(queries), "--top_k", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "query: a red circle" and out[3] == "query: a blue square" and len(out) == 6
    assert out[2].split()[-1] == parsed[0]["results"][0]["path"]
    # The id column is what ``search --video ID`` takes.
    assert out[1].split() == ["rank", "score", "id", "path"] and int(out[2].split()[2]) == parsed[0]["results"][0]["id"]


def test_captions_ranks_captions_for_indexed_and_new_videos(built, reference, tmp_path, capsys):
    root, index_dir, _ = built
    captions = ["a red circle moves left", "a blue square", "first a green triangle then a yellow star"]
    video = root / "c.mp4"
    logits = _reference_logits(reference, captions, *_decode([video]))[:, 0]
    order = np.argsort(-logits, kind="stable")

    assert (
        retrieve.main(["captions", "--index", str(index_dir), "--video", str(video), "--caption", *captions, "--json"])
        == 0
    )
    ranked = json.loads(capsys.readouterr().out)
    assert [r["caption"] for r in ranked["results"]] == [captions[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in ranked["results"]], logits[order], rtol=1e-5, atol=1e-5)

    outside = tmp_path / "elsewhere.mp4"  # not in the index: encoded on the fly, same frames, same scores
    outside.write_bytes(video.read_bytes())
    again = rank_captions(index_dir, outside, captions, top=2)
    assert [r["caption"] for r in again["results"]] == [captions[i] for i in order[:2]]
    np.testing.assert_allclose([r["score"] for r in again["results"]], logits[order[:2]], rtol=1e-5, atol=1e-5)


def test_reindex_encodes_only_new_and_changed_files(tmp_path, tiny_clip_file, reference, monkeypatch):
    root = _write_videos(tmp_path / "videos")
    index_dir = tmp_path / "index"
    build_index(root, index_dir, pretrained_clip_name=str(tiny_clip_file), max_frames=MAX_FRAMES, progress=False)
    before = load_index(index_dir)

    def no_model(*args, **kwargs):
        raise AssertionError("an unchanged folder needs no model")

    with monkeypatch.context() as m:
        m.setattr(search_build, "load_model", no_model)
        report = build_index(root, index_dir, progress=False)
    assert report.encoded == [] and report.unchanged == 3 and report.removed == []
    assert [u["path"] for u in report.unreadable] == ["broken.mp4"]  # still reported, not retried
    np.testing.assert_array_equal(load_index(index_dir).embeddings, before.embeddings)

    write_video(root / "c.mp4", n_frames=12, fps=4, seed=9)  # new content
    st = (root / "c.mp4").stat()
    os.utime(root / "c.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    write_video(root / "d.mp4", n_frames=12, fps=4, seed=4)
    (root / "red" / "a.mp4").unlink()
    report = build_index(root, index_dir, progress=False)
    assert report.encoded == ["c.mp4", "d.mp4"] and report.unchanged == 1 and report.removed == ["red/a.mp4"]

    after = load_index(index_dir)
    assert [v["path"] for v in after.videos] == ["blue/b.avi", "c.mp4", "d.mp4"]
    np.testing.assert_array_equal(after.embeddings[0], before.embeddings[0])  # blue/b.avi kept as it was
    fresh = video_embeddings(reference, *_decode([root / "c.mp4", root / "d.mp4"])).numpy()
    np.testing.assert_allclose(after.embeddings[1:], fresh, rtol=1e-5, atol=1e-6)
    assert np.abs(after.embeddings[1] - before.embeddings[2]).max() > 1e-3  # c.mp4 really changed


def test_checkpoint_head_is_indexed_and_reused_at_search(tmp_path, tiny_clip_file):
    # Trained with --cross_num_hidden_layers 2 (as the demo): the index must build 2 layers, not the default 4.
    reference = _reference_model(tiny_clip_file, "seqTransf", temporal_layers=2)
    assert implied_by_state_dict(reference.state_dict())["cross_num_hidden_layers"] == 2
    with torch.no_grad():  # a "trained" head: anything but its initial copy of the text blocks
        reference.transformerClip.resblocks[0].mlp.c_proj.weight.add_(0.05)
    ckpt = tmp_path / "pytorch_model.bin.0"
    torch.save(reference.state_dict(), ckpt)
    root = tmp_path / "videos"
    for rel, seed in CONTENT.items():
        write_video(root / rel, n_frames=12, fps=4, seed=seed)

    report = build_index(
        root,
        tmp_path / "index",
        init_model=str(ckpt),
        pretrained_clip_name=str(tiny_clip_file),
        max_frames=MAX_FRAMES,
        progress=False,
    )
    assert report.total == 3
    assert load_index(tmp_path / "index").settings.model.sim_header == "seqTransf"  # read off the checkpoint
    queries = ["a red circle", "a blue square"]
    found = search(tmp_path / "index", queries, top=3)
    paths = [root / rel for rel in sorted(CONTENT)]
    logits = _reference_logits(reference, queries, *_decode(paths))
    for q, entry in enumerate(found):
        for r in entry["results"]:
            np.testing.assert_allclose(r["score"], logits[q, paths.index(Path(r["path"]))], rtol=1e-5, atol=1e-5)


def test_unipt_checkpoint_is_detected_from_its_adapter_keys(tmp_path, tiny_clip_file):
    reference = _reference_model(tiny_clip_file, "meanP", tuning="unipt")
    ckpt = tmp_path / "pytorch_model.bin.0"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("clip.")}, ckpt)
    root = tmp_path / "videos"
    for rel, seed in CONTENT.items():
        write_video(root / rel, n_frames=12, fps=4, seed=seed)
    build_index(
        root,
        tmp_path / "index",
        init_model=str(ckpt),
        pretrained_clip_name=str(tiny_clip_file),
        max_frames=MAX_FRAMES,
        progress=False,
    )
    queries = ["a red circle", "a blue square"]
    found = search(tmp_path / "index", queries, top=3)
    paths = [root / rel for rel in sorted(CONTENT)]
    logits = _reference_logits(reference, queries, *_decode(paths))
    full_logits = _reference_logits(_reference_model(tiny_clip_file), queries, *_decode(paths))
    assert np.abs(logits - full_logits).max() > 1e-3  # the adapters change the scores
    for q, entry in enumerate(found):
        for r in entry["results"]:
            np.testing.assert_allclose(r["score"], logits[q, paths.index(Path(r["path"]))], rtol=1e-5, atol=1e-5)


def test_refusals_are_clear(built, tmp_path, tiny_clip_file, capsys):
    root, index_dir, _ = built
    with pytest.raises(UsageError, match="tightTransf cannot be indexed"):
        build_index(
            root, tmp_path / "tight", pretrained_clip_name=str(tiny_clip_file), sim_header="tightTransf", progress=False
        )
    with pytest.raises(UsageError, match="seqTransf needs trained head weights"):
        build_index(
            root, tmp_path / "seq", pretrained_clip_name=str(tiny_clip_file), sim_header="seqTransf", progress=False
        )
    with pytest.raises(UsageError, match=r"other settings: --max_frames 6 \(index: 4\)"):
        build_index(root, index_dir, max_frames=6, progress=False)
    assert not list(tmp_path.glob("tight/*")) and not list(tmp_path.glob("seq/*"))

    other = tmp_path / "other-clip.pt"
    torch.save(make_clip_state_dict(seed=1), other)
    assert (
        retrieve.main(["search", "--index", str(index_dir), "--query", "x", "--pretrained_clip_name", str(other)]) == 2
    )
    err = capsys.readouterr().err
    assert "is not the model that built" in err and str(other) in err and len(err.splitlines()) == 1


def test_blank_query_or_caption_is_refused_like_an_empty_file(built, tmp_path, capsys):
    _, index_dir, _ = built
    for argv in (
        ["search", "--index", str(index_dir), "--query", " \t "],
        ["search", "--index", str(index_dir), "--query", ""],
        ["captions", "--index", str(index_dir), "--video", "x.mp4", "--caption", "a dog", "  "],
    ):
        assert retrieve.main(argv) == 2
        err = capsys.readouterr().err
        assert "is empty (or only whitespace)" in err and len(err.splitlines()) == 1
    (tmp_path / "q.txt").write_text(" \n\t\n")
    assert retrieve.main(["search", "--index", str(index_dir), "--queries", str(tmp_path / "q.txt")]) == 2
    assert "holds no queries" in capsys.readouterr().err


def test_embeddings_of_another_width_are_refused(built, tmp_path):
    _, index_dir, _ = built
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((index_dir / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps(manifest))
    np.save(copy / manifest["embeddings"], np.zeros((3, 7), dtype=np.float32))
    with pytest.raises(UsageError, match=r"embeddings are 7 wide, the model's 512"):
        search(copy, ["a red circle"])


def test_concurrent_writers_take_turns_and_a_reader_never_sees_a_half_swap(built, tmp_path, tiny_clip_file):
    """Two index runs on one new index and a reader polling it: no error, one consistent index at the end."""
    import threading

    root, _, _ = built
    index_dir = tmp_path / "shared"
    errors, reports, reads = [], [], []
    writing = threading.Event()

    def write():
        try:
            reports.append(
                build_index(
                    root,
                    index_dir,
                    pretrained_clip_name=str(tiny_clip_file),
                    max_frames=MAX_FRAMES,
                    num_workers=0,
                    progress=False,
                )
            )
        except Exception as e:  # noqa: BLE001 - the test reports whatever went wrong
            errors.append(e)

    def read():
        while writing.is_set():
            if (index_dir / "index.json").exists():
                try:
                    reads.append(len(load_index(index_dir, mmap=True).videos))
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

    # Without the lock the second run would also find no index and encode everything again.
    writers = [threading.Thread(target=write) for _ in range(2)]
    reader = threading.Thread(target=read)
    writing.set()
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    # A third writer swaps the files again (a new embeddings file, the old one removed) while the reader polls.
    for _ in range(3):
        save_index(index_dir, load_index(index_dir))
    writing.clear()
    reader.join()
    assert errors == []
    assert sorted(len(r.encoded) for r in reports) == [0, 3]  # the second run found the first one's index
    assert set(reads) <= {3}
    assert len(list(index_dir.glob("embeddings-*.npy"))) == 1


def test_video_whose_name_is_not_utf8_is_scanned_decoded_and_stored(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "ok.mp4", n_frames=12, fps=4)
    odd = os.fsdecode(b"odd\xff.mp4")  # cv2 segfaults on such a name as a str
    os.link(root / "ok.mp4", os.fsencode(str(root)) + b"/odd\xff.mp4")
    found, errors = scan_videos(root)
    assert list(found) == [odd, "ok.mp4"] and errors == {}
    extractor = RawVideoExtractor(centercrop=False, size=32, framerate=1)
    files = VideoFiles(root, list(found), extractor, replace(DEFAULT_SAMPLING, max_frames=MAX_FRAMES))
    (_, odd_video, _, odd_frames, error), (_, ok_video, _, ok_frames, _) = files[0], files[1]
    assert error == "" and odd_frames == ok_frames == 3 and torch.equal(odd_video, ok_video)
    index = _one_video_index()
    index.videos[0]["path"] = odd
    save_index(tmp_path / "index", index)
    assert load_index(tmp_path / "index").videos[0]["path"] == odd


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "--index", "i", "--query", "a", "--max_words", "2"], "--max_words must be at least 3"),
        (["index", "--videos", "v", "--index", "i", "--num_workers", "-1"], "--num_workers must be at least 0"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        retrieve.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_search_video_ranks_the_other_videos_by_the_stored_embeddings(built, tmp_path, capsys):
    root, index_dir, _ = built
    index = load_index(index_dir)
    scale = 1 / 0.07  # exp(logit_scale) of the tiny CLIP
    scores = scale * index.embeddings @ index.embeddings[1]
    expected = [j for j in np.argsort(-scores, kind="stable") if j != 1]  # the query video itself left out

    by_id = search_video(index_dir, "1", top=5)
    assert by_id["video"] == str(root / index.videos[1]["path"])
    assert [r["id"] for r in by_id["results"]] == expected and [r["rank"] for r in by_id["results"]] == [1, 2]
    np.testing.assert_allclose([r["score"] for r in by_id["results"]], scores[expected], rtol=1e-5)
    by_file = search_video(index_dir, str(root / index.videos[1]["path"]), top=5)
    by_relative = search_video(index_dir, index.videos[1]["path"], top=5)
    assert by_file == by_id == by_relative

    outside = tmp_path / "copy.mp4"  # not indexed: encoded now, so its own indexed twin comes first
    outside.write_bytes((root / "c.mp4").read_bytes())
    found = search_video(index_dir, str(outside), top=3)
    assert found["results"][0]["path"] == str(root / "c.mp4") and len(found["results"]) == 3
    assert found["results"][0]["score"] == pytest.approx(scale, rel=1e-4)

    assert retrieve.main(["search", "--index", str(index_dir), "--video", "1", "--top_k", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"video: {by_id['video']}" and out[2].split()[-1] == by_id["results"][0]["path"]
    assert int(out[2].split()[2]) == by_id["results"][0]["id"]
    for bad, message in (("7", "the index holds ids 0 to 2"), ("nope.mp4", "neither a video file nor an index id")):
        assert retrieve.main(["search", "--index", str(index_dir), "--video", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err


def test_a_bug_in_model_building_keeps_its_traceback(built, tmp_path, tiny_clip_file, monkeypatch, capsys):
    """Only errors raised on purpose for a user's mistake become one line and exit 2; a bug propagates."""
    root, _, _ = built

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")

    monkeypatch.setattr(CLIP4Clip, "from_config", broken)
    argv = [
        "index",
        "--videos",
        str(root),
        "--index",
        str(tmp_path / "i"),
        "--pretrained_clip_name",
        str(tiny_clip_file),
    ]
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):
        retrieve.main([*argv, "--num_workers", "0"])
    assert "error:" not in capsys.readouterr().err
    assert not (tmp_path / "i").exists()  # a failed first run leaves no directory behind


@pytest.mark.parametrize("argv", [["--help"], ["index", "--bogus"], ["search", "--index", "i"]])
def test_help_and_bad_flags_answer_before_torch_is_imported(argv):
    code = f"import sys, retrieve\ntry:\n    retrieve.parse_args({argv!r})\nexcept SystemExit:\n    pass\n"
    code += "print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False False"


def test_the_parsers_head_choices_are_the_models():
    assert retrieve.SIM_HEADERS == SIM_HEADERS
