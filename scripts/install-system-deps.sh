#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks start for real: the CNCF registry,
# containerd + runc, skopeo, a static busybox for test images, htpasswd, curl, iproute2 and the
# Python venv module. Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
packages=(docker-registry containerd runc skopeo busybox-static apache2-utils curl iproute2
          openssl python3-venv ca-certificates nftables fuse3 debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Debian packages start their own services; the tests start private instances instead.
for svc in docker-registry containerd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done
