"""QB-Norm for the search commands: a bank of caption embeddings stored beside an index, and ranking against it.

The bank keeps the captions' text embeddings (``qb_bank.npy``, float32, rows of unit norm) rather than their scores,
so it stays valid when the index gains or loses videos: the bank's scores against the current rows are a single
matrix product at search time. ``qb_bank.json`` records the captions file, their number and the model fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metrics import build_querybank, dynamic_inverted_softmax
from search.index import Index
from util import UsageError, atomic_path, atomic_write_text

BANK_EMBEDDINGS = "qb_bank.npy"
BANK_MANIFEST = "qb_bank.json"
# The paper's inverse temperature, on cosine similarities (the logits divided by exp(logit_scale)).
QB_BETA = 20.0


def save_bank(index_dir: Path, embeddings: np.ndarray, captions_file: str, fingerprint: str | None) -> None:
    """Store the bank's caption embeddings (the embeddings file first, then the manifest that vouches for it)."""
    with atomic_path(index_dir / BANK_EMBEDDINGS) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(embeddings, dtype=np.float32))
    manifest = {"captions_file": captions_file, "size": int(embeddings.shape[0]), "fingerprint": fingerprint}
    atomic_write_text(json.dumps(manifest, indent=1) + "\n", index_dir / BANK_MANIFEST)


def load_bank(index_dir: Path, index: Index) -> np.ndarray:
    """The stored bank's embeddings; a clear error when there is none or another model made it."""
    manifest, embeddings = index_dir / BANK_MANIFEST, index_dir / BANK_EMBEDDINGS
    if not manifest.is_file() or not embeddings.is_file():
        raise UsageError(f"--qb_norm: {index_dir} holds no querybank; add one with `retrieve.py index --qb_bank FILE`")
    stored = json.loads(manifest.read_text())
    if stored.get("fingerprint") != index.settings.model.fingerprint:
        raise UsageError(f"--qb_norm: {manifest} was made by another model; rebuild it with `index --qb_bank FILE`")
    bank = np.load(embeddings, allow_pickle=False)
    if bank.ndim != 2 or bank.shape[0] != stored.get("size") or bank.shape[1] != index.embeddings.shape[1]:
        raise UsageError(f"--qb_norm: {embeddings} is not a [{stored.get('size')}, D] matrix; rebuild the bank")
    return bank


def qb_normalised(index: Index, bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[queries, videos] scores after QB-Norm's dynamic inverted softmax, each query on its own.

    Inputs are unit embeddings, so the products are the cosines the paper's beta applies to. A query whose best
    video is no bank caption's best keeps its plain cosines; the others get beta x cosine - log(bank mass).
    """
    videos = np.asarray(index.embeddings, dtype=np.float32)
    querybank = build_querybank(bank.astype(np.float32) @ videos.T, beta=QB_BETA)
    return dynamic_inverted_softmax(queries.astype(np.float32) @ videos.T, querybank)


def build_bank(index_dir: Path, captions_file: str, captions: list[str], weights, max_words: int = 32) -> str:
    """Encode ``captions`` with the index's model and store them as its querybank; returns a one-line summary."""
    from search.encode import index_model, text_embeddings
    from search.index import load_index

    index = load_index(index_dir)
    model = index_model(index, index_dir, weights, max_words)
    embeddings = text_embeddings(model, captions, max_words).float().cpu().numpy()
    save_bank(index_dir, embeddings, captions_file, index.settings.model.fingerprint)
    return f"querybank {index_dir / BANK_EMBEDDINGS}: {len(captions)} captions from {captions_file} (QB-Norm beta {QB_BETA:g})"
