"""Distributed evaluation: each rank encodes its shard, similarity in bounded blocks, metrics on rank 0."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import util
from dataloaders.data_dataloaders import DATALOADER_DICT
from dataloaders.rawvideo_util import normalize_video
from engine.config import RunConfig
from engine.context import RunContext, autocast_for, log_peak_memory
from engine.runlog import RunLog
from metrics import QueryBank, build_querybank, dual_softmax_rerank, dynamic_inverted_softmax, retrieval_metrics
from modules.modeling import CLIP4Clip

logger = logging.getLogger("logger")

# Similarity is computed in blocks of at most this many logits (loose heads) ...
SIM_BLOCK_ELEMENTS = 1 << 22
# ... or this many (text, video) pairs through the cross encoder (tightTransf).
TIGHT_PAIRS_PER_BLOCK = 2048
TIGHT_VIDEOS_PER_BLOCK = 64


def shard(n: int) -> range:
    """This rank's contiguous share of ``n`` items (rank order = item order)."""
    rank, world = util.get_rank(), util.get_world_size()
    return range(n * rank // world, n * (rank + 1) // world)


def _loader_like(loader: DataLoader, indices: Sequence[int]) -> DataLoader:
    return DataLoader(
        Subset(loader.dataset, list(indices)),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        shuffle=False,
        drop_last=False,
        pin_memory=loader.pin_memory,
    )


def encode_test_shard(
    model: CLIP4Clip, test_dataloader: DataLoader, context: RunContext, max_words: int, max_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's text features, text masks, frame features and video masks, on the CPU.

    Multi-sentence data (MSVD): texts are tokenised straight from the annotations and each video is decoded once
    (at its last caption, as the original selects them), instead of decoding a video per caption.
    """
    dataset = test_dataloader.dataset
    caption_ends = dataset.caption_ends()
    device = context.device
    show = util.is_main_process()
    seqs, tmasks, viss, vmasks = [], [], [], []
    with autocast_for(context.precision, device):
        if caption_ends is not None:
            captions = [pair[1] for pair in dataset.all_pairs()]
            seq, mask = encode_captions(
                model, dataset, captions, shard(len(captions)), test_dataloader.batch_size, device
            )
            seqs.append(seq)
            tmasks.append(mask)
            last_caption = [c - 1 for c in caption_ends]
            video_loader = _loader_like(test_dataloader, [last_caption[i] for i in shard(len(last_caption))])
            for batch in tqdm(video_loader, desc="encode videos", disable=not show, unit="batch"):
                _, _, _, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
                video = normalize_video(video, video_mask)
                viss.append(model.get_visual_output(video, video_mask).float().cpu())
                vmasks.append(video_mask.view(-1, video_mask.shape[-1]).cpu())
        else:
            loader = test_dataloader
            if util.get_world_size() > 1:
                loader = _loader_like(test_dataloader, shard(len(dataset)))
            for batch in tqdm(loader, desc="encode test set", disable=not show, unit="batch"):
                input_ids, input_mask, segment_ids, video, video_mask = (t.to(device, non_blocking=True) for t in batch)
                video = normalize_video(video, video_mask)
                seq, vis = model.get_sequence_visual_output(input_ids, segment_ids, input_mask, video, video_mask)
                seqs.append(seq.float().cpu())
                tmasks.append(input_mask.view(-1, input_mask.shape[-1]).cpu())
                viss.append(vis.float().cpu())
                vmasks.append(video_mask.view(-1, video_mask.shape[-1]).cpu())

    def cat(parts: list[torch.Tensor], like: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty((0, *like), dtype=dtype)

    hidden = model.clip.text_projection.shape[1]
    return (
        cat(seqs, (1, hidden), torch.float32),
        cat(tmasks, (max_words,), torch.long),
        cat(viss, (max_frames, hidden), torch.float32),
        cat(vmasks, (max_frames,), torch.long),
    )


def encode_captions(
    model: CLIP4Clip, dataset, captions: Sequence[str], rows: range, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs and masks of ``captions[rows]``, tokenised as ``dataset`` does, on the CPU (call under
    ``autocast_for``)."""
    seqs, masks = [], []
    for start in tqdm(
        range(rows.start, rows.stop, batch_size), desc="encode texts", disable=not util.is_main_process(), unit="batch"
    ):
        encoded = [dataset.encode_text(captions[i]) for i in range(start, min(start + batch_size, rows.stop))]
        ids, mask, segment = (torch.from_numpy(np.concatenate(parts)).to(device) for parts in zip(*encoded))
        seqs.append(model.get_sequence_output(ids, segment, mask).float().cpu())
        masks.append(mask.view(-1, mask.shape[-1]).cpu())
    hidden = model.clip.text_projection.shape[1]
    if not seqs:
        return torch.empty((0, 1, hidden)), torch.empty((0, dataset.max_words), dtype=torch.long)
    return torch.cat(seqs), torch.cat(masks)


def similarity_columns(
    model: CLIP4Clip,
    seq: torch.Tensor,
    text_mask: torch.Tensor,
    vis: torch.Tensor,
    video_mask: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """[all texts, these videos] logits of ``model.get_similarity_logits``, in bounded-memory blocks, on the CPU.

    Loose heads: each block is all texts × a slice of videos, so the temporal head runs once per video (it does
    not depend on the text) and the result equals the original's per-batch-pair computation. tightTransf: blocks
    of (text, video) pairs through the cross encoder.
    """
    n_text, n_video = seq.shape[0], vis.shape[0]
    if n_video == 0:
        return torch.empty((n_text, 0))
    columns = []
    if model.loose_type:
        step = max(1, SIM_BLOCK_ELEMENTS // max(n_text, 1))
        seq_d, text_mask_d = seq.to(device), text_mask.to(device)
        for v0 in range(0, n_video, step):
            logits, _ = model.get_similarity_logits(
                seq_d,
                vis[v0 : v0 + step].to(device),
                text_mask_d,
                video_mask[v0 : v0 + step].to(device),
                loose_type=True,
            )
            columns.append(logits.float().cpu())
        return torch.cat(columns, dim=1)
    v_step = min(n_video, TIGHT_VIDEOS_PER_BLOCK)
    t_step = max(1, TIGHT_PAIRS_PER_BLOCK // v_step)
    for v0 in range(0, n_video, v_step):
        vis_d, video_mask_d = vis[v0 : v0 + v_step].to(device), video_mask[v0 : v0 + v_step].to(device)
        rows = []
        for t0 in range(0, n_text, t_step):
            logits, _ = model.get_similarity_logits(
                seq[t0 : t0 + t_step].to(device),
                vis_d,
                text_mask[t0 : t0 + t_step].to(device),
                video_mask_d,
                loose_type=False,
            )
            rows.append(logits.float().cpu())
        columns.append(torch.cat(rows, dim=0))
    return torch.cat(columns, dim=1)


def _metric_line(m: dict, prefix: str = "") -> str:
    return (
        f"\t>>>  {prefix}R@1: {m['R1']:.1f} - {prefix}R@5: {m['R5']:.1f} - {prefix}R@10: {m['R10']:.1f} - "
        f"{prefix}Median R: {m['MR']:.1f} - {prefix}Mean R: {m['MeanR']:.1f}"
    )


def _plain(m: dict) -> dict:
    return {k: float(v) for k, v in m.items() if k in ("R1", "R5", "R10", "MR", "MedianR", "MeanR", "Std_Rank")}


def eval_epoch(
    config: RunConfig,
    context: RunContext,
    model: torch.nn.Module,
    test_dataloader: DataLoader,
    tag: str,
    model_file: str | None = None,
    run_log: RunLog | None = None,
    global_step: int = 0,
) -> float:
    """Every rank encodes its shard and scores its videos' columns; rank 0 logs the metrics, writes
    ``metrics_<tag>.json``, records them in ``run_log`` and, with ``--eval_report``, writes ``eval_report.html``.
    Returns text-to-video R@1 (on every rank). Draws nothing from the RNGs."""
    model = getattr(model, "module", model)
    dataset = test_dataloader.dataset
    cut = dataset.caption_ends()
    is_main = util.is_main_process()
    if cut is not None and is_main:
        logger.warning("Eval under the multi-sentence per video clip setting.")
        logger.warning(f"sentence num: {len(dataset)}, video num: {len(cut)}")

    model.eval()
    with torch.no_grad(), util.preserved_rng():
        max_frames = config.eval_sampling.max_frames
        seq, text_mask, vis, video_mask = encode_test_shard(
            model, test_dataloader, context, config.data.max_words, max_frames
        )
        texts = util.all_gather_objects((seq, text_mask))
        seq, text_mask = torch.cat([t[0] for t in texts]), torch.cat([t[1] for t in texts])
        block = similarity_columns(model, seq, text_mask, vis, video_mask, context.device)
        bank_sim = None
        if config.run.qb_norm:
            captions = training_captions(config)
            bank_sim = querybank_similarities(model, dataset, captions, vis, video_mask, context, config)
    blocks = util.gather_objects(block.numpy())

    R1 = 0.0
    if is_main:
        sim_matrix = np.concatenate(blocks, axis=1)
        querybank = None if bank_sim is None else querybank_of(bank_sim, cosine_scale(model), config.run.qb_norm_beta)
        record, tables = score(config, sim_matrix, cut, tag, model_file, querybank, cosine_scale(model))
        metrics_file = os.path.join(config.run.output_dir, f"metrics_{tag}.json")
        with util.run_output(metrics_file):
            util.atomic_write_text(json.dumps(record, indent=1) + "\n", metrics_file)
        if run_log is not None:
            run_log.evaluation(record, global_step)
        if config.run.eval_report:
            from engine.report import write_eval_report

            curves = run_log.path if run_log is not None else None
            write_eval_report(config, dataset, sim_matrix, cut, tables, tag, model_file, curves)
        R1 = float(tables["Text-to-Video"]["R1"])
    log_peak_memory(context.device)
    return util.broadcast_object(R1)


def training_captions(config: RunConfig) -> list[str]:
    """Every caption of the training split (all of a video's captions, also for MSR-VTT), in annotation order: the
    QB-Norm querybank, so that no test query shapes the normalisation."""
    data = dataclasses.replace(config.data, expand_msrvtt_sentences=True)
    loader = DATALOADER_DICT[data.datatype]["train"](data, config.train_sampling, None, 1)[0]
    return [pair[1] for pair in loader.dataset.all_pairs()]


def cosine_scale(model: CLIP4Clip) -> float:
    """What the logits are divided by to give QB-Norm cosine similarities: exp(logit_scale) for the dot-product
    heads; 1 for tightTransf, whose cross-encoder scores are not scaled cosines."""
    return float(model.clip.logit_scale.detach().exp()) if model.loose_type else 1.0


def querybank_similarities(
    model: CLIP4Clip,
    dataset,
    captions: Sequence[str],
    vis: torch.Tensor,
    video_mask: torch.Tensor,
    context: RunContext,
    config: RunConfig,
) -> np.ndarray | None:
    """[bank captions, all test videos] logits on rank 0 (None elsewhere). The test videos' features are small, so
    every rank gets all of them and scores its share of the (much larger) bank against them."""
    videos = util.all_gather_objects((vis, video_mask))
    vis, video_mask = torch.cat([v[0] for v in videos]), torch.cat([v[1] for v in videos])
    rows = shard(len(captions))
    with autocast_for(context.precision, context.device):
        seq, mask = encode_captions(model, dataset, captions, rows, config.optim.batch_size_val, context.device)
    block = similarity_columns(model, seq, mask, vis, video_mask, context.device)
    parts = util.gather_objects(block.numpy())
    return np.concatenate(parts, axis=0) if parts is not None else None


def querybank_of(bank_sim: np.ndarray, scale: float, beta: float) -> QueryBank:
    """The QB-Norm querybank of [bank captions, test videos] logits, built on the cosines ``bank_sim / scale``."""
    querybank = build_querybank(bank_sim / scale, beta=beta)
    logger.info(
        "QB-Norm querybank: %d training captions x %d test videos, beta %g on cosine similarities (logits / %.4g), "
        "k %d; %d of %d test videos in its activation set",
        querybank.size,
        bank_sim.shape[1],
        querybank.beta,
        scale,
        querybank.k,
        int(querybank.active.sum()),
        bank_sim.shape[1],
    )
    return querybank


def score(
    config: RunConfig,
    sim_matrix: np.ndarray,
    cut: list[int] | None,
    tag: str,
    model_file: str | None,
    querybank: QueryBank | None = None,
    scale: float = 1.0,
) -> tuple[dict, dict[str, dict]]:
    """Log the metrics of ``sim_matrix`` as the original does; return the ``metrics_<tag>.json`` record and the
    metric tables by name (dual-softmax re-ranked ones added with ``--eval_dsl``, QB-Norm's with a ``querybank``
    built on the cosines ``sim_matrix / scale``)."""
    if cut is not None:
        logger.info(f"before reshape, sim matrix size: {sim_matrix.shape[0]} x {sim_matrix.shape[1]}")
        shape = (len(cut), max(e - s for s, e in zip([0] + cut[:-1], cut)), sim_matrix.shape[1])
        logger.info("after reshape, sim matrix size: {} x {} x {}".format(*shape))
    else:
        logger.info(f"sim matrix size: {sim_matrix.shape[0]}, {sim_matrix.shape[1]}")
        logger.info(f"\t Length-T: {len(sim_matrix)}, Length-V:{len(sim_matrix[0])}")
    tv_metrics, vt_metrics = retrieval_metrics(sim_matrix, cut)
    logger.info("Text-to-Video:")
    logger.info(_metric_line(tv_metrics))
    logger.info("Video-to-Text:")
    logger.info(_metric_line(vt_metrics, "V2T$"))
    record = {
        "tag": tag,
        "model_file": model_file,
        "datatype": config.data.datatype,
        "sim_header": config.model.sim_header,
        "num_texts": int(sim_matrix.shape[0]),
        "num_videos": int(sim_matrix.shape[1]),
        "text_to_video": _plain(tv_metrics),
        "video_to_text": _plain(vt_metrics),
    }
    tables = {"Text-to-Video": tv_metrics, "Video-to-Text": vt_metrics}
    if config.run.eval_dsl:
        # Re-ranked copies only: the standard numbers above are never replaced.
        temperature = config.run.dsl_temperature
        dsl_tv, _ = retrieval_metrics(dual_softmax_rerank(sim_matrix, temperature), cut)
        _, dsl_vt = retrieval_metrics(dual_softmax_rerank(sim_matrix.T, temperature).T, cut)
        logger.info("Text-to-Video, dual-softmax re-ranked (--eval_dsl, temperature %g):", temperature)
        logger.info(_metric_line(dsl_tv, "DSL$"))
        logger.info("Video-to-Text, dual-softmax re-ranked (--eval_dsl, temperature %g):", temperature)
        logger.info(_metric_line(dsl_vt, "DSL$V2T$"))
        record["dsl"] = {"temperature": temperature, "text_to_video": _plain(dsl_tv), "video_to_text": _plain(dsl_vt)}
        tables.update({"Text-to-Video, DSL": dsl_tv, "Video-to-Text, DSL": dsl_vt})
    if querybank is not None:
        record["qb_norm"], tables["Text-to-Video, QB-Norm"] = qb_norm_metrics(sim_matrix, cut, querybank, scale)
    return record, tables


def qb_norm_metrics(
    sim_matrix: np.ndarray, cut: list[int] | None, querybank: QueryBank, scale: float
) -> tuple[dict, dict]:
    """Log and return (the record's ``qb_norm`` entry, the metric table) of text-to-video after QB-Norm.

    Text-to-video only: the bank holds training captions, so it normalises caption queries, not video ones."""
    qb_tv, _ = retrieval_metrics(dynamic_inverted_softmax(sim_matrix / scale, querybank), cut)
    logger.info(
        "Text-to-Video, QB-Norm (--qb_norm, beta %g, bank of %d training captions):", querybank.beta, querybank.size
    )
    logger.info(_metric_line(qb_tv, "QB$"))
    entry = {
        "beta": querybank.beta,
        "k": querybank.k,
        "bank": "training captions",
        "bank_size": querybank.size,
        "similarity_divided_by": scale,
        "text_to_video": _plain(qb_tv),
    }
    return entry, qb_tv
