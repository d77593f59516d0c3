#!/usr/bin/env bash
# Install what the browser tests need, when it is missing (issue 9):
#   - Debian's Chromium (apt-get; the tests launch it from /usr/bin/chromium), and
#   - Playwright's Python package (the driver only: we NEVER run `playwright install`,
#     which would download browsers; this machine reaches package registries only).
#
# usage: bash tests/browser/setup.sh PYTHON        (e.g. .venv/bin/python)
# env:   MRCNN_EDU_CHROMIUM=/path/to/chromium      use this browser instead of searching
set -euo pipefail

PYTHON="${1:-}"
if [[ -z "$PYTHON" ]]; then
    echo "usage: bash tests/browser/setup.sh PYTHON   (e.g. .venv/bin/python)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys" 2>/dev/null; then
    echo "setup.sh: '$PYTHON' is not a working Python interpreter" >&2
    exit 2
fi

how_to_install_chromium() {  # bash builtins only: it must work on a bare machine
    printf '%s\n' \
        "setup.sh: no Chromium found and apt-get cannot install it here." \
        "Install a Chromium or Chrome yourself, then rerun \`make test-browser\`:" \
        "  Debian/Ubuntu (as root):  apt-get update && apt-get install -y chromium" \
        "  Fedora:                   dnf install chromium" \
        "  macOS:                    brew install --cask chromium" \
        "or point the tests at an existing browser:  export MRCNN_EDU_CHROMIUM=/path/to/chromium" >&2
}

find_chromium() {
    if [[ -n "${MRCNN_EDU_CHROMIUM:-}" ]]; then
        if [[ -x "$MRCNN_EDU_CHROMIUM" ]]; then echo "$MRCNN_EDU_CHROMIUM"; return 0; fi
        echo "setup.sh: MRCNN_EDU_CHROMIUM=$MRCNN_EDU_CHROMIUM is not an executable file" >&2
        return 1
    fi
    local name
    for name in chromium chromium-browser google-chrome-stable google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    done
    return 1
}

# --- 1. Chromium -----------------------------------------------------------------------------
if chromium_path="$(find_chromium)"; then
    echo "setup.sh: Chromium found: $chromium_path"
else
    if [[ -n "${MRCNN_EDU_CHROMIUM:-}" ]]; then exit 1; fi
    SUDO=""
    if [[ "$EUID" != "0" ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    fi
    if ! command -v apt-get >/dev/null 2>&1 || { [[ "$EUID" != "0" ]] && [[ -z "$SUDO" ]]; }; then
        how_to_install_chromium
        exit 1
    fi
    echo "setup.sh: installing Debian's chromium with apt-get (update once, then install)"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get update -q || ! $SUDO apt-get install -y -q --no-install-recommends chromium; then
        how_to_install_chromium
        exit 1
    fi
    if ! chromium_path="$(find_chromium)"; then
        how_to_install_chromium
        exit 1
    fi
fi
if ! version="$("$chromium_path" --headless --no-sandbox --disable-gpu --version 2>/dev/null)"; then
    echo "setup.sh: $chromium_path is installed but does not start (try: $chromium_path --version)" >&2
    exit 1
fi
echo "setup.sh: $version"

# --- 2. Playwright's Python driver (no browser download) --------------------------------------
if "$PYTHON" -c "import playwright.sync_api" 2>/dev/null; then
    echo "setup.sh: playwright $("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p') present"
else
    echo "setup.sh: installing Playwright's Python package (driver only; no 'playwright install')"
    "$PYTHON" -m pip install --quiet "playwright>=1.40"
fi
echo "setup.sh: ready (the tests launch $chromium_path through Playwright)"
