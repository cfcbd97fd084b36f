# apt_install PKG...: `apt-get update` and `apt-get install` of Debian packages, tried three times
# (mirrors can hiccup). Sourced by the test scripts that need one; runs as root or through
# passwordless sudo; never reads stdin.
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  local try sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
  for try in 1 2 3; do
    if "${sudo[@]}" apt-get update -qq </dev/null &&
       "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
         -o DPkg::Lock::Timeout=300 "$@" </dev/null >/dev/null; then
      return 0
    fi
    echo "apt-get install $* failed (try $try), retrying" >&2
    sleep $((try * 5))
  done
  return 1
}
