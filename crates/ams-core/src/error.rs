//! The one error type for configuration files: it names the file, the field path and the fix.

use std::borrow::Cow;
use std::fmt;

/// At most `max` characters of untrusted text, to show in a message; a cut is marked with `…`.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((i, _)) => Cow::Owned(format!("{}…", &s[..i])),
    }
}

/// A problem in a configuration file, worded for the person who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File name as the user knows it, e.g. `pipeline.json`.
    pub file: String,
    /// Field path such as `pipeline[0].commands`, or empty for the whole file.
    pub field: String,
    /// 1-based line and column, for syntax errors.
    pub position: Option<(usize, usize)>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    pub fn field(file: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            field: field.into(),
            position: None,
            message: message.into(),
        }
    }

    /// Wraps a serde_json error, keeping its line and column.
    pub fn json(file: &str, err: &serde_json::Error) -> Self {
        let text = err.to_string();
        // serde_json appends " at line L column C"; keep the message without it.
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        let position = if err.line() > 0 {
            Some((err.line(), err.column()))
        } else {
            None
        };
        ConfigError {
            file: file.to_string(),
            field: String::new(),
            position,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ": line {line} column {col}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
