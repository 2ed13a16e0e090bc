"""engine/evaluate.py's QB-Norm wiring: a tiny evaluation whose QB-Norm numbers are recomputed independently."""

import json

import numpy as np
import pytest
import torch
from conftest import make_clip_state_dict

import main_task_retrieval as mtr
from dataloaders.data_dataloaders import DATALOADER_DICT
from dataloaders.rawvideo_util import normalize_video
from engine.config import build_config
from engine.context import start_run
from engine.flags import parse_flags
from engine.model import init_model
from metrics import build_querybank, dynamic_inverted_softmax, retrieval_metrics
from modules.tokenization_clip import SimpleTokenizer


@pytest.fixture(scope="module")
def tiny_msvd(tmp_path_factory):
    from preprocess.make_synthetic_dataset import make_dataset

    root = tmp_path_factory.mktemp("qb")
    paths = make_dataset(root / "data", seed=0, num_train=6, num_val=2, num_test=5, size=32, fps=2, seconds=2)
    clip = root / "tiny-clip.pt"
    torch.save(make_clip_state_dict(), clip)
    argv = [
        "--do_eval",
        "--datatype",
        "msvd",
        "--data_path",
        str(paths["msvd_data_path"]),
        "--features_path",
        str(paths["msvd_features_path"]),
        "--pretrained_clip_name",
        str(clip),
        "--max_words",
        "8",
        "--max_frames",
        "2",
        "--batch_size_val",
        "4",
        "--num_thread_reader",
        "0",
        "--loose_type",
        "--slice_framepos",
        "2",
        "--qb_norm",
        "--qb_norm_beta",
        "5",
    ]
    return root, argv


def encoded_logits(model, dataset, captions):
    """[captions, test videos] logits, every text and video encoded on its own (no evaluation code involved)."""
    pairs = list(dataset.all_pairs())
    ends = dataset.caption_ends()
    seqs, masks = [], []
    for caption in captions:
        ids, mask, segment = (torch.from_numpy(a) for a in dataset.encode_text(caption))
        seqs.append(model.get_sequence_output(ids, segment, mask))
        masks.append(mask.view(1, -1))
    vis, vmasks = [], []
    for end in ends:
        _, _, _, video, video_mask = (torch.from_numpy(np.asarray(a))[None] for a in dataset[end - 1])
        video = normalize_video(video, video_mask)
        vis.append(model.get_visual_output(video, video_mask))
        vmasks.append(video_mask.view(1, -1))
    logits, _ = model.get_similarity_logits(
        torch.cat(seqs), torch.cat(vis), torch.cat(masks), torch.cat(vmasks), loose_type=True
    )
    assert len(pairs) == ends[-1]
    return logits.float().numpy()


def test_qb_norm_line_equals_the_pure_functions(tiny_msvd):
    root, argv = tiny_msvd
    out = root / "eval"
    assert mtr.main([*argv, "--output_dir", str(out)]) == 0
    record = json.loads((out / "metrics_eval.json").read_text())
    log = (out / "log.txt").read_text()
    assert "Text-to-Video, QB-Norm (--qb_norm, beta 5, bank of" in log and "QB$R@1:" in log

    config = build_config(vars(parse_flags([*argv, "--output_dir", str(root / "again")])))
    model = init_model(config, start_run(config)).eval()
    data, sampling = config.data, config.eval_sampling
    test = DATALOADER_DICT["msvd"]["test"](data, sampling, SimpleTokenizer(), 4)[0].dataset
    train = DATALOADER_DICT["msvd"]["train"](data, config.train_sampling, SimpleTokenizer(), 1)[0].dataset
    bank_captions = [pair[1] for pair in train.all_pairs()]
    with torch.no_grad():
        sim = encoded_logits(model, test, [pair[1] for pair in test.all_pairs()])
        bank_sim = encoded_logits(model, test, bank_captions)
    scale = float(model.clip.logit_scale.exp())
    bank = build_querybank(bank_sim / scale, beta=5.0)
    expected_qb, _ = retrieval_metrics(dynamic_inverted_softmax(sim / scale, bank), test.caption_ends())
    expected, _ = retrieval_metrics(sim, test.caption_ends())

    qb = record["qb_norm"]
    assert (qb["beta"], qb["k"], qb["bank_size"]) == (5.0, 1, len(bank_captions))
    assert len(bank_captions) != record["num_texts"]  # the training captions, not the test queries
    assert qb["similarity_divided_by"] == pytest.approx(scale)
    for key in ("R1", "R5", "R10", "MR", "MeanR"):
        assert qb["text_to_video"][key] == pytest.approx(expected_qb[key], abs=1e-4), key
        assert record["text_to_video"][key] == pytest.approx(expected[key], abs=1e-4), key
    # some query was normalised, so the QB-Norm line is not a copy of the plain one
    assert not np.allclose(dynamic_inverted_softmax(sim / scale, bank), sim / scale)
