//! The edge-case base of FORMATS.md: a busybox base whose layers hold
//! every input-side row of the edge-case table, the one script that makes
//! every output-side row and reports what it saw of the input side, and
//! what that report and the new layer must be. Used by tier 2
//! (e2e_formats.rs, through QEMU) and tier 3 (e2e_tier3.rs, the built-in
//! VMM).
//!
//! Include after `mod common;`, `#[path = "common/images.rs"] mod images;`
//! and `mod helpers;` with `#[path = "common/edge.rs"] mod edge;`.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::helpers::*;
use crate::images::*;

/// `setcap cap_net_bind_service+ep` as the kernel stores it
/// (vfs_cap_data revision 2: magic|effective, permitted lo/hi, inheritable).
pub const CAP: [u8; 20] = [0x01, 0, 0, 0x02, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
pub const LONG_NAME_LEN: usize = 150;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How `listing()` shows an xattr value.
pub fn shown(value: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(value))
}

pub fn long_name() -> String {
    format!("long-{}", "x".repeat(LONG_NAME_LEN - 5))
}

pub fn long_target() -> String {
    format!("target-{}", "y".repeat(150))
}

/// The edge-case base: busybox + rar-helper, then a plain layer with the
/// lower halves of every input case, then a gzip layer on top of it.
/// Env without PATH, so the script must get Docker's default PATH.
pub fn edge_image() -> Option<Image> {
    let mut l0 = busybox_entries()?;
    let helper = rar_helper()?;
    l0.extend([dir("usr"), dir("usr/local"), dir("usr/local/bin"), file(RAR_HELPER_IN_IMAGE, helper).mode(0o755)]);

    let l1 = vec![
        dir("opq"),
        file("opq/a", "a\n"),
        file("opq/b", "b\n"),
        dir("opq2"),
        file("opq2/a", "a\n"),
        dir("hl"),
        file("hl/a", "shared\n"),
        hardlink("hl/b", "hl/a"),
        dir("devs"),
        char_dev("devs/null", 1, 3),
        block_dev("devs/loop", 7, 0),
        fifo("devs/fifo"),
        dir("xa"),
        file("xa/f", "xattr-file\n")
            .xattr("user.keep", "1")
            .xattr("security.capability", CAP)
            .xattr("trusted.overlay.redirect", "/elsewhere")
            .xattr("trusted.overlay.origin", [0u8, 1, 2]),
        dir("xo"),
        file("xo/old", "old\n"),
        dir("perm"),
        file("perm/suid", "s\n").mode(0o4755),
        file("perm/sgid", "g\n").mode(0o2755),
        dir("perm/sticky").mode(0o1777),
        dir("names"),
        file(b"names/bad\xffname".as_slice(), "odd\n"),
        file("names/bigowner", "big\n").owner(3_000_000_000, 3_000_000_001),
        file(format!("names/{}", long_name()), "long\n"),
        symlink("names/longlink", long_target()),
        dir("keepme").mode(0o750).owner(123, 456),
        dir("out").mode(0o750).owner(7, 8),
        file("out/rmme", "rm me\n"),
        file("out/rmme2", "rm me too\n"),
        dir("wh"),
        file("wh/x", "x\n"),
        file("wh/y", "y\n"),
        dir("out/redo"),
        file("out/redo/old", "old\n"),
        file("out/lowerfile", "lower\n"),
    ];

    let l2 = vec![
        // Opaque marker first, as writers should put it ...
        dir("opq"),
        opaque("opq"),
        file("opq/c", "c\n"),
        // ... and after its sibling: applied first whatever its position.
        dir("opq2"),
        file("opq2/c", "c\n"),
        opaque("opq2"),
        // A whiteout that shadows nothing.
        whiteout("nothing-here"),
        // A hardlink whose target is in the layer below.
        hardlink("hl/c", "hl/a"),
        // Writes into /tmp and /keepme without listing them: their lower
        // metadata (1777, 750 123:456) must stay.
        file("tmp/fromlayer2", "t\n"),
        file("keepme/f", "k\n"),
        // trusted.overlay.* in an input layer: stripped, or /xo/old would
        // vanish (opaque) and /meta would refuse to open (metacopy=off).
        dir("xo").xattr("trusted.overlay.opaque", "y"),
        file("xo/new", "new\n"),
        file("meta", "real data\n").xattr("trusted.overlay.metacopy", ""),
        // A whiteout applies to lower layers only: the same layer's file stays.
        dir("same"),
        file("same/x", "kept\n"),
        whiteout("same/x"),
    ];

    Some(
        image(vec![layer(l0), layer(l1), layer(l2).gzip()])
            .tag("edge:1")
            .env(&["IMG_VAR=from-image", "OVERRIDE=image"]),
    )
}

/// The one script: output-side cases first (each failure is recorded, not
/// fatal, so one broken case does not hide the others), then the report.
pub fn edge_script() -> String {
    format!(
        r#"fails=
op() {{ "$@" || fails="$fails [$*]"; }}
op rm /out/rmme /out/rmme2 /wh/x /wh/y
op sh -c 'rm -rf /out/redo && mkdir /out/redo && echo new > /out/redo/n'
op mknod /out/c c 4 5
op mknod /out/b b 8 1
op mknod /out/p p
op rar-helper socket /out/sock
op sh -c 'echo hl > /out/h1 && ln /out/h1 /out/h2 && ln /out/h1 /out/h3'
op sh -c 'echo cap > /out/cap'
op rar-helper setxattr /out/cap security.capability {cap}
op rar-helper setxattr /out/cap user.note 68656c6c6f
op sh -c 'echo s > /out/suid && chmod 4755 /out/suid'
op chmod u+s /out/lowerfile
op sh -c 'mkdir /out/sgid && chmod 2775 /out/sgid'
op sh -c 'mkdir /out/sticky && chmod 1777 /out/sticky'
op sh -c 'echo o > /out/owned && chown 1234:5678 /out/owned'
op sh -c 'echo b > /out/bigowned && chown 4000000000:4000000001 /out/bigowned'
op sh -c 'touch /out/gone && rm /out/gone'
op sh -c 'mkdir /out/gonedir && rmdir /out/gonedir'
# A char device 0:0 made by the script reads as a whiteout in the upper
# dir, of a path no lower has: nothing may come of it (the kernel may also
# refuse to make it).
mknod /out/nolower c 0 0 2>/dev/null || true
op sh -c 'echo x > /dev/null'
op chmod 640 /xa/f
op cp -a /names /names-copy
ex() {{ if [ -e "$1" ] || [ -L "$1" ]; then echo "$1 present"; else echo "$1 absent"; fi; }}
{{
echo "opq: $(ls /opq | tr '\n' ' ')"
echo "opq2: $(ls /opq2 | tr '\n' ' ')"
ex /nothing-here
echo "wh-names: $(find / -xdev -name '.wh.*' | wc -l)"
echo "hl: $(cat /hl/a /hl/b /hl/c | tr '\n' ' ')"
if [ /hl/a -ef /hl/b ]; then echo "hl a b: one inode"; else echo "hl a b: two inodes"; fi
stat -c '%n %F %t:%T %a' /devs/null /devs/loop /devs/fifo
echo "xa: $(cat /xa/f)"
echo "xo: $(ls /xo | tr '\n' ' ')"
echo "meta: $(cat /meta 2>&1)"
stat -c '%n %a' /perm/suid /perm/sgid /perm/sticky
stat -c '%n %u:%g' /names/bigowner
echo "names: $(ls /names | wc -l)"
stat -c '%n %a %u:%g' /tmp /keepme
echo "keepme: $(cat /keepme/f)"
echo "same: $(cat /same/x 2>&1)"
echo "env: IMG_VAR=$IMG_VAR OVERRIDE=$OVERRIDE CLI_VAR=$CLI_VAR TZ=${{TZ-unset}} LANG=${{LANG-unset}}"
echo "PATH=$PATH"
echo "HOME=$HOME cwd=$(pwd) umask=$(umask) uid=$(id -u)"
echo "ctr: $(cat /ctr/fromdir /ctr/fromtar | tr '\n' ' ')"
echo "links: $(ip -o link | cut -d: -f2 | tr -d ' ' | tr '\n' ' ')"
echo "up: $(ip -o link | grep -E '[<,]UP[,>]' | cut -d: -f2 | tr -d ' ' | tr '\n' ' ')"
echo "addresses on: $(ip -o addr | awk '{{print $2}}' | sort -u | tr '\n' ' ')"
if ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1; then echo "lo: up"; else echo "lo: down"; fi
echo "op failures:$fails"
}} > /out/report 2>&1
"#,
        cap = hex(&CAP)
    )
}

/// What the script must see.
pub fn expected_report() -> String {
    [
        "opq: c ",
        "opq2: c ",
        "/nothing-here absent",
        "wh-names: 0",
        "hl: shared shared shared ",
        "hl a b: one inode",
        "/devs/null character special file 1:3 666",
        "/devs/loop block special file 7:0 660",
        "/devs/fifo fifo 0:0 644",
        "xa: xattr-file",
        "xo: new old ",
        "meta: real data",
        "/perm/suid 4755",
        "/perm/sgid 2755",
        "/perm/sticky 1777",
        "/names/bigowner 3000000000:3000000001",
        "names: 4",
        "/tmp 1777 0:0",
        "/keepme 750 123:456",
        "keepme: k",
        "same: kept",
        // The image's Env, then --env; nothing of the host's TZ or locale.
        "env: IMG_VAR=from-image OVERRIDE=cli CLI_VAR=x TZ=unset LANG=unset",
        // Docker's default PATH: the image sets none.
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root cwd=/ umask=0022 uid=0",
        // copy-to-root (a directory and a tar) is in place before the script.
        "ctr: dir! tar! ",
        // No network: loopback is the only device (as Docker's `--network
        // none` shows it: our kernel has no tunnel drivers such as sit0),
        // up, with addresses.
        "links: lo ",
        "up: lo ",
        "addresses on: lo ",
        "lo: up",
        "op failures:",
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect()
}

/// The new layer, in full, in the order FORMATS.md fixes.
pub fn expected_layer(report_len: usize) -> Vec<String> {
    let cap = shown(&CAP);
    vec![
        "ctr/ dir 755 0:0 0".to_string(),
        "ctr/fromdir file 644 0:0 5".into(),
        "ctr/fromtar file 600 42:43 5".into(),
        "names-copy/ dir 755 0:0 0".into(),
        "names-copy/bad\u{fffd}name file 644 0:0 4".into(),
        "names-copy/bigowner file 644 3000000000:3000000001 4".into(),
        format!("names-copy/{} file 644 0:0 5", long_name()),
        format!("names-copy/longlink symlink 777 0:0 0 -> {}", long_target()),
        // Copied up for the changes below: keeps the lower dir's metadata.
        "out/ dir 750 7:8 0".into(),
        // Several whiteouts share one inode in overlayfs: each is its own
        // empty file, never a hardlink to the first.
        "out/.wh.rmme file 644 0:0 0".into(),
        "out/.wh.rmme2 file 644 0:0 0".into(),
        "out/b block 8:1 644 0:0 0".into(),
        "out/bigowned file 644 4000000000:4000000001 2".into(),
        "out/c char 4:5 644 0:0 0".into(),
        format!("out/cap file 644 0:0 4 [security.capability={cap},user.note=\"hello\"]"),
        "out/h1 file 644 0:0 3".into(),
        "out/h2 hardlink 644 0:0 0 -> out/h1".into(),
        "out/h3 hardlink 644 0:0 0 -> out/h1".into(),
        "out/lowerfile file 4644 0:0 6".into(),
        "out/owned file 644 1234:5678 2".into(),
        "out/p fifo 644 0:0 0".into(),
        "out/redo/ dir 755 0:0 0".into(),
        "out/redo/.wh..wh..opq file 644 0:0 0".into(),
        "out/redo/n file 644 0:0 4".into(),
        format!("out/report file 644 0:0 {report_len}"),
        "out/sgid/ dir 2775 0:0 0".into(),
        "out/sticky/ dir 1777 0:0 0".into(),
        "out/suid file 4755 0:0 2".into(),
        // No sock (sockets are skipped), no gone/gonedir (created and
        // deleted), no nolower, nothing for dev/ proc/ sys/ or the script.
        "wh/ dir 755 0:0 0".into(),
        "wh/.wh.x file 644 0:0 0".into(),
        "wh/.wh.y file 644 0:0 0".into(),
        "xa/ dir 755 0:0 0".into(),
        // Copied up by chmod: user.* and security.capability kept, the
        // input's trusted.overlay.* gone.
        format!("xa/f file 640 0:0 11 [security.capability={cap},user.keep=\"1\"]"),
    ]
}

/// --copy-to-root inputs: a directory (packed by the host, owned by root)
/// and a tar (entries as given).
pub fn copy_to_root_inputs(at: &Path) -> (PathBuf, PathBuf) {
    let d = at.join("ctr-dir");
    fs::create_dir_all(d.join("ctr")).unwrap();
    fs::write(d.join("ctr/fromdir"), "dir!\n").unwrap();
    for (p, m) in [(d.clone(), 0o755), (d.join("ctr"), 0o755), (d.join("ctr/fromdir"), 0o644)] {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    }
    let t = at.join("ctr.tar");
    write_layer_tar(&[dir("ctr"), file("ctr/fromtar", "tar!\n").mode(0o600).owner(42, 43)], fs::File::create(&t).unwrap())
        .unwrap();
    fs::set_permissions(&t, fs::Permissions::from_mode(0o644)).unwrap();
    (d, t)
}
