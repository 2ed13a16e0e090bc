"""The model's choices by name, importable without torch so the command line can offer them before it loads."""

from __future__ import annotations

SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
# The dot-product heads: one vector per video, so the similarity is a matrix product (the original's loose_type).
LOOSE_HEADERS = ("meanP", "seqLSTM", "seqTransf")
PRECISIONS = ("fp16-weights", "fp32", "bf16", "fp16")
LINEAR_PATCHES = ("2d", "3d")
# full: the original's fine-tuning of CLIP. unipt: the UniPT fork's parallel tuning, a frozen CLIP plus two small
# side networks (``image_adapter``, ``text_adapter``) that are the only trained parameters.
TUNINGS = ("full", "unipt")
