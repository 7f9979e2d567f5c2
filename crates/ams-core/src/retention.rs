//! Retention: which finished builds keep their files. A project's `retention` in
//! pipeline-config.json overrides web_conf.json's `retention_keep_builds` and
//! `retention_max_age_days` key by key; `null` there turns a key off for the project.
//!
//! The rule itself (the newest N final builds are kept; a final build that finished more than D
//! days ago is not) is applied in SQL by the store; this module only says which N and D hold.

use serde::{Deserialize, Deserializer};

/// Seconds in a day, for `max-age-days`.
pub const DAY_SECS: f64 = 86_400.0;

/// A per-project setting: absent (the host's default applies), `null` (off for this
/// project), or a value.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Setting<T> {
    #[default]
    Default,
    Off,
    Value(T),
}

impl<T: Copy> Setting<T> {
    /// The value that holds when the host's default is `default`.
    pub fn or(self, default: Option<T>) -> Option<T> {
        match self {
            Setting::Default => default,
            Setting::Off => None,
            Setting::Value(v) => Some(v),
        }
    }
}

/// What `keep-builds` must be, worded for the person who fixes it.
pub const KEEP_BUILDS_RULE: &str =
    "must be a whole number of builds, at least 1 (such as 20), or null to keep every build";
/// What `max-age-days` must be.
pub const MAX_AGE_RULE: &str =
    "must be a number of days greater than 0 (such as 30), or null to keep builds of any age";

/// Whether `n` is a valid `keep-builds`.
pub fn keep_builds_ok(n: u64) -> bool {
    (1..=u32::MAX as u64).contains(&n)
}

/// Whether `d` is a valid `max-age-days`.
pub fn max_age_ok(d: f64) -> bool {
    d.is_finite() && d > 0.0 && d * DAY_SECS < 1e15
}

/// The `retention` object of pipeline-config.json. Each key's error names the key and the fix.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct RetentionConf {
    #[serde(deserialize_with = "keep_builds")]
    pub keep_builds: Setting<u32>,
    #[serde(deserialize_with = "max_age_days")]
    pub max_age_days: Setting<f64>,
}

/// The error of a key, as `field `PATH`: RULE` (see [`crate::private_config`], which moves the
/// path into [`crate::ConfigError::field`]).
fn field_error<E: serde::de::Error>(key: &str, rule: &str) -> E {
    E::custom(format!("field `retention.{key}`: {rule}"))
}

fn keep_builds<'de, D: Deserializer<'de>>(d: D) -> Result<Setting<u32>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None => Ok(Setting::Off),
        Some(v) => match v.as_u64() {
            Some(n) if keep_builds_ok(n) => Ok(Setting::Value(n as u32)),
            _ => Err(field_error("keep-builds", KEEP_BUILDS_RULE)),
        },
    }
}

fn max_age_days<'de, D: Deserializer<'de>>(d: D) -> Result<Setting<f64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None => Ok(Setting::Off),
        Some(v) => match v.as_f64() {
            Some(x) if max_age_ok(x) => Ok(Setting::Value(x)),
            _ => Err(field_error("max-age-days", MAX_AGE_RULE)),
        },
    }
}

/// The retention that holds for one project.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Policy {
    /// Keep the files of the newest this many final builds.
    pub keep_builds: Option<u32>,
    /// Remove the files of final builds that finished more than this many days ago.
    pub max_age_days: Option<f64>,
}

impl Policy {
    /// The project's settings over the host's defaults, key by key.
    pub fn resolve(project: &RetentionConf, defaults: Policy) -> Policy {
        Policy {
            keep_builds: project.keep_builds.or(defaults.keep_builds),
            max_age_days: project.max_age_days.or(defaults.max_age_days),
        }
    }

    /// Whether this policy keeps every build.
    pub fn keeps_all(&self) -> bool {
        self.keep_builds.is_none() && self.max_age_days.is_none()
    }

    /// The finish time (Unix seconds) before which a build is too old, at `now`.
    pub fn finished_before(&self, now: f64) -> Option<f64> {
        self.max_age_days.map(|d| now - d * DAY_SECS)
    }

    /// The policy in words, such as `keep-builds 20, max-age-days 30`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.keep_builds {
            parts.push(format!("keep-builds {n}"));
        }
        if let Some(d) = self.max_age_days {
            parts.push(format!("max-age-days {d}"));
        }
        if parts.is_empty() {
            "keep every build".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> Result<RetentionConf, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_project_overrides_the_defaults_key_by_key_and_null_turns_a_key_off() {
        let defaults = Policy {
            keep_builds: Some(10),
            max_age_days: Some(30.0),
        };
        let p = |t: &str| Policy::resolve(&conf(t).unwrap(), defaults);
        assert_eq!(p("{}"), defaults);
        assert_eq!(
            p(r#"{"keep-builds": 3}"#),
            Policy {
                keep_builds: Some(3),
                max_age_days: Some(30.0)
            }
        );
        assert_eq!(
            p(r#"{"keep-builds": null, "max-age-days": 0.5}"#),
            Policy {
                keep_builds: None,
                max_age_days: Some(0.5)
            }
        );
        assert!(p(r#"{"keep-builds": null, "max-age-days": null}"#).keeps_all());
        assert!(Policy::resolve(&RetentionConf::default(), Policy::default()).keeps_all());
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        for (text, key) in [
            (r#"{"keep-builds": 0}"#, "keep-builds"),
            (r#"{"keep-builds": -1}"#, "keep-builds"),
            (r#"{"keep-builds": 2.5}"#, "keep-builds"),
            (r#"{"keep-builds": "5"}"#, "keep-builds"),
            (r#"{"keep-builds": 5000000000}"#, "keep-builds"),
            (r#"{"max-age-days": 0}"#, "max-age-days"),
            (r#"{"max-age-days": -3}"#, "max-age-days"),
            (r#"{"max-age-days": "30"}"#, "max-age-days"),
            (r#"{"max-age-days": 1e300}"#, "max-age-days"),
        ] {
            let e = conf(text).unwrap_err();
            assert!(
                e.contains(&format!("field `retention.{key}`")),
                "{text}: {e}"
            );
            assert!(e.contains("such as"), "{text}: {e}");
        }
        assert!(conf(r#"{"keep": 3}"#)
            .unwrap_err()
            .contains("unknown field"));
    }

    #[test]
    fn the_age_limit_is_counted_back_from_now() {
        let p = Policy {
            keep_builds: None,
            max_age_days: Some(2.0),
        };
        assert_eq!(p.finished_before(10.0 * DAY_SECS), Some(8.0 * DAY_SECS));
        assert_eq!(Policy::default().finished_before(1.0), None);
        assert_eq!(p.describe(), "max-age-days 2");
    }
}
