"""Data config and video sampling → dataset → DataLoader: ``DATALOADER_DICT[datatype]["train" | "val" | "test"]``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from dataloaders.dataloader_activitynet_retrieval import ActivityNet_DataLoader
from dataloaders.dataloader_didemo_retrieval import DiDeMo_DataLoader
from dataloaders.dataloader_lsmdc_retrieval import LSMDC_DataLoader
from dataloaders.dataloader_msrvtt_retrieval import MSRVTT_DataLoader, MSRVTT_TrainDataLoader
from dataloaders.dataloader_msvd_retrieval import MSVD_DataLoader
from dataloaders.sampling import VideoSampling
from util import get_rank, get_world_size

# Differs from the original (pin_memory=False): batches land in page-locked memory when a GPU will read them, so the
# driver's non_blocking copies overlap the previous step. Persistent workers are not used: re-created workers draw
# their seeds from the main process's RNG each epoch, and keeping them would change the run's random streams.
PIN_MEMORY = torch.cuda.is_available()


@dataclass(frozen=True)
class DataConfig:
    """Where a data set is and how its loaders read it (``num_workers`` DataLoader workers per loader)."""

    datatype: str
    train_csv: str
    val_csv: str
    data_path: str
    features_path: str
    num_workers: int
    max_words: int
    expand_msrvtt_sentences: bool
    frame_cache: str | None
    skip_missing: bool


def _dataset_kwargs(data: DataConfig, sampling: VideoSampling, tokenizer) -> dict:
    """The constructor arguments every dataset shares. Batches carry uint8 frames (differs from the original's
    float64: an eighth of the bytes to collate and copy); ``normalize_video`` gives the same float32 values."""
    return dict(
        features_path=data.features_path,
        tokenizer=tokenizer,
        max_words=data.max_words,
        sampling=sampling,
        frame_cache=data.frame_cache,
        skip_missing=data.skip_missing,
        uint8_frames=True,
    )


def _loader(dataset: Dataset, data: DataConfig, batch_size: int, **order) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=data.num_workers, pin_memory=PIN_MEMORY, **order)


def _train_loader(dataset: Dataset, data: DataConfig, batch_size: int) -> tuple[DataLoader, int, DistributedSampler]:
    """Shuffled by a DistributedSampler (seed 0 + epoch; call ``set_epoch``), ``batch_size`` per process."""
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank())
    return _loader(dataset, data, batch_size, sampler=sampler, drop_last=True), len(dataset), sampler


def _eval_loader(dataset: Dataset, data: DataConfig, batch_size: int) -> tuple[DataLoader, int]:
    return _loader(dataset, data, batch_size, shuffle=False, drop_last=False), len(dataset)


def dataloader_msrvtt_train(data: DataConfig, sampling: VideoSampling, tokenizer, batch_size: int):
    dataset = MSRVTT_TrainDataLoader(
        csv_path=data.train_csv,
        json_path=data.data_path,
        unfold_sentences=data.expand_msrvtt_sentences,
        **_dataset_kwargs(data, sampling, tokenizer),
    )
    return _train_loader(dataset, data, batch_size)


def dataloader_msrvtt_test(data: DataConfig, sampling: VideoSampling, tokenizer, batch_size: int, subset="test"):
    dataset = MSRVTT_DataLoader(csv_path=data.val_csv, **_dataset_kwargs(data, sampling, tokenizer))
    return _eval_loader(dataset, data, batch_size)


def _subset_builders(dataset_cls, name: str):
    """The (train, test) builders of a data set whose class takes ``subset`` and ``data_path``."""

    def train(data: DataConfig, sampling: VideoSampling, tokenizer, batch_size: int):
        dataset = dataset_cls(subset="train", data_path=data.data_path, **_dataset_kwargs(data, sampling, tokenizer))
        return _train_loader(dataset, data, batch_size)

    def test(data: DataConfig, sampling: VideoSampling, tokenizer, batch_size: int, subset="test"):
        dataset = dataset_cls(subset=subset, data_path=data.data_path, **_dataset_kwargs(data, sampling, tokenizer))
        return _eval_loader(dataset, data, batch_size)

    train.__name__ = train.__qualname__ = f"dataloader_{name}_train"
    test.__name__ = test.__qualname__ = f"dataloader_{name}_test"
    return train, test


dataloader_msvd_train, dataloader_msvd_test = _subset_builders(MSVD_DataLoader, "msvd")
dataloader_lsmdc_train, dataloader_lsmdc_test = _subset_builders(LSMDC_DataLoader, "lsmdc")
dataloader_activity_train, dataloader_activity_test = _subset_builders(ActivityNet_DataLoader, "activity")
dataloader_didemo_train, dataloader_didemo_test = _subset_builders(DiDeMo_DataLoader, "didemo")


# "test": None means the val builder serves as the test set (MSR-VTT's 1k-A csv, ActivityNet's val_1).
DATALOADER_DICT = {
    "msrvtt": {"train": dataloader_msrvtt_train, "val": dataloader_msrvtt_test, "test": None},
    "msvd": {"train": dataloader_msvd_train, "val": dataloader_msvd_test, "test": dataloader_msvd_test},
    "lsmdc": {"train": dataloader_lsmdc_train, "val": dataloader_lsmdc_test, "test": dataloader_lsmdc_test},
    "activity": {"train": dataloader_activity_train, "val": dataloader_activity_test, "test": None},
    "didemo": {"train": dataloader_didemo_train, "val": dataloader_didemo_test, "test": dataloader_didemo_test},
}
