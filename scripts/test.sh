#!/usr/bin/env bash
# Set up the machine if needed, then run the test suite; extra arguments go to pytest.
set -uo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

bash scripts/setup.sh || exit $?

.venv/bin/python -m pytest -q tests "$@"
rc=$?
if ((rc == 5)); then
    echo "test: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
