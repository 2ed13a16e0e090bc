"""The frame cache's reader: what save_cached wrote comes back bit for bit, straight into the caller's array, and
anything else is a miss."""

from __future__ import annotations

import io

import numpy as np
import pytest

from dataloaders.frame_cache import read_cached, save_cached

SIZE = 8


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_reads_what_save_cached_wrote_into_the_callers_array(tmp_path, n):
    path = str(tmp_path / "ab" / "entry.npy")
    frames = _frames(n)
    assert save_cached(path, frames)
    out = np.full((5, 3, SIZE, SIZE), 77, dtype=np.uint8)
    assert read_cached(path, out) == n
    assert np.array_equal(out[:n], frames)
    assert (out[n:] == 77).all()  # the rows past n are the caller's: left as they were
    assert np.array_equal(np.load(path, allow_pickle=False), frames)  # still a plain .npy file


def test_order_places_each_frame_as_indexing_would(tmp_path):
    path = str(tmp_path / "entry.npy")
    frames = _frames(4)
    save_cached(path, frames)
    for order in ([3, 2, 1, 0], [2, 0, 3, 1], [0, 1, 2, 3]):
        seen = []
        out = np.zeros((6, 3, SIZE, SIZE), dtype=np.uint8)
        assert read_cached(path, out, lambda n, order=order, seen=seen: seen.append(n) or np.array(order)) == 4
        assert seen == [4] and np.array_equal(out[:4], frames[order])


def _npy(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        b"not an array",
        b"",
        _npy(_frames(3).astype(np.int16)),  # another dtype
        _npy(np.asfortranarray(_frames(3))),  # Fortran order
        _npy(_frames(3)[:, :, :, :4].copy()),  # another frame size
        _npy(_frames(3).reshape(3, 3 * SIZE * SIZE)),  # another rank
        _npy(_frames(7)),  # more frames than the sample keeps
        _npy(_frames(0)),  # no frame
        _npy(_frames(3))[:-1],  # cut short
    ],
    ids=["garbage", "empty", "int16", "fortran", "size", "rank", "too-many", "none", "truncated"],
)
def test_anything_else_is_a_miss_and_draws_no_order(tmp_path, content):
    path = tmp_path / "entry.npy"
    path.write_bytes(content)
    out = np.zeros((5, 3, SIZE, SIZE), dtype=np.uint8)

    def order(n):
        raise AssertionError("order drawn for an entry that is not used")

    assert read_cached(str(path), out, order) is None
    assert read_cached(str(tmp_path / "absent.npy"), out) is None


def test_header_is_parsed_without_literal_eval(tmp_path, monkeypatch):
    """The header this numpy's np.save writes is read by the module's own parser (otherwise every read would miss
    and the cache would be rewritten forever)."""
    import ast

    path = str(tmp_path / "entry.npy")
    save_cached(path, _frames(2))
    monkeypatch.setattr(ast, "literal_eval", lambda *a: pytest.fail("ast.literal_eval called"))
    assert read_cached(path, np.zeros((2, 3, SIZE, SIZE), dtype=np.uint8)) == 2
