#!/usr/bin/env bash
# Builds the Switchyard guest initramfs: an uncompressed newc cpio holding the agent as /init
# (static musl release build, stripped) and the empty directories it mounts on. The kernel
# creates nothing in it: the agent mounts devtmpfs on /dev itself and opens /dev/console there.
#
#   guest/agent/build-initrd.sh OUT
#
# OUT is replaced atomically. Idempotent and reproducible: the same agent binary gives the same
# bytes (entries sorted, owned by root, timestamps at 0), and OUT is left untouched when its
# content would not change. Needs: cargo with the x86_64-unknown-linux-musl target, cpio, strip.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT" >&2
  exit 2
fi
out=$1
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=x86_64-unknown-linux-musl

# Optimised for size (5.5 MB instead of 8.4 MB with the workspace's release profile); the
# environment may override these.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=${CARGO_PROFILE_RELEASE_OPT_LEVEL:-s}
export CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-fat}
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1}
cargo build --quiet --release --target "$target" -p yard-agent \
  --manifest-path "$root/Cargo.toml" >&2
bin=${CARGO_TARGET_DIR:-$root/target}/$target/release/yard-agent
[ -x "$bin" ] || { echo "build-initrd.sh: $bin missing after the build" >&2; exit 1; }

stage=$(mktemp -d)
tmp=
cleanup() { rm -rf "$stage"; [ -z "$tmp" ] || rm -f "$tmp"; }
trap cleanup EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
chmod 0755 "$stage" "$stage"/{dev,proc,sys,run}
chmod 1777 "$stage/tmp"
cp "$bin" "$stage/init"
strip --strip-all "$stage/init"
chmod 0755 "$stage/init"
find "$stage" -exec touch -h -d @0 {} +

mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible) >"$tmp"
if [ -f "$out" ] && cmp -s "$tmp" "$out"; then
  rm -f "$tmp"
else
  chmod 0644 "$tmp"
  mv -f "$tmp" "$out"
fi
tmp=
echo "$out"
