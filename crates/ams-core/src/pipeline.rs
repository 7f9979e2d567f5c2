//! pipeline.json: parsing and validation with errors that name the field path.
//!
//! The file is public (it lives in the repository), so it is parsed defensively: a syntax error
//! reports line and column, a wrong type or missing section reports the field path, and every
//! `{variable}` is checked against the known names before anything runs. Unknown keys are kept as
//! warnings, since files written for the described system may carry keys we do not use.

use crate::error::ConfigError;
use crate::vars;
use serde_json::{Map, Value};

const FILE: &str = "pipeline.json";

/// Hash of the 7z archive, as 7-Zip names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    Crc32,
    Crc64,
    Sha1,
    Sha256,
    Blake2sp,
}

impl HashKind {
    /// Parses a 7z_hash name, case-insensitively; `BLAKE2ep` is the described system's name
    /// for BLAKE2sp.
    pub fn parse(s: &str) -> Option<HashKind> {
        match s.to_ascii_lowercase().as_str() {
            "crc32" => Some(HashKind::Crc32),
            "crc64" => Some(HashKind::Crc64),
            "sha1" => Some(HashKind::Sha1),
            "sha256" => Some(HashKind::Sha256),
            "blake2sp" | "blake2ep" => Some(HashKind::Blake2sp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashKind::Crc32 => "CRC32",
            HashKind::Crc64 => "CRC64",
            HashKind::Sha1 => "SHA1",
            HashKind::Sha256 => "SHA256",
            HashKind::Blake2sp => "BLAKE2sp",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DockerSection {
    pub image: String,
    pub args: String,
    pub project_dest: String,
    pub build_output_dest: String,
    pub stop_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrepareBuild {
    pub master_dir_commands: Vec<String>,
    pub get_git_hash: bool,
    pub build_dir_commands: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub commands: Vec<String>,
    /// `None`: the exit code decides. `Some(s)`: the stage passes when its last output line is s.
    pub exit_line: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cleanup {
    pub remove_build_source: bool,
    pub archive: bool,
    pub hash: Option<HashKind>,
}

impl Default for Cleanup {
    fn default() -> Self {
        Cleanup {
            remove_build_source: true,
            archive: true,
            hash: Some(HashKind::Sha1),
        }
    }
}

/// A validated pipeline.json. Strings still hold their `{variables}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub build_name_format: String,
    pub docker: DockerSection,
    pub prepare: PrepareBuild,
    pub environment: Vec<(String, String)>,
    pub stages: Vec<Stage>,
    pub cleanup: Cleanup,
    pub dummy_build: bool,
    /// Build timeout override in seconds.
    pub timeout_secs: Option<u64>,
    /// Keys that were present but are not used.
    pub warnings: Vec<String>,
}

pub const DEFAULT_NAME_FORMAT: &str = "{project}_{build_hash}_build_{build_index}";

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn err(field: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::field(FILE, field, msg)
}

struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    fn new(path: &str, v: &'a Value) -> Result<Self, ConfigError> {
        match v {
            Value::Object(map) => Ok(Obj {
                path: path.to_string(),
                map,
                known: Vec::new(),
            }),
            other => Err(err(
                path,
                format!("expected an object, found {}", type_name(other)),
            )),
        }
    }

    fn sub(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &'static str, required: bool) -> Result<Option<String>, ConfigError> {
        let path = self.sub(key);
        match self.get(key) {
            None if required => Err(err(&path, "is missing; add it as a string")),
            None => Ok(None),
            Some(Value::String(s)) if required && s.trim().is_empty() => {
                Err(err(&path, "is empty; give it a value"))
            }
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(
                &path,
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    }

    fn boolean(&mut self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        let path = self.sub(key);
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(err(
                &path,
                format!("expected true or false, found {}", type_name(other)),
            )),
        }
    }

    fn uint(&mut self, key: &'static str, max: u64) -> Result<Option<u64>, ConfigError> {
        let path = self.sub(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(err(
                    &path,
                    format!("expected a whole number from 0 to {max}, found {n}"),
                )),
            },
            Some(other) => Err(err(
                &path,
                format!("expected a whole number, found {}", type_name(other)),
            )),
        }
    }

    fn strings(&mut self, key: &'static str) -> Result<Vec<String>, ConfigError> {
        let path = self.sub(key);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => string_list(&path, v),
        }
    }

    fn unknown_keys(&self, warnings: &mut Vec<String>) {
        for k in self.map.keys() {
            if !self.known.contains(&k.as_str()) {
                warnings.push(format!(
                    "{FILE}: field `{}` is not used by AMS-Build and was ignored",
                    self.sub(k)
                ));
            }
        }
    }
}

fn string_list(path: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(err(
                    &format!("{path}[{i}]"),
                    format!("expected a string, found {}", type_name(other)),
                )),
            })
            .collect(),
        other => Err(err(
            path,
            format!("expected a list of strings, found {}", type_name(other)),
        )),
    }
}

fn check_vars(path: &str, s: &str, known: &[&str]) -> Result<(), ConfigError> {
    if let Some(name) = vars::first_unknown(s, known) {
        let hint = if known == vars::NAME_VARS && vars::PIPELINE_VARS.contains(&name) {
            format!(
                "`{{{name}}}` is not known yet when a build is named; use only {}",
                known.join(", ")
            )
        } else {
            format!(
                "unknown variable `{{{name}}}`; known variables are {}; write `{{{{` for a literal brace",
                known.join(", ")
            )
        };
        return Err(err(path, hint));
    }
    Ok(())
}

fn valid_env_name(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Parses and validates the text of a pipeline.json.
pub fn parse(text: &str) -> Result<Pipeline, ConfigError> {
    let root: Value = serde_json::from_str(text).map_err(|e| ConfigError::json(FILE, &e))?;
    let mut warnings = Vec::new();
    let mut top = Obj::new("", &root).map_err(|mut e| {
        e.field = "(top level)".into();
        e
    })?;

    let build_name_format = top
        .string("build-name-format", false)?
        .unwrap_or_else(|| DEFAULT_NAME_FORMAT.to_string());
    check_vars("build-name-format", &build_name_format, vars::NAME_VARS)?;
    for piece in vars::parse(&build_name_format) {
        if let vars::Piece::Text(t) = piece {
            if t.contains(['/', '\\']) || t.chars().any(char::is_control) {
                return Err(err(
                    "build-name-format",
                    "may not contain `/`, `\\` or control characters: the name becomes a folder",
                ));
            }
        }
    }
    if build_name_format.starts_with('.') {
        return Err(err("build-name-format", "may not start with `.`"));
    }
    // Build names are unique across all projects (they name folders and are what `cancel`
    // takes), so the format must tell every build of every project apart.
    let has = |v: &str| build_name_format.contains(v);
    if !(has("{build_hash}") || (has("{project}") && has("{build_index}"))) {
        return Err(err(
            "build-name-format",
            "must contain {build_hash}, or both {project} and {build_index}, so that every build \
             of every project gets its own name",
        ));
    }

    let docker_v = top
        .get("docker")
        .ok_or_else(|| err("docker", "section is missing; add \"docker\": {\"image\": …, \"project-dest\": …, \"build-output-dest\": …}"))?;
    let mut d = Obj::new("docker", docker_v)?;
    let docker = DockerSection {
        image: d.string("image", true)?.unwrap_or_default(),
        args: d.string("args", false)?.unwrap_or_default(),
        project_dest: d.string("project-dest", true)?.unwrap_or_default(),
        build_output_dest: d.string("build-output-dest", true)?.unwrap_or_default(),
        stop_timeout_secs: d.uint("stop-timeout", 3600)?.unwrap_or(10),
    };
    for (field, v) in [
        ("docker.project-dest", &docker.project_dest),
        ("docker.build-output-dest", &docker.build_output_dest),
    ] {
        if !v.starts_with('/') {
            return Err(err(field, "must be an absolute path inside the container"));
        }
    }
    d.unknown_keys(&mut warnings);

    let prepare = match top.get("prepare-build") {
        None => PrepareBuild::default(),
        Some(v) => {
            let mut p = Obj::new("prepare-build", v)?;
            let out = PrepareBuild {
                master_dir_commands: p.strings("master-dir-commands")?,
                get_git_hash: p.boolean("get-git-hash", true)?,
                build_dir_commands: p.strings("build-dir-commands")?,
            };
            p.unknown_keys(&mut warnings);
            out
        }
    };

    let mut environment = Vec::new();
    if let Some(v) = top.get("environment") {
        let e = Obj::new("environment", v)?;
        for (k, val) in e.map {
            let path = format!("environment.{k}");
            if !valid_env_name(k) {
                return Err(err(
                    &path,
                    "is not a valid environment variable name (letters, digits and _, not starting with a digit)",
                ));
            }
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(err(
                        &path,
                        format!("expected a string, found {}", type_name(other)),
                    ))
                }
            };
            environment.push((k.clone(), s));
        }
    }

    let stages_v = top.get("pipeline").ok_or_else(|| {
        err(
            "pipeline",
            "section is missing; add \"pipeline\": [{\"name\": …, \"commands\": [ … ]}]",
        )
    })?;
    let Value::Array(items) = stages_v else {
        return Err(err(
            "pipeline",
            format!("expected a list of stages, found {}", type_name(stages_v)),
        ));
    };
    if items.is_empty() {
        return Err(err("pipeline", "is empty; add at least one stage"));
    }
    let mut stages = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("pipeline[{i}]");
        let mut s = Obj::new(&path, item)?;
        let name = s.string("name", true)?.unwrap_or_default();
        let commands = match s.get("commands") {
            None => {
                return Err(err(
                    &format!("{path}.commands"),
                    "is missing; add a list of commands",
                ))
            }
            Some(v) => string_list(&format!("{path}.commands"), v)?,
        };
        if commands.is_empty() {
            return Err(err(
                &format!("{path}.commands"),
                "is empty; add at least one command",
            ));
        }
        let exit_line = match s.get("exit-line") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::String(x)) => Some(x.clone()),
            Some(other) => {
                return Err(err(
                    &format!("{path}.exit-line"),
                    format!("expected a string or false, found {}", type_name(other)),
                ))
            }
        };
        s.unknown_keys(&mut warnings);
        stages.push(Stage {
            name,
            commands,
            exit_line,
        });
    }

    let cleanup = match top.get("cleanup") {
        None => Cleanup::default(),
        Some(v) => {
            let mut c = Obj::new("cleanup", v)?;
            let remove_build_source = c.boolean("remove_build_source", true)?;
            let archive = c.boolean("7z_build", true)?;
            let hash = match c.get("7z_hash") {
                None => None,
                Some(Value::String(s)) => Some(HashKind::parse(s).ok_or_else(|| {
                    err(
                        "cleanup.7z_hash",
                        format!(
                            "unknown hash `{s}`; use null, crc32, crc64, sha1, sha256 or blake2sp"
                        ),
                    )
                })?),
                Some(other) => {
                    return Err(err(
                        "cleanup.7z_hash",
                        format!("expected a hash name or null, found {}", type_name(other)),
                    ))
                }
            };
            c.unknown_keys(&mut warnings);
            Cleanup {
                remove_build_source,
                archive,
                hash,
            }
        }
    };
    let dummy_build = top.boolean("dummy-build", false)?;
    let timeout_secs = top.uint("timeout", 7 * 24 * 3600)?;
    if timeout_secs == Some(0) {
        return Err(err("timeout", "must be at least 1 second"));
    }
    top.unknown_keys(&mut warnings);

    let p = Pipeline {
        build_name_format,
        docker,
        prepare,
        environment,
        stages,
        cleanup,
        dummy_build,
        timeout_secs,
        warnings,
    };
    p.check_variables()?;
    Ok(p)
}

impl Pipeline {
    fn check_variables(&self) -> Result<(), ConfigError> {
        let k = vars::PIPELINE_VARS;
        check_vars("docker.image", &self.docker.image, k)?;
        check_vars("docker.args", &self.docker.args, k)?;
        check_vars("docker.project-dest", &self.docker.project_dest, k)?;
        check_vars(
            "docker.build-output-dest",
            &self.docker.build_output_dest,
            k,
        )?;
        for (i, c) in self.prepare.master_dir_commands.iter().enumerate() {
            check_vars(&format!("prepare-build.master-dir-commands[{i}]"), c, k)?;
        }
        for (i, c) in self.prepare.build_dir_commands.iter().enumerate() {
            check_vars(&format!("prepare-build.build-dir-commands[{i}]"), c, k)?;
        }
        for (name, v) in &self.environment {
            check_vars(&format!("environment.{name}"), v, k)?;
        }
        for (i, s) in self.stages.iter().enumerate() {
            check_vars(&format!("pipeline[{i}].name"), &s.name, k)?;
            for (j, c) in s.commands.iter().enumerate() {
                check_vars(&format!("pipeline[{i}].commands[{j}]"), c, k)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "build-name-format": "{project}_{build_hash}_build_{build_index}",
      "docker": {"image": "busybox:latest", "args": "--memory 512m",
                 "project-dest": "/root/project", "build-output-dest": "/root/project/Builds"},
      "prepare-build": {"master-dir-commands": ["git pull origin master"], "get-git-hash": true,
                        "build-dir-commands": ["git checkout --detach {git_hash}"]},
      "environment": {"MODE": "release", "N": 3},
      "pipeline": [{"name": "build", "commands": ["./build.sh {build_index}"], "exit-line": false},
                   {"name": "test", "commands": ["echo 0"], "exit-line": "0"}],
      "cleanup": {"remove_build_source": true, "7z_build": true, "7z_hash": "BLAKE2ep"}
    }"#;

    #[test]
    fn parses_the_documented_example() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.docker.image, "busybox:latest");
        assert_eq!(p.docker.stop_timeout_secs, 10);
        assert_eq!(p.stages.len(), 2);
        assert_eq!(p.stages[0].exit_line, None);
        assert_eq!(p.stages[1].exit_line.as_deref(), Some("0"));
        assert_eq!(p.cleanup.hash, Some(HashKind::Blake2sp));
        assert_eq!(p.environment[1], ("N".to_string(), "3".to_string()));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let e = parse("{\n  \"docker\": {,\n}").unwrap_err();
        assert_eq!(e.file, "pipeline.json");
        assert_eq!(e.position.map(|p| p.0), Some(2));
        assert!(e.to_string().contains("line 2 column"), "{e}");
    }

    fn field_of(text: &str) -> String {
        parse(text).unwrap_err().field
    }

    #[test]
    fn wrong_types_name_the_field_path() {
        let base: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "/pipeline/0/commands",
                serde_json::json!("ls"),
                "pipeline[0].commands",
            ),
            (
                "/pipeline/1/commands/0",
                serde_json::json!(5),
                "pipeline[1].commands[0]",
            ),
            ("/docker/image", serde_json::json!(1), "docker.image"),
            ("/docker/args", serde_json::json!(["x"]), "docker.args"),
            (
                "/cleanup/7z_hash",
                serde_json::json!("md5"),
                "cleanup.7z_hash",
            ),
            (
                "/pipeline/0/exit-line",
                serde_json::json!(true),
                "pipeline[0].exit-line",
            ),
            ("/environment", serde_json::json!([1]), "environment"),
            ("/pipeline", serde_json::json!([]), "pipeline"),
        ];
        for (ptr, val, want) in cases {
            let mut v = base.clone();
            *v.pointer_mut(ptr).unwrap() = val;
            assert_eq!(field_of(&v.to_string()), want, "{ptr}");
        }
    }

    #[test]
    fn missing_sections_are_named() {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v.as_object_mut().unwrap().remove("docker");
        assert_eq!(field_of(&v.to_string()), "docker");
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v.as_object_mut().unwrap().remove("pipeline");
        assert_eq!(field_of(&v.to_string()), "pipeline");
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v["docker"].as_object_mut().unwrap().remove("project-dest");
        assert_eq!(field_of(&v.to_string()), "docker.project-dest");
    }

    #[test]
    fn unknown_variable_is_refused_with_its_path() {
        let t = GOOD.replace("./build.sh {build_index}", "./build.sh {bild_index}");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.field, "pipeline[0].commands[0]");
        assert!(e.message.contains("bild_index"), "{e}");
    }

    #[test]
    fn build_name_format_may_not_use_late_variables() {
        let t = GOOD.replace(
            "{project}_{build_hash}",
            "{project}_{git_hash}_{build_hash}",
        );
        assert_eq!(parse(&t).unwrap_err().field, "build-name-format");
    }

    #[test]
    fn build_name_format_must_be_unique_across_projects() {
        let t = GOOD.replace(
            "{project}_{build_hash}_build_{build_index}",
            "build_{build_index}",
        );
        assert_eq!(parse(&t).unwrap_err().field, "build-name-format");
        let t = GOOD.replace(
            "{project}_{build_hash}_build_{build_index}",
            "{project}-{build_index}",
        );
        assert!(parse(&t).is_ok());
    }

    #[test]
    fn build_name_format_cannot_make_paths() {
        let t = GOOD.replace(
            "{project}_{build_hash}_build",
            "../{project}_{build_hash}_build",
        );
        assert_eq!(parse(&t).unwrap_err().field, "build-name-format");
    }

    #[test]
    fn unknown_keys_warn() {
        let t = GOOD.replace("\"environment\"", "\"colour\": 1, \"environment\"");
        let p = parse(&t).unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].contains("colour"));
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let p = parse(
            r#"{"docker": {"image": "x", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "a", "commands": ["true"]}]}"#,
        )
        .unwrap();
        assert_eq!(p.build_name_format, DEFAULT_NAME_FORMAT);
        assert_eq!(p.cleanup, Cleanup::default());
        assert!(!p.dummy_build);
    }
}
