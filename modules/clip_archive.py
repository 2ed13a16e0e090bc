"""Reading OpenAI's TorchScript weight archives (``ViT-B-32.pt``) as plain tensors, without running their code."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch


class _ScriptObject:
    """Stands in for any ``__torch__.*`` class of a TorchScript archive: it keeps the pickled state and runs nothing
    (the archive's own ``__setstate__``, which is TorchScript code, is never looked at)."""

    def __setstate__(self, state) -> None:
        self.state = state


def _restore_type_tag(value, _type_name: str):
    """TorchScript tags typed containers (``Dict[str, Tensor]``) with their type; the value is all we need."""
    return value


# What a TorchScript ``data.pkl`` may refer to besides its own classes: the tensor rebuild functions, the empty
# ``OrderedDict`` of backward hooks, the container type tag, and the storage types. Anything else is refused before
# it is looked up.
_ARCHIVE_GLOBALS = {
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's ``data.pkl`` the way ``weights_only`` reads a plain file: tensors are rebuilt
    from the storages stored beside it in the zip, module objects become inert :class:`_ScriptObject` s."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, shapes_only: bool = False):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.shapes_only = archive, prefix, shapes_only

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) in _ARCHIVE_GLOBALS:
            return _ARCHIVE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # the storage reference below only needs its dtype
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a weights archive never needs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"storage {key} has no known storage type")
        name, nbytes = f"{self.prefix}/data/{key}", numel * torch.empty((), dtype=dtype).element_size()
        if self.shapes_only:  # the size from the zip's directory, the data left unread: a tensor on the meta device
            size, untyped = self.archive.getinfo(name).file_size, torch.UntypedStorage(nbytes, device="meta")
        else:
            raw = self.archive.read(name)
            size = len(raw)
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        if size != nbytes:
            raise pickle.UnpicklingError(f"storage {key} holds {size} bytes, expected {numel} {dtype} values")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _named_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of an unpickled module tree under its dotted attribute name (positions name the entries of a
    module whose state is a tuple)."""
    state = obj.state if isinstance(obj, _ScriptObject) else obj
    items = (
        state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value.detach()
        elif isinstance(value, (_ScriptObject, Mapping, list, tuple)):
            out.update(_named_tensors(value, name + "."))
    return out


def read_torchscript_archive(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (OpenAI's ``ViT-B-32.pt``) without running any of its code;
    ``shapes_only``: meta tensors, their stored sizes checked but their data not read.

    Differs from the original, which calls ``torch.jit.load``: that runs the archive's TorchScript (``__setstate__``
    methods) at load time, so a hostile file could act. Here only ``data.pkl`` is unpickled, with the restricted
    unpickler above. An archive made by tracing (OpenAI's) gives exactly ``torch.jit.load(path).state_dict()``.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(data_pkl) != 1:
            raise pickle.UnpicklingError("no data.pkl at the top of the archive")
        prefix = data_pkl[0].split("/")[0]
        if f"{prefix}/byteorder" in names and archive.read(f"{prefix}/byteorder").strip() not in (b"", b"little"):
            raise pickle.UnpicklingError("stored big-endian; only little-endian archives are read")
        root = _ArchiveUnpickler(archive.read(data_pkl[0]), archive, prefix, shapes_only).load()
    return _named_tensors(root)


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding TorchScript code (a ``torch.save`` file is a zip too, but has no ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl") for n in archive.namelist())
