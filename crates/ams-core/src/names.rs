//! Rules for names that become paths or container names.

/// A build's database id. Commands that act on a build carry only this, after the edge that
/// received the request resolved the user's reference (a name, which is unique only within
/// its project) to one build of a project the caller may act on. A number typed by a user is
/// never taken for an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildId(pub i64);

impl std::fmt::Display for BuildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How a build was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// `amsbuild build` on the host.
    Cli,
    /// A form of the web interface.
    Web,
    /// The JSON API.
    Api,
    /// A push delivered to a webhook.
    Webhook,
    /// A schedule of pipeline-config.json.
    Schedule,
}

impl Trigger {
    /// The word stored and shown (`trigger_method` of the described system).
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cli => "cli",
            Trigger::Web => "web",
            Trigger::Api => "api",
            Trigger::Webhook => "webhook",
            Trigger::Schedule => "schedule",
        }
    }

    pub fn parse(s: &str) -> Option<Trigger> {
        Some(match s {
            "cli" => Trigger::Cli,
            "web" => Trigger::Web,
            "api" => Trigger::Api,
            "webhook" => Trigger::Webhook,
            "schedule" => Trigger::Schedule,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A project name that passed [`validate_project_name`]: safe as a folder name, in URLs and
/// in container names. Requests that cross the host loop carry this, never a raw string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectName(String);

impl ProjectName {
    pub fn new(name: &str) -> Result<ProjectName, String> {
        validate_project_name(name).map_err(|e| format!("{e}: `{name}`"))?;
        Ok(ProjectName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for ProjectName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ProjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest project name accepted.
pub const MAX_PROJECT_NAME: usize = 64;

/// Checks a project name. It becomes a folder name, part of URLs and of container names, so it
/// may not contain `/`, `\`, `..`, white space or control characters, nor start with `.` or `-`.
pub fn validate_project_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("project name is empty".into());
    }
    if name.chars().count() > MAX_PROJECT_NAME {
        return Err(format!(
            "project name is longer than {MAX_PROJECT_NAME} characters"
        ));
    }
    if name.contains("..") {
        return Err("project name may not contain `..`".into());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("project name may not start with `.` or `-`".into());
    }
    for c in name.chars() {
        if c == '/' || c == '\\' {
            return Err("project name may not contain `/` or `\\`".into());
        }
        if c.is_whitespace() {
            return Err("project name may not contain spaces".into());
        }
        if c.is_control() {
            return Err("project name may not contain control characters".into());
        }
        if matches!(
            c,
            ':' | '*' | '?' | '"' | '<' | '>' | '|' | '%' | '#' | '&' | '{' | '}'
        ) {
            return Err(format!("project name may not contain `{c}`"));
        }
    }
    Ok(())
}

/// Checks a build name produced by build-name-format: it becomes a folder name.
pub fn validate_build_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("build name must be 1 to 200 bytes long".into());
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return Err("build name may not start with `.`".into());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control() || c == '\0')
    {
        return Err("build name may not contain `/`, `\\` or control characters".into());
    }
    // Archives live beside the build folders as NAME.7z: a name may not pose as one.
    if name.ends_with(".7z") || name.ends_with(".7z.partial") {
        return Err("build name may not end with `.7z` or `.7z.partial`".into());
    }
    Ok(())
}

/// Makes a Docker container name from any text: Docker accepts `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn sanitize_container_name(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        out.insert(0, 'b');
    }
    out.truncate(200);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["exampleProject", "my-app_2", "a", "x.y", &"a".repeat(64)] {
            assert!(validate_project_name(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_dangerous_names() {
        for n in [
            "",
            "a/b",
            "..",
            "a..b",
            "a b",
            "a\tb",
            "a\u{7}b",
            ".hidden",
            "-rf",
            "a\\b",
            &"a".repeat(65),
        ] {
            assert!(validate_project_name(n).is_err(), "{n:?} accepted");
        }
    }

    #[test]
    fn container_names_are_docker_safe() {
        assert_eq!(sanitize_container_name("my proj/x"), "my_proj_x");
        assert_eq!(sanitize_container_name("_x"), "b_x");
    }

    #[test]
    fn build_names_cannot_escape() {
        assert!(validate_build_name("p_abc_build_1").is_ok());
        assert!(validate_build_name("../x").is_err());
        assert!(validate_build_name("a/b").is_err());
        assert!(validate_build_name("..").is_err());
        assert!(validate_build_name("q1.7z").is_err());
        assert!(ProjectName::new("../x").is_err());
        assert_eq!(ProjectName::new("app").unwrap().as_str(), "app");
        assert!(validate_build_name("q1.7z.partial").is_err());
    }
}
