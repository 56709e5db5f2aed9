#!/usr/bin/env bash
# Install what the launcher's SLURM tests need (Debian/Ubuntu): slurmctld, slurmd, slurm-client, munge.
# Idempotent: does nothing when the packages are already installed. Needs root (or sudo) and apt.
# The tests start their own throwaway cluster (tests/slurm_cluster.py); nothing is enabled or started here.
set -euo pipefail
PKGS="slurmctld slurmd slurm-client munge"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
  echo "install_slurm: already installed ($PKGS)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: apt-get not found; install$missing with your package manager (SLURM tests will skip)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_slurm: need root or sudo to install$missing" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install_slurm: installing$missing"
$SUDO apt-get update -q >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
echo "install_slurm: done"
