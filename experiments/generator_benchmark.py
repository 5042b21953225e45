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
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DCGAN_WEIGHTS = "/work/dl/wheel/gan_face_generate/weights.tar"
TORCH_FAMILIES = ("dcgan", "stylegan2", "biggan")
ALL_FAMILIES = ("stylegan", "stylegan2", "stylegan3-t", "stylegan3-r", "pggan", "biggan", "dcgan")
OPS = ("generate", "split")


def cores() -> int:
  """CPU cores this process (hence XLA:CPU) may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


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
  return dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=256, img_channels=3,
              channels=[min(16384 // r, 512) for r in (4, 8, 16, 32, 64, 128, 256)],
              mapping_layers=8)


def random_stylegan2_params(cfg, seed: int = 0) -> dict:
  """Parameters of the converted layout, drawn at the scales of a trained network."""
  from panda_jax.generators import stylegan2  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  flat = _flatten(jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                               stylegan2.param_shapes(cfg)))
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


def build_case(family: str, config: str, workdir: str, dcgan_weights: str,
               torch_proc=None, biggan_package=None):
  """`(gen, torch_spec)` of a family at `config` ("fixture" or "real"), or a skip reason (str)."""
  import converters  # pylint: disable=import-outside-toplevel
  from panda_jax import generators  # pylint: disable=import-outside-toplevel
  if family not in TORCH_FAMILIES:
    return "no torch original in this benchmark yet"
  if family == "biggan":
    if not os.path.isdir(os.path.join(biggan_package or "", "pytorch_pretrained_biggan")):
      return (f"pytorch-pretrained-biggan not found under --biggan_package={biggan_package!r} "
              "(pip download --no-deps pytorch-pretrained-biggan==0.1.1 and unzip the wheel)")
    src = os.path.join(FIXTURES, "biggan")
    if config == "real":  # The package's default config is biggan-deep-128's.
      src = os.path.join(workdir, "biggan_deep_128")
      torch_proc.call(cmd="make_biggan", dst=src, package=biggan_package)
    arch, cfg, params = converters.convert(src)
    return (generators.base.registered()[arch](cfg, params),
            {"family": "biggan", "folder": src, "package": biggan_package})
  if family == "dcgan":
    src = os.path.join(FIXTURES, "dcgan", "weights.tar") if config == "fixture" else dcgan_weights
    if not os.path.exists(src):
      return f"weights not found: {src}"
    arch, cfg, params = converters.convert(src)
    return generators.base.registered()[arch](cfg, params), {"family": "dcgan", "weights": src}
  if config == "fixture":
    arch, cfg, params = converters.convert(
        os.path.join(FIXTURES, "stylegan2", "network-snapshot.pkl"))
  else:
    from panda_jax.generators import stylegan2  # pylint: disable=import-outside-toplevel
    arch, cfg = "stylegan2", ffhq256_stylegan2_config()
    params = random_stylegan2_params(stylegan2.Config.from_dict(cfg))
  gen = generators.base.registered()[arch](cfg, params)
  npz = os.path.join(workdir, f"stylegan2_{config}.npz")
  np.savez(npz, **_flatten(params))
  spec = {"family": "stylegan2", "params": npz, "config": {
      k: v for k, v in gen.cfg.__dict__.items() if k in ("channels", "img_resolution",
                                                          "conv_clamp", "architecture",
                                                          "resample_filter", "kernel_size")}}
  spec["config"]["channels"] = list(spec["config"]["channels"])
  return gen, spec


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
    for m in main if stop is None else main[:3 * stop]:
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
    x = x[:, :, max(-y0, 0):x.shape[2] - max(-y1, 0), max(-x0, 0):x.shape[3] - max(-x1, 0)]
    f = (f1 * gain ** 0.5).flip(0)
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
      x = F.conv_transpose2d(x, wt.transpose(1, 2).reshape(n * i, o, k, k), stride=2,
                             padding=pt, groups=n)
      x = upfirdn2d(x, 1, (p0 + pt, p1 + pt, p0 + pt, p1 + pt), 4)
    return x.reshape(n, o, x.shape[2], x.shape[3])

  def oihw(a):
    return a.permute(3, 2, 0, 1).contiguous()

  convs = []
  for l in range(num_layers):
    q = f"synthesis/convs_{l}/"
    convs.append((p[q + "affine/kernel"], p[q + "affine/bias"], oihw(p[q + "weight"]),
                  p[q + "bias"], p[q + "noise_strength"] * p[q + "noise_const"],
                  2 if l % 2 == 1 else 1))
  torgbs = []
  for j in range(len(channels)):
    q = f"synthesis/torgbs_{j}/"
    torgbs.append((p[q + "affine/kernel"], p[q + "affine/bias"], oihw(p[q + "weight"]),
                   p[q + "bias"]))
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
  builders = {"dcgan": _torch_dcgan, "stylegan2": _torch_stylegan2, "biggan": _torch_biggan}
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


class TorchProcess:
  """The torch worker, started with `torch.set_num_threads(threads)`."""

  def __init__(self, threads: int):
    env = dict(os.environ, BENCH_TORCH_THREADS=str(threads))
    self.proc = subprocess.Popen(
        [sys.executable, "-c",
         "from experiments.generator_benchmark import _torch_worker; _torch_worker()"],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker exited ({self.proc.wait()})")
    return json.loads(line)

  def call(self, **cmd):
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    answer = self._read()
    if not answer.pop("ok"):
      raise RuntimeError(f"torch worker: {answer['error']}")
    return answer

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


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
  torch_proc.call(cmd="setup", case=case, spec=spec, latents=lat_path, layer=layer, op=op,
                  result=res_path)
  theirs = np.load(res_path)
  diff = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))
  jax_s, torch_s = [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    jax_s.append(time.perf_counter() - t0)
    torch_s.append(torch_proc.call(cmd="time", case=case)["seconds"])
  row = {"family": family, "config": config, "batch": batch, "op": op,
         "layer": layer if op == "split" else None, "output_shape": list(ours.shape),
         "torch_ms": _stats(torch_s), "jax_ms": _stats(jax_s), "jax_compile_s": compile_s,
         "max_rel_diff": diff, "loadavg_1min": os.getloadavg()[0]}
  row["ratio_torch_over_jax"] = row["torch_ms"]["median"] / row["jax_ms"]["median"]
  return row


def environment(threads: int, torch_info: dict) -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  cpu = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return {"versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                       "numpy": np.__version__, "torch": torch_info.get("torch")},
          "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                      "cores_used": threads, "jax_devices": [str(d) for d in jax.devices()]},
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "torch_threads": torch_info.get("threads")}


def run(families, batches, configs, rounds, dcgan_weights=DCGAN_WEIGHTS, biggan_package=None,
        log=print, out_path=None, torch_threads=None) -> dict:
  """The whole benchmark as a JSON-able dict (also written to `out_path` after every row).

  `torch_threads` defaults to the cores JAX uses (the protocol); fewer is a diagnostic.
  """
  threads = cores()
  torch_proc = TorchProcess(torch_threads or threads)
  out = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         **environment(threads, torch_proc.info),
         "settings": {"families": list(families), "batches": list(batches),
                      "configs": list(configs), "rounds": rounds, "ops": list(OPS)},
         "loadavg_start": list(os.getloadavg()), "results": [], "skipped": []}
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


TABLE_HEAD = ("| family | config | batch | op | torch min / median ms | jax min / median ms "
              "| torch / jax (median) | max rel diff |\n|---|---|---|---|---|---|---|---|")


def table_line(row: dict) -> str:
  t, j = row["torch_ms"], row["jax_ms"]
  op = row["op"] if row["layer"] is None else f"split@{row['layer']}"
  return (f"| {row['family']} | {row['config']} | {row['batch']} | {op} | "
          f"{t['min']:.2f} / {t['median']:.2f} | {j['min']:.2f} / {j['median']:.2f} | "
          f"{row['ratio_torch_over_jax']:.2f} | {row['max_rel_diff']:.1e} |")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  families = [s for s in f.families.split(",") if s]
  unknown = sorted(set(families) - set(ALL_FAMILIES))
  if unknown:
    raise SystemExit(f"unknown families {unknown}; known: {ALL_FAMILIES}")
  batches = [int(b) for b in f.batches.split(",") if b]
  configs = ["fixture"] if f.quick else [c for c in f.configs.split(",") if c]
  rounds = min(f.rounds, 3) if f.quick else f.rounds
  result = run(families, batches, configs, rounds, f.dcgan_weights, f.biggan_package,
               out_path=f.out, torch_threads=f.torch_threads)
  print(TABLE_HEAD)
  for row in result["results"]:
    print(table_line(row))


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("out", None, "Write the JSON here.")
  flags.DEFINE_bool("quick", False, "Fixture configurations only, 3 rounds (< 60 s).")
  flags.DEFINE_string("families", ",".join(TORCH_FAMILIES),
                      f"Comma-separated, of {','.join(ALL_FAMILIES)}.")
  flags.DEFINE_string("batches", "1,8,32", "Comma-separated batch sizes.")
  flags.DEFINE_string("configs", "fixture,real", "fixture and/or real (realistic widths).")
  flags.DEFINE_integer("rounds", 7, "Interleaved repetitions per case.")
  flags.DEFINE_integer("torch_threads", None, "Default: the cores JAX uses (a diagnostic otherwise).")
  flags.DEFINE_string("dcgan_weights", DCGAN_WEIGHTS, "The real DCGAN's torch checkpoint.")
  flags.DEFINE_string("biggan_package", os.environ.get("BIGGAN_PACKAGE"),
                      "Folder holding pytorch_pretrained_biggan/ (the unzipped wheel).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=ungrouped-imports
  _define_flags()
  app.run(main)
