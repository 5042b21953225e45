"""Bad numbers, bad arguments and a full disk (issue 10, part 3).

Each case: a `ValueError` (or one `error:` line and exit 2 for the converter
command line) that names the argument and the offending value, and no
half-written output (a bad launcher flag is refused before `--out` is made).
"""

import errno
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import panda_jax as pj
from conftest import ROOT
from converters import __main__ as cli

_Z = np.random.default_rng(0).standard_normal((4, 16, 6)).astype(np.float32)  # [n, s, c]
_A = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 3)))[0].astype(np.float32)
_P = np.abs(np.random.default_rng(2).standard_normal((16, 2))).astype(np.float32)


def _with(index, value):
  z = _Z.copy()
  z[index] = value
  return z


def _fit(features, rank_c=3, rank_s=2, steps=2, **kw):
  return pj.fit(
    features, rank_c, rank_s, steps=steps, key=jax.random.PRNGKey(0), progress=False, **kw
  )


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: _fit(_with((1, 2, 3), np.nan)), r"features contains 1 non-finite value"),
    (lambda: _fit(_with((0, 0, 0), np.inf)), r"features contains 1 non-finite value"),
    (lambda: _fit(_Z, rank_c=7), r"rank_c must be an integer in \[1, c=6\], got 7"),
    (lambda: _fit(_Z, rank_s=17), r"rank_s must be an integer in \[1, s=16\], got 17"),
    (lambda: _fit(_Z, checkpoint_every=0), r"checkpoint_every must be positive, got 0"),
    (lambda: _fit(pj.DeviceSampler(lambda p, k: p, _Z[0])), r"features must be \[n, s, c\]"),
    (lambda: _fit(pj.DeviceSampler(lambda p, k: p, _Z), rank_s=17), r"rank_s must be .* got 17"),
    (lambda: pj.edit(_Z, _A, _P, 0, 1, float("nan")), r"alpha contains 1 non-finite"),
    (lambda: pj.edit(_Z, _A, _P, np.ones(15), 1, 1.0), r"mask must be \[s=16\], got shape"),
    (lambda: pj.edit(_Z, _A, _P, 5, 1, 1.0), r"part must be an integer in \[0, 2\), got 5"),
    (lambda: pj.edit(_Z, _A, _P, 0, 9, 1.0), r"appearance must be an integer in \[0, 3\)"),
    (lambda: pj.rank(_Z, _A, 0, np.ones(15)), r"part must be \[s=16\]"),
    (lambda: pj.refine(_Z[0] * np.nan, _A, _P, steps=2), r"features contains 96 non-finite"),
  ],
)
def test_bad_values_name_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_non_finite_features_drawn_in_the_step_stop_the_fit():
  """A `DeviceSampler`'s batches are never on the host: NaN surfaces as the loss's."""
  with pytest.raises(FloatingPointError, match="non-finite at step 1"):
    _fit(pj.DeviceSampler(lambda p, k: p, _with((1, 2, 3), np.nan)))


def test_layer_out_of_range(fixture_generator):
  gen = fixture_generator("stylegan2")
  lat = gen.latents(np.zeros((1, gen.z_dim), np.float32))
  for layer in (0, gen.num_layers + 1, -1):
    with pytest.raises(ValueError, match=rf"layer must be in \[1, {gen.num_layers}\].*{layer}"):
      gen.split(lat, layer)


def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch):
  """ENOSPC while committing step 10: an OSError naming the step and the
  directory, step 5 intact, and a rerun (disk freed) ends as an uninterrupted run."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel

  kw = dict(steps=20, checkpoint_every=5, chunk_size=5)
  whole = _fit(_Z, checkpoint_dir=str(tmp_path / "whole"), **kw)
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self, *args, **kwargs):
    if self._final_path.name == "10":  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, "No space left on device")
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  ckpt = tmp_path / "ckpt"
  with pytest.raises(
    OSError,
    match=r"checkpoint of step 10 to .*ckpt \(the previous one "
    r"is intact\): .*No space left on device",
  ):
    _fit(_Z, checkpoint_dir=str(ckpt), **kw)
  assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["5"]
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", original)
  resumed = _fit(_Z, checkpoint_dir=str(ckpt), **kw)
  np.testing.assert_array_equal(resumed.parts, whole.parts)
  np.testing.assert_array_equal(resumed.appearances, whole.appearances)
  np.testing.assert_array_equal(resumed.loss_history, whole.loss_history)


@pytest.mark.parametrize(
  "dst_kind, reason",
  [
    ("file", r"destination .*afile already exists"),
    ("under_file", r"cannot write --dst=.*afile/sub: (File exists|Not a directory)"),
  ],
)
def test_converter_destination_errors(dst_kind, reason, tmp_path, capsys):
  sg2 = os.path.join(os.path.dirname(__file__), "fixtures", "stylegan2", "network-snapshot.pkl")
  (tmp_path / "afile").write_text("keep me")
  dst = tmp_path / "afile" if dst_kind == "file" else tmp_path / "afile" / "sub"
  code = cli.main([f"--src={sg2}", f"--dst={dst}"])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert "internal error" not in err and re.search(reason, err), err
  assert sorted(os.listdir(tmp_path)) == ["afile"]
  assert (tmp_path / "afile").read_text() == "keep me"


# ---------------------------------------------------------------------------
# The decompose launcher's flags: checked before anything is written.


@pytest.fixture(scope="module")
def sg2_dir(converted):
  run = converted("stylegan2/network-snapshot.pkl")
  assert run.returncode == 0, run.stderr
  return str(run.dst)


def _decompose(generator, out, **flags_):
  from experiments import decompose  # pylint: disable=import-outside-toplevel
  from experiments.plumbing import options  # pylint: disable=import-outside-toplevel

  values = dict(
    generator=generator,
    out=str(out),
    layer=3,
    num_samples=4,
    batch_size=4,
    rank_c=4,
    rank_s=3,
    steps=2,
    num_show=1,
  )
  values.update(flags_)
  return decompose.run(options.make_config(decompose.SPEC, **values))


@pytest.mark.parametrize(
  "flags_, message",
  [
    (dict(generator="/no/such/generator"), r"unknown generator '/no/such/generator'"),
    (dict(layer=99), r"layer must be in \[1, 7\] for stylegan2, got 99"),
    (dict(rank_c=100000), r"rank_c must be an integer in \[1, c=\d+\], got 100000"),
    (dict(rank_s=10**6), r"rank_s must be an integer in \[1, s=\d+\], got 1000000"),
  ],
)
def test_decompose_bad_flags_write_nothing(flags_, message, sg2_dir, tmp_path):
  with pytest.raises(ValueError, match=message):
    _decompose(flags_.pop("generator", sg2_dir), tmp_path / "out", **flags_)
  assert os.listdir(tmp_path) == []


def test_decompose_out_is_a_file(sg2_dir, tmp_path):
  (tmp_path / "out").write_text("keep me")
  with pytest.raises(ValueError, match=r"--out=.*out is a file, not a directory"):
    _decompose(sg2_dir, tmp_path / "out")
  assert (tmp_path / "out").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_decompose_read_only_out(sg2_dir, tmp_path):
  (tmp_path / "out").mkdir(mode=0o555)
  with pytest.raises(ValueError, match=r"--out=.*out is not writable"):
    _decompose(sg2_dir, tmp_path / "out")
  assert os.listdir(tmp_path / "out") == []


def test_decompose_command_line_error_is_one_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.decompose",
      "--generator=/nope",
      f"--out={tmp_path / 'out'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1].startswith("error: unknown generator '/nope'")
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []
