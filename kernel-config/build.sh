#!/usr/bin/env bash
# Build the runasroot guest kernel: Debian's linux-source-6.12, `make
# tinyconfig` + runasroot.config (+ debug.config when
# RUNASROOT_KERNEL_DEBUG=1). Prints the directory holding bzImage, vmlinux
# (stripped ELF) and config.
#
# The result is cached outside the source tree, keyed by a hash of what it
# is built from (kernel source tarball, fragments, this script), so a second
# build is instant. Concurrent builds of the same key wait on a lock.
#
# Environment:
#   RUNASROOT_KERNEL_SOURCE  kernel tarball (default /usr/src/linux-source-6.12.tar.xz)
#   RUNASROOT_CACHE          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/runasroot)
#   RUNASROOT_KERNEL_DEBUG   1 to merge debug.config
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=${RUNASROOT_KERNEL_SOURCE:-/usr/src/linux-source-6.12.tar.xz}
cache=${RUNASROOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/runasroot}

if [ ! -f "$src" ]; then
  echo "kernel-config/build.sh: kernel source $src not found." >&2
  echo "  fix: apt-get install linux-source-6.12 (or set RUNASROOT_KERNEL_SOURCE)" >&2
  exit 1
fi
for tool in make gcc bc bison flex xz; do
  command -v "$tool" >/dev/null || {
    echo "kernel-config/build.sh: '$tool' is missing; fix: apt-get install build-essential bc bison flex xz-utils libelf-dev" >&2
    exit 1
  }
done

fragments=("$here/runasroot.config")
[ "${RUNASROOT_KERNEL_DEBUG:-0}" = 1 ] && fragments+=("$here/debug.config")

# The key: the tarball's identity (name, size, mtime: hashing 140 MB on
# every cargo build would cost a second) plus every file the build reads.
key=$( { stat -c '%n %s %Y' "$src"; cat "${fragments[@]}" "$here/build.sh"; } | sha256sum | cut -c1-16)
out="$cache/kernel-$key"

if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/kernel-$key.lock"
flock 9
if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "$cache/kernel-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "kernel-config/build.sh: building kernel $key in $work (about 5 minutes on 2 cores)" >&2
tar -C "$work" -xf "$src"
ksrc=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
jobs=$(nproc)
{
  make -C "$ksrc" -s tinyconfig
  "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "${fragments[@]}"
  make -C "$ksrc" -s olddefconfig
} >&2

# Every option the fragments ask for must have survived olddefconfig.
missing=0
for frag in "${fragments[@]}"; do
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*)
        grep -qxF "$line" "$ksrc/.config" || { echo "missing from final .config: $line (from $(basename "$frag"))" >&2; missing=1; } ;;
      "# CONFIG_"*" is not set")
        opt=${line#\# }; opt=${opt%% *}
        if grep -q "^$opt=" "$ksrc/.config"; then echo "should be off but is set: $opt (from $(basename "$frag"))" >&2; missing=1; fi ;;
    esac
  done < "$frag"
done
if [ "$missing" != 0 ]; then
  echo "kernel-config/build.sh: Kconfig dropped options above; add their dependencies to the fragment" >&2
  exit 1
fi

make -C "$ksrc" -s -j"$jobs" bzImage >&2
mkdir -p "$out.tmp"
cp "$ksrc/arch/x86/boot/bzImage" "$out.tmp/bzImage"
objcopy --strip-all "$ksrc/vmlinux" "$out.tmp/vmlinux"
cp "$ksrc/.config" "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
