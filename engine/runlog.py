"""The run log for plots: ``metrics.jsonl`` and, when asked, TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import util

METRIC_SCALARS = (("R1", "R1"), ("R5", "R5"), ("R10", "R10"), ("MdR", "MR"), ("MnR", "MeanR"))


class RunLog:
    """Rank 0's numbers for plots: one JSON line per logged step, finished epoch and evaluation in
    ``<output_dir>/metrics.jsonl`` (appended, so a resumed run continues the file), the same as TensorBoard scalars
    under ``<output_dir>/tensorboard`` with ``--tensorboard``."""

    def __init__(self, output_dir: str, tensorboard: bool = False):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def _write(self, record: dict, scalars: dict[str, float], step: int) -> None:
        with util.run_output(self.path):
            util.append_line(json.dumps({**record, "time": round(time.time(), 3)}), self.path)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def step(
        self, epoch: int, step: int, global_step: int, lrs: Sequence[float], loss: float, time_per_step: float
    ) -> None:
        """The numbers of one ``Epoch: e/E, Step: s/n, Lr: ..., Loss: ...`` log line (e and s 1-based, as logged)."""
        scalars = {"train/loss": loss, "train/time_per_step": time_per_step}
        scalars.update({f"train/lr_{i}": lr for i, lr in enumerate(lrs)})
        self._write(
            {
                "event": "step",
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "lr": list(lrs),
                "loss": loss,
                "time_per_step": time_per_step,
            },
            scalars,
            global_step,
        )

    def epoch(self, epoch: int, global_step: int, train_loss: float) -> None:
        self._write(
            {"event": "epoch", "epoch": epoch, "global_step": global_step, "train_loss": train_loss},
            {"train/epoch_loss": train_loss},
            global_step,
        )

    def evaluation(self, record: dict, global_step: int) -> None:
        """One evaluation's ``metrics_<tag>.json`` record."""
        scalars = {
            f"eval/{side}_{name}": record[key][metric]
            for side, key in (("t2v", "text_to_video"), ("v2t", "video_to_text"))
            for name, metric in METRIC_SCALARS
        }
        self._write({"event": "eval", "global_step": global_step, **record}, scalars, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
