#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: Debian packages (OpenSSH's sshd for the
# SFTP tests, sshfs for a share mounted across a network, Chromium for the browser tests)
# and the project's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v sftp >/dev/null || need+=(openssh-client)
command -v sshfs >/dev/null || need+=(sshfs)
if [ "${CRAFTFLOW_SKIP_BROWSER:-0}" != 1 ]; then
  command -v chromium >/dev/null || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e '.[test,celery,photos]'
  touch "$stamp"
fi
