//! What the described (Python) system's users bring with them, read without IO: its users.json,
//! its API's status words and trigger methods. Every deliberate difference is listed in
//! [`COMPAT_DOC`], which the host's start-up warnings name.

use crate::access::{Grant, Level};
use crate::error::{clip, ConfigError};
use crate::names::{validate_project_name, Trigger};
use crate::status::BuildStatus;
use serde_json::Value;

/// The page that lists every deliberate difference from the described system, with its fix.
pub const COMPAT_DOC: &str = "docs/coming-from-python.md";

/// The described system's word for a status in its API and records (`status` of a build):
/// `warning` for WARN and `DEBUG-DUMMY-BUILD` for DUMMY; the statuses it did not have
/// (pending, running, error) keep our word.
pub fn legacy_status(s: BuildStatus) -> &'static str {
    match s {
        BuildStatus::Warn => "warning",
        BuildStatus::Dummy => "DEBUG-DUMMY-BUILD",
        other => other.as_str(),
    }
}

/// A status word as either system writes it (`warn` or `warning`, `dummy` or
/// `DEBUG-DUMMY-BUILD`, …), for filters.
pub fn parse_status_word(word: &str) -> Option<BuildStatus> {
    BuildStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == word || legacy_status(*s) == word)
}

/// The described system's `trigger_method`: `webhook` for a push, `www_interface` for the web
/// interface (and our API, which stands in for it); our word for triggers it did not have
/// (`cli`, `schedule`).
pub fn trigger_method(t: Trigger) -> &'static str {
    match t {
        Trigger::Webhook => "webhook",
        Trigger::Web | Trigger::Api => "www_interface",
        other => other.as_str(),
    }
}

/// One user of the described system's users.json, as it is imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyUser {
    pub name: String,
    pub grant: Grant,
    /// What the import changed or assumed, for the start-up log.
    pub notes: Vec<String>,
}

/// The file name the described system kept its users in (`CI-Host/data/users.json`).
pub const USERS_FILE: &str = "users.json";

/// Reads the described system's users.json: a list of `{"username", "secret", "projects",
/// "access_level"}`. Names, levels and projects are taken; `secret` is not a password (it
/// keys a separate hash file the described system kept, which is not part of its documented
/// format), so no password can be verified and every imported user is created locked.
///
/// A name that is not a valid user name, a name used twice (the described system compared
/// names case-insensitively) or a level outside 0 to 5 refuses the whole file, naming the
/// entry and the fix; nothing is imported half-way.
pub fn parse_users_json(text: &str) -> Result<Vec<LegacyUser>, ConfigError> {
    let f = USERS_FILE;
    let root: Value = serde_json::from_str(text).map_err(|e| ConfigError::json(f, &e))?;
    let Value::Array(items) = root else {
        return Err(ConfigError::field(
            f,
            "(top level)",
            "expected a list of users, e.g. [{\"username\": \"alice\", \"projects\": [\"app\"], \
             \"access_level\": 3}]",
        ));
    };
    let mut out: Vec<LegacyUser> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = |k: &str| format!("[{i}].{k}");
        let Value::Object(u) = item else {
            return Err(ConfigError::field(
                f,
                format!("[{i}]"),
                "expected an object",
            ));
        };
        let name = match u.get("username") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                return Err(ConfigError::field(
                    f,
                    at("username"),
                    "is missing or not text; give the user's name",
                ))
            }
        };
        validate_project_name(&name).map_err(|e| {
            ConfigError::field(
                f,
                at("username"),
                format!(
                    "{}; rename the user in the file (letters, digits, `-`, `_`, `.`), or \
                     remove the entry and add the user with `amsbuild user add`",
                    e.replace("project name", "user name")
                ),
            )
        })?;
        if let Some(o) = out.iter().find(|o| o.name.eq_ignore_ascii_case(&name)) {
            return Err(ConfigError::field(
                f,
                at("username"),
                format!(
                    "`{}` is the same name as `{}` (names are compared without case); remove \
                     one of them",
                    clip(&name, 64),
                    clip(&o.name, 64)
                ),
            ));
        }
        let mut notes = Vec::new();
        let level = match u.get("access_level") {
            None | Some(Value::Null) => {
                notes.push("no access_level in the file: imported as USER".to_string());
                Level::User
            }
            Some(v) => v
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .and_then(|n| Level::try_from(n).ok())
                .ok_or_else(|| {
                    ConfigError::field(
                        f,
                        at("access_level"),
                        format!("{v} is not a level; give 0 to 5"),
                    )
                })?,
        };
        let mut projects: Vec<String> = Vec::new();
        match u.get("projects") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (j, p) in list.iter().enumerate() {
                    let Some(p) = p.as_str() else {
                        return Err(ConfigError::field(
                            f,
                            format!("[{i}].projects[{j}]"),
                            "expected a project name (text)",
                        ));
                    };
                    match validate_project_name(p) {
                        Ok(()) if !projects.iter().any(|q| q == p) => projects.push(p.into()),
                        Ok(()) => {}
                        Err(_) => notes.push(format!(
                            "project `{}` is not a valid project name here: left out",
                            clip(p, 64)
                        )),
                    }
                }
            }
            Some(_) => {
                return Err(ConfigError::field(
                    f,
                    at("projects"),
                    "expected a list of project names or null",
                ))
            }
        }
        if level == Level::ServerAdmin && !projects.is_empty() {
            notes.push("SERVER ADMIN: on every project, its list is not needed".into());
        }
        out.push(LegacyUser {
            name,
            grant: Grant::uniform(level.into(), &projects),
            notes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_of_both_systems() {
        assert_eq!(legacy_status(BuildStatus::Warn), "warning");
        assert_eq!(legacy_status(BuildStatus::Dummy), "DEBUG-DUMMY-BUILD");
        assert_eq!(legacy_status(BuildStatus::Pass), "pass");
        assert_eq!(legacy_status(BuildStatus::Error), "error");
        for s in BuildStatus::ALL {
            assert_eq!(parse_status_word(s.as_str()), Some(s));
            assert_eq!(parse_status_word(legacy_status(s)), Some(s));
        }
        assert_eq!(parse_status_word("PASS"), None);
        assert_eq!(trigger_method(Trigger::Web), "www_interface");
        assert_eq!(trigger_method(Trigger::Api), "www_interface");
        assert_eq!(trigger_method(Trigger::Webhook), "webhook");
        assert_eq!(trigger_method(Trigger::Cli), "cli");
    }

    #[test]
    fn users_json_of_the_described_system_is_read() {
        let users = parse_users_json(
            r#"[
              {"username": "admin", "secret": "x", "projects": null, "access_level": 1},
              {"username": "User_0", "secret": "DO NOT CHANGE",
               "projects": ["project_1", "project_2"], "access_level": 3},
              {"username": "boss", "secret": "y", "projects": ["a"], "access_level": 5},
              {"username": "old", "secret": "z", "projects": ["a", "a", "../x"]}
            ]"#,
        )
        .unwrap();
        assert_eq!(users.len(), 4);
        assert_eq!(users[0].grant, Grant::uniform(1, &[]));
        assert_eq!(
            users[1].grant,
            Grant::uniform(3, &["project_1".into(), "project_2".into()])
        );
        assert!(users[2].grant.server_admin);
        assert_eq!(users[3].grant, Grant::uniform(1, &["a".into()]));
        assert_eq!(users[3].notes.len(), 2, "{:?}", users[3].notes);
    }

    #[test]
    fn a_bad_users_json_names_the_entry_and_the_fix() {
        let e = parse_users_json(r#"[{"username": "a", "access_level": 7}]"#).unwrap_err();
        assert_eq!(e.field, "[0].access_level");
        let e = parse_users_json(r#"[{"username": "a"}, {"username": "A"}]"#).unwrap_err();
        assert_eq!(e.field, "[1].username");
        assert!(e.message.contains("remove one"), "{e}");
        let e = parse_users_json(r#"[{"username": "has space"}]"#).unwrap_err();
        assert!(e.message.contains("amsbuild user add"), "{e}");
        let e = parse_users_json(r#"{"username": "a"}"#).unwrap_err();
        assert_eq!(e.field, "(top level)");
        let e = parse_users_json("[{\"username\": \"a\",}]").unwrap_err();
        assert_eq!(e.position, Some((1, 19)));
    }
}
