//! One configuration loader for both binaries: defaults, then a YAML file, then environment
//! variables (environment wins), into one typed struct.
//!
//! A setting's YAML key is its field name (`service_port`) and its environment variable is the
//! same name in upper case (`SERVICE_PORT`), so every variable of the seed keeps its name.
//! Values from the environment, and scalar values from YAML, are converted to the type of the
//! field's default (number, boolean, comma-separated list, string), and every error names the
//! setting it is about.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid YAML: {message}")]
    Yaml { path: String, message: String },
    #[error("configuration file {path}: unknown setting `{key}`")]
    UnknownKey { path: String, key: String },
    #[error("{name}: {message}")]
    Invalid { name: String, message: String },
}

/// Loads `T` from its defaults, an optional YAML file and the given environment.
///
/// Only variables whose lower-cased name is a field of `T` are read; an empty variable counts
/// as unset.
pub fn load<T>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let Value::Object(mut merged) =
        serde_json::to_value(T::default()).map_err(|e| ConfigError::Invalid {
            name: "defaults".into(),
            message: e.to_string(),
        })?
    else {
        return Err(ConfigError::Invalid {
            name: "defaults".into(),
            message: "the configuration type must be a struct".into(),
        });
    };
    let defaults = merged.clone();

    if let Some(path) = file {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let yaml: Value = if text.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_saphyr::from_str(&text).map_err(|e| ConfigError::Yaml {
                path: display.clone(),
                message: e.to_string(),
            })?
        };
        let Value::Object(yaml) = yaml else {
            return Err(ConfigError::Yaml {
                path: display,
                message: "expected a mapping of settings at the top level".into(),
            });
        };
        for (key, value) in yaml {
            let name = key.to_ascii_lowercase();
            let Some(default) = defaults.get(&name) else {
                return Err(ConfigError::UnknownKey { path: display, key });
            };
            let value = match value {
                Value::String(s) => coerce(&name, default, &s)?,
                Value::Number(_) | Value::Bool(_) if !default.is_string() => value,
                Value::Number(n) => Value::String(n.to_string()),
                Value::Bool(b) => Value::String(b.to_string()),
                other => other,
            };
            merged.insert(name, value);
        }
    }

    for (var, text) in env {
        let name = var.to_ascii_lowercase();
        if text.is_empty() || var != name.to_ascii_uppercase() {
            continue;
        }
        if let Some(default) = defaults.get(&name) {
            let value = coerce(&var, default, &text)?;
            merged.insert(name, value);
        }
    }

    let merged = Value::Object(merged);
    serde_path_to_error::deserialize(&merged).map_err(|e| ConfigError::Invalid {
        name: e.path().to_string().to_ascii_uppercase(),
        message: e.inner().to_string(),
    })
}

/// Converts text to the JSON type of the setting's default.
fn coerce(name: &str, default: &Value, text: &str) -> Result<Value, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        name: name.to_ascii_uppercase(),
        message,
    };
    let text = text.trim();
    Ok(match default {
        Value::Bool(_) => match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Bool(true),
            "false" | "0" | "no" | "off" => Value::Bool(false),
            _ => return Err(invalid(format!("expected true or false, got {text:?}"))),
        },
        Value::Number(_) => {
            if let Ok(n) = text.parse::<u64>() {
                Value::from(n)
            } else if let Ok(n) = text.parse::<i64>() {
                Value::from(n)
            } else if let Some(n) = text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                Value::Number(n)
            } else {
                return Err(invalid(format!("expected a number, got {text:?}")));
            }
        }
        // A list can also be given as a JSON array (lists of objects, such as rules).
        Value::Array(_) if text.starts_with('[') => serde_json::from_str(text)
            .map_err(|e| invalid(format!("not a valid JSON array: {e}")))?,
        Value::Array(_) => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => Value::String(text.to_string()),
    })
}

/// The names of every setting of `T`, upper-cased as environment variables.
pub fn variable_names<T: Serialize + Default>() -> Vec<String> {
    match serde_json::to_value(T::default()) {
        Ok(Value::Object(map)) => map.keys().map(|k| k.to_ascii_uppercase()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        service_port: u16,
        enabled: bool,
        name: String,
        channels: Vec<String>,
        url: Option<String>,
        ratio: f64,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                service_port: 8000,
                enabled: true,
                name: "logging".into(),
                channels: vec!["email".into()],
                url: None,
                ratio: 0.5,
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_yaml_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "service_port: 9000\nname: from-yaml\nURL: http://x\n",
        )
        .unwrap();
        let c: Sample = load(
            Some(&path),
            env(&[
                ("NAME", "from-env"),
                ("CHANNELS", "email, sms"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.service_port, 9000);
        assert_eq!(c.name, "from-env");
        assert_eq!(c.channels, vec!["email", "sms"]);
        assert_eq!(c.url.as_deref(), Some("http://x"));
        assert!(c.enabled);
        let c: Sample = load(None, env(&[("ENABLED", "false"), ("RATIO", "0.25")])).unwrap();
        assert!(!c.enabled);
        assert_eq!(c.ratio, 0.25);
    }

    #[test]
    fn errors_name_the_setting() {
        let err = load::<Sample>(None, env(&[("SERVICE_PORT", "eighty")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SERVICE_PORT: expected a number, got \"eighty\""
        );
        let err = load::<Sample>(None, env(&[("SERVICE_PORT", "70000")])).unwrap_err();
        assert!(err.to_string().starts_with("SERVICE_PORT: "), "{err}");
        let err = load::<Sample>(None, env(&[("ENABLED", "maybe")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ENABLED: expected true or false"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "servce_port: 1\n").unwrap();
        let err = load::<Sample>(Some(&path), env(&[])).unwrap_err();
        assert!(
            err.to_string().ends_with("unknown setting `servce_port`"),
            "{err}"
        );
        std::fs::write(&path, "service_port: [1\n").unwrap();
        assert!(matches!(
            load::<Sample>(Some(&path), env(&[])),
            Err(ConfigError::Yaml { .. })
        ));
    }

    #[test]
    fn lowercase_and_empty_variables_are_ignored() {
        let c: Sample = load(None, env(&[("name", "x"), ("NAME", "")])).unwrap();
        assert_eq!(c.name, "logging");
        assert!(variable_names::<Sample>().contains(&"SERVICE_PORT".to_string()));
    }
}
