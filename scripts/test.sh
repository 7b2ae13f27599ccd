#!/usr/bin/env bash
# Set up and run facetrain's whole test-suite on a fresh machine (Python >= 3.10; root for the Slurm part):
#   bash scripts/test.sh            # extra arguments go to pytest, e.g. -k sampler
# 1. installs facetrain with its test, align and serve extras and MLflow's client (torch comes from pip as usual);
# 2. installs and starts a one-node Slurm (munged, slurmctld, slurmd) for tests/test_slurm.py -- skipped with
#    a clear reason by those tests when this is not possible (not root, no apt);
# 3. lints with ruff, then runs pytest in 2 worker processes (pytest-xdist; whole test files per worker, so a
#    module's fixtures are built once): on a 2-core CPU about 1.5x faster than one process, because much of a
#    test's time is imports, process start-up and waiting on other processes. `-n 0` runs them in one process.
#    Tests that need ../shared/data/faces skip with a reason outside the facetrain workplace.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[test,align,serve]"
# tests/test_trackers.py's MLflow run: the `track` extra's client without the MLflow server and UI (mlflow-skinny,
# the same `mlflow` package: ~40 s and 99 MB here instead of ~115 s, 334 MB and a pyarrow downgrade)
python3 -m pip install -q --disable-pip-version-check "mlflow-skinny>=2"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bash scripts/start_slurm.sh || echo "scripts/test.sh: Slurm could not be started; Slurm tests will be skipped"
else
    echo "scripts/test.sh: not root or no apt-get: Slurm tests will be skipped"
fi
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
python3 -m ruff check .
python3 -m pytest -q -rs --durations=15 -n 2 --dist loadfile "$@"
