#!/usr/bin/env bash
# Installs the Debian 12 packages hbn needs that this machine lacks.
#   scripts/install_deps.sh [demo|test]   (default: test)
set -euo pipefail

packages=(cmake ninja-build g++ libhalide14-0-dev)
if [[ "${1:-test}" == test ]]; then
    packages+=(libgtest-dev)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "Installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
