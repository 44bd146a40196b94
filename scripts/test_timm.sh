#!/usr/bin/env bash
# The tests against timm itself (tests_timm/) in an environment of their own: timm imports
# torchvision, which needs the torch build it was made for (requirements-timm.txt), not the
# CPU build of the default environment. Makes the environment if missing (about 5.5 GB;
# minutes), installs this checkout into it, and runs the tests; arguments go to pytest.
#   scripts/test_timm.sh            # all of them
#   scripts/test_timm.sh -k caution # some
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ADAMPX_TIMM_VENV:-.venv-timm}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r requirements-timm.txt
"$venv/bin/pip" install -q --no-deps -e .
exec "$venv/bin/python" -m pytest tests_timm "$@"
