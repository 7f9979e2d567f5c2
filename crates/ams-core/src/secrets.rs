//! The rules of per-project secrets: what a secret's name and value may be, which branches'
//! builds receive them (`secret-branches` of pipeline-config.json), and the associated data
//! that binds a sealed value to its project and name. The host seals, stores and hands them
//! out (`ams_host::secrets`); masking is in [`crate::mask`].

/// Longest secret name, in bytes.
pub const MAX_NAME: usize = 64;
/// Shortest secret value, in characters: a shorter value would be masked wherever those few
/// characters happen to appear in a log, and could be guessed from what stays visible.
pub const MIN_VALUE_CHARS: usize = 8;
/// Longest secret value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most secrets a project may hold.
pub const MAX_PER_PROJECT: usize = 100;
/// Most secrets one pipeline.json may ask for.
pub const MAX_PER_PIPELINE: usize = 64;
/// Most bytes of secret values one project may hold (all its values together): each value is
/// masked in several encodings, and the size of a build's masker follows (about 16 MiB for
/// 64 KiB of printable value, far less for the usual tokens).
pub const MAX_PROJECT_BYTES: usize = 128 * 1024;
/// Most `secret-branches` patterns.
pub const MAX_BRANCH_PATTERNS: usize = 64;

/// Checks a secret's name: an environment variable name, `[A-Z_][A-Z0-9_]*`, at most
/// [`MAX_NAME`] bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut b = name.bytes();
    let ok = matches!(b.next(), Some(c) if c.is_ascii_uppercase() || c == b'_')
        && b.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_');
    if !ok {
        return Err(format!(
            "`{}` is not a secret name: use capital letters, digits and `_`, not starting with a \
             digit (an environment variable name such as DEPLOY_TOKEN)",
            crate::error::clip(name, 64)
        ));
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "the secret name is {} bytes long; at most {MAX_NAME} are allowed",
            name.len()
        ));
    }
    Ok(())
}

/// Checks a secret's value: at least [`MIN_VALUE_CHARS`] characters, at most
/// [`MAX_VALUE_BYTES`] bytes, no NUL (an environment variable cannot hold one).
pub fn validate_value(value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars < MIN_VALUE_CHARS {
        return Err(format!(
            "the value is {chars} characters long; a secret needs at least {MIN_VALUE_CHARS}: \
             a shorter one is too short to mask safely in build logs (it would be hidden wherever \
             those characters appear, and guessed from what stays visible)"
        ));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "the value is {} bytes long; at most {MAX_VALUE_BYTES} (64 KiB) are allowed",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(
            "the value contains a NUL byte, which an environment variable cannot hold".into(),
        );
    }
    Ok(())
}

/// Whether a branch name matches a `secret-branches` pattern: `*` stands for any run of
/// characters, `/` included; everything else matches itself. Linear in practice: at most one
/// star is backtracked to (the last one seen).
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// Whether builds of `branch` receive secrets under these `secret-branches` patterns. A build
/// that is not of a known branch (`None`: a commit asked for by itself, or the remote's
/// default branch when the project names none) receives them only when the list holds `"*"`.
pub fn branch_allowed(patterns: &[String], branch: Option<&str>) -> bool {
    match branch {
        Some(b) => patterns.iter().any(|p| glob_matches(p, b)),
        None => patterns.iter().any(|p| p == "*"),
    }
}

/// Checks a `secret-branches` pattern.
pub fn validate_branch_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 256 || p.chars().any(|c| c.is_control() || c == ' ') {
        return Err(
            "is not a branch pattern; write a branch name, with `*` for any characters, e.g. \
             \"main\" or \"release/*\""
                .into(),
        );
    }
    Ok(())
}

/// The associated data a sealed value is bound to: moving a sealed value to another project
/// or name makes it fail to open.
pub fn associated_data(project: &str, name: &str) -> Vec<u8> {
    let mut ad = b"ams-build secret v1\0".to_vec();
    ad.extend_from_slice(project.as_bytes());
    ad.push(0);
    ad.extend_from_slice(name.as_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_environment_variable_names() {
        for ok in ["TOKEN", "_X", "DEPLOY_KEY_2", &"A".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "token", "2X", "A-B", "A B", "Ä", &"A".repeat(65), "A=B"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_long_enough_to_mask_and_bounded() {
        let e = validate_value("1234567").unwrap_err();
        assert!(e.contains("too short to mask"), "{e}");
        assert!(validate_value("12345678").is_ok());
        // Characters, not bytes: eight of them are enough whatever their size.
        assert!(validate_value("ééééééé").is_err());
        assert!(validate_value("éééééééé").is_ok());
        assert!(validate_value(&"x".repeat(MAX_VALUE_BYTES)).is_ok());
        assert!(validate_value(&"x".repeat(MAX_VALUE_BYTES + 1)).is_err());
        assert!(validate_value("abcd\0efgh").is_err());
    }

    #[test]
    fn branch_patterns() {
        let pats = vec!["main".to_string(), "release/*".to_string()];
        assert!(branch_allowed(&pats, Some("main")));
        assert!(branch_allowed(&pats, Some("release/1.0")));
        assert!(branch_allowed(&pats, Some("release/1.0/hotfix")));
        assert!(!branch_allowed(&pats, Some("mainline")));
        assert!(!branch_allowed(&pats, Some("feature/main")));
        assert!(!branch_allowed(&pats, Some("release")));
        assert!(!branch_allowed(&pats, None));
        assert!(branch_allowed(&["*".to_string()], None));
        assert!(!branch_allowed(&[], Some("main")));
        assert!(glob_matches("*-stable", "2-stable"));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
        assert!(glob_matches("**", ""));
        // The worst case stays fast: many stars against a long name.
        let long = "a".repeat(255);
        assert!(!glob_matches(&format!("{}b", "*a".repeat(100)), &long));
    }

    #[test]
    fn associated_data_separates_project_and_name() {
        assert_ne!(associated_data("ab", "C"), associated_data("a", "BC"));
    }
}
