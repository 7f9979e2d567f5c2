//! `{variable}` templates used in pipeline.json and webhooks.json strings.
//!
//! A reference is `{name}` where name is lower-case letters, digits and `_`. Anything else in
//! braces is left alone, so shell text such as `${HOME}`, `{a,b}` or `awk '{print $1}'` passes
//! through. `{{` and `}}` stand for literal braces. A reference to an unknown name is an error,
//! never an empty string.

use std::collections::BTreeMap;

/// Variables of pipeline.json strings.
pub const PIPELINE_VARS: &[&str] = &[
    "project",
    "build_name",
    "build_hash",
    "build_index",
    "git_hash",
    "actor",
    "created",
    "project_dir",
    "build_dir",
    "master_source_dir",
    "build_source_dir",
    "master_build_name",
];

/// Variables known when a build is named, before its source is fetched.
pub const NAME_VARS: &[&str] = &["project", "build_hash", "build_index", "created"];

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Brace(char),
    Var(&'a str),
}

fn is_var_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.as_bytes()[0].is_ascii_lowercase()
}

/// Splits a template into literal text and variable references.
pub fn parse(template: &str) -> Vec<Piece<'_>> {
    let bytes = template.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' if bytes.get(i + 1) == Some(&b'{') => {
                if start < i {
                    out.push(Piece::Text(&template[start..i]));
                }
                out.push(Piece::Brace('{'));
                i += 2;
                start = i;
            }
            b'}' if bytes.get(i + 1) == Some(&b'}') => {
                if start < i {
                    out.push(Piece::Text(&template[start..i]));
                }
                out.push(Piece::Brace('}'));
                i += 2;
                start = i;
            }
            b'{' if i == 0 || bytes[i - 1] != b'$' => {
                // A name is at most 64 name characters: look no further than that for the
                // closing brace, so parsing stays linear whatever the text holds.
                let rest = &bytes[i + 1..];
                let len = rest
                    .iter()
                    .take(65)
                    .position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_'));
                if let Some(len) = len.filter(|&l| rest[l] == b'}') {
                    let name = &template[i + 1..i + 1 + len];
                    if is_var_name(name) {
                        if start < i {
                            out.push(Piece::Text(&template[start..i]));
                        }
                        out.push(Piece::Var(name));
                        i += len + 2;
                        start = i;
                        continue;
                    }
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        out.push(Piece::Text(&template[start..]));
    }
    out
}

/// Returns the first reference in `template` whose name is not in `known`.
pub fn first_unknown<'a>(template: &'a str, known: &[&str]) -> Option<&'a str> {
    parse(template).into_iter().find_map(|p| match p {
        Piece::Var(name) if !known.contains(&name) => Some(name),
        _ => None,
    })
}

/// Expands a template. Fails with the name of the first variable that has no value.
pub fn expand(template: &str, values: &BTreeMap<&str, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template) {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Brace(c) => out.push(c),
            Piece::Var(name) => match values.get(name) {
                Some(v) => out.push_str(v),
                None => return Err(name.to_string()),
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals() -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        m.insert("project", "demo".to_string());
        m.insert("build_index", "7".to_string());
        m
    }

    #[test]
    fn expands_known_variables() {
        assert_eq!(
            expand("{project}_build_{build_index}", &vals()).unwrap(),
            "demo_build_7"
        );
    }

    #[test]
    fn leaves_shell_text_alone() {
        let t = "echo ${HOME} {a,b} $(awk '{print $1}') {1..3} {Upper}";
        assert_eq!(expand(t, &vals()).unwrap(), t);
    }

    #[test]
    fn unclosed_braces_are_text_and_parse_in_one_pass() {
        // Each `{` looks at most 65 bytes ahead (this took seconds when it searched to the end).
        let t = "{a".repeat(200_000);
        assert_eq!(parse(&t), vec![Piece::Text(&t)]);
        let long = format!("{{{}}}", "a".repeat(65));
        assert_eq!(parse(&long), vec![Piece::Text(&long)]);
        assert_eq!(parse("{a}{b"), vec![Piece::Var("a"), Piece::Text("{b")]);
    }

    #[test]
    fn doubled_braces_are_literal() {
        assert_eq!(expand("{{project}}", &vals()).unwrap(), "{project}");
    }

    #[test]
    fn unknown_variable_is_an_error() {
        assert_eq!(expand("x {nope} y", &vals()).unwrap_err(), "nope");
        assert_eq!(first_unknown("a {git_hsh}", PIPELINE_VARS), Some("git_hsh"));
        assert_eq!(first_unknown("a {git_hash}", PIPELINE_VARS), None);
    }

    #[test]
    fn value_text_is_not_reexpanded() {
        let mut m = vals();
        m.insert("project", "{build_index}".to_string());
        assert_eq!(expand("{project}", &m).unwrap(), "{build_index}");
    }
}
