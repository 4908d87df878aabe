#!/usr/bin/env bash
# Builds the Switchyard guest kernel (an uncompressed ELF `vmlinux`) from Debian's
# linux-source-6.1 with microvm.config laid over `make tinyconfig`, and caches it by the hash of
# the config, this script and the source package version, outside the repository:
#
#   $SWITCHYARD_KERNEL_CACHE/<hash>/vmlinux   (default /var/cache/switchyard/kernel)
#
# Prints the vmlinux path. A cached build is reused (about 4 minutes on 2 cores otherwise).
# Needs: linux-source-6.1 gcc make flex bison bc libelf-dev libssl-dev (installed by setup).
# >>> variant
#
# `build.sh VARIANT` also lays VARIANT.config over microvm.config (`nested`: the outer VM of the
# nested-KVM test harness, tests/nested) and caches that kernel as <cache>/VARIANT-<hash>.
# Blocks between `# >>> variant` and `# <<< variant` are left out of the default kernel's cache
# key, so adding variants did not change it (every existing cache stays valid).
# <<< variant
set -euo pipefail
# >>> variant
variant=${1:-}
case "$variant" in
  '') ;;
  *[!a-z0-9_-]* | microvm) echo "build.sh: bad variant '$variant'" >&2; exit 2 ;;
  *) [ -f "$(dirname "$0")/$variant.config" ] || { echo "build.sh: no $variant.config" >&2; exit 2; } ;;
esac
# <<< variant
here=$(cd "$(dirname "$0")" && pwd)
cache=${SWITCHYARD_KERNEL_CACHE:-/var/cache/switchyard/kernel}
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "build.sh: $tarball missing (apt-get install linux-source-6.1)" >&2; exit 1; }
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
hash=$( { cat "$here/microvm.config" "$here/build.sh"; echo "$srcver"; } | sha256sum | cut -c1-16)
# >>> variant
# The key is over this script without its variant blocks (the line above hashed all of it).
recipe() { sed '/^# >>> variant$/,/^# <<< variant$/d' "$here/build.sh"; }
if [ -z "$variant" ]; then
  hash=$( { cat "$here/microvm.config"; recipe; echo "$srcver"; } | sha256sum | cut -c1-16)
else
  hash=$variant-$( { cat "$here/microvm.config" "$here/$variant.config" "$here/build.sh"; echo "$srcver"; } | sha256sum | cut -c1-16)
fi
# <<< variant
out=$cache/$hash
if [ -f "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build.sh: building the guest kernel ($srcver, config $hash) in $work" >&2
tar -xf "$tarball" -C "$work"
src=$(echo "$work"/linux-source-6.1)
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/microvm.config" >&2
# >>> variant
if [ -n "$variant" ]; then
  "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/$variant.config" >&2
fi
# <<< variant
make -C "$src" -s olddefconfig >&2
# Every option asked for must have survived olddefconfig (a missing dependency drops it).
missing=()
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  key=${line%%=*}; want=${line#*=}
  if [ "$want" = n ]; then
    grep -q "^$key=" "$src/.config" && missing+=("$line")
  else
    grep -qx "$key=$want" "$src/.config" || missing+=("$line")
  fi
done <"$here/microvm.config"
# >>> variant
if [ -n "$variant" ]; then
  while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    key=${line%%=*}; want=${line#*=}
    if [ "$want" = n ]; then
      grep -q "^$key=" "$src/.config" && missing+=("$line")
    else
      grep -qx "$key=$want" "$src/.config" || missing+=("$line")
    fi
  done <"$here/$variant.config"
fi
# <<< variant
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build.sh: options not in the final config: ${missing[*]}" >&2
  exit 1
fi
make -C "$src" -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/.config" "$out.tmp/"
strip --strip-debug "$out.tmp/vmlinux" 2>/dev/null || true
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out/vmlinux"
