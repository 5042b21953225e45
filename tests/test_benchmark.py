"""`experiments/benchmark.py`: the machine reference it divides by (timings live in its JSON)."""
import concurrent.futures

import numpy as np
import pytest

from experiments import benchmark


@pytest.mark.parametrize("size,threads", [(1, 1), (1001, 3), (4096, 8)])
def test_parallel_copy_copies_every_element(size, threads):
  src = np.random.default_rng(size).random(size, np.float32)
  dst = np.full_like(src, np.nan)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    benchmark._parallel_copy(src, dst, pool, threads)  # pylint: disable=protected-access
  np.testing.assert_array_equal(dst, src)


def test_machine_peaks_are_positive_rates():
  peaks = benchmark.machine_peaks(repeats=1)
  assert peaks["gemm_gflops"] > 0 and peaks["copy_gbps"] > 0 and peaks["copy_threads"] >= 1
