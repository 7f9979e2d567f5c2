//! Status badges: `GET /{web_root}/badge/{project}.svg` (optionally `?branch=…`), an SVG with
//! the project's name (and the branch) and the status of its newest build that has ended,
//! in that status's colour, for READMEs and dashboards. No login: a badge is shown only for
//! projects whose private pipeline-config.json says `"public-badge": true`. Any other name,
//! an existing project or not, gets the same 404, so a badge never tells which projects exist.
//! Builds are read through the store like everywhere else; every text in the picture is
//! escaped.

use crate::api::ApiState;
use ams_core::status::BuildStatus;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;

/// Names longer than this (in characters) are cut with an ellipsis, so a badge stays small.
pub const MAX_LABEL: usize = 48;

/// The status word shown when the project (or branch) has no build that ended.
pub const NO_BUILDS: &str = "no builds";

pub fn router(state: ApiState, web_root: &str) -> Router {
    Router::new()
        .route(&format!("/{web_root}/badge/{{file}}"), get(badge))
        .with_state(state)
}

/// Headers of every answer, the 404 included: caches revalidate (a badge changes with each
/// build), and the picture is never sniffed as anything else nor runs anything.
const HEADERS: [(header::HeaderName, &str); 3] = [
    (header::CACHE_CONTROL, "no-cache"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CONTENT_SECURITY_POLICY, "default-src 'none'"),
];

/// The one answer for a badge that is not shown, whatever the reason.
fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        HEADERS,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found\n",
    )
        .into_response()
}

/// The default branch (`branch` of the private config) of `project` when it exists and its
/// private config makes its badge public; `None` otherwise. A config that
/// cannot be read or parsed keeps the badge private.
async fn public(st: &ApiState, project: &str) -> Option<Option<String>> {
    if !ams_host::project::exists(&st.host.data, project) {
        return None;
    }
    let pd = st.host.data.project(project);
    tokio::task::spawn_blocking(move || {
        ams_host::project::private_config(&pd)
            .ok()
            .filter(|c| c.public_badge)
            .map(|c| c.branch)
    })
    .await
    .ok()
    .flatten()
}

async fn badge(
    State(st): State<ApiState>,
    file: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Ok(Path(file)) = file else {
        return not_found();
    };
    let Some(project) = file.strip_suffix(".svg") else {
        return not_found();
    };
    let Some(default_branch) = public(&st, project).await else {
        return not_found();
    };
    let branch = q.get("branch").map(String::as_str);
    // Builds that named no branch built the default one: they count for it.
    let is_default = branch.is_some() && branch == default_branch.as_deref();
    // A name git would refuse names no build: nothing to look up.
    let status = match branch {
        Some(b) if !ams_host::git::valid_branch(b) => None,
        _ => match st
            .host
            .store
            .latest_final_build(project, branch, is_default)
            .await
        {
            Ok(b) => b.map(|b| b.status),
            Err(e) => {
                tracing::error!("badge of {project}: {e}");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    HEADERS,
                    "the build records cannot be read now\n",
                )
                    .into_response();
            }
        },
    };
    let label = match branch {
        Some(b) => format!("{project} · {b}"),
        None => project.to_string(),
    };
    (
        HEADERS,
        [(header::CONTENT_TYPE, "image/svg+xml; charset=utf-8")],
        svg(&label, status),
    )
        .into_response()
}

/// The word and colour of a status (`None`: no build has ended). ERROR (a failure outside
/// the project: engine, git remote, disk) has its own colour, so it is not read as FAIL.
pub fn look(status: Option<BuildStatus>) -> (&'static str, &'static str) {
    match status {
        Some(BuildStatus::Pass) => ("PASS", "#3c9a1f"),
        Some(BuildStatus::Fail) => ("FAIL", "#d9442e"),
        Some(BuildStatus::Error) => ("ERROR", "#b5179e"),
        Some(BuildStatus::Warn) => ("WARN", "#d19a0b"),
        Some(BuildStatus::Cancel) => ("CANCEL", "#8a8a8a"),
        Some(BuildStatus::Skip) => ("SKIP", "#8a8a8a"),
        Some(BuildStatus::Dummy) => ("DUMMY", "#2f74b5"),
        // A badge only shows ended builds; these two never reach it.
        Some(BuildStatus::Pending) => ("PENDING", "#8a8a8a"),
        Some(BuildStatus::Running) => ("RUNNING", "#8a8a8a"),
        None => (NO_BUILDS, "#8a8a8a"),
    }
}

/// Text for XML: at most [`MAX_LABEL`] characters, those XML cannot hold replaced, then
/// escaped as for HTML (the one escaping rule of the web crate).
fn xml_text(s: &str) -> String {
    let mut clean: String = s
        .chars()
        .take(MAX_LABEL)
        .map(|c| {
            if c.is_control() || matches!(c, '\u{FFFE}' | '\u{FFFF}') {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect();
    if s.chars().nth(MAX_LABEL).is_some() {
        clean.push('…');
    }
    crate::session::esc(&clean)
}

/// An estimate of the width of `s` at 11 px in a sans-serif font, with padding.
fn width(s: &str) -> usize {
    s.chars().count().min(MAX_LABEL + 1) * 7 + 12
}

/// The badge: the label on grey, the status word on its colour.
pub fn svg(label: &str, status: Option<BuildStatus>) -> String {
    let (word, colour) = look(status);
    let (lw, rw) = (width(label), width(word));
    let total = lw + rw;
    let (label, word) = (xml_text(label), xml_text(word));
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{label}: {word}"><title>{label}: {word}</title><clipPath id="c"><rect width="{total}" height="20" rx="3"/></clipPath><g clip-path="url(#c)"><rect width="{lw}" height="20" fill="#555"/><rect x="{lw}" width="{rw}" height="20" fill="{colour}"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{rx}" y="14">{word}</text></g></svg>
"##,
        lx = lw / 2,
        rx = lw + rw / 2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_cut() {
        let s = svg("p'x · <b>&\"", Some(BuildStatus::Pass));
        assert!(s.contains("p&#39;x · &lt;b&gt;&amp;&quot;"), "{s}");
        assert!(!s.contains("<b>"), "{s}");
        assert!(s.contains(">PASS<") && s.contains("#3c9a1f"), "{s}");
        let long = "a".repeat(500);
        let s = svg(&long, None);
        assert!(s.contains(&format!("{}…", "a".repeat(MAX_LABEL))), "{s}");
        assert!(!s.contains(&"a".repeat(MAX_LABEL + 1)));
        assert!(s.contains(NO_BUILDS));
        assert_eq!(xml_text("a\u{FFFE}b"), "a\u{FFFD}b");
    }
}
