"""Read and write PyTorch's zip checkpoint format without torch and without running pickles.

`torch.save(obj, path)` (torch >= 1.6) writes a zip archive: `<name>/data.pkl` holds `obj`
pickled, with every tensor replaced by a call `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` whose storage is a *persistent id* naming a record
`<name>/data/<key>` of raw little-endian bytes. A pickle can call any importable function, so
unpickling an untrusted checkpoint runs arbitrary code; here the unpickler resolves only an
allow-list of names (the tensor rebuild functions, the storage types, `OrderedDict`) to
functions of this module that build numpy arrays, and refuses every other global. Plain
containers (dict, list, tuple, str, numbers, bool, None) need no globals.

`RestrictedUnpickler(file, allowed, where)` is that mechanism for any pickle: every reader of
pickled files in the project (these checkpoints, the CIFAR-10 batches) goes through it with
its own allow-list.

    obj = load(path)     # tensors -> np.ndarray, everything else plain Python (also reads
                         # torch's legacy pre-1.6 format)
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
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from score_sde.io import files

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


class RestrictedUnpickler(pickle.Unpickler):
  """A `pickle.Unpickler` that resolves only the globals of an allow-list.

  Every global a pickle names (`GLOBAL` / `STACK_GLOBAL`: the functions and classes it will
  call) is looked up in `allowed`; any other one raises `error` before anything is called.
  Persistent ids go to `persistent_load`, or are refused when it is None.

  Args:
    file: a binary file positioned at the pickle.
    allowed: `(module, name) -> the object returned for it`.
    where: the file, for error messages.
    what: what such a file may hold, for the refusal message.
    persistent_load: `pid -> object`, or None to refuse persistent ids.
    error: the exception class raised on a refusal.
    **kwargs: `pickle.Unpickler`'s (e.g. `encoding="bytes"`).
  """

  def __init__(self, file, allowed: Mapping[tuple[str, str], Any], where: str, *,
               what: str = "a checkpoint may hold only tensors and plain containers",
               persistent_load: Callable[[Any], Any] | None = None,
               error: type[Exception] | None = None, **kwargs):
    super().__init__(file, **kwargs)
    self._allowed, self._where, self._what = allowed, where, what
    self._persistent, self._error = persistent_load, error or CheckpointFormatError

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise self._error(
        f"{self._where}: refusing to load the pickled global '{module}.{name}': {self._what} "
        f"(allowed globals: {sorted('.'.join(k) for k in self._allowed)})")

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent is None:
      raise self._error(f"{self._where}: refusing the persistent id {pid!r}: {self._what}")
    return self._persistent(pid)


def _storage_pid(pid: Any, path: str) -> tuple[_StorageType, str, int]:
  """`('storage', storage_type, key, location, numel[, view])` -> (type, key, numel)."""
  if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage",
                                                                             b"storage")
      or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], (str, bytes))
      or not isinstance(pid[4], int) or isinstance(pid[4], bool) or pid[4] < 0):
    raise CheckpointFormatError(f"{path}: unexpected persistent id {pid!r}")
  if len(pid) == 6 and pid[5] is not None:
    raise CheckpointFormatError(f"{path}: storage views (persistent id {pid!r}) are not "
                                "supported")
  key = pid[2].decode("ascii", "replace") if isinstance(pid[2], bytes) else pid[2]
  return pid[1], key, pid[4]


def _read_storage(raw: bytes, storage_type: _StorageType, numel: int, little: bool, key: str,
                  path: str) -> np.ndarray:
  dtype = storage_type.dtype.newbyteorder("<" if little else ">")
  if len(raw) != numel * dtype.itemsize:
    raise CheckpointFormatError(f"{path}: storage {key} has {len(raw)} bytes, "
                                f"expected {numel} x {dtype.itemsize}")
  return np.frombuffer(raw, dtype).astype(storage_type.dtype)


def _unpickle(unpickler: RestrictedUnpickler, path: str, what: str) -> Any:
  """`unpickler.load()`; any failure but a refusal -> CheckpointFormatError naming `what`."""
  try:
    return unpickler.load()
  except CheckpointFormatError:
    raise
  except Exception as e:  # a malformed pickle: bad opcodes, truncation, wrong arguments
    raise CheckpointFormatError(f"{path}: unreadable pickle in {what}: "
                                f"{type(e).__name__}: {e}") from None


def _load_zip(path: str) -> Any:
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
    storages: dict[str, np.ndarray] = {}

    def storage(pid: Any) -> np.ndarray:
      storage_type, key, numel = _storage_pid(pid, path)
      if key not in storages:
        record = f"{prefix}data/{key}"
        try:
          raw = archive.read(record)
        except KeyError:
          raise CheckpointFormatError(f"{path}: missing storage record {record}") from None
        storages[key] = _read_storage(raw, storage_type, numel, byteorder == "little", key,
                                      path)
      return storages[key]

    unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), _ALLOWED_GLOBALS,
                                    path, persistent_load=storage)
    return _unpickle(unpickler, path, pickles[0])


# The legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in
# a row -- this magic number, the protocol version, a system-info dict, the object (its
# storages as persistent ids), the sorted list of storage keys -- then, per key in that
# order, the storage: its element count as an int64 and its raw elements, both in the
# writer's byte order (`sys_info['little_endian']`).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


def _plain_pickle(f, path: str, what: str) -> Any:
  """One pickle of plain data (no globals, no persistent ids) from `f`."""
  return _unpickle(RestrictedUnpickler(f, {}, path, what=f"{what} is plain data"), path, what)


def _is_legacy(path: str) -> bool:
  with open(path, "rb") as f:
    if f.read(1) != b"\x80":  # a pickle's PROTO opcode
      return False
    f.seek(0)
    try:
      return _plain_pickle(f, path, "the magic number") == LEGACY_MAGIC_NUMBER
    except CheckpointFormatError:
      return False


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    _plain_pickle(f, path, "the magic number")
    version = _plain_pickle(f, path, "the protocol version")
    if version != LEGACY_PROTOCOL_VERSION:
      raise CheckpointFormatError(f"{path}: legacy torch checkpoint of protocol version "
                                  f"{version!r}; only {LEGACY_PROTOCOL_VERSION} is read")
    sys_info = _plain_pickle(f, path, "the system info")
    if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian", True),
                                                        bool):
      raise CheckpointFormatError(f"{path}: bad system info {sys_info!r}")
    little = sys_info.get("little_endian", True)
    start = f.tell()
    # Pass 1: the storages' types and sizes, which the data after the pickles do not repeat.
    # Same allow-list (so a refusal happens here already), tensors not yet built.
    found: dict[str, tuple[_StorageType, int]] = {}

    def record(pid: Any) -> None:
      storage_type, key, numel = _storage_pid(pid, path)
      found.setdefault(key, (storage_type, numel))

    skeleton = {k: (lambda *_: None) if k[0] == "torch._utils" else v
                for k, v in _ALLOWED_GLOBALS.items()}
    _unpickle(RestrictedUnpickler(f, skeleton, path, persistent_load=record), path,
              "the object")
    keys = _plain_pickle(f, path, "the storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys):
      raise CheckpointFormatError(f"{path}: bad list of storage keys")
    keys = [k.decode("ascii", "replace") if isinstance(k, bytes) else k for k in keys]
    if set(keys) != set(found):
      raise CheckpointFormatError(f"{path}: the storage keys {sorted(keys)} are not those "
                                  f"the object uses, {sorted(found)}")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
      storage_type, numel = found[key]
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointFormatError(f"{path}: truncated before storage {key}")
      (size,) = struct.unpack("<q" if little else ">q", head)
      if size != numel:
        raise CheckpointFormatError(f"{path}: storage {key} holds {size} elements, the "
                                    f"object expects {numel}")
      raw = f.read(numel * storage_type.dtype.itemsize)
      storages[key] = _read_storage(raw, storage_type, numel, little, key, path)
    # Pass 2: the object, with its tensors.
    f.seek(start)
    unpickler = RestrictedUnpickler(
        f, _ALLOWED_GLOBALS, path, persistent_load=lambda pid: storages[_storage_pid(pid,
                                                                                   path)[1]])
    return _unpickle(unpickler, path, "the object")


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` checkpoint without torch and without executing pickled code.

  Reads both of torch's formats: the zip archive (`torch.save` since torch 1.6) and the
  legacy sequential one (older torch, or `_use_new_zipfile_serialization=False`; e.g.
  pytorch-fid's Inception weights).

  Args:
    path: the `.pth` / `.pt` file.

  Returns:
    The saved object with every tensor as a numpy array (same dtype and shape; bfloat16 as
    `jnp.bfloat16`) and every container as plain Python (`OrderedDict` stays one; an
    `argparse.Namespace` becomes a `types.SimpleNamespace` of the same fields).

  Raises:
    FileNotFoundError: no such file.
    CheckpointFormatError: not a torch checkpoint in either format, a malformed one (e.g. a
      tensor reaching outside its storage, storage views of the legacy format), or a pickle
      that references anything but the tensor-rebuild functions, storage types,
      `OrderedDict` and `argparse.Namespace`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  if _is_legacy(path):
    return _load_legacy(path)
  raise CheckpointFormatError(
      f"{path} is not a PyTorch zip checkpoint (the format of torch.save since torch 1.6), "
      "nor one of torch's legacy sequential format")


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


def save(obj: Any, path: str | os.PathLike, archive_name: str | None = None, *,
         overwrite: bool = False, flag: str | None = None) -> None:
  """Writes `obj` in `torch.save`'s zip format; arrays become tensors.

  The result is what `torch.save` writes for the same tensors (protocol-2 `data.pkl`,
  little-endian storage records aligned to 64 bytes), so `torch.load(path,
  weights_only=True)` and `load` read it.

  Args:
    obj: nested dict / OrderedDict / list / tuple of arrays, str, int, float, bool, None.
    path: the file to write.
    archive_name: the folder name inside the zip (default: the file name's stem).
    overwrite: replace an existing `path` (otherwise FileExistsError naming `flag`). The
      file is written atomically (`files.write_atomic`): an interrupt leaves the old file
      or none, never a torn one.

  Raises:
    TypeError: `obj` holds something else (or an array dtype torch has no storage for).
    FileExistsError: `path` exists and `overwrite` is False.
  """
  files.check_new(path, overwrite=overwrite, flag=flag)
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

  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
      for record, data in records:
        info = zipfile.ZipInfo(f"{name}/{record}", date_time=(1980, 1, 1, 0, 0, 0))
        # Pad the local header's extra field so the data start at a multiple of 64 bytes.
        header = 30 + len(info.filename.encode()) + 4
        pad = -(f.tell() + header) % 64
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        archive.writestr(info, data)

  files.write_atomic(path, write, overwrite=overwrite, flag=flag)
