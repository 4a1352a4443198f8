"""Read and write PyTorch's zip checkpoint format without torch and without running pickles.

`torch.save(obj, path)` (torch >= 1.6) writes a zip archive: `<name>/data.pkl` holds `obj`
pickled, with every tensor replaced by a call `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` whose storage is a *persistent id* naming a record
`<name>/data/<key>` of raw little-endian bytes. A pickle can call any importable function, so
unpickling an untrusted checkpoint runs arbitrary code; here the unpickler resolves only an
allow-list of names (the tensor rebuild functions, the storage types, `OrderedDict`) to
functions of this module that build numpy arrays, and refuses every other global. Plain
containers (dict, list, tuple, str, numbers, bool, None) need no globals.

    obj = load(path)     # tensors -> np.ndarray, everything else plain Python
    save(obj, path)      # np.ndarray -> tensors; torch.load(path, weights_only=True) reads it
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import types
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np

# Storage type name (as pickled: `torch.<Name>`) -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("float64"),
    "FloatStorage": np.dtype("float32"),
    "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": np.dtype(jnp.bfloat16),
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
}
_DTYPE_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


class CheckpointFormatError(ValueError):
  """The file is not a PyTorch zip checkpoint, or it holds more than tensors and plain
  containers (e.g. a pickled call of an arbitrary function)."""


# --- reading ---------------------------------------------------------------------------------


class _StorageType:
  """Stand-in for `torch.<Name>Storage` in a persistent id: only carries the dtype."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride, *_unused
                    ) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2` for numpy: a copy of the strided view of `storage`.

  Raises:
    CheckpointFormatError: arguments of the wrong type, or a view that reaches outside the
      storage (which a crafted file could use to read foreign memory).
  """
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CheckpointFormatError(f"tensor rebuilt from a non-storage {type(storage).__name__}")
  size, stride = tuple(size), tuple(stride)
  ints = (storage_offset, *size, *stride)
  if (len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool)
                                          for v in ints) or min(ints, default=0) < 0):
    raise CheckpointFormatError(f"bad tensor layout: offset {storage_offset!r}, size "
                                f"{size!r}, stride {stride!r}")
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise CheckpointFormatError(f"tensor of size {size}, stride {stride}, offset "
                                f"{storage_offset} reaches element {last} of a storage of "
                                f"{storage.size}")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad=None, backward_hooks=None, *_unused
                       ) -> np.ndarray:
  """`torch._utils._rebuild_parameter`: an `nn.Parameter` is its data here."""
  del requires_grad, backward_hooks
  return data


# (module, name) -> what the unpickler returns for it. Nothing else is ever resolved.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # The `args` of a facebookresearch/DiT training checkpoint: read as plain data (pickle
    # builds it with NEWOBJ + BUILD, i.e. an empty object whose __dict__ is then filled).
    ("argparse", "Namespace"): types.SimpleNamespace,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip archive; tensors become numpy arrays."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str,
               path: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise CheckpointFormatError(
        f"{self._path}: refusing to load the pickled global '{module}.{name}': a checkpoint "
        "may hold only tensors and plain containers (allowed globals: "
        f"{sorted('.'.join(k) for k in _ALLOWED_GLOBALS)})")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)):
      raise CheckpointFormatError(f"{self._path}: unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      record = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise CheckpointFormatError(f"{self._path}: missing storage record {record}") from None
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      if len(raw) != numel * dtype.itemsize:
        raise CheckpointFormatError(f"{self._path}: storage {key} has {len(raw)} bytes, "
                                    f"expected {numel} x {dtype.itemsize}")
      self._storages[key] = np.frombuffer(raw, dtype).astype(storage_type.dtype)
    return self._storages[key]


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` zip checkpoint without torch and without executing pickled code.

  Args:
    path: the `.pth` / `.pt` file.

  Returns:
    The saved object with every tensor as a numpy array (same dtype and shape; bfloat16 as
    `jnp.bfloat16`) and every container as plain Python (`OrderedDict` stays one; an
    `argparse.Namespace` becomes a `types.SimpleNamespace` of the same fields).

  Raises:
    FileNotFoundError: no such file.
    CheckpointFormatError: not a torch zip archive (e.g. the legacy pre-1.6 format, or not a
      checkpoint at all), a malformed archive, or a pickle that references anything but the
      tensor-rebuild functions, storage types, `OrderedDict` and `argparse.Namespace`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}")
  if not zipfile.is_zipfile(path):
    raise CheckpointFormatError(
        f"{path} is not a PyTorch zip checkpoint (the format of torch.save since torch 1.6); "
        "if it was written by an older torch, re-save it with a current one")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise CheckpointFormatError(f"{path} is a zip file but not a PyTorch checkpoint: "
                                  f"expected one '<name>/data.pkl', found {pickles or 'none'}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byteorder {byteorder!r}")
    unpickler = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, byteorder,
                                     path)
    try:
      return unpickler.load()
    except CheckpointFormatError:
      raise
    except Exception as e:  # a malformed pickle: bad opcodes, truncation, wrong arguments
      raise CheckpointFormatError(f"{path}: unreadable pickle in {pickles[0]}: "
                                  f"{type(e).__name__}: {e}") from None


# --- writing ---------------------------------------------------------------------------------


class _PickleWriter:
  """Emits protocol-2 pickle opcodes for plain containers and arrays (as torch tensors).

  Written by hand rather than with `pickle.Pickler` so that tensors can name
  `torch._utils._rebuild_tensor_v2` without torch being importable.
  """

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def _global(self, module: str, name: str) -> None:
    self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def write(self, obj: Any) -> None:
    w = self.out.write
    if obj is None:
      w(b"N")
    elif obj is True or obj is False:
      w(b"\x88" if obj else b"\x89")
    elif isinstance(obj, (int, np.integer)):
      obj = int(obj)
      if 0 <= obj < 256:
        w(b"K" + struct.pack("<B", obj))
      elif 0 <= obj < 65536:
        w(b"M" + struct.pack("<H", obj))
      elif -2**31 <= obj < 2**31:
        w(b"J" + struct.pack("<i", obj))
      else:
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        w(b"\x8a" + struct.pack("<B", len(raw)) + raw)
    elif isinstance(obj, (float, np.floating)):
      w(b"G" + struct.pack(">d", float(obj)))
    elif isinstance(obj, str):
      raw = obj.encode("utf-8")
      w(b"X" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(obj, np.ndarray):
      self._tensor(obj)
    elif isinstance(obj, tuple):
      w(b"(")
      for item in obj:
        self.write(item)
      w(b"t")
    elif isinstance(obj, list):
      w(b"](")
      for item in obj:
        self.write(item)
      w(b"e")
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self._global("collections", "OrderedDict")
        w(b")R")
      else:
        w(b"}")
      w(b"(")
      for key, value in obj.items():
        self.write(key)
        self.write(value)
      w(b"u")
    else:
      raise TypeError(f"cannot write {type(obj).__name__} to a torch checkpoint; only "
                      "arrays and plain containers")

  def _tensor(self, array: np.ndarray) -> None:
    # np.asarray, not np.ascontiguousarray: the latter turns 0-d arrays into 1-d ones.
    array = np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C")
    if array.dtype not in _DTYPE_STORAGES:
      raise TypeError(f"no torch storage type for dtype {array.dtype}; valid: "
                      f"{sorted(str(d) for d in _DTYPE_STORAGES)}")
    key = str(len(self.storages))
    self.storages.append(array)
    w = self.out.write
    self._global("torch._utils", "_rebuild_tensor_v2")
    w(b"(")  # the arguments
    w(b"(")  # the persistent id of the storage
    self.write("storage")
    self._global("torch", _DTYPE_STORAGES[array.dtype])
    self.write(key)
    self.write("cpu")
    self.write(array.size)
    w(b"tQ")
    self.write(0)  # storage offset
    self.write(tuple(array.shape))
    strides, step = [], 1
    for n in reversed(array.shape):
      strides.insert(0, step)
      step *= n
    self.write(tuple(strides))
    self.write(False)  # requires_grad
    self._global("collections", "OrderedDict")
    w(b")R")  # backward hooks
    w(b"tR")


def save(obj: Any, path: str | os.PathLike, archive_name: str | None = None) -> None:
  """Writes `obj` in `torch.save`'s zip format; arrays become tensors.

  The result is what `torch.save` writes for the same tensors (protocol-2 `data.pkl`,
  little-endian storage records aligned to 64 bytes), so `torch.load(path,
  weights_only=True)` and `load` read it.

  Args:
    obj: nested dict / OrderedDict / list / tuple of arrays, str, int, float, bool, None.
    path: the file to write.
    archive_name: the folder name inside the zip (default: the file name's stem).

  Raises:
    TypeError: `obj` holds something else (or an array dtype torch has no storage for).
  """
  path = os.fspath(path)
  name = archive_name or os.path.splitext(os.path.basename(path))[0] or "archive"
  writer = _PickleWriter()
  writer.out.write(b"\x80\x02")
  writer.write(obj)
  writer.out.write(b".")
  records = [("data.pkl", writer.out.getvalue()), ("byteorder", b"little")]
  records += [(f"data/{i}", a.astype(a.dtype.newbyteorder("<")).tobytes())
              for i, a in enumerate(writer.storages)]
  records += [("version", b"3\n"), (".format_version", b"1"), (".storage_alignment", b"64")]
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
    for record, data in records:
      info = zipfile.ZipInfo(f"{name}/{record}", date_time=(1980, 1, 1, 0, 0, 0))
      # Pad the local header's extra field so the data start at a multiple of 64 bytes.
      header = 30 + len(info.filename.encode()) + 4
      pad = -(f.tell() + header) % 64
      info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
      archive.writestr(info, data)
