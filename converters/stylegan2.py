"""NVIDIA StyleGAN2 / StyleGAN2-ADA network pickles -> `panda_jax.generators.stylegan2`.

Reads `G_ema` of a snapshot written by stylegan2-ada-pytorch (module
`training.networks`) or the stylegan3 repo (`training.networks_stylegan2`):
both have the same module tree and tensors, only some plain attributes differ,
so the options are taken from tensor shapes and the attributes both share.
Equalised-learning-rate gains (`weight_gain`, `bias_gain`, ToRGB's
`weight_gain`) are folded into the stored weights; PyTorch's `[o, i, kh, kw]`
kernels become `[kh, kw, i, o]`.
"""

from __future__ import annotations

import numpy as np

from converters import Source, nvidia
from converters.errors import ConversionError
from converters.safe_pickle import Record
from panda_jax.generators import layers

ARCH = "stylegan2"


def sniff(source: Source) -> bool:
  """A network pickle whose generator has StyleGAN2 synthesis blocks."""
  state = nvidia.generator_class_state(source)
  return state is not None and "block_resolutions" in state


def _same(values, what: str):
  values = list(values)
  if any(v != values[0] for v in values[1:]):
    raise ConversionError(f"unsupported StyleGAN2 options: {what} differs between layers")
  return values[0]


def mapping(rec: Record, c_dim: int) -> tuple[dict, dict]:
  """A MappingNetwork (StyleGAN2's and StyleGAN3's) -> `(config, params)`.

  `config` holds the `stylegan2.MappingConfig` options besides z/c/w dims,
  `params` the `stylegan2.Mapping` tree (`fcs_i`, `embed`, `w_avg`).
  """
  n = int(nvidia.attr(rec, "num_layers"))
  fcs = [nvidia.child(rec, f"fc{i}") for i in range(n)]
  params = {f"fcs_{i}": nvidia.dense(fc) for i, fc in enumerate(fcs)}
  if "w_avg" not in rec.state.get("_buffers", {}):
    raise ConversionError("mapping network has no w_avg (w_avg_beta=None): cannot truncate")
  params["w_avg"] = nvidia.tensor(rec, "w_avg")
  config = {
    "mapping_layers": n,
    "mapping_features": int(params["fcs_0"]["kernel"].shape[1]) if n > 1 else None,
    "mapping_activation": _same(
      (nvidia.attr(fc, "activation") for fc in fcs), "mapping activation"
    ),
  }
  if c_dim > 0:
    params["embed"] = nvidia.dense(nvidia.child(rec, "embed"))
    config["embed_features"] = int(params["embed"]["kernel"].shape[1])
  return config, params


def _layer(rec: Record) -> dict:
  """SynthesisLayer -> params."""
  params = {
    "affine": nvidia.dense(nvidia.child(rec, "affine")),
    "weight": nvidia.tensor(rec, "weight").transpose(2, 3, 1, 0),
    "bias": nvidia.tensor(rec, "bias"),
  }
  if nvidia.attr(rec, "use_noise"):
    params["noise_strength"] = nvidia.tensor(rec, "noise_strength")
    params["noise_const"] = nvidia.tensor(rec, "noise_const")
  return params


def _torgb(rec: Record) -> dict:
  return {
    "affine": nvidia.dense(nvidia.child(rec, "affine"), nvidia.attr(rec, "weight_gain")),
    "weight": nvidia.tensor(rec, "weight").transpose(2, 3, 1, 0),
    "bias": nvidia.tensor(rec, "bias"),
  }


def _synthesis(syn: Record, resolution: int) -> tuple[dict, dict]:
  resolutions = [int(r) for r in nvidia.attr(syn, "block_resolutions")]
  if resolutions != [2**k for k in range(2, int(np.log2(resolution)) + 1)]:
    raise ConversionError(f"unsupported block resolutions {resolutions}")
  blocks = [nvidia.child(syn, f"b{r}") for r in resolutions]
  arch = _same((nvidia.attr(b, "architecture") for b in blocks), "architecture")
  if arch not in ("skip", "orig"):
    raise ConversionError(
      f"unsupported StyleGAN2 generator architecture {arch!r} (supported: 'skip', 'orig')"
    )
  convs, torgbs = [], []
  for k, block in enumerate(blocks):
    if k > 0:
      conv0 = nvidia.child(block, "conv0")
      if nvidia.attr(conv0, "up") != 2:
        raise ConversionError("unsupported StyleGAN2 options: conv0 must upsample by 2")
      convs.append(conv0)
    convs.append(nvidia.child(block, "conv1"))
    if nvidia.has_child(block, "torgb"):
      torgbs.append(nvidia.child(block, "torgb"))
  filters = [nvidia.tensor(m, "resample_filter") for m in convs + blocks]
  f = filters[0]
  if f.ndim != 2 or any(g.shape != f.shape or not np.array_equal(g, f) for g in filters):
    raise ConversionError("unsupported StyleGAN2 options: resample filters differ")
  kernel = _same((nvidia.tensor(m, "weight").shape[2:] for m in convs), "kernel size")
  if (
    kernel[0] != kernel[1]
    or kernel[0] % 2 != 1
    or any(nvidia.attr(m, "padding") != kernel[0] // 2 for m in convs)
  ):
    raise ConversionError(f"unsupported StyleGAN2 kernel size {kernel}")
  clamp = _same((nvidia.attr(m, "conv_clamp") for m in convs + torgbs), "conv_clamp")
  params = {"const": nvidia.tensor(blocks[0], "const").transpose(1, 2, 0)}
  params.update({f"convs_{i}": _layer(m) for i, m in enumerate(convs)})
  params.update({f"torgbs_{j}": _torgb(m) for j, m in enumerate(torgbs)})
  config = {
    "channels": [int(nvidia.tensor(nvidia.child(b, "conv1"), "bias").shape[0]) for b in blocks],
    "activation": _same((nvidia.attr(m, "activation") for m in convs), "activation"),
    "kernel_size": int(kernel[0]),
    "use_noise": bool(_same((nvidia.attr(m, "use_noise") for m in convs), "use_noise")),
    "conv_clamp": None if clamp is None else float(clamp),
    "architecture": arch,
    "resample_filter": f.tolist(),
    "num_fp16_res": int(nvidia.attr(syn, "num_fp16_res", 0)),
  }
  return config, params


def convert(source: Source) -> tuple[str, dict, dict]:
  """`G_ema` of a StyleGAN2(-ADA) snapshot -> `("stylegan2", config, params)`."""
  g = nvidia.g_ema(source)
  config = {
    k: int(nvidia.attr(g, k)) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
  }
  syn_config, syn_params = _synthesis(nvidia.child(g, "synthesis"), config["img_resolution"])
  map_config, map_params = mapping(nvidia.child(g, "mapping"), config["c_dim"])
  for act in (syn_config["activation"], map_config["mapping_activation"]):
    if act not in layers.ACTIVATIONS:
      raise ConversionError(f"unsupported activation {act!r}")
  num_ws = int(nvidia.attr(g, "num_ws"))
  if num_ws != 2 * len(syn_config["channels"]):
    raise ConversionError(f"unexpected num_ws {num_ws}")
  config.update(syn_config)
  config.update(map_config)
  config["source"] = {
    "format": "nvidia-network-pickle",
    "init_kwargs": nvidia.jsonable(nvidia.attr(g, "_init_kwargs", {})),
  }
  return ARCH, config, {"mapping": map_params, "synthesis": syn_params}
