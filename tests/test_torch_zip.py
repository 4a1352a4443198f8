"""torch_zip's legacy-format branch (torch < 1.6, `_use_new_zipfile_serialization=False`,
the format pytorch-fid's weights may be in): bit-exact against torch's own writer, and the
same refusals as the zip format. Needs the CPU torch of the `test` extra."""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from score_sde.io import torch_zip

torch = pytest.importorskip("torch")


def _bits(t) -> np.ndarray:
  """The raw bits of a torch tensor as an unsigned-integer numpy array."""
  width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
  return t.contiguous().view(width).numpy() if t.dtype != torch.bool else t.numpy()


def test_legacy_format_reads_torch_save_bit_exactly(tmp_path):
  g = torch.Generator().manual_seed(0)
  weight = torch.randn(3, 2, 1, 5, generator=g)
  weight.view(-1)[0] = float("nan")  # NaN bits survive
  state = collections.OrderedDict({
      "a.conv.weight": weight,
      "b": torch.arange(6).reshape(2, 3).t(),  # non-contiguous: stride (1, 3)
      "c": torch.tensor(2.5, dtype=torch.float64),  # 0-d
      "d.num_batches_tracked": torch.tensor(7),
      "h": torch.randn(4, generator=g).half(),
      "bf": torch.randn(3, generator=g).bfloat16(),
      "i8": torch.tensor([-3, 4], dtype=torch.int8),
      "mask": torch.tensor([True, False, True]),
      "empty": torch.zeros(0, 3),
      "shared": weight[1],  # a view into another tensor's storage, at an offset
  })
  path = tmp_path / "legacy.pth"
  torch.save(state, path, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(path)  # really the legacy format
  got = torch_zip.load(path)
  assert isinstance(got, collections.OrderedDict) and list(got) == list(state)
  for key, tensor in state.items():
    assert got[key].shape == tuple(tensor.shape), key
    assert str(got[key].dtype) == str(tensor.dtype).removeprefix("torch."), key
    want = _bits(tensor)
    np.testing.assert_array_equal(np.ascontiguousarray(got[key]).view(want.dtype), want,
                                  err_msg=key)


def _legacy_bytes(main_pickle: bytes, keys: list, storages: list[bytes]) -> bytes:
  out = io.BytesIO()
  for header in (torch_zip.LEGACY_MAGIC_NUMBER, torch_zip.LEGACY_PROTOCOL_VERSION,
                 {"protocol_version": 1001, "little_endian": True,
                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
    pickle.dump(header, out, protocol=2)
  out.write(main_pickle)
  pickle.dump(keys, out, protocol=2)
  for raw in storages:
    out.write(raw)
  return out.getvalue()


def test_legacy_format_refuses_os_system_and_runs_nothing(tmp_path):
  marker, control = tmp_path / "marker", tmp_path / "control"

  def payload(target) -> bytes:  # GLOBAL os.system, called on one string
    command = f"touch {target}".encode()
    return b"\x80\x02cos\nsystem\n(X" + len(command).to_bytes(4, "little") + command + b"tR."

  pickle.loads(payload(control))  # the payload is live: an unrestricted unpickler runs it
  assert control.exists()
  path = tmp_path / "evil.pth"
  path.write_bytes(_legacy_bytes(payload(marker), [], []))
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"refusing .*'os\.system'"):
    torch_zip.load(path)
  assert not marker.exists()


class _Storage:
  """Stands for a storage of 4 float32 elements in a hand-made legacy pickle."""


class _Tensor:
  """Pickles as torch's tensor rebuild call with a chosen layout."""

  def __init__(self, size, stride, offset=0):
    self.args = (_Storage(), offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args


class _LegacyPickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", torch.FloatStorage, "0", "cpu", 4, None)
    return None


def _hand_made(tmp_path, obj, numel=4) -> os.PathLike:
  buf = io.BytesIO()
  _LegacyPickler(buf, protocol=2).dump(obj)
  data = np.arange(4, dtype="<f4").tobytes()
  path = tmp_path / "hand.pth"
  path.write_bytes(_legacy_bytes(buf.getvalue(), ["0"], [numel.to_bytes(8, "little") + data]))
  return path


def test_legacy_format_keeps_the_tensor_bounds_checks(tmp_path):
  # A well-formed hand-made file reads (so the failures below are the layouts' own) ...
  good = torch_zip.load(_hand_made(tmp_path, {"w": _Tensor((2, 2), (1, 2))}))
  np.testing.assert_array_equal(good["w"], np.array([[0, 2], [1, 3]], np.float32))
  # ... one reaching past the 4-element storage is refused, like in the zip format,
  with pytest.raises(torch_zip.CheckpointFormatError, match="reaches element 4"):
    torch_zip.load(_hand_made(tmp_path, {"w": _Tensor((2, 2), (2, 1), offset=1)}))
  with pytest.raises(torch_zip.CheckpointFormatError, match="bad tensor layout"):
    torch_zip.load(_hand_made(tmp_path, {"w": _Tensor((2,), (-1,), offset=3)}))
  # ... and so is a storage record whose size disagrees with its persistent id.
  with pytest.raises(torch_zip.CheckpointFormatError, match="holds 3 elements"):
    torch_zip.load(_hand_made(tmp_path, {"w": _Tensor((2,), (1,))}, numel=3))


def test_one_unpickler_for_other_pickles_with_its_own_allow_list(tmp_path):
  allowed = {("collections", "OrderedDict"): collections.OrderedDict}
  raw = pickle.dumps(collections.OrderedDict(a=1), protocol=2)
  assert torch_zip.RestrictedUnpickler(io.BytesIO(raw), allowed, "x").load() == {"a": 1}
  with pytest.raises(pickle.UnpicklingError, match=r"^f\.pkl: refusing to load the pickled "
                     r"global 'collections\.OrderedDict': .*allowed globals: \[\]"):
    torch_zip.RestrictedUnpickler(io.BytesIO(raw), {}, "f.pkl",
                                  error=pickle.UnpicklingError).load()
