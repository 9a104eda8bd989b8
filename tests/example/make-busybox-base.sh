#!/usr/bin/env bash
# Builds a small docker-archive base image from Debian's busybox-static:
# /bin/busybox with its applet links, /etc/passwd and /etc/group for root,
# /tmp 1777, /root. Reproducible: fixed owners, mtimes and order.
# Usage: make-busybox-base.sh OUT.tar
set -euo pipefail
out=$(realpath -m "$1")
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "make-busybox-base.sh: $busybox not found; fix: apt-get install busybox-static" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,root,tmp,usr/bin,usr/sbin,sbin}
cp "$busybox" "$root/bin/busybox"
for applet in sh ls cat echo mkdir chown chmod rm mv cp ln id stat touch grep sed sleep true false mknod setcap env; do
  ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
tar -C "$root" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1 --format=pax \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir -p "$work/img/$diff_id"
mv "$work/layer.tar" "$work/img/$diff_id/layer.tar"
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:01Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created":"1970-01-01T00:00:01Z","created_by":"make-busybox-base.sh"}]}
JSON
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/img/$config.json"
printf '[{"Config":"%s.json","RepoTags":["busybox-base:latest"],"Layers":["%s/layer.tar"]}]\n' "$config" "$diff_id" > "$work/img/manifest.json"
(cd "$work/img" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1 -cf "$out" manifest.json "$config.json" "$diff_id")
echo "$out"
