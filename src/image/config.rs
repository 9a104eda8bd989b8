//! `--config FILE`: the new image's container config, as nixpkgs'
//! `buildImage { config = { Cmd = ...; Env = ...; }; }` gives it.
//!
//! The file is one JSON object of container-config fields (image-spec
//! `config.md`, "Properties" of `config`, plus Docker's Healthcheck,
//! OnBuild and Shell). It is merged over the base's `config`:
//! * a key given replaces the base's value for that key;
//! * a key given as `null` removes it (e.g. the base's `Cmd`);
//! * `Env` is merged by name: the base's entries in their order, one the
//!   file names again takes the file's value in place, new names follow in
//!   the file's order;
//! * keys not given keep the base's value (as Docker's `FROM` does;
//!   nixpkgs' buildImage keeps only the base's Env).
//!
//! Unknown keys and wrong types are errors naming the key: a typo (`cmd`)
//! must not vanish silently from the image.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Largest config file read (a config is a few KiB; this bounds a mistake
/// such as passing an image archive).
const MAX_CONFIG_FILE: u64 = 4 << 20;

/// The JSON type each known field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    String,
    /// An array of strings.
    Strings,
    /// An array of `KEY=VALUE` strings.
    EnvList,
    /// An object whose values are empty objects (`{"80/tcp": {}}`).
    Set,
    /// An object whose values are strings.
    StringMap,
    Object,
    Bool,
}

/// Every field the file may set, with its type: image-spec config.md
/// (`User` … `ArgsEscaped`) and Docker's image config extensions
/// (`Healthcheck`, `OnBuild`, `Shell`).
const FIELDS: &[(&str, Shape)] = &[
    ("User", Shape::String),
    ("ExposedPorts", Shape::Set),
    ("Env", Shape::EnvList),
    ("Entrypoint", Shape::Strings),
    ("Cmd", Shape::Strings),
    ("Volumes", Shape::Set),
    ("WorkingDir", Shape::String),
    ("Labels", Shape::StringMap),
    ("StopSignal", Shape::String),
    ("ArgsEscaped", Shape::Bool),
    ("Healthcheck", Shape::Object),
    ("OnBuild", Shape::Strings),
    ("Shell", Shape::Strings),
];

/// Errors reading or checking a `--config` file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read --config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path} is {size} bytes; a container config is a small JSON object (at most {MAX_CONFIG_FILE} bytes)")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("--config {path} is not valid JSON")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("--config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A checked `--config`: the fields to merge, in the file's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigOverrides(Map<String, Value>);

impl ConfigOverrides {
    /// Reads and checks a `--config` file.
    pub fn load(path: &Path) -> Result<ConfigOverrides, ConfigError> {
        let read = |source| ConfigError::Read { path: path.to_path_buf(), source };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_CONFIG_FILE {
            return Err(ConfigError::TooLarge { path: path.to_path_buf(), size });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        ConfigOverrides::check(value).map_err(|reason| ConfigError::Invalid { path: path.to_path_buf(), reason })
    }

    /// Checks a parsed file: an object of known fields of the right types.
    fn check(value: Value) -> Result<ConfigOverrides, String> {
        let Value::Object(map) = value else {
            return Err(format!(
                "expected a JSON object of container config fields (e.g. {{\"Cmd\": [\"/bin/sh\"]}}), found {}",
                type_name(&value)
            ));
        };
        for (key, v) in &map {
            let Some(&(_, shape)) = FIELDS.iter().find(|(name, _)| name == key) else {
                return Err(unknown_key(key));
            };
            if !v.is_null() {
                check_shape(key, v, shape)?;
            }
        }
        Ok(ConfigOverrides(map))
    }

    /// Whether the file set nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The base's `config` (an object, or absent/null) with these fields
    /// merged over it (module docs).
    pub fn merge_into(&self, base: Option<&Value>) -> Value {
        let mut out = match base {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        for (key, value) in &self.0 {
            match value {
                Value::Null => {
                    out.shift_remove(key);
                }
                Value::Array(given) if key == "Env" => {
                    let merged = merge_env(out.get("Env").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]), given);
                    out.insert(key.clone(), Value::Array(merged));
                }
                v => {
                    out.insert(key.clone(), v.clone());
                }
            }
        }
        Value::Object(out)
    }
}

/// Env merged by name: base order, replaced in place, new names appended.
fn merge_env(base: &[Value], given: &[Value]) -> Vec<Value> {
    let name = |v: &Value| v.as_str().map(|s| s.split_once('=').map_or(s, |(k, _)| k).to_string());
    let mut out: Vec<Value> = base.to_vec();
    for entry in given {
        match out.iter().position(|b| name(b).is_some() && name(b) == name(entry)) {
            Some(i) => out[i] = entry.clone(),
            None => out.push(entry.clone()),
        }
    }
    out
}

fn unknown_key(key: &str) -> String {
    let known: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
    match known.iter().find(|n| n.eq_ignore_ascii_case(key)) {
        Some(right) => format!("unknown field {key:?}: field names are case-sensitive, write {right:?}"),
        None => format!("unknown field {key:?}; a container config has: {}", known.join(", ")),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_shape(key: &str, v: &Value, shape: Shape) -> Result<(), String> {
    let want = match shape {
        Shape::String if v.is_string() => return Ok(()),
        Shape::String => "a string",
        Shape::Bool if v.is_boolean() => return Ok(()),
        Shape::Bool => "true or false",
        Shape::Object if v.is_object() => return Ok(()),
        Shape::Object => "an object",
        Shape::Strings => match v.as_array() {
            Some(a) if a.iter().all(Value::is_string) => return Ok(()),
            _ => "an array of strings (e.g. [\"/bin/sh\", \"-c\", \"...\"])",
        },
        Shape::EnvList => match v.as_array() {
            Some(a) => {
                for e in a {
                    let ok = e.as_str().and_then(|s| s.split_once('=')).is_some_and(|(k, _)| !k.is_empty());
                    if !ok {
                        return Err(format!("\"Env\" entry {e} is not a \"KEY=VALUE\" string"));
                    }
                }
                return Ok(());
            }
            None => "an array of \"KEY=VALUE\" strings",
        },
        Shape::Set => match v.as_object() {
            Some(m) => match m.iter().find(|(_, x)| !x.as_object().is_some_and(Map::is_empty)) {
                None => return Ok(()),
                Some((k, _)) => {
                    return Err(format!("{key:?}: the value of {k:?} must be {{}} (e.g. {{\"{k}\": {{}}}})"));
                }
            },
            None => "an object with {} values (e.g. {\"6379/tcp\": {}})",
        },
        Shape::StringMap => match v.as_object() {
            Some(m) => match m.iter().find(|(_, x)| !x.is_string()) {
                None => return Ok(()),
                Some((k, _)) => return Err(format!("{key:?}: the value of {k:?} must be a string")),
            },
            None => "an object of strings",
        },
    };
    Err(format!("{key:?} must be {want}, found {}", type_name(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(base: Value, given: Value) -> Value {
        ConfigOverrides::check(given).unwrap().merge_into(Some(&base))
    }

    #[test]
    fn merges_as_documented() {
        let base = json!({
            "Env": ["PATH=/usr/bin:/bin", "LANG=C", "A=1"],
            "Cmd": ["/bin/sh"],
            "User": "nobody",
            "Labels": {"from": "base"},
        });
        let given = json!({
            "Env": ["LANG=C.UTF-8", "B=2", "A=x=y"],
            "Cmd": null,
            "Entrypoint": ["/bin/redis-server"],
            "Labels": {"new": "yes"},
            "ExposedPorts": {"6379/tcp": {}},
        });
        // Base keys keep their order; given keys replace; null removes;
        // Env merges by name in place; new keys follow in the file's order.
        let want = json!({
            "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "A=x=y", "B=2"],
            "User": "nobody",
            "Labels": {"new": "yes"},
            "Entrypoint": ["/bin/redis-server"],
            "ExposedPorts": {"6379/tcp": {}},
        });
        let got = merged(base, given);
        assert_eq!(got, want);
        assert_eq!(serde_json::to_string(&got).unwrap(), serde_json::to_string(&want).unwrap(), "key order");
    }

    #[test]
    fn merges_over_nothing() {
        let o = ConfigOverrides::check(json!({"Cmd": ["/bin/sh"], "Env": ["A=1"], "User": null})).unwrap();
        assert_eq!(o.merge_into(None), json!({"Cmd": ["/bin/sh"], "Env": ["A=1"]}));
        assert_eq!(o.merge_into(Some(&Value::Null)), json!({"Cmd": ["/bin/sh"], "Env": ["A=1"]}));
        assert_eq!(ConfigOverrides::default().merge_into(Some(&json!({"User": "u"}))), json!({"User": "u"}));
    }

    #[test]
    fn rejects_what_an_image_would_lose_or_misread() {
        let cases = [
            (json!([1]), "expected a JSON object"),
            (json!({"cmd": ["x"]}), "case-sensitive, write \"Cmd\""),
            (json!({"Memory": 1}), "unknown field \"Memory\"; a container config has: User,"),
            (json!({"Cmd": "redis-server"}), "\"Cmd\" must be an array of strings"),
            (json!({"Entrypoint": ["a", 1]}), "\"Entrypoint\" must be an array of strings"),
            (json!({"Env": ["NOEQUALS"]}), "\"Env\" entry \"NOEQUALS\" is not a \"KEY=VALUE\" string"),
            (json!({"Env": ["=v"]}), "is not a \"KEY=VALUE\""),
            (json!({"Env": "A=1"}), "\"Env\" must be an array of \"KEY=VALUE\" strings"),
            (json!({"Volumes": ["/data"]}), "\"Volumes\" must be an object with {} values"),
            (json!({"ExposedPorts": {"80/tcp": true}}), "the value of \"80/tcp\" must be {}"),
            (json!({"Labels": {"a": 1}}), "the value of \"a\" must be a string"),
            (json!({"WorkingDir": ["/data"]}), "\"WorkingDir\" must be a string, found an array"),
            (json!({"ArgsEscaped": "yes"}), "\"ArgsEscaped\" must be true or false"),
        ];
        for (value, want) in cases {
            let err = ConfigOverrides::check(value.clone()).unwrap_err();
            assert!(err.contains(want), "{value}: {err}");
        }
    }

    #[test]
    fn accepts_every_known_field() {
        let all = json!({
            "User": "redis", "ExposedPorts": {"6379/tcp": {}}, "Env": ["A=1"], "Entrypoint": ["/e"],
            "Cmd": [], "Volumes": {"/data": {}}, "WorkingDir": "/data", "Labels": {"k": "v"},
            "StopSignal": "SIGTERM", "ArgsEscaped": true, "Healthcheck": {"Test": ["NONE"]},
            "OnBuild": [], "Shell": ["/bin/sh", "-c"],
        });
        assert_eq!(all.as_object().unwrap().len(), FIELDS.len());
        ConfigOverrides::check(all).unwrap();
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, "{\"Cmd\": [").unwrap();
        let e = ConfigOverrides::load(&p).unwrap_err().to_string();
        assert!(e.contains("c.json is not valid JSON"), "{e}");
        let e = ConfigOverrides::load(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert_eq!(e, format!("cannot read --config {}", dir.path().join("missing.json").display()));
        std::fs::write(&p, "{\"Cmd\": [\"/bin/sh\"]}").unwrap();
        assert_eq!(ConfigOverrides::load(&p).unwrap().merge_into(None), serde_json::json!({"Cmd": ["/bin/sh"]}));
    }
}
