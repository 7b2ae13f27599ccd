"""How idle OpenMP threads wait: one setting for every entry point, applied before torch loads.

PyTorch's CPU kernels split each operation between threads and wait for all of them at its end. How a waiting
thread waits is read once, when the OpenMP runtime loads with torch, from OMP_WAIT_POLICY (and GOMP_SPINCOUNT
for GNU OpenMP, which pip's torch uses):

* spinning (`ACTIVE`, or libgomp's default: a bounded spin of 300,000 iterations) is fastest on an idle
  machine, but a process whose threads share cores with DataLoader workers, other ranks or other jobs spins
  through the scheduler's time slices at every parallel region: training measured 18x slower on a loaded 2-core
  CPU (docs/performance.md);
* `PASSIVE` (sleep at once) never wastes a core, at the cost of a wake-up per parallel region: 13-15% of the
  training step on an idle machine;
* a bounded spin (GOMP_SPINCOUNT=N) sits in between; measured, neither 1,000 nor 10,000 gave both.

Entry points run `os.environ.update(threads.wait_policy())` before anything imports torch: DEFAULT_POLICY
unless the environment already chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT set: the user's setting wins).
bench/thread_policy.py measures the choices, each in its own process, on an idle and on a loaded machine.
"""

from __future__ import annotations

import os

DEFAULT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
"""What facetrain's commands use when the environment sets neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT. Measured
as whole processes, each variant alone, on this project's 2-core CPU (bench/thread_policy.py: tf_efficientnetv2_b0
224 px bf16, raw step and facetrain's step; bench/RESULTS.md): idle, PASSIVE gives 31-35 img/s against ACTIVE's
37-40 (13-15% slower); beside one busy process 15.6-16.9 against ACTIVE's 12-14 (25-30% faster), and on a
heavily loaded machine 18x faster (docs/performance.md). Bounded spins did not get both: GOMP_SPINCOUNT=10000
behaved like ACTIVE (12 img/s loaded), GOMP_SPINCOUNT=1000 like PASSIVE (idle within the run's noise). PASSIVE
never turns a shared CPU into the 18x case; on a dedicated machine set OMP_WAIT_POLICY=ACTIVE for the 13-15%."""


def wait_policy() -> dict[str, str]:
    """The environment variables to set: DEFAULT_POLICY, or nothing when the environment already chose."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    return dict(DEFAULT_POLICY)
