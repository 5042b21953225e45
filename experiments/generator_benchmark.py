r"""Generator speed: each JAX port against a PyTorch original, on this CPU (issue 22, item 1).

Times `generate` (synthesis from the latents: W+ codes or z) and `split` at a
middle layer (`(num_layers + 1) // 2`: feature extraction, what PandA calls
most) for batches 1, 8, 32, at the fixture configuration and at a realistic one.

  python -m experiments.generator_benchmark --out=docs/benchmarks/generators_cpu.json
  python -m experiments.generator_benchmark --quick --families=dcgan --out=/tmp/q.json

Protocol: the torch side runs in its own process (`torch.set_num_threads(N)`, N =
the cores JAX sees, `torch.no_grad()`, eval mode), driven line by line over a
pipe so that repetitions interleave: round r times one JAX call, then one torch
call, of the same case. JAX functions are jitted and compiled (one untimed call)
before timing; torch gets one untimed call too. Min and median per side; the
ratio is torch median / JAX median (> 1: JAX faster). Both sides see the same
latents and their outputs are compared (`max_rel_diff`, max |jax - torch| /
max |torch|), so a timing is never of a wrong network.

The torch originals:
- dcgan: the PyTorch DCGAN tutorial's generator (`nn.Sequential` of
  ConvTranspose2d/BatchNorm2d/ReLU, as `tests/fixtures/make_dcgan.py`), loading
  the checkpoint file itself (`torch.load`); fixture = tests/fixtures/dcgan,
  realistic = gan-face-generate's 64x64 weights (`--dcgan_weights`).
- stylegan2: a torch transcription of the official network's inference path on
  CPU, written here (the official code is under a non-commercial licence): fused
  modulated convs as one grouped conv per layer, upsampling convs as a grouped
  stride-2 transposed conv then the separable [1,3,3,1] FIR filter as two
  depthwise convs (upfirdn2d's reference path), skip ToRGB. It loads the
  converted parameters (`params.npz` written here) and is checked against the
  JAX port on every case (`max_rel_diff`), which the fixtures tie to the
  official code. Fixture = tests/fixtures/stylegan2 (converted from its pickle);
  realistic = FFHQ-256 widths (stylegan2-ada cbase 16384, cmax 512: 512 x 4,
  256, 128, 64; w_dim 512; 8 mapping layers), random weights (no conversion
  step: the parameters are drawn in the converted layout).
- stylegan, pggan: genforce's synthesis networks (what the PandA repo loads), as
  torch ops the way genforce computes them, written here: ProGAN's pixel norm,
  4x4 dense start (a matmul), nearest 2x + 3x3 conv; StyleGAN v1's constant,
  nearest 2x + 3x3 conv below 128 px and the fused stride-2 transposed 4x4 conv
  from 128 px (genforce's `fused_scale="auto"`), the [1, 2, 1] blur as a
  depthwise conv, noise, `F.instance_norm`, the style. They load the converted
  parameters (`params.npz`) and are checked against the ports on every case.
  Fixture = tests/fixtures/{stylegan,pggan} (converted); realistic = 256 px at
  genforce's default widths (fmaps_base 16384, fmaps_max 512: 512 at 4..32 px,
  then 256, 128, 64 at 64, 128, 256 px; the official FFHQ networks' widths at
  those resolutions and StyleGAN2's realistic ones here), z_dim = w_dim = 512,
  8 mapping layers, random weights drawn in the converted layout.
- stylegan3-t, stylegan3-r: the official network's inference path on CPU, written
  here: the Fourier-feature input, each layer's modulated conv fused into one
  grouped conv over the batch, `filtered_lrelu` as its reference (non-CUDA) path
  (bias, upfirdn2d up, leaky ReLU x sqrt 2, clamp, upfirdn2d down) with torch
  conv ops: each upsampling pass a depthwise transposed conv of stride `up` (the
  zero insertion without the zeros), each downsampling pass a strided depthwise
  conv (R's radial filter as one 2-D one), in channels_last (oneDNN's depthwise
  convs: 2-100x faster than NCHW here). Fixture T = tests/fixtures/stylegan3
  (converted); fixture R = the same schedule (32 px, channel_base 2048,
  channel_max 64, 6 layers) with R's layers (1x1 convs, radial down filters),
  random weights; realistic = 256 px at the official configs' widths: T
  channel_base 32768, channel_max 512 (512 .. 128 channels), R doubled (1024 ..
  256); 14 layers, 2 mapping layers. `stylegan3_config` computes the alias-free
  schedule and filters (checked against the fixture pickle), random weights
  get trained-like `magnitude_ema` (`random_stylegan3_params`). A realistic
  StyleGAN3 call takes seconds (T) to minutes (R, batch 8) here: realistic
  batches above `MAX_REAL_BATCH` (8 for T, 1 for R) are reported as skipped.
- biggan: the original package, pytorch-pretrained-biggan 0.1.1 (MIT; not a
  dependency: pass the unzipped wheel's folder as `--biggan_package`, its
  download helpers' imports are stubbed), `BigGAN.from_pretrained(folder)`;
  fixture = tests/fixtures/biggan, realistic = its default config
  (biggan-deep-128) with random weights saved by the worker as a
  `pytorch_model.bin` folder and converted by `converters` like a download.

Families not listed in `TORCH_FAMILIES` are reported under "skipped".
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

from experiments import torch_worker
from experiments.plumbing import options
from experiments.torch_worker import TorchProcess, cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DCGAN_WEIGHTS = "/work/dl/wheel/gan_face_generate/weights.tar"
TORCH_FAMILIES = ("dcgan", "stylegan2", "biggan", "stylegan", "pggan", "stylegan3-t", "stylegan3-r")
ALL_FAMILIES = ("stylegan", "stylegan2", "stylegan3-t", "stylegan3-r", "pggan", "biggan", "dcgan")
OPS = ("generate", "split")
MAX_REAL_BATCH = {"stylegan3-t": 8, "stylegan3-r": 1}  # Larger realistic batches are skipped.
WORKER = "experiments.generator_benchmark:_torch_worker"
SPEC = options.replace(
  options.spec(
    "out",
    quick=options.Flag("bool", False, "Fixture configurations only, 3 rounds (< 60 s)."),
    families=options.Flag(
      "string", ",".join(TORCH_FAMILIES), f"Comma-separated, of {','.join(ALL_FAMILIES)}."
    ),
    batches=options.Flag("string", "1,8,32", "Comma-separated batch sizes."),
    configs=options.Flag("string", "fixture,real", "fixture and/or real (realistic widths)."),
    rounds=options.Flag("integer", 7, "Interleaved repetitions per case."),
    torch_threads=options.Flag(
      "integer", None, "Default: the cores JAX uses (a diagnostic otherwise)."
    ),
    dcgan_weights=options.Flag("string", DCGAN_WEIGHTS, "The real DCGAN's torch checkpoint."),
    biggan_package=options.Flag(
      "string",
      os.environ.get("BIGGAN_PACKAGE"),
      "Folder holding pytorch_pretrained_biggan/ (the unzipped wheel).",
    ),
  ),
  out=dict(help="Write the JSON here."),
)


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v, np.float32)
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


# ---------------------------------------------------------------- the JAX side


def ffhq256_stylegan2_config() -> dict:
  """StyleGAN2-ADA's FFHQ-256 widths (cbase 16384, cmax 512)."""
  return dict(
    z_dim=512,
    c_dim=0,
    w_dim=512,
    img_resolution=256,
    img_channels=3,
    channels=[min(16384 // r, 512) for r in (4, 8, 16, 32, 64, 128, 256)],
    mapping_layers=8,
  )


def random_stylegan2_params(cfg, seed: int = 0) -> dict:
  """Parameters of the converted layout, drawn at the scales of a trained network."""
  from panda_jax.generators import stylegan2  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  flat = _flatten(
    jax.tree.map(lambda s: np.zeros(s.shape, np.float32), stylegan2.param_shapes(cfg))
  )
  for path, a in flat.items():
    name, parent = path.rsplit("/", 2)[-1], path.rsplit("/", 2)[-2] if "/" in path else ""
    if name == "kernel":
      a[...] = rng.standard_normal(a.shape) / np.sqrt(a.shape[0])
    elif name == "weight":
      a[...] = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif name == "bias":
      a[...] = 1.0 if parent == "affine" else 0.1 * rng.standard_normal(a.shape)
    elif name == "noise_strength":
      a[...] = 0.1
    elif name in ("const", "noise_const"):
      a[...] = rng.standard_normal(a.shape)
  return _unflatten(flat)


def ffhq256_genforce_config(arch: str) -> dict:
  """genforce's ProGAN / StyleGAN v1 at 256 px, as converted (`converters.genforce`).

  Widths `min(16384 // res, 512)` (genforce's defaults fmaps_base 16 << 10 and
  fmaps_max 512: 512 at 4..32, then 256, 128, 64 at 64, 128, 256 px), the same
  as StyleGAN2's realistic config above and as the official FFHQ networks at
  those resolutions. z_dim (and w_dim, 8 mapping layers) 512; genforce's
  default `fused_scale`: False for ProGAN, "auto" for StyleGAN (fused
  transposed convs at 128 and 256 px).
  """
  cfg = dict(
    resolution=256,
    z_dim=512,
    image_channels=3,
    final_tanh=False,
    fused_scale=False if arch == "pggan" else "auto",
  )
  if arch == "stylegan":
    cfg["w_dim"] = 512
  return cfg


def random_genforce_params(
  arch: str,
  cfg: dict,
  seed: int = 0,
  fmaps_base: int = 16384,
  fmaps_max: int = 512,
  mapping_layers: int = 8,
) -> dict:
  """ProGAN (`arch="pggan"`) or StyleGAN v1 parameters of the converted layout
  (`panda_jax.generators.progan` / `stylegan1` docstrings), equalised-lr gains applied."""
  from panda_jax.generators import progan  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)

  def normal(*shape, std=1.0):
    return (std * rng.standard_normal(shape)).astype(np.float32)

  num_layers = progan.num_layers_for(cfg["resolution"])
  c_in, params = cfg["z_dim"], {}
  if arch == "stylegan":
    w_dim = cfg["w_dim"]
    params["mapping"] = {
      f"dense{i}": {"weight": normal(c, w_dim, std=np.sqrt(2 / c)), "bias": normal(w_dim, std=0.1)}
      for i, c in enumerate([c_in] + [w_dim] * (mapping_layers - 1))
    }
    params["w_avg"] = normal(w_dim, std=0.1)
  for i in range(num_layers):
    res = 4 << (i // 2)
    c = min(fmaps_base // res, fmaps_max)
    p = {"bias": normal(c, std=0.1)}
    if i == 0 and arch == "stylegan":
      p["const"] = normal(1, 4, 4, c)
    else:
      k = 4 if i == 0 else 3
      p["weight"] = normal(k, k, c_in, c, std=np.sqrt(2 / (k * k * c_in)))
    if arch == "stylegan":
      p.update(
        noise=normal(1, res, res, 1),
        noise_strength=np.full(c, 0.1, np.float32),
        style={
          "weight": normal(w_dim, 2 * c, std=1 / np.sqrt(w_dim)),
          "bias": normal(2 * c, std=0.1),
        },
      )
    params[f"layer{i}"], c_in = p, c
  params["torgb"] = {
    "weight": normal(c_in, cfg["image_channels"], std=1 / np.sqrt(c_in)),
    "bias": normal(cfg["image_channels"], std=0.1),
  }
  return params


def _lowpass(numtaps: int, cutoff: float, width: float, fs: float, radial: bool):
  """StyleGAN3's low-pass filter design: a Kaiser-windowed sinc `[t]` (scipy's firwin),
  or (radial) a jinc times the outer product of Kaiser windows `[t, t]`; None for t = 1."""
  import scipy.signal  # pylint: disable=import-outside-toplevel
  import scipy.special  # pylint: disable=import-outside-toplevel

  if numtaps == 1:
    return None
  if not radial:
    return scipy.signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs).astype(
      np.float32
    )
  x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
  r = np.hypot(*np.meshgrid(x, x))
  f = scipy.special.j1(2 * cutoff * (np.pi * r)) / (np.pi * r)
  beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
  window = np.kaiser(numtaps, beta)
  f = f * np.outer(window, window)
  return (f / f.sum()).astype(np.float32)


def stylegan3_config(
  resolution: int,
  channel_base: int,
  channel_max: int,
  *,
  radial: bool,
  num_layers: int = 14,
  z_dim: int = 512,
  w_dim: int = 512,
  mapping_layers: int = 2,
) -> tuple[dict, dict]:
  """`(config, filters)` of a StyleGAN3-T (`radial=False`, 3x3 convs) or -R (1x1
  convs, radial down filters before the critically sampled layers) network, as
  `converters.stylegan3` writes the config; `filters[name] = (up, down)`.

  The alias-free schedule of the paper (Sec. 3.2, Appendix F): cutoffs from 2
  to resolution / 2 geometrically over the first `num_layers - 2` layers (the
  last two critically sampled), stopbands from 2^2.1 to 2^0.3 x the last
  cutoff, sampling rates the next power of two above twice the stopband
  (at most the resolution), 10-pixel margins, widths `channel_base / 2 /
  cutoff` capped at `channel_max`, 2x upsampling around the leaky ReLU,
  6 taps per resampling factor, conv clamp 256, output scale 0.25.
  (`tests/test_generator_benchmark.py` checks it against the fixture's pickle.)
  """
  num_critical, margin = 2, 10
  last_cutoff = resolution / 2
  exps = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
  cutoffs = 2 * (last_cutoff / 2) ** exps
  stopbands = 2**2.1 * (last_cutoff * 2**0.3 / 2**2.1) ** exps
  rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, resolution))))
  half_widths = np.maximum(stopbands, rates / 2) - cutoffs
  sizes = rates + 2 * margin
  sizes[-2:] = resolution
  channels = np.rint(np.minimum(channel_base / 2 / cutoffs, channel_max))
  channels[-1] = 3
  layer_cfgs, filters = [], {}
  for i in range(num_layers + 1):
    j, torgb = max(i - 1, 0), i == num_layers
    k = 1 if torgb else (1 if radial else 3)
    tmp_rate = max(rates[j], rates[i]) * (1 if torgb else 2)
    up, down = int(np.rint(tmp_rate / rates[j])), int(np.rint(tmp_rate / rates[i]))
    up_taps = 6 * up if up > 1 and not torgb else 1
    down_taps = 6 * down if down > 1 and not torgb else 1
    total = (sizes[i] - 1) * down + 1 - (sizes[j] + k - 1) * up + up_taps + down_taps - 2
    lo = int((total + up) // 2)
    name = f"L{i}_{int(sizes[i])}_{int(channels[i])}"
    layer_cfgs.append(
      dict(
        name=name,
        is_torgb=torgb,
        conv_clamp=256,
        in_channels=int(channels[j]),
        out_channels=int(channels[i]),
        conv_kernel=k,
        up_factor=up,
        down_factor=down,
        in_size=[int(sizes[j])] * 2,
        out_size=[int(sizes[i])] * 2,
        padding=[lo, int(total) - lo, lo, int(total) - lo],
      )
    )
    critical = i >= num_layers - num_critical
    filters[name] = (
      _lowpass(up_taps, cutoffs[j], 2 * half_widths[j], tmp_rate, False),
      _lowpass(down_taps, cutoffs[i], 2 * half_widths[i], tmp_rate, radial and not critical),
    )
  config = dict(
    z_dim=z_dim,
    c_dim=0,
    w_dim=w_dim,
    img_resolution=resolution,
    img_channels=3,
    input=dict(
      channels=int(channels[0]),
      size=[int(sizes[0])] * 2,
      sampling_rate=float(rates[0]),
      bandwidth=float(cutoffs[0]),
    ),
    layers=layer_cfgs,
    output_scale=0.25,
    mapping=dict(mapping_layers=mapping_layers, mapping_features=w_dim, mapping_activation="lrelu"),
  )
  return config, filters


def random_stylegan3_params(config: dict, filters: dict, seed: int = 0) -> dict:
  """StyleGAN3 parameters of the converted layout; `magnitude_ema` set as a trained
  network holds it (the mean square of each layer's input, one sample: batch 1, so that
  the per-layer compilations are shared with batch-1 runs)."""
  import jax  # pylint: disable=import-outside-toplevel
  from panda_jax.generators import stylegan2  # pylint: disable=import-outside-toplevel
  from panda_jax.generators import stylegan3  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)

  def normal(*shape, std=1.0):
    return (std * rng.standard_normal(shape)).astype(np.float32)

  filter_params = {
    name: {k: f for k, f in zip(("up_filter", "down_filter"), pair) if f is not None}
    for name, pair in filters.items()
  }
  cfg = stylegan3.Config.from_dict(config, {"layers": filter_params})
  w_dim, c = cfg.mapping.w_dim, cfg.input.channels
  mapping = _flatten(
    jax.tree.map(
      lambda s: np.zeros(s.shape, np.float32), stylegan2.mapping_param_shapes(cfg.mapping)
    )
  )
  for path, a in mapping.items():
    a[...] = (
      normal(*a.shape, std=1 / np.sqrt(a.shape[0]))
      if path.endswith("kernel")
      else normal(*a.shape, std=0.1)
    )
  freqs = normal(c, 2)
  radii = np.sqrt(np.sum(freqs**2, axis=1, keepdims=True))
  freqs = freqs / (radii * np.exp(radii**2) ** 0.25) * cfg.input.bandwidth
  params = {
    "mapping": _unflatten(mapping),
    "layers": {},
    "input": {
      "weight": normal(c, c, std=1 / np.sqrt(c)),
      "transform": np.eye(3, dtype=np.float32),
      "affine": {
        "kernel": normal(w_dim, 4, std=0.1 / np.sqrt(w_dim)),
        "bias": np.float32([1, 0, 0, 0]),
      },
      "freqs": freqs.astype(np.float32),
      "phases": (rng.random(c) - 0.5).astype(np.float32),
    },
  }
  ws = stylegan2.mapping_latents(
    params["mapping"], cfg.mapping, normal(1, cfg.mapping.z_dim), num_ws=cfg.num_ws
  )
  x = stylegan3.synthesis_input(params["input"], cfg.input, ws[:, 0])
  for i, layer in enumerate(cfg.layers):
    k, c_in, c_out = layer.conv_kernel, layer.in_channels, layer.out_channels
    p = {
      "weight": normal(k, k, c_in, c_out),
      "bias": normal(c_out, std=0.1),
      "affine": {
        "kernel": normal(w_dim, c_in, std=1 / np.sqrt(w_dim)),
        "bias": np.ones(c_in, np.float32),
      },
      "magnitude_ema": np.float32(np.mean(np.square(np.asarray(x)))),
      **filter_params[layer.name],
    }
    params["layers"][layer.name] = p
    x = stylegan3.synthesis_layer(jax.tree.map(jax.numpy.asarray, p), layer, x, ws[:, 1 + i])
  return params


def build_case(
  family: str, config: str, workdir: str, dcgan_weights: str, torch_proc=None, biggan_package=None
):
  """`(gen, torch_spec)` of a family at `config` ("fixture" or "real"), or a skip reason (str)."""
  import converters  # pylint: disable=import-outside-toplevel
  from panda_jax import generators  # pylint: disable=import-outside-toplevel

  if family not in TORCH_FAMILIES:
    return "no torch original in this benchmark yet"
  if family == "biggan":
    if not os.path.isdir(os.path.join(biggan_package or "", "pytorch_pretrained_biggan")):
      return (
        f"pytorch-pretrained-biggan not found under --biggan_package={biggan_package!r} "
        "(pip download --no-deps pytorch-pretrained-biggan==0.1.1 and unzip the wheel)"
      )
    src = os.path.join(FIXTURES, "biggan")
    if config == "real":  # The package's default config is biggan-deep-128's.
      src = os.path.join(workdir, "biggan_deep_128")
      torch_proc.call(cmd="make_biggan", dst=src, package=biggan_package)
    arch, cfg, params = converters.convert(src)
    return (
      generators.base.registered()[arch](cfg, params),
      {"family": "biggan", "folder": src, "package": biggan_package},
    )
  if family == "dcgan":
    src = os.path.join(FIXTURES, "dcgan", "weights.tar") if config == "fixture" else dcgan_weights
    if not os.path.exists(src):
      return f"weights not found: {src}"
    arch, cfg, params = converters.convert(src)
    return generators.base.registered()[arch](cfg, params), {"family": "dcgan", "weights": src}
  arch, cfg, params = _converted_or_random(family, config)
  gen = generators.base.registered()[arch].from_converted(cfg, params)
  npz = os.path.join(workdir, f"{family}_{config}.npz")
  np.savez(npz, **_flatten(params))
  if arch == "stylegan2":
    keep = (
      "channels",
      "img_resolution",
      "conv_clamp",
      "architecture",
      "resample_filter",
      "kernel_size",
    )
    torch_cfg = {k: v for k, v in gen.cfg.__dict__.items() if k in keep}
    torch_cfg["channels"] = list(torch_cfg["channels"])
  else:
    torch_cfg = {k: v for k, v in gen.config.items() if k != "source"}
  return gen, {"family": arch, "params": npz, "config": torch_cfg}


def _converted_or_random(family: str, config: str) -> tuple[str, dict, dict]:
  """`(arch, config, params)` of a StyleGAN or ProGAN family: the fixture converted
  by `converters`, or the realistic config with random weights (module docstring)."""
  import converters  # pylint: disable=import-outside-toplevel

  fixture_files = {
    "stylegan2": "stylegan2/network-snapshot.pkl",
    "stylegan3-t": "stylegan3/network-snapshot.pkl",
    "stylegan": "stylegan/stylegan.pth",
    "pggan": "pggan/pggan.pth",
  }
  if family == "stylegan3-r":  # No R fixture: the T fixture's schedule with R's layers.
    cfg, filters = (
      stylegan3_config(32, 2048, 64, radial=True, num_layers=6, z_dim=64, w_dim=64)
      if config == "fixture"
      else stylegan3_config(256, 65536, 1024, radial=True)
    )
    return "stylegan3", cfg, random_stylegan3_params(cfg, filters)
  if config == "fixture":
    return converters.convert(os.path.join(FIXTURES, fixture_files[family]))
  if family == "stylegan2":
    from panda_jax.generators import stylegan2  # pylint: disable=import-outside-toplevel

    cfg = ffhq256_stylegan2_config()
    return "stylegan2", cfg, random_stylegan2_params(stylegan2.Config.from_dict(cfg))
  if family == "stylegan3-t":
    cfg, filters = stylegan3_config(256, 32768, 512, radial=False)
    return "stylegan3", cfg, random_stylegan3_params(cfg, filters)
  cfg = ffhq256_genforce_config(family)
  return family, cfg, random_genforce_params(family, cfg)


def inputs(gen, family: str, batch: int, seed: int):
  """`(latents for JAX, {name: array} for torch)` of `batch` samples."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((batch, gen.z_dim)).astype(np.float32)
  if family != "biggan":
    lat = np.asarray(gen.latents(z))
    return lat, {"x": lat}
  truncation = 0.47  # Off the grid of the 51 statistics: the package's interpolation jumps there.
  z = np.clip(z, -2, 2) * truncation  # Truncated noise, as the package's sampler.
  c = np.eye(gen.c_dim, dtype=np.float32)[rng.integers(0, gen.c_dim, batch)]
  import jax  # pylint: disable=import-outside-toplevel

  lat = jax.tree.map(np.asarray, gen.latents(z, c, truncation_psi=truncation))
  return lat, {"z": z, "c": c, "truncation": np.float64(truncation)}


# -------------------------------------------------------------- the torch side


def _torch_dcgan(spec):
  """The tutorial generator, from the checkpoint file: `run(z, stop)` NCHW."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  ckpt = torch.load(spec["weights"], map_location="cpu", weights_only=True)
  for key in ("netG_state_dict", "netG", "state_dict"):
    if isinstance(ckpt, dict) and key in ckpt:
      ckpt = ckpt[key]
      break
  sd = {k.removeprefix("module."): v for k, v in ckpt.items()}
  kernels = [sd[f"main.{3 * i}.weight"] for i in range(len(sd)) if f"main.{3 * i}.weight" in sd]
  mods = []
  for i, w in enumerate(kernels):
    stride, padding = (1, 0) if i == 0 else (2, 1)
    mods.append(nn.ConvTranspose2d(w.shape[0], w.shape[1], 4, stride, padding, bias=False))
    if i < len(kernels) - 1:
      mods += [nn.BatchNorm2d(w.shape[1]), nn.ReLU(inplace=True)]
  mods.append(nn.Tanh())
  net = nn.Sequential(*mods)
  net.load_state_dict({k.removeprefix("main."): v for k, v in sd.items()})
  net.eval()
  main = list(net)

  def run(inputs, stop=None):
    x = inputs["x"][:, :, None, None]
    for m in main if stop is None else main[: 3 * stop]:
      x = m(x)
    return x

  return run


def _torch_stylegan2(spec):
  """The synthesis network's CPU inference path (module docstring): `run(ws, stop)` NCHW."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  cfg = spec["config"]
  if cfg.get("architecture", "skip") != "skip" or cfg["kernel_size"] != 3:
    raise ValueError("the torch StyleGAN2 here supports the skip architecture, 3x3 kernels")
  p = {k: torch.from_numpy(v) for k, v in np.load(spec["params"]).items()}
  f1 = torch.tensor(np.asarray(cfg["resample_filter"], np.float32).sum(axis=1))  # 1-D taps.
  clamp = cfg["conv_clamp"]
  channels = cfg["channels"]
  num_layers = 2 * len(channels) - 1

  def upfirdn2d(x, up, pad, gain):
    """Zero insertion, pad (x0, x1, y0, y1; negative crops), separable FIR as 2 depthwise convs."""
    n, c, h, w = x.shape
    if up > 1:
      x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1])
      x = x.reshape(n, c, h * up, w * up)
    x0, x1, y0, y1 = pad
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0) : x.shape[2] - max(-y1, 0), max(-x0, 0) : x.shape[3] - max(-x1, 0)]
    f = (f1 * gain**0.5).flip(0)
    x = F.conv2d(x, f[None, None, None, :].repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, f[None, None, :, None].repeat(c, 1, 1, 1), groups=c)

  def modconv(x, weight, styles, demodulate, up):
    """Fused: one grouped conv over the batch; `weight [o, i, k, k]`."""
    n, i, h, w = x.shape
    o, k = weight.shape[0], weight.shape[-1]
    wt = weight[None] * styles[:, None, :, None, None]  # [n, o, i, k, k]
    if demodulate:
      wt = wt * torch.rsqrt(wt.square().sum(dim=[2, 3, 4]) + 1e-8)[:, :, None, None, None]
    x = x.reshape(1, n * i, h, w)
    if up == 1:
      x = F.conv2d(x, wt.reshape(n * o, i, k, k), padding=k // 2, groups=n)
    else:
      fw, pad = f1.shape[0], k // 2
      p0, p1 = pad + (fw + 1) // 2 - (k - 1), pad + (fw - 2) // 2 - (k - 2)
      pt = max(min(-p0, -p1), 0)
      x = F.conv_transpose2d(
        x, wt.transpose(1, 2).reshape(n * i, o, k, k), stride=2, padding=pt, groups=n
      )
      x = upfirdn2d(x, 1, (p0 + pt, p1 + pt, p0 + pt, p1 + pt), 4)
    return x.reshape(n, o, x.shape[2], x.shape[3])

  def oihw(a):
    return a.permute(3, 2, 0, 1).contiguous()

  convs = []
  for l in range(num_layers):
    q = f"synthesis/convs_{l}/"
    convs.append(
      (
        p[q + "affine/kernel"],
        p[q + "affine/bias"],
        oihw(p[q + "weight"]),
        p[q + "bias"],
        p[q + "noise_strength"] * p[q + "noise_const"],
        2 if l % 2 == 1 else 1,
      )
    )
  torgbs = []
  for j in range(len(channels)):
    q = f"synthesis/torgbs_{j}/"
    torgbs.append(
      (p[q + "affine/kernel"], p[q + "affine/bias"], oihw(p[q + "weight"]), p[q + "bias"])
    )
  const = p["synthesis/const"].permute(2, 0, 1)
  gain = np.sqrt(2)

  def to_rgb(x, img, ws, layer):
    ak, ab, w, b = torgbs[layer // 2]
    y = modconv(x, w, ws[:, layer] @ ak + ab, False, 1) + b[None, :, None, None]
    if clamp is not None:
      y = y.clamp(-clamp, clamp)
    return y if img is None else upfirdn2d(img, 2, (2, 1, 2, 1), 4) + y

  def run(inputs, stop=None):
    ws = inputs["x"]
    x, img = const[None].expand(ws.shape[0], -1, -1, -1), None
    for layer in range(1, (num_layers if stop is None else stop) + 1):
      if layer % 2 == 0:
        img = to_rgb(x, img, ws, layer - 1)
      ak, ab, w, b, noise, up = convs[layer - 1]
      x = modconv(x, w, ws[:, layer - 1] @ ak + ab, True, up)
      x = F.leaky_relu(x.add_(noise).add_(b[None, :, None, None]), 0.2).mul_(gain)
      if clamp is not None:
        x = x.clamp_(-clamp * gain, clamp * gain)
    return to_rgb(x, img, ws, num_layers) if stop is None else x

  return run


def _torch_params(spec) -> dict:
  import torch  # pylint: disable=import-outside-toplevel

  return {k: torch.from_numpy(v) for k, v in np.load(spec["params"]).items()}


def _oihw(a):
  """A converted conv weight `[k, k, i, o]` as torch's `[o, i, k, k]`."""
  return a.permute(3, 2, 0, 1).contiguous()


def _torch_genforce(spec):
  """genforce's ProGAN / StyleGAN v1 synthesis (module docstring): `run(x, stop)` NCHW.

  `x`: the pixel-normalised z (ProGAN) or W+ codes (StyleGAN). Per layer: (ProGAN)
  pixel norm; the 4x4 dense start (a matmul), the learned constant, nearest 2x +
  3x3 conv, or the fused stride-2 transposed 4x4 conv; (StyleGAN) the [1, 2, 1]
  blur after upsampling as a depthwise conv, the noise; bias and leaky ReLU;
  (StyleGAN) instance norm and the style `x (1 + s_0) + s_1`. Then the last
  ToRGB (a 1x1 conv; ProGAN pixel-normalises first).
  """
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  cfg, p = spec["config"], _torch_params(spec)
  style = spec["family"] == "stylegan"
  num_layers = 2 * (cfg["resolution"].bit_length() - 2)
  blur = torch.tensor([1.0, 2.0, 1.0])
  blur = torch.outer(blur, blur) / 16
  convs = []
  for i in range(num_layers):
    q, res = f"layer{i}/", 4 << (i // 2)
    fused = (
      i > 0
      and i % 2 == 0
      and (res >= 128 if cfg["fused_scale"] == "auto" else bool(cfg["fused_scale"]))
    )
    layer = {"bias": p[q + "bias"].view(1, -1, 1, 1), "kind": "conv3x3"}
    c = layer["bias"].shape[1]
    if i == 0:
      layer["kind"] = "const" if style else "dense"
      if style:
        layer["const"] = p[q + "const"].permute(0, 3, 1, 2)
      else:  # [4, 4, z, c] -> [z, c * 16]: out[n, c, h, w] = sum_z x[n, z] w[h, w, z, c].
        layer["weight"] = p[q + "weight"].permute(2, 3, 0, 1).reshape(-1, c * 16)
    elif fused:  # The 4x4 kernel (sum of the 3x3's four shifts), transposed-conv layout.
      w = F.pad(p[q + "weight"], (0, 0, 0, 0, 1, 1, 1, 1))
      w = w[1:, 1:] + w[:-1, 1:] + w[1:, :-1] + w[:-1, :-1]  # [4, 4, i, o], correlation.
      layer.update(kind="fused", weight=w.flip(0, 1).permute(2, 3, 0, 1).contiguous())
    else:
      layer.update(weight=_oihw(p[q + "weight"]), up=i % 2 == 0)
    if style:
      layer["noise"] = p[q + "noise"].permute(0, 3, 1, 2) * p[q + "noise_strength"].view(
        1, -1, 1, 1
      )
      layer["style"] = (p[q + "style/weight"], p[q + "style/bias"])
      if i > 0 and i % 2 == 0:
        layer["blur"] = blur[None, None].repeat(c, 1, 1, 1)
    convs.append(layer)
  torgb = (p["torgb/weight"].t()[:, :, None, None].contiguous(), p["torgb/bias"])

  def pixel_norm(x):
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)

  def forward(layer, x, w, n):
    kind = layer["kind"]
    if not style:
      x = pixel_norm(x)
    if kind == "const":
      x = layer["const"].expand(n, -1, -1, -1)
    elif kind == "dense":
      x = (x @ layer["weight"]).view(n, -1, 4, 4)
    elif kind == "fused":
      x = F.conv_transpose2d(x, layer["weight"], stride=2, padding=1)
    else:
      if layer["up"]:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
      x = F.conv2d(x, layer["weight"], padding=1)
    if "blur" in layer:
      x = F.conv2d(x, layer["blur"], padding=1, groups=x.shape[1])
    if style:
      x = x + layer["noise"]
    x = F.leaky_relu(x + layer["bias"], 0.2)
    if style:
      x = F.instance_norm(x, eps=1e-8)
      s = torch.addmm(layer["style"][1], w, layer["style"][0])  # [n, 2c]
      scale, shift = s[:, :, None, None].chunk(2, dim=1)
      x = torch.addcmul(shift, x, scale + 1)
    return x

  def run(inputs, stop=None):
    x = inputs["x"]
    n = x.shape[0]
    for i in range(num_layers if stop is None else stop):
      x = forward(convs[i], x, inputs["x"][:, i] if style else None, n)
    if stop is not None:
      return x
    img = F.conv2d(x if style else pixel_norm(x), torgb[0], torgb[1])
    return torch.tanh(img) if cfg["final_tanh"] else img

  return run


def _torch_upfirdn2d(x, f, up: int, down: int, pad, gain: float):
  """StyleGAN3's `upfirdn2d` with `up == 1` or `down == 1`: upsample by zero insertion,
  pad (x0, x1, y0, y1; negative crops), convolve with the FIR filter `f` (`[t]`
  separably along w then h, gain `sqrt(gain)` each; `[t, t]` at once), keep every
  `down`-th output. As torch ops: the upsampling pass of each axis is a depthwise
  transposed conv of stride `up` (the zero insertion without the zeros: at the
  realistic sizes 1.5-3x faster than the reference path's zero insertion, which
  alone costs as much), the downsampling pass a depthwise conv of stride `down`.
  """
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  c = x.shape[1]
  x0, x1, y0, y1 = pad
  if f is None:  # The identity filter.
    return F.pad(x, [x0, x1, y0, y1])[:, :, ::down, ::down] * gain
  if f.ndim == 2:  # Radial (StyleGAN3-R), downsampling only.
    x = F.pad(x, [x0, x1, y0, y1])
    return F.conv2d(x, (f.flip(0, 1) * gain)[None, None].repeat(c, 1, 1, 1), groups=c, stride=down)
  t, f = f.shape[0], f * gain**0.5
  if up > 1:  # Transposed conv output m is the padded, zero-inserted signal's m + t - 1 - pad0.
    x = F.conv_transpose2d(x, f.view(1, 1, 1, t).repeat(c, 1, 1, 1), stride=(1, up), groups=c)
    x = F.pad(x, [x0 - t + 1, x1 + up - t])
    x = F.conv_transpose2d(x, f.view(1, 1, t, 1).repeat(c, 1, 1, 1), stride=(up, 1), groups=c)
    return F.pad(x, [0, 0, y0 - t + 1, y1 + up - t])
  f = f.flip(0)
  x = F.pad(x, [x0, x1, y0, y1])
  x = F.conv2d(x, f.view(1, 1, 1, t).repeat(c, 1, 1, 1), groups=c, stride=(1, down))
  return F.conv2d(x, f.view(1, 1, t, 1).repeat(c, 1, 1, 1), groups=c, stride=(down, 1))


def _torch_stylegan3(spec):
  """StyleGAN3's synthesis network, the official CPU path (module docstring): `run(ws, stop)`.

  Fourier-feature input; per layer a fused modulated conv (one grouped conv over
  the batch, 'full' padding k - 1, the input gain 1 / sqrt(magnitude_ema)
  folded into the weights) and the reference `filtered_lrelu`: bias, upfirdn2d
  up, leaky ReLU x sqrt(2), clamp, upfirdn2d down. ToRGB: no demodulation,
  bias and clamp only. Then `output_scale`.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  cfg, p = spec["config"], _torch_params(spec)
  inp = cfg["input"]
  size_w, size_h = inp["size"]
  rate, band = inp["sampling_rate"], inp["bandwidth"]
  gx = torch.tensor(
    ((2 * np.arange(size_w) + 1) / size_w - 1) * (0.5 * size_w / rate), dtype=torch.float32
  )
  gy = torch.tensor(
    ((2 * np.arange(size_h) + 1) / size_h - 1) * (0.5 * size_h / rate), dtype=torch.float32
  )

  def fourier(w):
    """The input layer: `w [n, w_dim] -> [n, c, h, w]`."""
    t = torch.addmm(p["input/affine/bias"], w, p["input/affine/kernel"])  # [n, 4]
    t = t / t[:, :2].norm(dim=1, keepdim=True)
    n = w.shape[0]
    m_r = torch.eye(3).repeat(n, 1, 1)
    m_r[:, 0, 0], m_r[:, 0, 1], m_r[:, 1, 0], m_r[:, 1, 1] = t[:, 0], -t[:, 1], t[:, 1], t[:, 0]
    m_t = torch.eye(3).repeat(n, 1, 1)
    m_t[:, 0, 2], m_t[:, 1, 2] = -t[:, 2], -t[:, 3]
    mat = m_r @ m_t @ p["input/transform"]
    freqs = p["input/freqs"][None]  # [1, c, 2]
    phases = p["input/phases"][None] + (freqs @ mat[:, :2, 2:]).squeeze(2)  # [n, c]
    freqs = freqs @ mat[:, :2, :2]  # [n, c, 2]
    amps = (1 - (freqs.norm(dim=2) - band) / (rate / 2 - band)).clamp(0, 1)
    x = (
      gx[None, None, :, None] * freqs[:, None, None, :, 0]
      + gy[None, :, None, None] * freqs[:, None, None, :, 1]
      + phases[:, None, None, :]
    )
    x = torch.sin(x * (2 * np.pi)) * amps[:, None, None, :]  # [n, h, w, c]
    return (x @ p["input/weight"]).permute(0, 3, 1, 2)

  layers = []
  for lc in cfg["layers"]:
    q = f"layers/{lc['name']}/"
    w = _oihw(p[q + "weight"])
    if not lc["is_torgb"]:  # Weight normalised per output channel (a constant).
      w = w * w.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
    layers.append(
      dict(
        lc,
        weight=w,
        bias=p[q + "bias"].view(1, -1, 1, 1),
        affine=(p[q + "affine/kernel"], p[q + "affine/bias"]),
        input_gain=p[q + "magnitude_ema"].rsqrt(),
        up_filter=p.get(q + "up_filter"),
        down_filter=p.get(q + "down_filter"),
      )
    )

  def layer_forward(layer, x, w):
    n, c_in, h, wd = x.shape
    styles = torch.addmm(layer["affine"][1], w, layer["affine"][0])  # [n, c_in]
    weight, k, torgb = layer["weight"], layer["conv_kernel"], layer["is_torgb"]
    if torgb:
      styles = styles / np.sqrt(c_in * k * k)
    else:  # As the official code: one mean square over the whole batch.
      styles = styles * styles.square().mean().rsqrt()
    wm = weight[None] * styles[:, None, :, None, None]  # [n, o, i, k, k]
    if not torgb:
      wm = wm * (wm.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
    wm = wm * layer["input_gain"]
    x = F.conv2d(x.reshape(1, n * c_in, h, wd), wm.reshape(-1, c_in, k, k), padding=k - 1, groups=n)
    x = x.reshape(n, -1, x.shape[2], x.shape[3]) + layer["bias"]
    x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's depthwise convs: 2-100x.
    up, down, clamp = layer["up_factor"], layer["down_factor"], layer["conv_clamp"]
    x = _torch_upfirdn2d(x, layer["up_filter"], up, 1, layer["padding"], up**2)
    if not torgb:
      x = F.leaky_relu(x, 0.2, inplace=True).mul_(np.sqrt(2))
    if clamp is not None:
      x = x.clamp_(-clamp, clamp)
    return _torch_upfirdn2d(x, layer["down_filter"], 1, down, (0, 0, 0, 0), 1)

  def run(inputs, stop=None):
    ws = inputs["x"]
    x = fourier(ws[:, 0])
    for i in range(len(layers) if stop is None else stop):
      x = layer_forward(layers[i], x, ws[:, 1 + i])
    return x if stop is not None else x * cfg["output_scale"]

  return run


def _import_biggan(package: str):
  """pytorch-pretrained-biggan from an unzipped wheel; its download helpers' imports stubbed."""
  import types  # pylint: disable=import-outside-toplevel

  for name in ("boto3", "requests", "botocore", "botocore.exceptions"):
    if name not in sys.modules:
      try:
        __import__(name)
      except ImportError:
        sys.modules[name] = types.ModuleType(name)
  sys.modules["botocore.exceptions"].__dict__.setdefault("ClientError", Exception)
  if package not in sys.path:
    sys.path.insert(0, package)
  import pytorch_pretrained_biggan  # pylint: disable=import-outside-toplevel,import-error

  return pytorch_pretrained_biggan


def _make_biggan(dst: str, package: str, seed: int = 0):
  """A biggan-deep-128 folder (`pytorch_model.bin`, `config.json`) with random weights."""
  import torch  # pylint: disable=import-outside-toplevel

  ppb = _import_biggan(package)
  torch.manual_seed(seed)
  model = ppb.BigGAN(ppb.BigGANConfig())
  with torch.no_grad():
    for name, p in model.named_parameters():  # Some are torch.Tensor(n): uninitialised.
      if p.dim() == 1:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    for module in model.modules():  # u, v of a trained model: sigma = ||W||_2, not ~0.
      if hasattr(module, "weight_orig"):
        w = module.weight_orig.reshape(module.weight_orig.shape[0], -1)
        v = torch.randn(w.shape[1])
        for _ in range(30):
          u = torch.nn.functional.normalize(w @ v, dim=0)
          v = torch.nn.functional.normalize(w.t() @ u, dim=0)
        module.weight_u.copy_(u)
        module.weight_v.copy_(v)
    for name, b in model.named_buffers():
      if name.endswith("running_vars"):
        b.copy_(1 + 0.1 * torch.rand_like(b))
      elif name.endswith("running_means"):
        b.copy_(0.1 * torch.randn_like(b))
  os.makedirs(dst, exist_ok=True)
  torch.save(model.state_dict(), os.path.join(dst, "pytorch_model.bin"))
  with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
    f.write(model.config.to_json_string())


def _torch_biggan(spec):
  """The package's `BigGAN` (`from_pretrained` of the folder): `run(inputs, stop)` NCHW."""
  import torch  # pylint: disable=import-outside-toplevel

  ppb = _import_biggan(spec["package"])
  model = ppb.BigGAN.from_pretrained(spec["folder"]).eval()
  gen = model.generator

  def run(inputs, stop=None):
    truncation = float(inputs["truncation"])
    if stop is None:
      return model(inputs["z"], inputs["c"], truncation)
    cond = torch.cat((inputs["z"], model.embeddings(inputs["c"])), dim=1)
    x = gen.gen_z(cond).view(-1, 4, 4, 16 * gen.config.channel_width).permute(0, 3, 1, 2)
    x = x.contiguous()
    for layer in gen.layers[:stop]:
      x = layer(x, cond, truncation) if isinstance(layer, ppb.model.GenBlock) else layer(x)
    return x

  return run


def _torch_worker():
  """The torch process: JSON commands on stdin, one JSON answer per line on stdout."""
  import torch  # pylint: disable=import-outside-toplevel

  threads = int(os.environ.get("BENCH_TORCH_THREADS", cores()))
  torch.set_num_threads(threads)
  builders = {
    "dcgan": _torch_dcgan,
    "stylegan2": _torch_stylegan2,
    "biggan": _torch_biggan,
    "stylegan": _torch_genforce,
    "pggan": _torch_genforce,
    "stylegan3": _torch_stylegan3,
  }
  nets, cases = {}, {}
  out = sys.stdout
  sys.stdout = sys.stderr  # Stray prints must not corrupt the protocol.
  out.write(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}) + "\n")
  out.flush()
  with torch.no_grad():
    for line in sys.stdin:
      cmd = json.loads(line)
      try:
        if cmd["cmd"] == "setup":
          key = json.dumps(cmd["spec"], sort_keys=True)
          if key not in nets:
            nets[key] = builders[cmd["spec"]["family"]](cmd["spec"])
          run = nets[key]
          x = {k: torch.from_numpy(v) for k, v in np.load(cmd["latents"]).items()}
          stop = cmd["layer"] if cmd["op"] == "split" else None
          cases[cmd["case"]] = lambda run=run, x=x, stop=stop: run(x, stop)
          y = cases[cmd["case"]]().numpy()  # Untimed warm-up, kept for the comparison.
          np.save(cmd["result"], np.transpose(y, (0, 2, 3, 1)))
          answer = {"ok": True}
        elif cmd["cmd"] == "make_biggan":
          _make_biggan(cmd["dst"], cmd["package"])
          answer = {"ok": True}
        elif cmd["cmd"] == "time":
          fn = cases[cmd["case"]]
          t0 = time.perf_counter()
          fn()
          answer = {"ok": True, "seconds": time.perf_counter() - t0}
        else:
          answer = {"ok": False, "error": f"unknown command {cmd['cmd']!r}"}
      except Exception as e:  # pylint: disable=broad-except
        answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
      out.write(json.dumps(answer) + "\n")
      out.flush()


# ------------------------------------------------------------------ the driver


def _stats(seconds: list[float]) -> dict:
  ms = np.asarray(seconds) * 1e3
  return {"min": float(ms.min()), "median": float(np.median(ms)), "all": ms.round(4).tolist()}


def bench_case(torch_proc, gen, spec, family, config, batch, op, rounds, workdir, seed=0):
  """One result row: interleaved rounds of one JAX and one torch call."""
  import jax  # pylint: disable=import-outside-toplevel

  layer = (gen.num_layers + 1) // 2
  lat, torch_inputs = inputs(gen, family, batch, seed)
  lat_dev = jax.device_put(lat)
  if op == "generate":
    fn = lambda: gen.generate(lat_dev)  # pylint: disable=unnecessary-lambda-assignment
  else:
    fn = lambda: gen.split(lat_dev, layer)[0]  # pylint: disable=unnecessary-lambda-assignment
  t0 = time.perf_counter()
  ours = np.asarray(jax.block_until_ready(fn()))  # Compiles.
  compile_s = time.perf_counter() - t0
  case = f"{family}/{config}/{batch}/{op}"
  lat_path = os.path.join(workdir, "inputs.npz")
  res_path = os.path.join(workdir, "torch_out.npy")
  np.savez(lat_path, **torch_inputs)
  torch_proc.call(
    cmd="setup", case=case, spec=spec, latents=lat_path, layer=layer, op=op, result=res_path
  )
  theirs = np.load(res_path)
  diff = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))
  jax_s, torch_s = [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    jax_s.append(time.perf_counter() - t0)
    torch_s.append(torch_proc.call(cmd="time", case=case)["seconds"])
  row = {
    "family": family,
    "config": config,
    "batch": batch,
    "op": op,
    "layer": layer if op == "split" else None,
    "output_shape": list(ours.shape),
    "torch_ms": _stats(torch_s),
    "jax_ms": _stats(jax_s),
    "jax_compile_s": compile_s,
    "max_rel_diff": diff,
    "loadavg_1min": os.getloadavg()[0],
  }
  row["ratio_torch_over_jax"] = row["torch_ms"]["median"] / row["jax_ms"]["median"]
  return row


def measure(
  families,
  batches,
  configs,
  rounds,
  dcgan_weights=DCGAN_WEIGHTS,
  biggan_package=None,
  log=print,
  out_path=None,
  torch_threads=None,
) -> dict:
  """The whole benchmark as a JSON-able dict (also written to `out_path` after every row).

  `torch_threads` defaults to the cores JAX uses (the protocol); fewer is a diagnostic.
  """
  threads = cores()
  torch_proc = TorchProcess(torch_threads or threads, WORKER)
  out = {
    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    **torch_worker.environment(threads, torch_proc.info),
    "settings": {
      "families": list(families),
      "batches": list(batches),
      "configs": list(configs),
      "rounds": rounds,
      "ops": list(OPS),
    },
    "loadavg_start": list(os.getloadavg()),
    "results": [],
    "skipped": [],
  }
  try:
    with tempfile.TemporaryDirectory() as workdir:
      for family in families:
        for config in configs:
          built = build_case(family, config, workdir, dcgan_weights, torch_proc, biggan_package)
          if isinstance(built, str):
            out["skipped"].append({"family": family, "config": config, "reason": built})
            log(f"skip {family}/{config}: {built}")
            continue
          gen, spec = built
          for batch in batches:
            if config == "real" and batch > MAX_REAL_BATCH.get(family, batch):
              reason = f"batch {batch} > {MAX_REAL_BATCH[family]}: minutes per call on CPU"
              out["skipped"].append({"family": family, "config": config, "reason": reason})
              log(f"skip {family}/{config}/{batch}: {reason}")
              continue
            for op in OPS:
              row = bench_case(torch_proc, gen, spec, family, config, batch, op, rounds, workdir)
              out["results"].append(row)
              log(table_line(row))
              if out_path:
                _write(out, out_path)
  finally:
    torch_proc.close()
  out["loadavg_end"] = list(os.getloadavg())
  if out_path:
    _write(out, out_path)
  return out


def _write(result: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1)
  os.replace(path + ".tmp", path)


TABLE_HEAD = (
  "| family | config | batch | op | torch min / median ms | jax min / median ms "
  "| torch / jax (median) | max rel diff |\n|---|---|---|---|---|---|---|---|"
)


def table_line(row: dict) -> str:
  t, j = row["torch_ms"], row["jax_ms"]
  op = row["op"] if row["layer"] is None else f"split@{row['layer']}"
  return (
    f"| {row['family']} | {row['config']} | {row['batch']} | {op} | "
    f"{t['min']:.2f} / {t['median']:.2f} | {j['min']:.2f} / {j['median']:.2f} | "
    f"{row['ratio_torch_over_jax']:.2f} | {row['max_rel_diff']:.1e} |"
  )


def run(config, log=print) -> dict:
  """The benchmark of `SPEC`'s options (`measure`): the JSON-able result, also written to
  `--out` (when given) after every row; prints its table at the end."""
  families = [s for s in config.families.split(",") if s]
  unknown = sorted(set(families) - set(ALL_FAMILIES))
  if unknown:
    raise ValueError(f"unknown families {unknown}; known: {ALL_FAMILIES}")
  batches = [int(b) for b in config.batches.split(",") if b]
  configs = ["fixture"] if config.quick else [c for c in config.configs.split(",") if c]
  rounds = min(config.rounds, 3) if config.quick else config.rounds
  result = measure(
    families,
    batches,
    configs,
    rounds,
    config.dcgan_weights,
    config.biggan_package,
    log=log,
    out_path=config.out,
    torch_threads=config.torch_threads,
  )
  print(TABLE_HEAD)
  for row in result["results"]:
    print(table_line(row))
  return result


if __name__ == "__main__":
  # `cli` imports JAX: here only, so that the torch worker (which imports this module) never does.
  from experiments.plumbing import cli  # pylint: disable=ungrouped-imports

  cli.main(run, SPEC, stoppable=False)
