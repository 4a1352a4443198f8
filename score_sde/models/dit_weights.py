"""DiT weights in the facebookresearch/DiT and diffusers layouts <-> this project's variables.

Pure functions of dicts of NumPy arrays (no file I/O), plus one reader:

    state_dict = load_reference_checkpoint(path)                  # find_model's choice (EMA)
    variables = params_from_reference(state_dict, net, (32, 32, 4))   # {'params', 'constants'}
    state_dict = reference_from_params(variables, net, (32, 32, 4))   # export, torch layouts
    variables = params_from_diffusers(diffusers_state_dict, net, (32, 32, 4))

The reference state dict (PyTorch layouts: Linear `weight` `[out, in]`, Conv2d `[out, in, kh,
kw]`) has, with D = hidden_size, p = patch_size, C = in_channels, T tokens:
`pos_embed` [1, T, D]; `x_embedder.proj.{weight [D, C, p, p], bias}`; `t_embedder.mlp.{0,2}`;
`y_embedder.embedding_table.weight` [num_classes (+1 null), D]; per block i
`blocks.{i}.attn.{qkv,proj}`, `blocks.{i}.mlp.{fc1,fc2}`, `blocks.{i}.adaLN_modulation.1`; and
`final_layer.{linear,adaLN_modulation.1}`. `num_heads` is not in the weights.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Mapping

import numpy as np

from score_sde.models import layers
from score_sde.models.dit import FREQUENCY_EMBEDDING_SIZE
from score_sde.models.dit import DiT
from score_sde.models.dit import sincos_pos_embed_2d

# Layout conversions: "linear" (torch [out, in] <-> kernel [in, out]), "bias" / "embedding" /
# "table" (the same array), "patch" (Conv2d [D, C, p, p] <-> kernel [p * p * C, D] with rows in
# (i, j, c) order).
KINDS = ("linear", "bias", "embedding", "table", "patch")


def _linear(prefix: str, path: tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...], str]]:
  return [(f"{prefix}.weight", "params", path + ("kernel",), "linear"),
          (f"{prefix}.bias", "params", path + ("bias",), "bias")]


def reference_layout(net: DiT, image_shape: tuple[int, int, int]
                     ) -> list[tuple[str, tuple[int, ...], str, tuple[str, ...], str]]:
  """The reference state dict of `net` on images `image_shape`, in the reference's key order.

  Args:
    net: the DiT (its shape fields; `num_heads` does not enter).
    image_shape: `(H, W, C)` of the inputs (latents for latent DiT).

  Returns:
    `[(key, torch_shape, collection, flax_path, kind)]`.

  Raises:
    ValueError: H or W not divisible by the patch size.
  """
  height, width, channels = image_shape
  gh, gw = net.grid(height, width)
  p, d = net.patch_size, net.hidden_size
  out = p * p * (2 * channels if net.learn_sigma else channels)
  hidden = int(d * net.mlp_ratio)
  shapes = {"pos_embed": (1, gh * gw, d),
            "x_embedder.proj.weight": (d, channels, p, p), "x_embedder.proj.bias": (d,),
            "t_embedder.mlp.0.weight": (d, FREQUENCY_EMBEDDING_SIZE), "t_embedder.mlp.0.bias": (d,),
            "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
            "final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            "final_layer.adaLN_modulation.1.bias": (2 * d,)}
  entries = [("pos_embed", layers.CONSTANTS, ("pos_embed",), "table"),
             ("x_embedder.proj.weight", "params", ("x_embedder", "kernel"), "patch"),
             ("x_embedder.proj.bias", "params", ("x_embedder", "bias"), "bias"),
             *_linear("t_embedder.mlp.0", ("t_embedder_mlp_0",)),
             *_linear("t_embedder.mlp.2", ("t_embedder_mlp_2",))]
  if net.num_classes > 0:
    rows = net.num_classes + int(net.has_null_class)
    shapes["y_embedder.embedding_table.weight"] = (rows, d)
    entries.append(("y_embedder.embedding_table.weight", "params", ("y_embedder", "embedding"),
                    "embedding"))
  for i in range(net.depth):
    block = f"blocks.{i}"
    for name, (n_out, n_in) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d),
                                "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden),
                                "adaLN_modulation.1": (6 * d, d)}.items():
      shapes[f"{block}.{name}.weight"], shapes[f"{block}.{name}.bias"] = (n_out, n_in), (n_out,)
      path = (f"blocks_{i}",) + {"adaLN_modulation.1": ("adaLN_modulation",)}.get(
          name, tuple(name.split(".")))
      entries += _linear(f"{block}.{name}", path)
  entries += [*_linear("final_layer.linear", ("final_layer_linear",)),
              *_linear("final_layer.adaLN_modulation.1", ("final_layer_adaLN_modulation",))]
  return [(key, shapes[key], collection, path, kind) for key, collection, path, kind in entries]


def infer_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The DiT fields a reference state dict fits (as far as its shapes tell; not num_heads).

  Returns:
    A dict with whichever of `hidden_size`, `in_channels`, `patch_size`, `depth`,
    `learn_sigma`, `mlp_ratio`, `num_classes` (assuming a null row, i.e.
    class_dropout_prob > 0) and `image_size` (square grid) the keys present determine.
  """
  shape = lambda key: tuple(np.shape(state_dict[key])) if key in state_dict else None
  fits: dict[str, Any] = {}
  proj = shape("x_embedder.proj.weight")
  if proj and len(proj) == 4:
    fits.update(hidden_size=proj[0], in_channels=proj[1], patch_size=proj[2])
  blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
  if blocks:
    fits["depth"] = max(blocks) + 1
  final = shape("final_layer.linear.weight")
  if final and proj and len(proj) == 4:
    fits["learn_sigma"] = final[0] == 2 * proj[1] * proj[2] ** 2
  fc1 = shape("blocks.0.mlp.fc1.weight")
  if fc1 and len(fc1) == 2:
    fits["mlp_ratio"] = fc1[0] / fc1[1]
  table = shape("y_embedder.embedding_table.weight")
  fits["num_classes"] = table[0] - 1 if table else 0
  pos = shape("pos_embed")
  if pos and len(pos) == 3 and "patch_size" in fits:
    side = int(round(pos[1] ** 0.5))
    if side * side == pos[1]:
      fits["image_size"] = side * fits["patch_size"]
  return fits


def _mismatch(problem: str, state_dict, net: DiT, image_shape) -> ValueError:
  """`problem` (naming the key and shapes), the network's fields and the fields that fit."""
  fits = ", ".join(f"{k}={v}" for k, v in infer_config(state_dict).items())
  return ValueError(
      f"DiT checkpoint {problem}; configured network: patch_size={net.patch_size}, "
      f"hidden_size={net.hidden_size}, depth={net.depth}, mlp_ratio={net.mlp_ratio}, "
      f"num_classes={net.num_classes}, class_dropout_prob={net.class_dropout_prob}, "
      f"learn_sigma={net.learn_sigma}, image_shape={tuple(image_shape)}; the checkpoint "
      f"fits: {fits}")


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return array.T
  if kind == "patch":  # [D, C, p, p] -> [p, p, C, D] -> [p * p * C, D]
    return array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0])
  return array


def _flax_shape(kind: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "linear":
    return torch_shape[::-1]
  if kind == "patch":
    d, c, p, _ = torch_shape
    return (p * p * c, d)
  return torch_shape


def _from_flax(array: np.ndarray, kind: str, torch_shape: tuple[int, ...]) -> np.ndarray:
  if kind == "linear":
    return array.T
  if kind == "patch":
    d, c, p, _ = torch_shape
    return array.reshape(p, p, c, d).transpose(3, 2, 0, 1)
  return array


def params_from_reference(state_dict: Mapping[str, Any], net: DiT,
                          image_shape: tuple[int, int, int]) -> dict[str, dict]:
  """This project's variables from a facebookresearch/DiT state dict.

  The stored `pos_embed` table goes to `constants` as it is (the reference uses the stored
  table, not a recomputed one).

  Args:
    state_dict: key -> array (NumPy or anything `np.asarray` takes), PyTorch layouts, as
      `load_reference_checkpoint` returns it (no `module.` prefix).
    net: the DiT to load into (its fields must fit the weights; `num_heads` is not checked).
    image_shape: `(H, W, C)` of the network's inputs.

  Returns:
    `{'params': ..., 'constants': {'pos_embed': [1, T, D]}}` of float32 NumPy arrays, the tree
    `net.init` gives.

  Raises:
    ValueError: a missing key, an array of the wrong shape, or a key the network has no place
      for: the first such key, both shapes and the config fields the checkpoint fits.
  """
  variables: dict[str, dict] = {"params": {}, layers.CONSTANTS: {}}
  layout = reference_layout(net, image_shape)
  known = {entry[0] for entry in layout}
  for key in state_dict:
    if key not in known:
      raise _mismatch(f"key {key!r} (shape {tuple(np.shape(state_dict[key]))}) has no place "
                      "in the configured network", state_dict, net, image_shape)
  for key, torch_shape, collection, path, kind in layout:
    if key not in state_dict:
      raise _mismatch(f"lacks key {key!r}, which the configured network needs with shape "
                      f"{torch_shape}", state_dict, net, image_shape)
    array = np.asarray(state_dict[key])
    if array.shape != torch_shape:
      raise _mismatch(f"key {key!r} has shape {array.shape}, the configured network needs "
                      f"{torch_shape}", state_dict, net, image_shape)
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.asarray(_to_flax(array, kind), np.float32)
  return variables


def reference_from_params(variables: Mapping[str, Any], net: DiT,
                          image_shape: tuple[int, int, int]) -> "collections.OrderedDict":
  """The facebookresearch/DiT state dict of `variables` (the inverse of
  `params_from_reference`), float32 NumPy arrays in PyTorch layouts, in the reference's key
  order; `torch_zip.save` writes it as a file `torch.load` and `find_model` read.

  Args:
    variables: `{'params': ..., 'constants': {'pos_embed': ...}}` of `net` (arrays of any
      kind `np.asarray` takes).
    net: the DiT.
    image_shape: `(H, W, C)` of the inputs.

  Raises:
    ValueError: a variable missing or of the wrong shape (its path and both shapes).
  """
  state_dict = collections.OrderedDict()
  for key, torch_shape, collection, path, kind in reference_layout(net, image_shape):
    node = variables.get(collection, {})
    for name in path:
      if not isinstance(node, Mapping) or name not in node:
        raise ValueError(f"DiT variables lack {collection}/{'/'.join(path)} (for {key!r})")
      node = node[name]
    array = np.asarray(node, np.float32)
    if array.shape != _flax_shape(kind, torch_shape):
      raise ValueError(f"DiT variable {collection}/{'/'.join(path)} has shape {array.shape}; "
                       f"the network needs {_flax_shape(kind, torch_shape)} (for {key!r})")
    state_dict[key] = np.ascontiguousarray(_from_flax(array, kind, torch_shape))
  return state_dict


# diffusers' DiTTransformer2DModel key -> reference key (per block i; the time / class embedder
# of block 0 is the model's, the other blocks' copies must equal it).
_DIFFUSERS_BLOCK = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj",
                    "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}
_DIFFUSERS_EMBEDDER = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                       "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
                       "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table"}
_DIFFUSERS_TOP = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
                  "proj_out_2": "final_layer.linear"}


def reference_from_diffusers(state_dict: Mapping[str, Any]) -> "collections.OrderedDict":
  """A diffusers `DiTTransformer2DModel` state dict in the facebookresearch/DiT layout
  (without `pos_embed`, which diffusers keeps as a non-persistent buffer).

  diffusers splits `qkv` into `to_q` / `to_k` / `to_v` (concatenated back here, in that
  order) and gives every block its own copy of the timestep and class embedders (all equal
  in a converted DiT; block 0's is used).

  Raises:
    ValueError: a key of no known place, or a block's embedder copy that differs from block
      0's (the first such key).
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  out = collections.OrderedDict()
  used = set()

  def take(src: str, dst: str) -> None:
    for suffix in (".weight", ".bias"):
      if src + suffix in sd:
        out[dst + suffix] = sd[src + suffix]
        used.add(src + suffix)

  for src, dst in _DIFFUSERS_TOP.items():
    take(src, dst)
  for src, dst in _DIFFUSERS_EMBEDDER.items():
    take(f"transformer_blocks.0.{src}", dst)
  blocks = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
  for i in blocks:
    prefix = f"transformer_blocks.{i}"
    for src, dst in _DIFFUSERS_BLOCK.items():
      take(f"{prefix}.{src}", f"blocks.{i}.{dst}")
    for suffix in (".weight", ".bias"):
      parts = [sd.get(f"{prefix}.attn1.to_{n}{suffix}") for n in "qkv"]
      if all(part is not None for part in parts):
        out[f"blocks.{i}.attn.qkv{suffix}"] = np.concatenate(parts, axis=0)
        used.update(f"{prefix}.attn1.to_{n}{suffix}" for n in "qkv")
    for src in _DIFFUSERS_EMBEDDER:
      for suffix in (".weight", ".bias"):
        key, first = f"{prefix}.{src}{suffix}", f"transformer_blocks.0.{src}{suffix}"
        if key in sd:
          if sd[key].shape != sd[first].shape or not np.array_equal(sd[key], sd[first]):
            raise ValueError(f"diffusers key {key!r} differs from {first!r}: this DiT shares "
                             "one timestep / class embedder across blocks")
          used.add(key)
  for key in sd:
    if key not in used:
      raise ValueError(f"diffusers DiT key {key!r} has no counterpart in the DiT layout")
  return out


def params_from_diffusers(state_dict: Mapping[str, Any], net: DiT,
                          image_shape: tuple[int, int, int]) -> dict[str, dict]:
  """This project's variables from a diffusers `DiTTransformer2DModel` state dict.

  The weights map exactly (`reference_from_diffusers`); the position table (not in diffusers'
  state dict) is recomputed. The networks are not identical: diffusers' timestep features use
  frequencies 10000^(-i/127) (`Timesteps(downscale_freq_shift=1)`) where the reference has
  10000^(-i/128), and its block LayerNorms default to eps 1e-5 (reference 1e-6), so its outputs
  differ slightly from the reference's and from this network's.

  Raises:
    ValueError: as `reference_from_diffusers` and `params_from_reference`.
  """
  reference = reference_from_diffusers(state_dict)
  height, width, _ = image_shape
  gh, gw = net.grid(height, width)
  reference["pos_embed"] = sincos_pos_embed_2d(net.hidden_size, gh, gw)[None].astype(np.float32)
  return params_from_reference(reference, net, image_shape)
