"""Hard stops (issue 10, part 2): SIGKILL at any moment loses nothing, SIGTERM/SIGINT stop cleanly.

A child process runs a checkpointed `pj.fit` (a fixed batch, chunks of 5 steps,
a checkpoint every 5) and is killed: by itself inside orbax's commit of its
k-th checkpoint (`finalize`: the temporary directory is fully written but not
renamed; `rename`: even its commit_success file is written), by the parent
with SIGKILL once a checkpoint exists (between steps) or right after start
(imports, tracing, compilation). Rerun with the same directory, it must end
with factors bit-identical to an uninterrupted run, having resumed from the
last committed step (never from the half-written one). SIGTERM and SIGINT make
`fit(stop=...)` checkpoint and the process exit 0 within a few seconds.

By default one chain runs (killed inside a commit, resumed and stopped by
SIGTERM: 2 processes; then resumed to the end here); `PANDA_HARD_STOPS=full`
runs the whole matrix, each case from scratch.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
import panda_jax as pj

FULL = os.environ.get("PANDA_HARD_STOPS") == "full"
STEPS, EVERY = 40, 5

# KILL="finalize:K" / "rename:K": the child SIGKILLs itself in its K-th commit.
_KILLER = """
import os, signal, sys
kill = sys.argv.pop(1)
if kill != "none":
  from orbax.checkpoint._src.path import async_path, atomicity
  where, k = kill.split(":")
  calls = [0]
  def killer(original, final_path):
    async def wrapped(*args, **kwargs):
      if final_path(*args).name.isdigit():  # A step's directory (not an item in it).
        calls[0] += 1
        if calls[0] == int(k):
          os.kill(os.getpid(), signal.SIGKILL)
      return await original(*args, **kwargs)
    return wrapped
  if where == "finalize":
    cls = atomicity.AtomicRenameTemporaryPath
    cls.finalize = killer(cls.finalize, lambda self: self._final_path)
  else:
    atomicity.async_path.rename = killer(async_path.rename, lambda src, dst: dst)
"""

# Runs `pj.fit` with a stop on SIGTERM/SIGINT; argv: KILL CHECKPOINT_DIR.
_CHILD = (
  _KILLER
  + f"""
import json, threading
import numpy as np
ckpt = sys.argv[1]
import jax
import orbax.checkpoint as ocp
import panda_jax as pj
stop = threading.Event()
for sig in (signal.SIGTERM, signal.SIGINT):
  signal.signal(sig, lambda *_: stop.set())
resumed = ocp.CheckpointManager(ckpt).latest_step() if os.path.isdir(ckpt) else None
print(json.dumps(dict(resumed_from=resumed)), flush=True)
f = pj.fit(np.random.default_rng(0).standard_normal((8, 36, 12)).astype(np.float32), 5, 4,
           steps={STEPS}, key=jax.random.PRNGKey(1), checkpoint_dir=ckpt,
           checkpoint_every={EVERY}, chunk_size={EVERY}, progress=False, stop=stop.is_set)
np.savez(ckpt + ".npz", appearances=np.asarray(f.appearances), parts=np.asarray(f.parts),
         history=f.loss_history)
print(json.dumps(dict(steps=f.steps)), flush=True)
"""
)


def _start(ckpt, kill="none"):
  return subprocess.Popen(
    [sys.executable, "-c", _CHILD, kill, str(ckpt)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(proc, timeout=120):
  out, err = proc.communicate(timeout=timeout)
  lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
  return proc.returncode, lines, err


def _run(ckpt, kill="none"):
  return _finish(_start(ckpt, kill))


def _steps_on_disk(ckpt):
  names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def _wait_for_step(ckpt, proc, timeout=120):
  start = time.time()
  while not _steps_on_disk(ckpt)[0]:
    assert proc.poll() is None, proc.communicate()
    assert time.time() - start < timeout
    time.sleep(0.02)


def _fit_here(ckpt) -> dict:
  """The child's run, in this process (the same numbers as in a child)."""
  f = pj.fit(
    np.random.default_rng(0).standard_normal((8, 36, 12)).astype(np.float32),
    5,
    4,
    steps=STEPS,
    key=jax.random.PRNGKey(1),
    checkpoint_dir=str(ckpt),
    checkpoint_every=EVERY,
    chunk_size=EVERY,
    progress=False,
  )
  return dict(
    appearances=np.asarray(f.appearances), parts=np.asarray(f.parts), history=f.loss_history
  )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run."""
  return _fit_here(tmp_path_factory.mktemp("reference") / "ckpt")


def test_killed_in_a_commit_then_sigterm_then_resumed(reference, tmp_path):
  """The default chain: SIGKILL inside the 2nd commit (step 10), rerun resumes
  from step 5 and is stopped by SIGTERM (checkpoint, exit 0), rerun ends
  bit-identical to the uninterrupted run."""
  ckpt = tmp_path / "ckpt"
  code, _, _ = _run(ckpt, "finalize:2")
  assert code == -signal.SIGKILL
  assert _steps_on_disk(ckpt) == ([EVERY], [f"{2 * EVERY}.orbax-checkpoint-tmp"])
  proc = _start(ckpt)
  while _steps_on_disk(ckpt)[0][-1] == EVERY:
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.02)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  code, lines, err = _finish(proc)
  assert time.time() - sent < 10 and code == 0, err
  stopped = lines[-1]["steps"]
  assert lines[0] == dict(resumed_from=EVERY) and 2 * EVERY <= stopped < STEPS
  assert _steps_on_disk(ckpt)[0][-1] == stopped
  resumed = _fit_here(ckpt)
  for name, value in reference.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)


full_only = pytest.mark.skipif(not FULL, reason="set PANDA_HARD_STOPS=full")


def _assert_identical(ckpt, reference):
  got = np.load(f"{ckpt}.npz")
  for name, value in reference.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@full_only
@pytest.mark.parametrize("kill", ["finalize:1", "finalize:2", "finalize:8", "rename:1", "rename:3"])
def test_sigkill_inside_a_checkpoint_commit(kill, reference, tmp_path):
  """Killed while committing checkpoint k: steps k-1's checkpoint is the resume point."""
  ckpt = tmp_path / "ckpt"
  code, _, _ = _run(ckpt, kill)
  assert code == -signal.SIGKILL
  k = int(kill.split(":")[1])
  steps, tmp = _steps_on_disk(ckpt)
  assert steps == list(range(EVERY, EVERY * k, EVERY))[-2:]  # Keeps the latest 2.
  assert len(tmp) == 1  # The half-written checkpoint, left where it died.
  code, lines, err = _run(ckpt)
  assert code == 0, err
  assert lines == [dict(resumed_from=steps[-1] if steps else None), dict(steps=STEPS)]
  _assert_identical(ckpt, reference)


@full_only
@pytest.mark.parametrize(
  "when", ["between_steps", "at_start_0.5", "at_start_2", "at_start_4", "at_start_6"]
)
def test_sigkill_from_outside(when, reference, tmp_path):
  ckpt = tmp_path / "ckpt"
  proc = _start(ckpt)
  if when == "between_steps":
    _wait_for_step(ckpt, proc)
  else:  # Imports, tracing or compilation.
    time.sleep(float(when.split("_")[-1]))
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  code, lines, err = _run(ckpt)
  assert code == 0, err
  assert lines[-1] == dict(steps=STEPS)
  _assert_identical(ckpt, reference)


@full_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_and_exits_0(sig, reference, tmp_path):
  ckpt = tmp_path / "ckpt"
  proc = _start(ckpt)
  _wait_for_step(ckpt, proc)
  sent = time.time()
  proc.send_signal(sig)
  code, lines, err = _finish(proc)
  assert time.time() - sent < 10
  assert code == 0, err
  stopped = lines[-1]["steps"]
  assert EVERY <= stopped < STEPS
  assert _steps_on_disk(ckpt)[0][-1] == stopped  # Checkpointed where it stopped.
  code, lines, err = _run(ckpt)
  assert code == 0, err
  assert lines == [dict(resumed_from=stopped), dict(steps=STEPS)]
  _assert_identical(ckpt, reference)


# ---------------------------------------------------------------------------
# The same stops of `python -m experiments.decompose` (full matrix only: each
# run costs a generator, feature extraction and a figure).

_DECOMPOSE = (
  _KILLER
  + """
import runpy
sys.argv[0] = "decompose"
runpy.run_module("experiments.decompose", run_name="__main__", alter_sys=True)
"""
)
_FLAGS = [
  "--layer=3",
  "--num_samples=16",
  "--batch_size=8",
  "--rank_c=4",
  "--rank_s=3",
  "--steps=12",
  "--checkpoint_every=2",
  "--num_show=1",
]


def _decompose(generator, out, kill="none"):
  return subprocess.Popen(
    [sys.executable, "-c", _DECOMPOSE, kill, f"--generator={generator}", f"--out={out}", *_FLAGS],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.fixture(scope="module")
def decompose_reference(tmp_path_factory, converted):
  run = converted("stylegan2/network-snapshot.pkl")
  assert run.returncode == 0, run.stderr
  out = tmp_path_factory.mktemp("decompose") / "out"
  proc = _decompose(run.dst, out)
  assert proc.wait(timeout=300) == 0, proc.communicate()[1]
  return run.dst, pj.load_factors(os.path.join(out, "factors"))


def _assert_same_factors(out, reference):
  got = pj.load_factors(os.path.join(out, "factors"))
  np.testing.assert_array_equal(got.appearances, reference.appearances)
  np.testing.assert_array_equal(got.parts, reference.parts)
  np.testing.assert_array_equal(got.loss_history, reference.loss_history)


@full_only
@pytest.mark.parametrize(
  "stop",
  ["finalize:1", "finalize:3", "rename:2", "between_steps", "at_start_3", "SIGTERM", "SIGINT"],
)
def test_decompose_stopped_then_rerun(stop, decompose_reference, tmp_path):
  generator, reference = decompose_reference
  out = tmp_path / "out"
  proc = _decompose(generator, out, stop if ":" in stop else "none")
  if stop in ("between_steps", "SIGTERM", "SIGINT"):
    _wait_for_step(out / "checkpoints", proc, timeout=300)
  elif stop.startswith("at_start"):
    time.sleep(float(stop.split("_")[-1]))
  if ":" not in stop:
    sent = time.time()
    proc.send_signal(getattr(signal, stop, signal.SIGKILL))
  code = proc.wait(timeout=300)
  if stop.startswith("SIG"):
    assert code == 0 and time.time() - sent < 10, proc.communicate()[1]
    assert _steps_on_disk(out / "checkpoints")[0]  # Checkpointed where it stopped.
  else:
    assert code == -signal.SIGKILL
  assert not os.path.exists(out / "factors")  # No final outputs of an unfinished run.
  rerun = _decompose(generator, out)
  assert rerun.wait(timeout=300) == 0, rerun.communicate()[1]
  _assert_same_factors(out, reference)
