#!/usr/bin/env bash
# Install what `python -m cxr.tools.export --web` and tests/test_web.py need outside PyPI:
#   onnxruntime-web (npm) into $CXR_WEB_VENDOR (default build/npm) — export copies its dist/ files
#   dicom-parser (npm, same folder) — export copies its dist/dicomParser.min.js: the page's DICOM header parser
#   playwright-core (npm, same folder; drives the system chromium, downloads no browser) — the page test
#   chromium (Debian apt, root only) — the headless browser of the page test
# Usage: scripts/web-deps.sh [npm|chromium|all]   (make web-deps runs `all`)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENDOR=${CXR_WEB_VENDOR:-$ROOT/build/npm}
ORT_VERSION=${ORT_WEB_VERSION:-1.30.0}
PW_VERSION=${PLAYWRIGHT_CORE_VERSION:-1.65.1}
DICOM_PARSER_VERSION=${DICOM_PARSER_VERSION:-1.8.21}
say() { echo "web-deps: $*" >&2; }
die() { say "$*"; exit 1; }

install_npm() {
    if [[ -f $VENDOR/node_modules/onnxruntime-web/package.json && -f $VENDOR/node_modules/playwright-core/package.json &&
        -f $VENDOR/node_modules/dicom-parser/package.json ]]; then
        return 0
    fi
    command -v npm >/dev/null || die "npm not found — install Node.js (apt-get install -y npm)"
    mkdir -p "$VENDOR"
    say "npm install onnxruntime-web@$ORT_VERSION dicom-parser@$DICOM_PARSER_VERSION playwright-core@$PW_VERSION into $VENDOR"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$VENDOR" --no-audit --no-fund --loglevel=error \
        "onnxruntime-web@$ORT_VERSION" "dicom-parser@$DICOM_PARSER_VERSION" "playwright-core@$PW_VERSION" >&2
}

install_chromium() {
    command -v chromium >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "chromium missing; run as root to install it (apt-get install -y chromium)"
    command -v apt-get >/dev/null || die "chromium missing and no apt-get — install Chromium by hand"
    say "apt-get install chromium"
    local rc=0
    mkdir -p "$ROOT/build"
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    } >"$ROOT/build/apt-chromium.log" 2>&1 || rc=$?
    ((rc == 0)) || die "apt-get failed (see $ROOT/build/apt-chromium.log)"
}

case "${1:-all}" in
    npm) install_npm ;;
    chromium) install_chromium ;;
    all) install_npm; install_chromium ;;
    *) die "unknown target ${1} — use npm | chromium | all" ;;
esac
