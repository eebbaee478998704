# Sourced by the scripts that install what they need (bench/run.sh,
# scripts/build-pgo.sh): need_packages PKG... apt-gets these Debian
# packages when run as root, and otherwise stops with what to install.
need_packages() {
  (($#)) || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: install $* (or run as root to let this script apt-get them)" >&2
    exit 1
  fi
}
