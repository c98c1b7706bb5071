#!/usr/bin/env bash
# flannelette quick start: `bash scripts/quickstart.sh demo` or `bash scripts/quickstart.sh test`.
# Installs what the project needs on Debian 12 (system packages, a virtualenv, the package),
# then runs the demo or the whole test suite. Safe and quick to run again.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
what=${1:-}
shift || true

case "$what" in
  demo|test|setup) ;;
  *) echo "usage: bash scripts/quickstart.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "flannelette needs root (network namespaces, TUN devices, routes): run this as root." >&2
  exit 1
fi

# System packages from Debian. Only touch apt when something is missing.
pkgs=(etcd-server etcd-client iproute2 iputils-ping iperf3 tshark libpcap0.8 nftables iptables procps
      ethtool python3-venv python3-pip kmod containernetworking-plugins)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's etcd-server package may start a system etcd; the project never uses it.
modprobe vxlan 2>/dev/null || true
modprobe tun 2>/dev/null || true

# A virtualenv with the package and its test tools, reinstalled only when pyproject.toml changes.
py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "flannelette needs Python >= 3.11; $py is $("$py" --version 2>&1)" >&2
  exit 1
fi
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating virtualenv $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.flannelette-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing flannelette and its dependencies into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test,bench]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

case "$what" in
  setup) echo "== set up; the venv is $venv" ;;
  demo) exec "$venv/bin/flannelette" demo "$@" ;;
  test)
    echo "== ruff"; "$venv/bin/ruff" check .
    echo "== mypy"; "$venv/bin/mypy"
    echo "== pytest"; exec "$venv/bin/python" -m pytest "$@"
    ;;
esac
