"""The evaluation report (``eval_report.html``), written only when asked."""

from __future__ import annotations

import logging
import os

import numpy as np

import util
from engine.config import RunConfig

logger = logging.getLogger("logger")


def write_eval_report(
    config: RunConfig,
    dataset,
    sim_matrix: np.ndarray,
    cut: list[int] | None,
    tables: dict[str, dict],
    tag: str,
    model_file: str | None,
    curves: str | None,
) -> None:
    """``eval_report.html`` in ``--output_dir`` (replaced by each evaluation), thumbnails from the frames the model
    saw: the test set's own decoding of each video."""
    import eval_report

    pairs = list(dataset.all_pairs())
    if cut is None:  # one caption per video: row i and column i are pair i
        video_pairs, truth = list(range(len(pairs))), np.arange(len(pairs))
    else:  # caption rows grouped by video; each video is its last caption's pair, as encoded
        video_pairs = [c - 1 for c in cut]
        truth = np.repeat(np.arange(len(cut)), np.diff([0] + list(cut)))

    def frames(j: int) -> np.ndarray:
        return dataset.kept_frames_uint8(video_pairs[j])

    path = os.path.join(config.run.output_dir, "eval_report.html")
    details = {
        "evaluation": tag,
        "model": model_file or config.model.pretrained_clip_name,
        "data set": config.data.datatype,
        "head": config.model.sim_header,
    }
    with util.run_output(path):
        eval_report.write_report(
            path,
            sim_matrix,
            truth,
            [p[1] for p in pairs],
            [str(pairs[i][0]) for i in video_pairs],
            tables,
            frames,
            title=f"CLIP4Clip evaluation report ({tag})",
            details=details,
            curves=curves,
        )
    logger.info("Evaluation report written to %s", path)
