"""DATALOADER_DICT and the loader builders: datasets, samplers, batch sizes, worker counts, flag plumbing."""

from __future__ import annotations

import pickle
from argparse import Namespace

import pytest
import torch
from conftest import write_video
from torch.utils.data import SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from dataloaders import data_dataloaders as dd
from dataloaders.dataloader_msvd_retrieval import MSVD_DataLoader
from dataloaders.sampling import VideoSampling
from util import UsageError


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A tiny MSVD layout (5 train videos × 3 captions, 2 test videos × 2 captions) and a tiny MSR-VTT one."""
    root = tmp_path_factory.mktemp("data")
    clip = write_video(root / "clip.avi", n_frames=30, fps=10, size=(40, 32))
    train, test = [f"tr{i}" for i in range(5)], ["te0", "te1"]
    captions = {v: [f"caption {k} of {v}".split() for k in range(3)] for v in train}
    captions.update({v: [f"test {k} {v}".split() for k in range(2)] for v in test})
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
    (root / "train_list.txt").write_text("\n".join(train))
    (root / "test_list.txt").write_text("\n".join(test))
    (root / "videos").mkdir()
    for v in train + test:
        (root / "videos" / f"{v}.avi").symlink_to(clip)
    (root / "train.csv").write_text("video_id\ntr0\ntr1\ntr2\n")
    (root / "test.csv").write_text("key,vid_key,video_id,sentence\nret0,m0,te0,a cat\nret1,m1,te1,a dog\n")
    (root / "MSRVTT_data.json").write_text(
        '{"sentences": ['
        + ", ".join(f'{{"video_id": "tr{i}", "caption": "c{k} {i}"}}' for k in range(2) for i in range(3))
        + "]}"
    )
    for v in ("tr0", "tr1", "tr2", "te0", "te1"):
        (root / "videos" / f"{v}.mp4").symlink_to(clip)
    return root


def make_args(root, **kw):
    args = Namespace(
        data_path=str(root),
        features_path=str(root / "videos"),
        train_csv=str(root / "train.csv"),
        val_csv=str(root / "test.csv"),
        max_words=12,
        feature_framerate=1,
        max_frames=2,
        train_frame_order=0,
        eval_frame_order=0,
        slice_framepos=2,
        batch_size=8,
        batch_size_val=3,
        n_gpu=2,
        num_thread_reader=0,
        expand_msrvtt_sentences=False,
        image_resolution=32,
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def parts(args, frame_order):
    """The builders' arguments (data config, video sampling) of a flags-like namespace."""
    data = dd.DataConfig(
        datatype="msvd",
        train_csv=args.train_csv,
        val_csv=args.val_csv,
        data_path=args.data_path,
        features_path=args.features_path,
        num_workers=args.num_thread_reader,
        max_words=args.max_words,
        expand_msrvtt_sentences=args.expand_msrvtt_sentences,
        frame_cache=getattr(args, "frame_cache", None),
        skip_missing=getattr(args, "skip_missing", False),
    )
    sampling = VideoSampling(
        max_frames=args.max_frames,
        feature_framerate=args.feature_framerate,
        slice_framepos=args.slice_framepos,
        image_resolution=getattr(args, "image_resolution", 224),
        frame_order=frame_order,
    )
    return data, sampling


def build_train(builder, args, tokenizer):
    return builder(*parts(args, args.train_frame_order), tokenizer, args.batch_size // args.n_gpu)


def build_test(builder, args, tokenizer, **kw):
    return builder(*parts(args, args.eval_frame_order), tokenizer, args.batch_size_val, **kw)


def test_dict_layout_matches_the_original():
    assert set(dd.DATALOADER_DICT) == {"msrvtt", "msvd", "lsmdc", "activity", "didemo"}
    table = {k: tuple(v[s] for s in ("train", "val", "test")) for k, v in dd.DATALOADER_DICT.items()}
    assert table["msrvtt"] == (dd.dataloader_msrvtt_train, dd.dataloader_msrvtt_test, None)
    assert table["msvd"] == (dd.dataloader_msvd_train, dd.dataloader_msvd_test, dd.dataloader_msvd_test)
    assert table["lsmdc"] == (dd.dataloader_lsmdc_train, dd.dataloader_lsmdc_test, dd.dataloader_lsmdc_test)
    assert table["activity"] == (dd.dataloader_activity_train, dd.dataloader_activity_test, None)
    assert table["didemo"] == (dd.dataloader_didemo_train, dd.dataloader_didemo_test, dd.dataloader_didemo_test)


def test_train_builder(layout, tokenizer):
    loader, length, sampler = build_train(dd.DATALOADER_DICT["msvd"]["train"], make_args(layout), tokenizer)
    assert isinstance(loader.dataset, MSVD_DataLoader) and length == len(loader.dataset) == 15
    assert isinstance(sampler, DistributedSampler) and loader.sampler is sampler
    assert (sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.seed) == (1, 0, True, 0)
    assert loader.batch_size == 4 and loader.drop_last and not loader.pin_memory and loader.num_workers == 0
    assert len(loader) == 3  # 15 // 4, last partial batch dropped
    sampler.set_epoch(0)
    order0 = list(sampler)
    g = torch.Generator().manual_seed(0)  # seed 0 + epoch, independent of --seed
    assert order0 == torch.randperm(15, generator=g).tolist()
    assert loader.dataset.frame_order == 0 and loader.dataset.slice_framepos == 2
    text, mask, segment, video, video_mask = next(iter(loader))
    assert text.shape == (4, 1, 12) and text.dtype == torch.int64
    assert video.shape == (4, 1, 2, 1, 3, 32, 32) and video.dtype == torch.uint8
    assert video_mask.shape == (4, 1, 2) and video_mask.sum() == 8


def test_eval_builder_and_flags(layout, tokenizer, tmp_path):
    args = make_args(layout, eval_frame_order=1, num_thread_reader=1, frame_cache=str(tmp_path / "cache"))
    loader, length = build_test(dd.DATALOADER_DICT["msvd"]["test"], args, tokenizer, subset="test")
    assert length == 4 and loader.batch_size == 3 and not loader.drop_last and loader.num_workers == 1
    assert isinstance(loader.sampler, SequentialSampler)
    ds = loader.dataset
    assert ds.subset == "test" and ds.frame_order == 1 and ds.max_words == 12 and ds.max_frames == 2
    assert ds.rawVideoExtractor.size == 32 and not ds.skip_missing and ds.cut_off_points == [2, 4]
    # batch sizes without starting a worker process (forking after cv2 has run threads can hang a test session)
    assert [len(b) for b in loader.batch_sampler] == [3, 1]


def test_msrvtt_builders(layout, tokenizer):
    args = make_args(
        layout, expand_msrvtt_sentences=True, n_gpu=1, batch_size=2, data_path=str(layout / "MSRVTT_data.json")
    )
    loader, length, sampler = build_train(dd.dataloader_msrvtt_train, args, tokenizer)
    assert length == 6 and loader.dataset.unfold_sentences and loader.batch_size == 2
    loader, length = build_test(dd.dataloader_msrvtt_test, args, tokenizer)
    assert length == 2 and [p[1] for p in loader.dataset.all_pairs()] == ["a cat", "a dog"]


def test_defaults_for_new_flags_and_skip_missing(layout, tokenizer, tmp_path):
    args = make_args(layout)
    del args.image_resolution
    loader, _ = build_test(dd.dataloader_msvd_test, args, tokenizer)
    assert loader.dataset.rawVideoExtractor.size == 224 and loader.dataset.skip_missing is False
    (layout / "test_list.txt").write_text("te0\nte1\nte_missing\n")
    try:
        (layout / "raw-captions.pkl").write_bytes(pickle.dumps({"te0": [["a"]], "te1": [["b"]], "te_missing": [["c"]]}))
        with pytest.raises(UsageError, match="te_missing"):
            build_test(dd.dataloader_msvd_test, make_args(layout), tokenizer)
        loader, length = build_test(dd.dataloader_msvd_test, make_args(layout, skip_missing=True), tokenizer)
        assert length == 2
    finally:
        (layout / "test_list.txt").write_text("te0\nte1")
        captions = {f"tr{i}": [f"caption {k} of tr{i}".split() for k in range(3)] for i in range(5)}
        captions.update({v: [f"test {k} {v}".split() for k in range(2)] for v in ("te0", "te1")})
        (layout / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
