"""Flags → dataset → DataLoader: ``DATALOADER_DICT[datatype]["train" | "val" | "test"]``."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from dataloaders.dataloader_activitynet_retrieval import ActivityNet_DataLoader
from dataloaders.dataloader_didemo_retrieval import DiDeMo_DataLoader
from dataloaders.dataloader_lsmdc_retrieval import LSMDC_DataLoader
from dataloaders.dataloader_msrvtt_retrieval import MSRVTT_DataLoader, MSRVTT_TrainDataLoader
from dataloaders.dataloader_msvd_retrieval import MSVD_DataLoader
from util import get_rank, get_world_size

# Differs from the original (pin_memory=False): batches land in page-locked memory when a GPU will read them, so the
# driver's non_blocking copies overlap the previous step. Persistent workers are not used: re-created workers draw
# their seeds from the main process's RNG each epoch, and keeping them would change the run's random streams.
PIN_MEMORY = torch.cuda.is_available()


def _dataset_kwargs(args, tokenizer, frame_order: int) -> dict:
    """The constructor arguments every dataset shares, read from the training flags."""
    return dict(
        features_path=args.features_path,
        tokenizer=tokenizer,
        max_words=args.max_words,
        feature_framerate=args.feature_framerate,
        max_frames=args.max_frames,
        image_resolution=getattr(args, "image_resolution", 224),
        frame_order=frame_order,
        slice_framepos=args.slice_framepos,
        frame_cache=getattr(args, "frame_cache", None),
        skip_missing=getattr(args, "skip_missing", False),
    )


def _train_loader(dataset: Dataset, args) -> tuple[DataLoader, int, DistributedSampler]:
    """Shuffled by a DistributedSampler (seed 0 + epoch; call ``set_epoch``), ``batch_size // n_gpu`` per process."""
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank())
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size // args.n_gpu,
        num_workers=args.num_thread_reader,
        pin_memory=PIN_MEMORY,
        sampler=sampler,
        drop_last=True,
    )
    return loader, len(dataset), sampler


def _eval_loader(dataset: Dataset, args) -> tuple[DataLoader, int]:
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size_val,
        num_workers=args.num_thread_reader,
        shuffle=False,
        drop_last=False,
        pin_memory=PIN_MEMORY,
    )
    return loader, len(dataset)


def dataloader_msrvtt_train(args, tokenizer):
    dataset = MSRVTT_TrainDataLoader(
        csv_path=args.train_csv,
        json_path=args.data_path,
        unfold_sentences=args.expand_msrvtt_sentences,
        **_dataset_kwargs(args, tokenizer, args.train_frame_order),
    )
    return _train_loader(dataset, args)


def dataloader_msrvtt_test(args, tokenizer, subset="test"):
    dataset = MSRVTT_DataLoader(csv_path=args.val_csv, **_dataset_kwargs(args, tokenizer, args.eval_frame_order))
    return _eval_loader(dataset, args)


def _subset_builders(dataset_cls, name: str):
    """The (train, test) builders of a data set whose class takes ``subset`` and ``data_path``."""

    def train(args, tokenizer):
        dataset = dataset_cls(
            subset="train", data_path=args.data_path, **_dataset_kwargs(args, tokenizer, args.train_frame_order)
        )
        return _train_loader(dataset, args)

    def test(args, tokenizer, subset="test"):
        dataset = dataset_cls(
            subset=subset, data_path=args.data_path, **_dataset_kwargs(args, tokenizer, args.eval_frame_order)
        )
        return _eval_loader(dataset, args)

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
