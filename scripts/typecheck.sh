#!/usr/bin/env bash
# mypy over the source as the installed package sees it. The folders gateway/ and drivers/ install as storelink
# and storelink.drivers (pyproject.toml, package-dir), which mypy cannot follow through setuptools' editable import
# hook, so this builds a tree of symlinks, build/typecheck/storelink/{gateway's entries, drivers -> drivers/},
# and runs mypy on it with pyproject's settings. Paths in mypy's messages are mapped back to the source folders.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/storelink
rm -rf build/typecheck
mkdir -p "$tree"
for entry in gateway/*; do
    [[ $(basename "$entry") == __pycache__ ]] || ln -s "$PWD/$entry" "$tree/"
done
ln -s "$PWD/drivers" "$tree/drivers"
MYPY=${MYPY:-.venv/bin/mypy}
"$MYPY" "$@" 2>&1 | sed -e "s#^$tree/drivers/#drivers/#" -e "s#^$tree/#gateway/#"
exit "${PIPESTATUS[0]}"
