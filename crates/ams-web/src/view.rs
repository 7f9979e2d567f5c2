//! The pages' frame: askama templates (in `templates/`, escaping by construction), the top bar's
//! data, the one time format, and the response headers every page carries.

use crate::pages::{Viewer, CSP};
use askama::Template;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// What the frame of every page needs: the web root, the signed-in user (none on the login
/// page), the page title, the top bar's current section and the favicon's status.
pub struct Chrome {
    pub root: String,
    pub title: String,
    pub section: &'static str,
    pub icon: &'static str,
    pub user: Option<ChromeUser>,
}

pub struct ChromeUser {
    pub name: String,
    /// The levels, for the tooltip.
    pub level: String,
    pub csrf: String,
    pub manages_users: bool,
}

impl Chrome {
    pub fn new(root: &str, title: impl Into<String>, v: Option<&Viewer>) -> Chrome {
        Chrome {
            root: root.to_string(),
            title: title.into(),
            section: "",
            icon: "app",
            user: v.map(|v| ChromeUser {
                name: v.user.name.clone(),
                level: v.grant.describe(),
                csrf: v.csrf.clone(),
                manages_users: v.grant.manages_users(),
            }),
        }
    }

    pub fn section(mut self, s: &'static str) -> Chrome {
        self.section = s;
        self
    }

    /// The favicon shows a build's status.
    pub fn icon_for(mut self, status: &str) -> Chrome {
        self.icon = favicon_name(status);
        self
    }
}

/// The favicons there are: one per status family, and the app's own.
pub fn favicon_name(status: &str) -> &'static str {
    match status {
        "pass" | "dummy" => "pass",
        "fail" => "fail",
        "error" => "error",
        "warn" => "warn",
        "running" | "pending" => "running",
        "cancel" | "skip" => "cancel",
        _ => "app",
    }
}

/// The favicon SVG of a status family (`/{root}/static/favicon/{name}.svg`).
pub fn favicon_svg(name: &str) -> Option<String> {
    let (colour, mark) = match name {
        "pass" => ("#1e7b34", "M9 16.5l4.5 4.5L23 11"),
        "fail" => ("#b3261e", "M10.5 10.5l11 11M21.5 10.5l-11 11"),
        "error" => ("#7b3fa0", "M16 9v9M16 22.5v.5"),
        "warn" => ("#b07800", "M16 9v9M16 22.5v.5"),
        "running" => ("#1a5fb4", "M12 16h8"),
        "cancel" => ("#535b66", "M10 22l12-12"),
        "app" => ("#1a5fb4", "M10 22l6-12 6 12M12.5 18h7"),
        _ => return None,
    };
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\"><circle cx=\"16\" \
         cy=\"16\" r=\"15\" fill=\"{colour}\"/><path d=\"{mark}\" stroke=\"#fff\" \
         stroke-width=\"3.2\" stroke-linecap=\"round\" stroke-linejoin=\"round\" \
         fill=\"none\"/></svg>"
    ))
}

/// A moment, in the one format pages use: ISO 8601 for machines (the browser shows it in the
/// viewer's time zone, with this UTC text on hover) and `YYYY-MM-DD HH:MM:SS UTC` as text.
#[derive(Clone)]
pub struct Ts {
    pub iso: String,
    pub text: String,
}

impl Ts {
    pub fn at(unix: f64) -> Ts {
        let iso = ams_host::timefmt::iso(unix);
        let text = format!("{} UTC", iso.trim_end_matches('Z').replace('T', " "));
        Ts { iso, text }
    }
}

/// Writes `s` escaped for HTML text and attribute values: `& < > " '` become entities.
pub fn escape_into<W: std::fmt::Write>(mut dest: W, s: &str) -> std::fmt::Result {
    // By bytes: the five are ASCII, and no byte of a multi-byte character equals one of them,
    // so every cut falls between characters.
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        dest.write_str(&s[last..i])?;
        dest.write_str(rep)?;
        last = i + 1;
    }
    dest.write_str(&s[last..])
}

/// The templates' HTML escaper (askama.toml), so pages escape as [`crate::session::esc`] does.
#[derive(Debug, Clone, Copy)]
pub struct Html;

impl askama::filters::Escaper for Html {
    fn write_escaped_str<W: std::fmt::Write>(&self, dest: W, string: &str) -> std::fmt::Result {
        escape_into(dest, string)
    }
}

/// The length each kind of page had when last rendered, by its template's type, so the next
/// one is written into one allocation: askama's own estimate is the template's text, a few
/// KB, and a 66 KB dashboard grew its buffer five times, copying it each time.
static PAGE_LENGTHS: Mutex<BTreeMap<&'static str, usize>> = Mutex::new(BTreeMap::new());

/// At most this much is reserved from an earlier page's length.
const MAX_RESERVE: usize = 512 << 10;

/// Renders a template into a buffer sized from the last page of its kind.
pub fn render_sized<T: Template>(t: &T) -> askama::Result<String> {
    let kind = std::any::type_name::<T>();
    let lengths = || PAGE_LENGTHS.lock().unwrap_or_else(|p| p.into_inner());
    let want = lengths().get(kind).copied().unwrap_or(0).min(MAX_RESERVE);
    let mut buf = String::with_capacity(want.max(T::SIZE_HINT));
    t.render_into(&mut buf)?;
    // A little over the length, so a page that grows by a few rows fits too.
    lengths().insert(kind, buf.len() + buf.len() / 8);
    Ok(buf)
}

/// Renders a template as a page with the security headers.
pub fn render<T: Template>(status: StatusCode, t: &T) -> Response {
    match render_sized(t) {
        Ok(body) => (
            status,
            [
                ("content-type", "text/html; charset=utf-8"),
                ("content-security-policy", CSP),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "same-origin"),
                ("cache-control", "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("a page failed to render: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Renders a template as a fragment for the live views.
pub fn render_fragment<T: Template>(t: &T) -> Response {
    match render_sized(t) {
        Ok(body) => crate::pages::fragment(body),
        Err(e) => {
            tracing::error!("a fragment failed to render: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A one-message page: not found, refused.
#[derive(Template)]
#[template(path = "message.html")]
pub struct MessageT<'a> {
    pub chrome: Chrome,
    pub heading: &'a str,
    pub message: &'a str,
    pub class: &'a str,
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct LoginT<'a> {
    pub chrome: Chrome,
    pub redirect: &'a str,
    pub message: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_cuts_between_characters() {
        let mut out = String::new();
        escape_into(&mut out, "é<ü>&'\"日本").unwrap();
        assert_eq!(out, "é&lt;ü&gt;&amp;&#39;&quot;日本");
        let mut out = String::new();
        escape_into(&mut out, "plain").unwrap();
        assert_eq!(out, "plain");
    }

    #[derive(askama::Template)]
    #[template(source = "<p>{{ body }}</p>", ext = "html")]
    struct LongT {
        body: String,
    }

    #[test]
    fn a_page_is_rendered_into_a_buffer_sized_by_the_last_one() {
        let t = LongT {
            body: "a&b ".repeat(25_000),
        };
        let first = render_sized(&t).unwrap();
        assert_eq!(first, t.render().unwrap(), "the same page as askama's own");
        let second = render_sized(&t).unwrap();
        assert_eq!(second, first);
        assert_eq!(
            second.capacity(),
            first.len() + first.len() / 8,
            "the second page was written into the room the first one's length asked for"
        );
    }

    #[test]
    fn templates_escape_with_the_one_escaper() {
        let t = MessageT {
            chrome: Chrome::new("ams-build", "t<i>'\"&", None),
            heading: "<script>alert(1)</script>",
            message: "a & b",
            class: "x\" onclick=\"y",
        };
        let html = t.render().unwrap();
        assert!(
            html.contains("<h1>&lt;script&gt;alert(1)&lt;/script&gt;</h1>"),
            "{html}"
        );
        assert!(html.contains("<title>t&lt;i&gt;&#39;&quot;&amp; · AMS-Build</title>"));
        assert!(html.contains("class=\"x&quot; onclick=&quot;y\""));
        assert!(!html.contains("<script>alert"));
        assert_eq!(crate::session::esc("<'&\">"), "&lt;&#39;&amp;&quot;&gt;");
    }
}
