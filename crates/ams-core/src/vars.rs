//! `{variable}` templates used in pipeline.json and webhooks.json strings.
//!
//! A reference is `{name}` where name is lower-case letters, digits and `_`, with at least one
//! letter (`{7z_hash}` is a name, `{0}` is text). Anything else in braces is left alone, so shell text such as `${HOME}`, `{a,b}` or `awk '{print $1}'` passes
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
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

/// Splits a template into literal text and variable references.
pub fn parse(template: &str) -> Vec<Piece<'_>> {
    let bytes = template.as_bytes();
    crate::work::add(bytes.len());
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
                crate::work::add(len.map_or(rest.len().min(65), |l| l + 1));
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
    fn names_may_start_with_a_digit_but_need_a_letter() {
        let mut m = vals();
        m.insert("7z_hash", "abc".to_string());
        assert_eq!(expand("h={7z_hash}", &m).unwrap(), "h=abc");
        let t = "python -c 'print(\"{0} {1}\".format(1, 2))' {_}";
        assert_eq!(expand(t, &m).unwrap(), t);
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

    #[test]
    fn adversarial_templates_take_linear_work() {
        // About 1 MiB each, the size of the largest pipeline.json: a scan to the end of the text
        // from every brace would count hundreds of billions of units here, not two million.
        let long_name = format!("{{{}", "a".repeat(64));
        for unit in [
            "{a",
            "{",
            "{{",
            "}}",
            "${a}",
            "{a}",
            "a}{",
            long_name.as_str(),
            "{a_1}}",
        ] {
            let t = unit.repeat((1 << 20) / unit.len());
            let (pieces, work) = crate::work::count(|| parse(&t));
            assert!(
                work <= 2 * t.len() as u64 + 1,
                "{unit}: {work} units for {} bytes",
                t.len()
            );
            assert_eq!(render(&pieces), t, "{unit}");
        }
    }

    /// Writes pieces back as template text.
    fn render(pieces: &[Piece<'_>]) -> String {
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Brace(c) => {
                    out.push(*c);
                    out.push(*c);
                }
                Piece::Var(n) => {
                    out.push('{');
                    out.push_str(n);
                    out.push('}');
                }
            }
        }
        out
    }

    /// The rules of the module's documentation, read one character at a time and searching to
    /// the end of the text for each closing brace: slow, obviously right.
    fn model(t: &str) -> Vec<Piece<'_>> {
        fn flush<'a>(t: &'a str, from: usize, to: usize, out: &mut Vec<Piece<'a>>) {
            if from < to {
                out.push(Piece::Text(&t[from..to]));
            }
        }
        let mut out = Vec::new();
        let (mut text_start, mut i) = (0, 0);
        while i < t.len() {
            let rest = &t[i..];
            if rest.starts_with("{{") || rest.starts_with("}}") {
                flush(t, text_start, i, &mut out);
                out.push(Piece::Brace(if rest.starts_with('{') { '{' } else { '}' }));
                i += 2;
                text_start = i;
                continue;
            }
            if rest.starts_with('{') && !t[..i].ends_with('$') {
                if let Some(close) = rest[1..].find('}') {
                    let name = &rest[1..1 + close];
                    let is_name = (1..=64).contains(&name.chars().count())
                        && name.chars().any(|c| c.is_ascii_lowercase())
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if is_name {
                        flush(t, text_start, i, &mut out);
                        out.push(Piece::Var(name));
                        i += close + 2;
                        text_start = i;
                        continue;
                    }
                }
            }
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
        flush(t, text_start, t.len(), &mut out);
        out
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Text rich in what the parser looks at: braces, `$`, names of every length around
        /// the 64-character limit, known and unknown references, and any other character.
        fn template() -> impl Strategy<Value = String> {
            let atom = prop_oneof![
                4 => prop::sample::select(vec!["{", "}", "{{", "}}", "$", "${", " ", "A", "é", "\n"])
                    .prop_map(str::to_string),
                3 => "[a-z_0-9]{0,4}",
                1 => "[a-z][a-z0-9_]{61,66}",
                2 => prop::sample::select(PIPELINE_VARS.to_vec()).prop_map(|n| format!("{{{n}}}")),
                1 => Just("{nope}".to_string()),
                1 => any::<char>().prop_map(String::from),
            ];
            prop::collection::vec(atom, 0..48).prop_map(|v| v.concat())
        }

        fn any_template() -> impl Strategy<Value = String> {
            prop_oneof![template(), any::<String>()]
        }

        proptest! {
            #![proptest_config(crate::work::cases(256))]

            /// The 65-byte look-ahead finds exactly the references the documented rules find.
            #[test]
            fn parse_matches_the_model(t in template()) {
                prop_assert_eq!(parse(&t), model(&t));
            }

            /// Pieces are the template cut up: written back, they give the same text.
            #[test]
            fn pieces_concatenate_back(t in any_template()) {
                prop_assert_eq!(render(&parse(&t)), t);
            }

            /// Every byte is looked at by the main loop once and by one look-ahead at most once.
            #[test]
            fn parse_examines_each_byte_at_most_twice(t in any_template()) {
                let (_, work) = crate::work::count(|| parse(&t));
                prop_assert!(work <= 2 * t.len() as u64 + 1, "{} units for {} bytes", work, t.len());
            }

            /// With a value for every name, expansion substitutes each reference once, turns
            /// `{{`/`}}` into braces and never expands a value again.
            #[test]
            fn expand_substitutes_references_once(t in template(), v in ".{0,6}") {
                let pieces = model(&t);
                let mut values = BTreeMap::new();
                for p in &pieces {
                    if let Piece::Var(n) = p {
                        values.insert(*n, format!("{{{n}}}{v}"));
                    }
                }
                let mut want = String::new();
                for p in &pieces {
                    match p {
                        Piece::Text(x) => want.push_str(x),
                        Piece::Brace(c) => want.push(*c),
                        Piece::Var(n) => want.push_str(&values[n]),
                    }
                }
                prop_assert_eq!(expand(&t, &values), Ok(want));
            }

            /// `first_unknown` names exactly the variable `expand` fails on.
            #[test]
            fn first_unknown_agrees_with_expand(t in any_template(), known in prop::sample::subsequence(PIPELINE_VARS.to_vec(), 0..PIPELINE_VARS.len())) {
                let values: BTreeMap<&str, String> =
                    known.iter().map(|k| (*k, k.to_uppercase())).collect();
                match expand(&t, &values) {
                    Ok(_) => prop_assert_eq!(first_unknown(&t, &known), None),
                    Err(name) => prop_assert_eq!(first_unknown(&t, &known), Some(name.as_str())),
                }
            }
        }
    }
}
