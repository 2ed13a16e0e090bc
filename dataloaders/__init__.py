"""Data sets of video-text retrieval. ``DATATYPES`` names them without importing torch (for the command line)."""

DATATYPES = ("msrvtt", "msvd", "lsmdc", "activity", "didemo")
