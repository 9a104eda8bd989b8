//! Choosing one image in an archive: by name (Docker's name rules) and by
//! platform. Pure functions; the readers call them.

/// Docker's registry for short names (`busybox` → `docker.io/library/busybox`).
const DEFAULT_REGISTRY: &str = "docker.io";
/// Docker's namespace for official images.
const OFFICIAL_NAMESPACE: &str = "library";
/// The tag a name without one means.
const DEFAULT_TAG: &str = "latest";
/// The platform runasroot's guest runs.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

/// Splits `NAME[:TAG][@DIGEST]` into name and tag (a `:` after the last
/// `/` starts the tag; one before it is a registry port).
pub fn split_name_tag(reference: &str) -> (&str, Option<&str>) {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].rfind(':') {
        Some(i) => (&without_digest[..last_slash + i], Some(&without_digest[last_slash + i + 1..])),
        None => (without_digest, None),
    }
}

/// Whether the first component of a name is a registry host (Docker's
/// rule: it has a `.` or a `:`, or is `localhost`).
fn has_registry(name: &str) -> bool {
    match name.split_once('/') {
        Some((first, _)) => first.contains('.') || first.contains(':') || first == "localhost",
        None => false,
    }
}

/// The fully qualified form Docker ≥ 25 writes in `io.containerd.image.name`:
/// `busybox` → `docker.io/library/busybox:latest`.
pub fn full_name(reference: &str) -> String {
    let (name, tag) = split_name_tag(reference);
    let name = if has_registry(name) {
        name.to_string()
    } else if name.contains('/') {
        format!("{DEFAULT_REGISTRY}/{name}")
    } else {
        format!("{DEFAULT_REGISTRY}/{OFFICIAL_NAMESPACE}/{name}")
    };
    format!("{name}:{}", tag.unwrap_or(DEFAULT_TAG))
}

/// The short form Docker shows and writes in RepoTags:
/// `docker.io/library/busybox:latest` → `busybox:latest`.
pub fn familiar_name(reference: &str) -> String {
    let full = full_name(reference);
    let rest = full
        .strip_prefix(&format!("{DEFAULT_REGISTRY}/{OFFICIAL_NAMESPACE}/"))
        .or_else(|| full.strip_prefix(&format!("{DEFAULT_REGISTRY}/")))
        .unwrap_or(&full);
    rest.to_string()
}

/// Whether a name the user asked for is one the archive gives: equal as
/// written (an OCI `ref.name` like `latest` or `v1`), or equal once both
/// are fully qualified (`busybox` = `docker.io/library/busybox:latest`).
pub fn name_matches(wanted: &str, candidate: &str) -> bool {
    wanted == candidate || full_name(wanted) == full_name(candidate)
}

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, normalising architecture aliases.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let arch = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().filter(|p| !p.is_empty()).map(str::to_string);
        if parts.next().is_some() {
            return None;
        }
        Some(Platform { os: os.to_string(), architecture: normalize_arch(arch).to_string(), variant })
    }

    /// Whether an image built for `self` serves a request for `wanted`
    /// (a variant is compared only when asked for).
    pub fn satisfies(&self, wanted: &Platform) -> bool {
        self.os == wanted.os
            && normalize_arch(&self.architecture) == wanted.architecture
            && (wanted.variant.is_none() || self.variant == wanted.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// GOARCH names, as OCI platforms use them.
fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" => "386",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_names_and_tags() {
        let cases = [
            ("busybox", ("busybox", None)),
            ("busybox:1.36", ("busybox", Some("1.36"))),
            ("localhost:5000/a/b:t", ("localhost:5000/a/b", Some("t"))),
            ("localhost:5000/a/b", ("localhost:5000/a/b", None)),
            ("a:t@sha256:00", ("a", Some("t"))),
        ];
        for (r, want) in cases {
            assert_eq!(split_name_tag(r), want, "{r}");
        }
    }

    #[test]
    fn qualifies_and_familiarises_names_as_docker_does() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
            ("busybox:1", "docker.io/library/busybox:1", "busybox:1"),
            ("me/app:2", "docker.io/me/app:2", "me/app:2"),
            ("docker.io/library/redis:7", "docker.io/library/redis:7", "redis:7"),
            ("ghcr.io/o/r:v", "ghcr.io/o/r:v", "ghcr.io/o/r:v"),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
        ];
        for (r, full, familiar) in cases {
            assert_eq!((full_name(r).as_str(), familiar_name(r).as_str()), (full, familiar), "{r}");
        }
    }

    #[test]
    fn matches_names_loosely_but_not_tags() {
        let cases = [
            ("busybox:latest", "docker.io/library/busybox:latest", true),
            ("busybox", "busybox:latest", true),
            ("latest", "latest", true),
            ("busybox:latest", "latest", false),
            ("busybox:1", "busybox:2", false),
            ("other:latest", "docker.io/library/busybox:latest", false),
        ];
        for (w, c, want) in cases {
            assert_eq!(name_matches(w, c), want, "{w} vs {c}");
        }
    }

    #[test]
    fn parses_and_matches_platforms() {
        let amd64 = Platform::parse("linux/amd64").unwrap();
        let arm_v7 = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(Platform::parse("linux/x86_64"), Some(amd64.clone()));
        assert_eq!(arm_v7.to_string(), "linux/arm/v7");
        for bad in ["linux", "/amd64", "a/b/c/d", ""] {
            assert_eq!(Platform::parse(bad), None, "{bad}");
        }
        let cases = [
            (Platform { os: "linux".into(), architecture: "amd64".into(), variant: Some("v3".into()) }, &amd64, true),
            (Platform { os: "linux".into(), architecture: "x86_64".into(), variant: None }, &amd64, true),
            (Platform { os: "linux".into(), architecture: "arm".into(), variant: Some("v6".into()) }, &arm_v7, false),
            (Platform { os: "windows".into(), architecture: "amd64".into(), variant: None }, &amd64, false),
        ];
        for (have, want, ok) in cases {
            assert_eq!(have.satisfies(want), ok, "{have} for {want}");
        }
    }
}
