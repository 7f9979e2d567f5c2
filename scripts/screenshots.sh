#!/usr/bin/env bash
# Photographs the web interface for the README: runs the browser test that checks the pages
# (axe-core, no sideways scrolling) with AMS_SCREENSHOTS=1, so that it writes its PNGs into
# docs/screenshots/ (login, dashboard, project and build pages at 1,280 px, the dashboard and
# the build page dark too, the build page on a 390 px phone). The test's data are made up
# by the test itself (long names, passing and failing builds, a failed test report).
# Exits non-zero when a check fails; the photographs are written all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
AMS_SCREENSHOTS=1 cargo test -p amsbuild --test it -- --exact \
  browser::the_pages_pass_axe_fit_a_phone_and_a_desktop_and_are_photographed
ls -l docs/screenshots/
