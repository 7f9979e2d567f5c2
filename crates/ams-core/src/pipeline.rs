//! pipeline.json: parsing and validation with errors that name the field path.
//!
//! The file is public (it lives in the repository), so it is parsed defensively: a syntax error
//! reports line and column, a wrong type or missing section reports the field path, and every
//! `{variable}` is checked against the known names before anything runs. Unknown keys are kept as
//! warnings, since files written for the described system may carry keys we do not use.
//!
//! A pusher writes this file, and the host loop parses it to name each build, so parsing is
//! total and linear: the size, the nesting, the number of stages, commands and variables and
//! the length of each string are capped, and each cap has an error saying which field is over.

use crate::error::{clip, ConfigError};
use crate::{docker_args, protocol, secrets, vars};
use serde_json::{Map, Value};

const FILE: &str = "pipeline.json";

/// Largest pipeline.json, in bytes. The host refuses a larger file before reading it.
pub const MAX_BYTES: usize = 1 << 20;
/// Deepest nesting of lists and objects (the top-level object is the first level): serde_json's
/// recursion limit of 128 stops the parse with an error, not a stack overflow, at the 128th.
pub const MAX_DEPTH: usize = 127;
/// Most stages in one pipeline.
pub const MAX_STAGES: usize = 256;
/// Most commands in one list: a stage's `commands` or a `prepare-build` list.
pub const MAX_COMMANDS: usize = 1024;
/// Most variables in `environment`.
pub const MAX_ENV: usize = 1024;
/// Longest command or environment value, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest name: `build-name-format`, a stage's name, an environment variable's name.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest `docker.image`, `docker.project-dest` or `docker.build-output-dest`.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most warnings about unused keys listed one by one; the others are counted in one more.
pub const MAX_WARNINGS: usize = 32;

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
    /// The engine labels the build needs (web_conf.json `engines[].labels`).
    pub labels: Vec<String>,
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
    /// With `fail-fast`, the build goes on past this stage when it fails (ending WARN).
    pub allow_failure: bool,
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

/// Most entries of `parameters`.
pub const MAX_PARAMETERS: usize = 64;
/// Longest parameter value (and default), in bytes.
pub const MAX_PARAMETER_BYTES: usize = 4096;

/// Checks a trigger's parameters against the declared ones: each must be declared, short
/// enough and free of NUL. Returns the values the stages get: the given ones over the
/// defaults; a declared parameter without a default that is not given is an error.
pub fn resolve_parameters(
    declared: &[(String, Option<String>)],
    given: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    for (k, v) in given {
        if !declared.iter().any(|(d, _)| d == k) {
            let known: Vec<&str> = declared.iter().map(|(d, _)| d.as_str()).collect();
            return Err(format!(
                "parameter `{k}` is not declared in pipeline.json; declare it as \
                 \"parameters\": {{\"{k}\": {{\"default\": …}}}}{}",
                if known.is_empty() {
                    String::new()
                } else {
                    format!(" (declared: {})", known.join(", "))
                }
            ));
        }
        if v.len() > MAX_PARAMETER_BYTES || v.contains('\0') {
            return Err(format!(
                "parameter `{k}`: a value is at most {MAX_PARAMETER_BYTES} bytes, without NUL"
            ));
        }
    }
    declared
        .iter()
        .map(|(k, default)| match given.get(k).or(default.as_ref()) {
            Some(v) => Ok((k.clone(), v.clone())),
            None => Err(format!(
                "parameter `{k}` has no default in pipeline.json; give it (`-p {k}=VALUE`)"
            )),
        })
        .collect()
}

/// Most entries of `caches`.
pub const MAX_CACHES: usize = 8;
/// The most `"test-reports"` patterns.
pub const MAX_TEST_REPORT_PATTERNS: usize = 16;

/// One entry of `caches`: a folder kept between builds of a project.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheDef {
    /// The entry's name: text, `{variables}` and `{hash:FILE}` (a hash of a file of the
    /// checkout), so that the cache follows what it was made from.
    pub key: String,
    /// Where the folder is mounted in the container (absolute).
    pub path: String,
}

/// An absolute path with its `//` and trailing `/` folded, or `None` when it is relative or
/// holds a `.` or `..` component.
fn normal_path(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if parts.iter().any(|s| *s == "." || *s == "..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

impl CacheDef {
    /// The key's pieces: literal text (with `{variables}`) and the files of `{hash:FILE}`.
    fn pieces(&self) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = self.key.as_str();
        while let Some(at) = rest.find("{hash:") {
            let after = &rest[at + 6..];
            let Some(end) = after.find('}') else { break };
            out.push((false, &rest[..at]));
            out.push((true, &after[..end]));
            rest = &after[end + 1..];
        }
        out.push((false, rest));
        out
    }

    /// The key with its `{hash:FILE}` references left out (for checking its variables).
    pub fn key_without_hashes(&self) -> String {
        self.pieces()
            .into_iter()
            .filter(|(h, _)| !h)
            .map(|(_, t)| t)
            .collect()
    }

    /// The files whose hashes the key holds.
    pub fn hashed_files(&self) -> Vec<&str> {
        self.pieces()
            .into_iter()
            .filter(|(h, _)| *h)
            .map(|(_, t)| t)
            .collect()
    }

    /// The key of a build: `{hash:FILE}` from `hash_of`, variables from `values`; characters
    /// other than letters, digits, `.`, `_` and `-` become `_`, so a key is always one folder
    /// name.
    pub fn resolve_key(
        &self,
        mut hash_of: impl FnMut(&str) -> Result<String, String>,
        values: &std::collections::BTreeMap<&str, String>,
    ) -> Result<String, String> {
        let mut key = String::new();
        for (is_hash, text) in self.pieces() {
            if is_hash {
                key.push_str(&hash_of(text)?);
            } else {
                key.push_str(
                    &vars::expand(text, values)
                        .map_err(|v| format!("variable `{{{v}}}` has no value"))?,
                );
            }
        }
        let mut key: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(128)
            .collect();
        if key.starts_with('.') || key.is_empty() {
            key.insert(0, '_');
        }
        Ok(key)
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
    /// Stop at the first failed stage (unless it allows failure) and end FAIL. Without it
    /// every stage runs and failures make the build WARN (or FAIL when none passed).
    pub fail_fast: bool,
    /// Build timeout override in seconds.
    pub timeout_secs: Option<u64>,
    /// Names of the project's secrets the stages receive as environment variables (when the
    /// build is of a branch that pipeline-config.json's `secret-branches` allows).
    pub secrets: Vec<String>,
    /// Folders kept between builds.
    pub caches: Vec<CacheDef>,
    /// Parameters a trigger may give (`-p NAME=VALUE`), with their defaults: the stages get
    /// them as environment variables. A trigger may give no other.
    pub parameters: Vec<(String, Option<String>)>,
    /// Glob patterns, relative to the build output, of the JUnit XML files the stages leave
    /// (`"test-reports"`).
    pub test_reports: Vec<String>,
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

/// Refuses a string longer than `max` bytes, with what to do instead.
fn check_len(path: &str, s: &str, max: usize, fix: &str) -> Result<(), ConfigError> {
    if s.len() > max {
        return Err(err(
            path,
            format!("is {} bytes long, over the limit of {max}; {fix}", s.len()),
        ));
    }
    Ok(())
}

const SHORTEN: &str = "shorten it";
const SCRIPT: &str = "put a long script in a file of the repository and run that file";

/// Warnings about unused keys: the first [`MAX_WARNINGS`], and a count of the others.
#[derive(Default)]
struct Warnings {
    list: Vec<String>,
    more: usize,
}

impl Warnings {
    fn finish(mut self) -> Vec<String> {
        if self.more > 0 {
            self.list.push(format!(
                "{FILE}: {} more fields are not used by AMS-Build and were ignored",
                self.more
            ));
        }
        self.list
    }
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

    fn string(
        &mut self,
        key: &'static str,
        required: bool,
        max: usize,
        fix: &str,
    ) -> Result<Option<String>, ConfigError> {
        let path = self.sub(key);
        match self.get(key) {
            None if required => Err(err(&path, "is missing; add it as a string")),
            None => Ok(None),
            Some(Value::String(s)) if required && s.trim().is_empty() => {
                Err(err(&path, "is empty; give it a value"))
            }
            Some(Value::String(s)) => {
                check_len(&path, s, max, fix)?;
                Ok(Some(s.clone()))
            }
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
            Some(v) => commands(&path, v),
        }
    }

    fn unknown_keys(&self, warnings: &mut Warnings) {
        for k in self.map.keys() {
            crate::work::add(1);
            if !self.known.contains(&k.as_str()) {
                if warnings.list.len() < MAX_WARNINGS {
                    warnings.list.push(format!(
                        "{FILE}: field `{}` is not used by AMS-Build and was ignored",
                        self.sub(&clip(k, 64))
                    ));
                } else {
                    warnings.more += 1;
                }
            }
        }
    }
}

/// A list of commands: at most [`MAX_COMMANDS`] strings of at most [`MAX_COMMAND_BYTES`].
fn commands(path: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
    match v {
        Value::Array(items) if items.len() > MAX_COMMANDS => Err(err(
            path,
            format!(
                "has {} commands, over the limit of {MAX_COMMANDS}; {SCRIPT}",
                items.len()
            ),
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => {
                    crate::work::add(1);
                    check_len(&format!("{path}[{i}]"), s, MAX_COMMAND_BYTES, SCRIPT)?;
                    Ok(s.clone())
                }
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

/// Reads the JSON, refusing more than [`MAX_BYTES`]; too deep a nesting gets its own message.
fn read_json(text: &str) -> Result<Value, ConfigError> {
    if text.len() > MAX_BYTES {
        return Err(err(
            "",
            format!(
                "the file is {} bytes, over the limit of {MAX_BYTES} (1 MiB); {SCRIPT}",
                text.len()
            ),
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        let mut ce = ConfigError::json(FILE, &e);
        if ce.message.starts_with("recursion limit exceeded") {
            ce.message = format!(
                "lists and objects are nested more than {MAX_DEPTH} deep; flatten the file"
            );
        }
        ce
    })
}

/// The top-level `secrets`: a list of at most [`secrets::MAX_PER_PIPELINE`] secret names, each
/// once, none also set in `environment`.
fn secret_names(
    v: Option<&Value>,
    environment: &[(String, String)],
) -> Result<Vec<String>, ConfigError> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = v else {
        return Err(err(
            "secrets",
            format!(
                "expected a list of secret names, found {}; write \"secrets\": [\"NAME\"]",
                type_name(v)
            ),
        ));
    };
    if items.len() > secrets::MAX_PER_PIPELINE {
        return Err(err(
            "secrets",
            format!(
                "has {} names, over the limit of {}",
                items.len(),
                secrets::MAX_PER_PIPELINE
            ),
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        crate::work::add(1);
        let path = format!("secrets[{i}]");
        let Value::String(name) = item else {
            return Err(err(
                &path,
                format!("expected a secret name, found {}", type_name(item)),
            ));
        };
        secrets::validate_name(name).map_err(|e| err(&path, e))?;
        if out.contains(name) {
            return Err(err(&path, format!("`{name}` is listed twice")));
        }
        if environment.iter().any(|(k, _)| k == name) {
            return Err(err(
                &path,
                format!(
                    "`{name}` is also set in `environment`; a variable comes from one place: \
                     remove it from one of them"
                ),
            ));
        }
        out.push(name.clone());
    }
    Ok(out)
}

/// Parses and validates the text of a pipeline.json.
pub fn parse(text: &str) -> Result<Pipeline, ConfigError> {
    let root = read_json(text)?;
    let mut warnings = Warnings::default();
    let mut top = Obj::new("", &root).map_err(|mut e| {
        e.field = "(top level)".into();
        e
    })?;

    let build_name_format = top
        .string(
            "build-name-format",
            false,
            MAX_NAME_BYTES,
            "the build names it makes may be at most 200 bytes",
        )?
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
    let args_fix = "give docker.args only `docker run` flags, and environment variables in \
                    \"environment\"";
    let docker = DockerSection {
        image: d
            .string("image", true, MAX_PATH_BYTES, SHORTEN)?
            .unwrap_or_default(),
        args: d
            .string("args", false, docker_args::MAX_ARGS_BYTES, args_fix)?
            .unwrap_or_default(),
        project_dest: d
            .string("project-dest", true, MAX_PATH_BYTES, SHORTEN)?
            .unwrap_or_default(),
        build_output_dest: d
            .string("build-output-dest", true, MAX_PATH_BYTES, SHORTEN)?
            .unwrap_or_default(),
        stop_timeout_secs: d.uint("stop-timeout", 3600)?.unwrap_or(10),
        labels: d.strings("labels")?,
    };
    if docker.labels.len() > crate::webconf::MAX_LABELS {
        return Err(err(
            "docker.labels",
            format!("has more than {} labels", crate::webconf::MAX_LABELS),
        ));
    }
    for (i, l) in docker.labels.iter().enumerate() {
        if let Some(p) = crate::webconf::label_problem(l) {
            return Err(err(
                &format!("docker.labels[{i}]"),
                format!("`{}` {p}", clip(l, 64)),
            ));
        }
    }
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
        if e.map.len() > MAX_ENV {
            return Err(err(
                "environment",
                format!(
                    "has {} variables, over the limit of {MAX_ENV}; set fewer, or read them from \
                     a file of the repository",
                    e.map.len()
                ),
            ));
        }
        for (k, val) in e.map {
            crate::work::add(1);
            let path = format!("environment.{}", clip(k, 64));
            check_len(&path, k, MAX_NAME_BYTES, SHORTEN)?;
            if !valid_env_name(k) {
                return Err(err(
                    &path,
                    "is not a valid environment variable name (letters, digits and _, not starting with a digit)",
                ));
            }
            let s = match val {
                Value::String(s) => {
                    check_len(&path, s, MAX_COMMAND_BYTES, SCRIPT)?;
                    s.clone()
                }
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
    if items.len() > MAX_STAGES {
        return Err(err(
            "pipeline",
            format!(
                "has {} stages, over the limit of {MAX_STAGES}; run several steps in one stage",
                items.len()
            ),
        ));
    }
    let mut stages = Vec::new();
    for (i, item) in items.iter().enumerate() {
        crate::work::add(1);
        let path = format!("pipeline[{i}]");
        let mut s = Obj::new(&path, item)?;
        let name = s
            .string("name", true, MAX_NAME_BYTES, SHORTEN)?
            .unwrap_or_default();
        let commands = match s.get("commands") {
            None => {
                return Err(err(
                    &format!("{path}.commands"),
                    "is missing; add a list of commands",
                ))
            }
            Some(v) => commands(&format!("{path}.commands"), v)?,
        };
        if commands.is_empty() {
            return Err(err(
                &format!("{path}.commands"),
                "is empty; add at least one command",
            ));
        }
        let exit_line = match s.get("exit-line") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::String(x)) => {
                check_len(
                    &format!("{path}.exit-line"),
                    x,
                    protocol::MAX_LAST_LINE,
                    "only that much of a stage's last line is kept, so it could never match",
                )?;
                Some(x.clone())
            }
            Some(other) => {
                return Err(err(
                    &format!("{path}.exit-line"),
                    format!("expected a string or false, found {}", type_name(other)),
                ))
            }
        };
        let allow_failure = s.boolean("allow-failure", false)?;
        s.unknown_keys(&mut warnings);
        stages.push(Stage {
            name,
            commands,
            exit_line,
            allow_failure,
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
                            "unknown hash `{}`; use null, crc32, crc64, sha1, sha256 or blake2sp",
                            clip(s, 64)
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
    let fail_fast = top.boolean("fail-fast", false)?;
    let mut parameters = Vec::new();
    if let Some(v) = top.get("parameters") {
        let o = Obj::new("parameters", v)?;
        if o.map.len() > MAX_PARAMETERS {
            return Err(err(
                "parameters",
                format!(
                    "has {} entries, over the limit of {MAX_PARAMETERS}",
                    o.map.len()
                ),
            ));
        }
        for (k, val) in o.map {
            let path = format!("parameters.{}", clip(k, 64));
            check_len(&path, k, MAX_NAME_BYTES, SHORTEN)?;
            if !valid_env_name(k) {
                return Err(err(
                    &path,
                    "is not a valid environment variable name (letters, digits and _, not starting with a digit)",
                ));
            }
            let mut p = Obj::new(&path, val)?;
            let default = match p.get("default") {
                None => None,
                Some(Value::String(s)) => {
                    check_len(&format!("{path}.default"), s, MAX_PARAMETER_BYTES, SHORTEN)?;
                    Some(s.clone())
                }
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                Some(other) => {
                    return Err(err(
                        &format!("{path}.default"),
                        format!("expected a string, found {}", type_name(other)),
                    ))
                }
            };
            p.unknown_keys(&mut warnings);
            parameters.push((k.clone(), default));
        }
    }
    let caches = match top.get("caches") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_CACHES {
                return Err(err(
                    "caches",
                    format!(
                        "has {} entries, over the limit of {MAX_CACHES}",
                        items.len()
                    ),
                ));
            }
            let mut out: Vec<CacheDef> = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let path = format!("caches[{i}]");
                let mut c = Obj::new(&path, item)?;
                let key = c
                    .string("key", true, MAX_NAME_BYTES, SHORTEN)?
                    .unwrap_or_default();
                let dest = c
                    .string("path", true, MAX_PATH_BYTES, SHORTEN)?
                    .unwrap_or_default();
                let field = format!("{path}.path");
                let Some(dest) = normal_path(&dest).filter(|d| d != "/") else {
                    return Err(err(
                        &field,
                        "must be an absolute folder of the container other than `/`, without `.` \
                         or `..`, e.g. \"/root/.cache/pip\"",
                    ));
                };
                let nested = |a: &str, b: &str| {
                    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
                };
                for (other, what) in [
                    ("/.ams-ci", "the host's own folder"),
                    ("/proc", "a folder of the kernel"),
                    ("/sys", "a folder of the kernel"),
                    ("/dev", "the devices folder"),
                ] {
                    if nested(&dest, other) {
                        return Err(err(
                            &field,
                            format!("meets {other}, {what}; choose another folder"),
                        ));
                    }
                }
                for (other, what) in [
                    (&docker.project_dest, "docker.project-dest"),
                    (&docker.build_output_dest, "docker.build-output-dest"),
                ] {
                    if let Some(o) = normal_path(other).filter(|_| !other.contains('{')) {
                        if nested(&dest, &o) {
                            return Err(err(
                                &field,
                                format!(
                                    "is, holds or lies in {what} ({o}); a cache needs a folder of \
                                     its own"
                                ),
                            ));
                        }
                    }
                }
                if out.iter().any(|o| nested(&o.path, &dest)) {
                    return Err(err(&field, "is, holds or lies in another cache's folder"));
                }
                c.unknown_keys(&mut warnings);
                out.push(CacheDef { key, path: dest });
            }
            out
        }
        Some(other) => {
            return Err(err(
                "caches",
                format!(
                    "expected a list of {{\"key\": …, \"path\": …}}, found {}",
                    type_name(other)
                ),
            ))
        }
    };
    let test_reports = match top.get("test-reports") {
        None => Vec::new(),
        Some(Value::String(p)) => vec![p.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_TEST_REPORT_PATTERNS {
                return Err(err(
                    "test-reports",
                    format!(
                        "has {} patterns, over the limit of {MAX_TEST_REPORT_PATTERNS}; use `**`",
                        items.len()
                    ),
                ));
            }
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(p) => out.push(p.clone()),
                    other => {
                        return Err(err(
                            &format!("test-reports[{i}]"),
                            format!(
                                "expected a glob pattern such as \"junit*.xml\", found {}",
                                type_name(other)
                            ),
                        ))
                    }
                }
            }
            out
        }
        Some(other) => {
            return Err(err(
                "test-reports",
                format!(
                    "expected a list of glob patterns such as [\"junit*.xml\"], found {}",
                    type_name(other)
                ),
            ))
        }
    };
    for (i, p) in test_reports.iter().enumerate() {
        let field = format!("test-reports[{i}]");
        check_len(&field, p, MAX_PATH_BYTES, SHORTEN)?;
        crate::junit::check_pattern(p).map_err(|m| err(&field, m))?;
    }
    let timeout_secs = top.uint("timeout", 7 * 24 * 3600)?;
    if timeout_secs == Some(0) {
        return Err(err("timeout", "must be at least 1 second"));
    }
    let secrets = secret_names(top.get("secrets"), &environment)?;
    top.unknown_keys(&mut warnings);

    let p = Pipeline {
        build_name_format,
        docker,
        prepare,
        environment,
        stages,
        cleanup,
        dummy_build,
        fail_fast,
        timeout_secs,
        secrets,
        caches,
        parameters,
        test_reports,
        warnings: warnings.finish(),
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
        for (i, c) in self.caches.iter().enumerate() {
            check_vars(
                &format!("caches[{i}].key"),
                c.key_without_hashes().as_str(),
                k,
            )?;
            check_vars(&format!("caches[{i}].path"), &c.path, k)?;
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

    #[test]
    fn parameters_are_declared_with_defaults_and_checked() {
        let p = parse(
            r#"{"docker": {"image": "i", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "s", "commands": ["true"]}],
                "parameters": {"MODE": {"default": "fast"}, "N": {"default": 3}, "TARGET": {}}}"#,
        )
        .unwrap();
        assert_eq!(p.parameters.len(), 3);
        let given = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let r = resolve_parameters(&p.parameters, &given(&[("TARGET", "x"), ("MODE", "slow")]))
            .unwrap();
        assert!(r.contains(&("MODE".into(), "slow".into())));
        assert!(r.contains(&("N".into(), "3".into())));
        assert!(r.contains(&("TARGET".into(), "x".into())));
        let e = resolve_parameters(&p.parameters, &given(&[("NOPE", "1")])).unwrap_err();
        assert!(e.contains("NOPE") && e.contains("not declared"), "{e}");
        let e = resolve_parameters(&p.parameters, &given(&[])).unwrap_err();
        assert!(e.contains("TARGET") && e.contains("no default"), "{e}");
        let bad = r#"{"docker": {"image": "i", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "s", "commands": ["true"]}], "parameters": {"1X": {}}}"#;
        assert_eq!(parse(bad).unwrap_err().field, "parameters.1X");
    }

    #[test]
    fn caches_parse_and_keys_resolve() {
        let p = parse(
            r#"{"docker": {"image": "i", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "s", "commands": ["true"]}],
                "caches": [{"key": "pip-{hash:requirements.txt}-{project}", "path": "/root/.cache/pip"}]}"#,
        )
        .unwrap();
        let c = &p.caches[0];
        assert_eq!(c.hashed_files(), vec!["requirements.txt"]);
        let mut values = std::collections::BTreeMap::new();
        values.insert("project", "a b".to_string());
        let key = c.resolve_key(|f| Ok(format!("H({f})")), &values).unwrap();
        assert_eq!(key, "pip-H_requirements.txt_-a_b");
        let dots = CacheDef {
            key: "..".into(),
            path: "/c".into(),
        };
        assert_eq!(
            dots.resolve_key(|_| Ok(String::new()), &values).unwrap(),
            "_.."
        );
        for (caches, field) in [
            (r#"[{"key": "k", "path": "relative"}]"#, "caches[0].path"),
            (r#"[{"key": "k", "path": "/"}]"#, "caches[0].path"),
            (
                r#"[{"key": "k", "path": "/a"}, {"key": "j", "path": "/a"}]"#,
                "caches[1].path",
            ),
            (
                r#"[{"key": "k", "path": "/a"}, {"key": "j", "path": "/a/b"}]"#,
                "caches[1].path",
            ),
            (r#"[{"key": "k", "path": "//.ams-ci/x"}]"#, "caches[0].path"),
            (r#"[{"key": "k", "path": "/proc/x"}]"#, "caches[0].path"),
            (r#"[{"key": "k", "path": "/p/"}]"#, "caches[0].path"),
            (r#"[{"key": "k", "path": "/o/x"}]"#, "caches[0].path"),
            (r#"[{"key": "k", "path": "/c/../etc"}]"#, "caches[0].path"),
            (r#"[{"path": "/a"}]"#, "caches[0].key"),
            (r#"[{"key": "{nope}", "path": "/a"}]"#, "caches[0].key"),
            (r#"{"key": "k"}"#, "caches"),
        ] {
            let text = format!(
                r#"{{"docker": {{"image": "i", "project-dest": "/p", "build-output-dest": "/o"}},
                    "pipeline": [{{"name": "s", "commands": ["true"]}}], "caches": {caches}}}"#
            );
            let e = parse(&text).unwrap_err();
            assert_eq!(e.field, field, "{caches}: {e}");
        }
    }

    #[test]
    fn test_report_patterns_parse_and_bad_ones_are_named() {
        let base = r#""docker": {"image": "i", "project-dest": "/p", "build-output-dest": "/o"},
                "pipeline": [{"name": "s", "commands": ["true"]}]"#;
        let p = parse(&format!(
            r#"{{{base}, "test-reports": ["junit*.xml", "reports/**/*.xml"]}}"#
        ))
        .unwrap();
        assert_eq!(p.test_reports, vec!["junit*.xml", "reports/**/*.xml"]);
        let one = parse(&format!(r#"{{{base}, "test-reports": "junit.xml"}}"#)).unwrap();
        assert_eq!(one.test_reports, vec!["junit.xml"]);
        assert!(parse(&format!("{{{base}}}"))
            .unwrap()
            .test_reports
            .is_empty());
        for (v, field) in [
            (r#"["/etc/*.xml"]"#, "test-reports[0]"),
            (r#"["ok.xml", "../up.xml"]"#, "test-reports[1]"),
            (r#"["a[.xml"]"#, "test-reports[0]"),
            (r#"[3]"#, "test-reports[0]"),
            (r#"{"a": 1}"#, "test-reports"),
        ] {
            let e = parse(&format!(r#"{{{base}, "test-reports": {v}}}"#)).unwrap_err();
            assert_eq!(e.field, field, "{v}: {e}");
        }
    }

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
    fn secrets_are_a_list_of_names_each_once_and_not_in_environment() {
        let with = |v: serde_json::Value| {
            let mut p: serde_json::Value = serde_json::from_str(GOOD).unwrap();
            p["secrets"] = v;
            parse(&p.to_string())
        };
        let p = with(serde_json::json!(["DEPLOY_TOKEN", "_KEY2"])).unwrap();
        assert_eq!(p.secrets, vec!["DEPLOY_TOKEN", "_KEY2"]);
        assert!(parse(GOOD).unwrap().secrets.is_empty());
        for (v, field, says) in [
            (serde_json::json!("TOKEN"), "secrets", "expected a list"),
            (
                serde_json::json!(["TOKEN", 3]),
                "secrets[1]",
                "expected a secret name",
            ),
            (
                serde_json::json!(["token"]),
                "secrets[0]",
                "not a secret name",
            ),
            (
                serde_json::json!(["A", "B", "A"]),
                "secrets[2]",
                "listed twice",
            ),
            (
                serde_json::json!(["MODE"]),
                "secrets[0]",
                "also set in `environment`",
            ),
        ] {
            let e = with(v.clone()).unwrap_err();
            assert_eq!(e.field, field, "{v}: {e}");
            assert!(e.message.contains(says), "{v}: {e}");
        }
        let many: Vec<String> = (0..=secrets::MAX_PER_PIPELINE)
            .map(|i| format!("S{i}"))
            .collect();
        assert_eq!(with(serde_json::json!(many)).unwrap_err().field, "secrets");
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

    /// GOOD with the value at `ptr` replaced (or added to its parent object).
    fn with(ptr: &str, val: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        set(&mut v, ptr, val);
        v.to_string()
    }

    fn set(v: &mut serde_json::Value, ptr: &str, val: serde_json::Value) {
        if let Some(slot) = v.pointer_mut(ptr) {
            *slot = val;
        } else if let Some((parent, key)) = ptr.rsplit_once('/') {
            if let Some(serde_json::Value::Object(m)) = v.pointer_mut(parent) {
                m.insert(key.to_string(), val);
            }
        }
    }

    #[test]
    fn caps_name_the_field_and_allow_the_limit_itself() {
        use serde_json::json;
        let many = |n: usize| json!(vec!["true"; n]);
        let long = |n: usize| json!("x".repeat(n));
        let stage = json!({"name": "s", "commands": ["true"]});
        let env = |n: usize| {
            serde_json::Value::Object((0..n).map(|i| (format!("V{i}"), json!("1"))).collect())
        };
        let cases = [
            ("/pipeline", json!(vec![stage; MAX_STAGES + 1]), "pipeline"),
            (
                "/pipeline/0/commands",
                many(MAX_COMMANDS + 1),
                "pipeline[0].commands",
            ),
            (
                "/prepare-build/build-dir-commands",
                many(MAX_COMMANDS + 1),
                "prepare-build.build-dir-commands",
            ),
            (
                "/pipeline/1/commands/0",
                long(MAX_COMMAND_BYTES + 1),
                "pipeline[1].commands[0]",
            ),
            (
                "/prepare-build/master-dir-commands/0",
                long(MAX_COMMAND_BYTES + 1),
                "prepare-build.master-dir-commands[0]",
            ),
            (
                "/pipeline/1/exit-line",
                long(protocol::MAX_LAST_LINE + 1),
                "pipeline[1].exit-line",
            ),
            (
                "/pipeline/0/name",
                long(MAX_NAME_BYTES + 1),
                "pipeline[0].name",
            ),
            (
                "/docker/args",
                json!(format!(
                    "--rm{}",
                    " ".repeat(docker_args::MAX_ARGS_BYTES - 3)
                )),
                "docker.args",
            ),
            ("/docker/image", long(MAX_PATH_BYTES + 1), "docker.image"),
            (
                "/docker/project-dest",
                json!(format!("/{}", "x".repeat(MAX_PATH_BYTES))),
                "docker.project-dest",
            ),
            ("/environment", env(MAX_ENV + 1), "environment"),
            (
                "/environment/MODE",
                long(MAX_COMMAND_BYTES + 1),
                "environment.MODE",
            ),
            (
                "/environment/V",
                json!(format!("V{}", "x".repeat(MAX_NAME_BYTES))),
                "",
            ),
        ];
        for (ptr, val, want) in cases {
            let (ptr, val, want) = if ptr == "/environment/V" {
                // An over-long name: the key itself is what is too long.
                let key = val.as_str().unwrap().to_string();
                let mut m = serde_json::Map::new();
                m.insert(key.clone(), json!("1"));
                (
                    "/environment",
                    serde_json::Value::Object(m),
                    format!("environment.{}", clip(&key, 64)),
                )
            } else {
                (ptr, val, want.to_string())
            };
            let e = parse(&with(ptr, val)).unwrap_err();
            assert_eq!(e.field, want, "{ptr}: {e}");
            assert!(e.message.contains("over the limit of"), "{ptr}: {e}");
            assert!(!e.message.ends_with('.'), "{e}");
        }
        let at_limit = [
            (
                "/pipeline",
                json!(vec![json!({"name": "s", "commands": ["true"]}); MAX_STAGES]),
            ),
            ("/pipeline/0/commands", many(MAX_COMMANDS)),
            ("/pipeline/1/commands/0", long(MAX_COMMAND_BYTES)),
            ("/pipeline/1/exit-line", long(protocol::MAX_LAST_LINE)),
            ("/pipeline/0/name", long(MAX_NAME_BYTES)),
            (
                "/docker/args",
                json!(format!(
                    "--rm{}",
                    " ".repeat(docker_args::MAX_ARGS_BYTES - 4)
                )),
            ),
            ("/environment", env(MAX_ENV)),
        ];
        for (ptr, val) in at_limit {
            parse(&with(ptr, val)).unwrap_or_else(|e| panic!("{ptr}: {e}"));
        }
    }

    #[test]
    fn a_file_over_a_mebibyte_is_refused_before_parsing() {
        let fits = format!("{GOOD}{}", " ".repeat(MAX_BYTES - GOOD.len()));
        assert!(parse(&fits).is_ok());
        let e = parse(&format!("{fits} ")).unwrap_err();
        assert_eq!((e.file.as_str(), e.field.as_str()), ("pipeline.json", ""));
        assert!(
            e.to_string().contains("over the limit of 1048576 (1 MiB)"),
            "{e}"
        );
        // Refused by its size, not by its (broken) contents.
        let e = parse(&"[".repeat(MAX_BYTES + 1)).unwrap_err();
        assert!(e.message.contains("1 MiB"), "{e}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let nested = |depth: usize| {
            // `depth` levels in all: the top object, then lists.
            with("/colour", serde_json::Value::Null).replace(
                "\"colour\":null",
                &format!(
                    "\"colour\":{}{}",
                    "[".repeat(depth - 1),
                    "]".repeat(depth - 1)
                ),
            )
        };
        let p = parse(&nested(MAX_DEPTH)).unwrap();
        assert_eq!(p.warnings.len(), 1);
        let e = parse(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(e.message.contains("nested more than 127 deep"), "{e}");
        assert!(e.position.is_some(), "{e}");
        // Half a million open lists: stopped at the limit, long before the stack runs out.
        let e = parse(&"[".repeat(MAX_BYTES / 2)).unwrap_err();
        assert_eq!(e.position, Some((1, MAX_DEPTH + 1)), "{e}");
    }

    #[test]
    fn unused_field_warnings_are_capped() {
        let keys: String = (0..10_000).map(|i| format!("\"k{i}\": {i}, ")).collect();
        let t = GOOD.replacen('{', &format!("{{{keys}"), 1);
        let p = parse(&t).unwrap();
        assert_eq!(p.warnings.len(), MAX_WARNINGS + 1);
        assert!(
            p.warnings[MAX_WARNINGS].contains("9968 more fields"),
            "{:?}",
            p.warnings.last()
        );
        let long_key = GOOD.replacen('{', &format!("{{\"{}\": 1, ", "k".repeat(100_000)), 1);
        assert!(parse(&long_key).unwrap().warnings[0].len() < 200);
    }

    #[test]
    fn the_largest_files_take_linear_work() {
        // About 1 MiB of commands full of unclosed references, or of references; and one of
        // many small stages. A scan to the end of each string from every brace, or a check of
        // every command per stage, would count far beyond these bounds.
        let body = |unit: &str| {
            let cmd = serde_json::json!(unit.repeat(60_000 / unit.len()));
            let stage = serde_json::json!({"name": "s", "commands": vec![cmd; 4]});
            with("/pipeline", serde_json::json!(vec![stage; 4]))
        };
        let small = serde_json::json!({"name": "s{build_index}", "commands": vec!["{project}"; MAX_COMMANDS]});
        for t in [
            body("{a"),
            body("{project}"),
            body("{{"),
            with("/pipeline", serde_json::json!(vec![small; 80])),
        ] {
            assert!(t.len() > 900_000 && t.len() <= MAX_BYTES, "{}", t.len());
            let (r, work) = crate::work::count(|| parse(&t));
            r.unwrap();
            assert!(
                work <= 4 * t.len() as u64,
                "{work} units for {} bytes",
                t.len()
            );
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        /// Strings a pusher might write, and some they might not: references known and
        /// unknown, braces, separators, long runs, any character.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-z {}_$/.]{0,12}",
                2 => prop::sample::select(vec!["{project}", "{build_hash}", "{build_index}", "{git_hash}", "{nope}", "{{", "}}", "${HOME}", "", " "])
                    .prop_map(str::to_string),
                1 => any::<String>(),
                1 => (1usize..3000).prop_map(|n| "{a".repeat(n)),
            ]
        }

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                text().prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 5, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop_oneof![3 => "[A-Za-z_0-9-]{0,6}", 1 => text()],
                        inner,
                        0..5
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        const POINTERS: &[&str] = &[
            "",
            "/build-name-format",
            "/docker",
            "/docker/image",
            "/docker/args",
            "/docker/project-dest",
            "/docker/build-output-dest",
            "/docker/stop-timeout",
            "/prepare-build",
            "/prepare-build/master-dir-commands",
            "/prepare-build/master-dir-commands/0",
            "/prepare-build/get-git-hash",
            "/environment",
            "/environment/MODE",
            "/environment/x y",
            "/pipeline",
            "/pipeline/0",
            "/pipeline/0/name",
            "/pipeline/0/commands",
            "/pipeline/0/commands/0",
            "/pipeline/0/exit-line",
            "/pipeline/1/exit-line",
            "/pipeline/1/extra",
            "/cleanup",
            "/cleanup/7z_hash",
            "/cleanup/7z_build",
            "/cleanup/remove_build_source",
            "/timeout",
            "/dummy-build",
            "/extra",
        ];

        /// GOOD with a few fields replaced by anything, added or taken away.
        fn mutated() -> impl Strategy<Value = String> {
            let edit = (
                prop::sample::select(POINTERS),
                prop::option::weighted(0.85, json()),
            );
            prop::collection::vec(edit, 1..4).prop_map(|edits| {
                let mut v: Value = serde_json::from_str(GOOD).unwrap();
                for (ptr, val) in edits {
                    match val {
                        Some(val) => set(&mut v, ptr, val),
                        None => {
                            if let Some((parent, key)) = ptr.rsplit_once('/') {
                                if let Some(Value::Object(m)) = v.pointer_mut(parent) {
                                    m.remove(key);
                                }
                            }
                        }
                    }
                }
                v.to_string()
            })
        }

        /// Any text: broken JSON (a valid file cut anywhere), other JSON, and noise.
        fn any_text() -> impl Strategy<Value = String> {
            prop_oneof![
                (mutated(), any::<prop::sample::Index>()).prop_map(|(t, i)| {
                    let mut cut = i.index(t.len() + 1);
                    while !t.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    t[..cut].to_string()
                }),
                json().prop_map(|v| v.to_string()),
                any::<String>(),
            ]
        }

        /// What every error must look like: the file, a field unless the whole file is at
        /// fault, a message that is short and ends without a period.
        fn check_error(e: &ConfigError) -> Result<(), TestCaseError> {
            prop_assert_eq!(e.file.as_str(), "pipeline.json");
            prop_assert!(!e.message.is_empty() && !e.message.ends_with('.'), "{}", e);
            prop_assert!(
                e.position.is_some() || !e.field.is_empty() || e.message.contains("1 MiB"),
                "{}",
                e
            );
            if e.position.is_none() {
                prop_assert!(!e.message.starts_with(char::is_uppercase), "{}", e);
            }
            prop_assert!(
                e.to_string().len() <= 2048,
                "{} bytes: {}",
                e.to_string().len(),
                e
            );
            Ok(())
        }

        /// What every accepted file must respect: the caps, and only known variables.
        fn check_pipeline(p: &Pipeline) -> Result<(), TestCaseError> {
            prop_assert!((1..=MAX_STAGES).contains(&p.stages.len()));
            prop_assert!(p.warnings.len() <= MAX_WARNINGS + 1);
            prop_assert!(p.environment.len() <= MAX_ENV);
            let lists = p.stages.iter().map(|s| &s.commands).chain([
                &p.prepare.master_dir_commands,
                &p.prepare.build_dir_commands,
            ]);
            for list in lists {
                prop_assert!(list.len() <= MAX_COMMANDS);
                for c in list {
                    prop_assert!(c.len() <= MAX_COMMAND_BYTES);
                    prop_assert_eq!(vars::first_unknown(c, vars::PIPELINE_VARS), None);
                }
            }
            prop_assert_eq!(
                vars::first_unknown(&p.build_name_format, vars::NAME_VARS),
                None
            );
            prop_assert!(p.docker.args.len() <= docker_args::MAX_ARGS_BYTES);
            Ok(())
        }

        fn command() -> impl Strategy<Value = String> {
            let atom = prop_oneof![
                3 => "[a-z ./$'\"-]{0,8}",
                1 => prop::sample::select(vars::PIPELINE_VARS.to_vec()).prop_map(|n| format!("{{{n}}}")),
                1 => prop::sample::select(vec!["{{", "}}", "${HOME}", "awk '{print $1}'", "{a,b}"]).prop_map(str::to_string),
                1 => any::<char>().prop_filter("no braces", |c| *c != '{' && *c != '}').prop_map(String::from),
            ];
            prop::collection::vec(atom, 0..6).prop_map(|v| v.concat())
        }

        fn hash() -> impl Strategy<Value = Option<HashKind>> {
            prop::option::of(prop::sample::select(vec![
                HashKind::Crc32,
                HashKind::Crc64,
                HashKind::Sha1,
                HashKind::Sha256,
                HashKind::Blake2sp,
            ]))
        }

        /// Valid pipelines, every field varied.
        fn pipeline() -> impl Strategy<Value = Pipeline> {
            let docker = (
                "[a-z]{1,8}(:[0-9]{1,2})?",
                prop::sample::select(vec![
                    "",
                    "--memory 512m",
                    "-e A={build_index} --rm",
                    "--network none",
                ]),
                "/[a-z]{1,8}",
                "/[a-z]{1,8}/[a-z{}_]{0,12}",
                0u64..=3600,
            )
                .prop_map(|(image, args, project_dest, out, stop)| DockerSection {
                    image,
                    args: args.to_string(),
                    project_dest,
                    build_output_dest: out.replace(['{', '}'], "_"),
                    stop_timeout_secs: stop,
                    labels: Vec::new(),
                });
            let stage = (
                "[a-z][a-z {}_]{0,8}",
                prop::collection::vec(command(), 1..4),
                prop::option::of(command()),
                any::<bool>(),
            )
                .prop_map(|(name, commands, exit_line, allow_failure)| Stage {
                    name: name.replace(['{', '}'], "_"),
                    commands,
                    exit_line,
                    allow_failure,
                });
            (
                prop::sample::select(vec![
                    DEFAULT_NAME_FORMAT,
                    "{project}-{build_index}",
                    "b{build_hash}",
                    "{build_hash}{{x}}",
                ]),
                docker,
                (
                    prop::collection::vec(command(), 0..3),
                    any::<bool>(),
                    prop::collection::vec(command(), 0..3),
                ),
                prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,6}", command(), 0..4),
                prop::collection::vec(stage, 1..5),
                (any::<bool>(), any::<bool>(), hash()),
                (any::<bool>(), any::<bool>()),
                prop::option::of(1u64..=7 * 24 * 3600),
                // Longer than any generated environment name, so never the same.
                prop::collection::btree_set("SECRET_[A-Z0-9_]{1,6}", 0..4),
            )
                .prop_map(
                    |(
                        format,
                        docker,
                        (m, g, b),
                        env,
                        stages,
                        (remove, archive, hash),
                        (dummy, fail_fast),
                        timeout,
                        secrets,
                    )| Pipeline {
                        build_name_format: format.to_string(),
                        docker,
                        prepare: PrepareBuild {
                            master_dir_commands: m,
                            get_git_hash: g,
                            build_dir_commands: b,
                        },
                        environment: env.into_iter().collect(),
                        stages,
                        cleanup: Cleanup {
                            remove_build_source: remove,
                            archive,
                            hash,
                        },
                        dummy_build: dummy,
                        fail_fast,
                        timeout_secs: timeout,
                        secrets: secrets.into_iter().collect(),
                        caches: Vec::new(),
                        parameters: Vec::new(),
                        test_reports: Vec::new(),
                        warnings: Vec::new(),
                    },
                )
        }

        /// Writes a pipeline as pipeline.json.
        fn write(p: &Pipeline) -> String {
            let mut v = json!({
                "build-name-format": p.build_name_format,
                "docker": {"image": p.docker.image, "args": p.docker.args,
                           "project-dest": p.docker.project_dest,
                           "build-output-dest": p.docker.build_output_dest,
                           "stop-timeout": p.docker.stop_timeout_secs},
                "prepare-build": {"master-dir-commands": p.prepare.master_dir_commands,
                                  "get-git-hash": p.prepare.get_git_hash,
                                  "build-dir-commands": p.prepare.build_dir_commands},
                "environment": p.environment.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "pipeline": p.stages.iter().map(|s| json!({
                    "name": s.name, "commands": s.commands,
                    "exit-line": s.exit_line.as_ref().map_or(json!(false), |x| json!(x)),
                    "allow-failure": s.allow_failure,
                })).collect::<Vec<_>>(),
                "cleanup": {"remove_build_source": p.cleanup.remove_build_source,
                            "7z_build": p.cleanup.archive,
                            "7z_hash": p.cleanup.hash.map(HashKind::name)},
                "dummy-build": p.dummy_build,
                "fail-fast": p.fail_fast,
                "secrets": p.secrets,
            });
            if let Some(t) = p.timeout_secs {
                v["timeout"] = json!(t);
            }
            serde_json::to_string_pretty(&v).unwrap()
        }

        proptest! {
            #![proptest_config(crate::work::cases(256))]

            /// No text makes the parser panic, and every error has the documented shape.
            #[test]
            fn any_text_is_total(t in any_text()) {
                if let Err(e) = parse(&t) {
                    check_error(&e)?;
                }
            }

            /// A valid file with fields replaced by anything: an error of the right shape, or
            /// a pipeline within the caps whose variables are all known; in linear work.
            #[test]
            fn mutated_files_are_total_and_linear(t in mutated()) {
                let (r, work) = crate::work::count(|| parse(&t));
                match r {
                    Ok(p) => check_pipeline(&p)?,
                    Err(e) => check_error(&e)?,
                }
                // The default build-name-format is checked when the file has none.
                prop_assert!(work <= 4 * t.len() as u64 + 256, "{} units for {} bytes", work, t.len());
            }

            /// A pipeline written as pipeline.json reads back as the same pipeline.
            #[test]
            fn written_pipelines_read_back(p in pipeline()) {
                let text = write(&p);
                prop_assert_eq!(parse(&text), Ok(p));
            }
        }
    }
}
