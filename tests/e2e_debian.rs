//! Tier 2, issue 4's flagship: nixpkgs' redis example on a real Debian.
//!
//! Base: `mmdebstrap --variant=minbase --format=tar bookworm` (pinned
//! SOURCE_DATE_EPOCH, cached in ~/.cache/runasroot), wrapped as a one-layer
//! docker-archive with no Env, so `useradd` is found through Docker's
//! default PATH as a Dockerfile RUN line finds it. Script, verbatim:
//! `groupadd -r redis && useradd -r -g redis -d /data -M redis && mkdir
//! /data && chown redis:redis /data`. The result must load with `docker
//! load` and run (`stat /data` says redis:redis), and its tree unpacked by
//! umoci must have /data owned by redis's uid/gid and redis in /etc/passwd.

mod common;
#[path = "common/images.rs"]
mod images;
mod helpers;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::*;
use helpers::*;
use images::tar_members;

/// `NAME:x:UID:GID:…` → (uid, gid) of `name` in a passwd file.
fn ids(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() >= 7).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

fn group_id(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() >= 3).then(|| f[2].parse().unwrap())
    })
}

#[test]
fn redis_user_on_debian_bookworm_minbase() {
    let dir = scratch();
    let base = dir.path().join("debian.tar");
    let built = match write_debian_base(&base) {
        Ok(b) => b,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "redis.sh", REDIS_SCRIPT);
    let out = dir.path().join("redis.tar");
    let layer_path = dir.path().join("layer.tar");
    let run = runasroot(
        &["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--layer-output", layer_path.to_str().unwrap(), "--tag", "redis-base:e2e"],
        &tmp,
    );
    ok(run);
    assert_empty_dir(&tmp);
    let layer = fs::read(&layer_path).unwrap();

    // What useradd and groupadd wrote, read from the layer itself.
    let members = tar_members(&layer_path);
    let text = |name: &str| {
        members.iter().find(|(n, _)| n == name).map(|(_, b)| String::from_utf8_lossy(b).into_owned()).unwrap_or_else(|| panic!("{name} in the layer"))
    };
    let passwd = text("etc/passwd");
    let (uid, gid) = ids(&passwd, "redis").unwrap_or_else(|| panic!("redis in /etc/passwd:\n{passwd}"));
    assert_eq!(group_id(&text("etc/group"), "redis"), Some(gid), "redis's group");
    // System ids (below 1000: -r), Debian's first free one.
    assert!(uid < 1000 && gid < 1000, "system ids: {uid}:{gid}");
    let redis_line = passwd.lines().find(|l| l.starts_with("redis:")).unwrap();
    assert!(redis_line.starts_with(&format!("redis:x:{uid}:{gid}:")) && redis_line.contains(":/data:"), "{redis_line}");

    // The whole layer: shadow's files and the backups it keeps (modes and
    // the shadow group as on Debian), its lock file (opened for writing, so
    // overlayfs copies it up; checked with the host's overlayfs and chroot),
    // /data, and nothing else: no whiteouts, no /dev /proc /sys, no
    // script, no leftover *.lock files, no lastlog/faillog change.
    let len = |name: &str| members.iter().find(|(n, _)| n == name).map(|(_, b)| b.len()).unwrap_or_else(|| panic!("{name}"));
    let shadow_gid = group_id(&text("etc/group"), "shadow").expect("Debian has a shadow group");
    let mut want = vec![
        format!("data/ dir 755 {uid}:{gid} 0"),
        "etc/ dir 755 0:0 0".to_string(),
        "etc/.pwd.lock file 600 0:0 0".to_string(),
    ];
    for (name, mode, g) in [
        ("group", 0o644, 0),
        ("group-", 0o644, 0),
        ("gshadow", 0o640, shadow_gid),
        ("gshadow-", 0o640, shadow_gid),
        ("passwd", 0o644, 0),
        ("passwd-", 0o644, 0),
        ("shadow", 0o640, shadow_gid),
        ("shadow-", 0o640, shadow_gid),
    ] {
        want.push(format!("etc/{name} file {mode:o} 0:{g} {}", len(&format!("etc/{name}"))));
    }
    assert_eq!(listing(&layer), want, "the new layer, entry by entry");
    assert!(mtimes(&layer).iter().all(|&m| m == 1), "every new entry gets the epoch (1)");

    // The image: one base layer byte for byte, plus the new one.
    let img = OutImage::open(&out, dir.path());
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0].digest, built.images[0].layer_digests[0], "the Debian layer byte for byte");
    assert_eq!(img.new_layer(), layer);

    if have("skopeo") {
        let v: serde_json::Value = serde_json::from_str(&skopeo(&["inspect", &format!("docker-archive:{}", out.display())])).unwrap();
        assert_eq!(v["Layers"].as_array().unwrap().len(), 2);
        if !is_root() {
            skip("umoci raw unpack needs root to restore owners");
        } else if have("umoci") {
            let copy = dir.path().join("oci");
            skopeo(&["copy", &format!("docker-archive:{}", out.display()), &format!("oci:{}:redis", copy.display())]);
            let rootfs = dir.path().join("rootfs");
            must(Command::new("umoci").args(["raw", "unpack", "--image"]).arg(format!("{}:redis", copy.display())).arg(&rootfs));
            let data = fs::metadata(rootfs.join("data")).unwrap();
            assert_eq!((data.uid(), data.gid()), (uid, gid), "umoci: /data owned by redis");
            let unpacked = fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
            assert_eq!(ids(&unpacked, "redis"), Some((uid, gid)), "umoci: redis in /etc/passwd");
            assert!(rootfs.join("usr/sbin/useradd").exists(), "umoci: the Debian base is there");
        }
    }

    let Some(d) = Dockerd::start() else { return };
    let load = d.docker(&["load", "-i", out.to_str().unwrap()]);
    assert!(load.status.success(), "docker load: {}", String::from_utf8_lossy(&load.stderr));
    let run = d.docker(&["run", "--rm", "--network", "none", "redis-base:e2e", "stat", "-c", "%U:%G %u:%g", "/data"]);
    assert!(run.status.success(), "docker run: {}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), format!("redis:redis {uid}:{gid}"), "docker run … stat /data");
}
