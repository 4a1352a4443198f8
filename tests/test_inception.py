"""The Flax FID Inception-v3 against pytorch-fid's own network on transplanted random weights.

Needs the `test` extra's torch (CPU), torchvision and pytorch-fid; skipped without them.
pytorch-fid's network is built by its own `InceptionV3` / `fid_inception_v3` code, with its
weight download replaced by a random state dict (BatchNorm statistics calibrated on a batch,
then perturbed), so resizing, normalization, the FID blocks and the pooling are all its own.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.io import inception_files, torch_zip
from score_sde.models import inception

torch = pytest.importorskip("torch")


def _import_pytorch_fid():
  # The PyPI torchvision wheel is built against CUDA torch: with the CPU torch its C
  # extension does not load and `import torchvision` fails while registering fake kernels
  # for two of its operators. Defining their schemas first lets the (pure Python) models load.
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive below)
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_pytorch_fid.keep = lib
    import sys
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
  return pytest.importorskip("pytorch_fid.inception")


def _random_fid_state_dict(fid_inception, seed: int = 0) -> dict:
  """A random state dict of pytorch-fid's FID Inception-v3 (built as `fid_inception_v3` does)."""
  torch.manual_seed(seed)
  net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  # Calibrate running statistics on one batch (momentum None: the running values become the
  # batch's), so activations keep a sensible scale through 90+ layers; then perturb them.
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None
  net.train()
  with torch.no_grad():
    net(torch.rand(2, 3, 299, 299) * 2 - 1)
    for bn in bns:
      bn.running_mean += 0.1 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt()
      bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.8, 1.25)
      bn.weight.uniform_(0.8, 1.2)
      bn.bias.normal_(0.0, 0.1)
    net.fc.bias.normal_(0.0, 0.1)
  return net.state_dict()


def _relative_error(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("in_size", [32, 28, 300, 512])
def test_resize_matches_torch_interpolate(in_size):
  torch_f = torch.nn.functional
  x = np.random.default_rng(in_size).random((2, in_size, in_size + 3, 3))
  expected = torch_f.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
  with jax.enable_x64():
    got = inception.resize_bilinear(jnp.asarray(x), 299)
  np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=0, atol=1e-12)


def test_torch_file_reader_both_formats_and_refuses_code(tmp_path):
  state = {"a.conv.weight": torch.randn(3, 2, 1, 5), "b": torch.arange(6).reshape(2, 3).t(),
           "c": torch.tensor(2.5, dtype=torch.float64), "d.num_batches_tracked": torch.tensor(7)}
  for legacy in (False, True):
    path = tmp_path / f"w{legacy}.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    got = inception_files.load_inception_variables(path)
    assert set(got) == set(state)
    for k, v in state.items():
      np.testing.assert_array_equal(got[k], v.numpy())
      assert got[k].dtype == v.numpy().dtype
  evil = tmp_path / "evil.pth"
  torch.save({"x": torch.zeros(1), "f": print}, evil)  # a pickled function: refused
  with pytest.raises(torch_zip.CheckpointFormatError, match=r"refusing to load .*print"):
    inception_files.load_inception_variables(evil)


def test_weights_file_constants_agree():  # io does not import models: the two copies match
  assert inception_files.WEIGHTS_FILENAME == inception.WEIGHTS_FILENAME
  assert inception_files.WEIGHTS_URL == inception.WEIGHTS_URL


def test_not_an_fid_inception_state_dict_is_refused():
  with pytest.raises(ValueError, match="not the FID Inception-v3"):
    inception.variables_from_state_dict({"fc.weight": np.zeros((10, 2048), np.float32),
                                         "fc.bias": np.zeros(10, np.float32)}, "w.pth")


def test_missing_weights_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth from https"):
    inception_files.load_inception_variables(tmp_path / "nope.pth")


@pytest.mark.slow
def test_flax_inception_equals_pytorch_fid_on_random_weights(tmp_path, monkeypatch):
  fid_inception = _import_pytorch_fid()
  state = _random_fid_state_dict(fid_inception)
  monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
  reference = fid_inception.InceptionV3([fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
  fc = fid_inception.fid_inception_v3().fc.eval()  # the same weights' classifier
  x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    pool_ref = reference(torch.from_numpy(x).permute(0, 3, 1, 2))[0].flatten(1)
    logits_ref = fc(pool_ref).numpy()
    pool_ref = pool_ref.numpy()

  path = tmp_path / inception.WEIGHTS_FILENAME
  torch.save(state, path)
  variables = inception.variables_from_state_dict(inception_files.load_inception_variables(path))
  pool, logits = jax.jit(inception.InceptionV3().apply)(variables, jnp.asarray(x))
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert _relative_error(pool, pool_ref) < 1e-4
  assert _relative_error(logits, logits_ref) < 1e-4
  assert np.std(pool_ref) > 1e-3 * np.max(np.abs(pool_ref))  # not a degenerate comparison
