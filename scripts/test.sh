#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv and the system packages the tests need, run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k prep`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
# The SLURM tests start a throwaway cluster from Debian's slurm-wlm + munge. In CI a failed install is
# an error (those tests must run there); elsewhere they skip with the reason.
if ! bash scripts/install_slurm.sh; then
  if [ "${CI:-}" = true ]; then echo "cannot install the SLURM packages the tests need" >&2; exit 1; fi
  echo "warning: SLURM packages missing: the SLURM tests will skip" >&2
fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing (exit 5 must not pass silently)" >&2; exit 1; fi
exit "$rc"
