//! Server-rendered pages: the dashboard (message panel, active and queued tasks, projects and
//! builds) with panels pushed live over server-sent events, the build page with its stages and
//! a live log, and the forms that trigger, cancel and delete. Everything user-controlled is
//! escaped on the server; the page script sets text only with `textContent`; no inline script.

use crate::api::ApiState;
use crate::manage::note;
use crate::session::{self, esc, secrets_equal};
use ams_core::access::{Action, Grant};
use ams_host::host::BuildRequest;
use ams_host::timefmt;
use ams_store::{BuildRecord, User};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

/// How much of a log the build page shows at first; the rest is a download.
pub const TAIL: u64 = 256 * 1024;

pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn router(state: ApiState, root: &str) -> Router {
    Router::new()
        .route(&format!("/{root}/"), get(dashboard))
        .route(&format!("/{root}/panels"), get(panels))
        .route(&format!("/{root}/events"), get(events))
        .route(&format!("/{root}/static/app.js"), get(js))
        .route(&format!("/{root}/static/app.css"), get(css))
        .route(
            &format!("/{root}/build/{{project}}/{{name}}"),
            get(build_page),
        )
        .route(
            &format!("/{root}/build/{{project}}/{{name}}/stages"),
            get(stages_fragment),
        )
        .route(
            &format!("/{root}/build/{{project}}/{{name}}/stream"),
            get(stream),
        )
        .route(
            &format!("/{root}/build/{{project}}/{{name}}/log"),
            get(log_chunk),
        )
        .route(
            &format!("/{root}/build/{{project}}/{{name}}/cancel"),
            post(cancel_form),
        )
        .route(
            &format!("/{root}/build/{{project}}/{{name}}/delete-output"),
            post(delete_form),
        )
        .route(
            &format!("/{root}/build/{{project}}/{{name}}/rebuild"),
            post(rebuild_form),
        )
        .route(
            &format!("/{root}/projects/{{project}}/build"),
            post(trigger_form),
        )
        .route(&format!("/{root}/admin/{{project}}"), get(admin_page))
        .route(
            &format!("/{root}/admin/{{project}}/replay/{{id}}"),
            post(replay_form),
        )
        .route(
            &format!("/{root}/admin/{{project}}/secrets"),
            post(secret_set_form),
        )
        .route(
            &format!("/{root}/admin/{{project}}/secrets/{{name}}/remove"),
            post(secret_remove_form),
        )
        .with_state(state)
}

async fn js() -> Response {
    (
        [
            ("content-type", "text/javascript; charset=utf-8"),
            ("cache-control", "no-cache"),
        ],
        include_str!("../static/app.js"),
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            ("content-type", "text/css; charset=utf-8"),
            ("cache-control", "no-cache"),
        ],
        include_str!("../static/app.css"),
    )
        .into_response()
}

pub(crate) fn html(status: StatusCode, title: &str, root: &str, body: &str) -> Response {
    let doc = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{} · AMS-Build</title>\
         <link rel=\"stylesheet\" href=\"/{root}/static/app.css\">\
         <script src=\"/{root}/static/app.js\" defer></script></head><body>{body}</body></html>",
        esc(title)
    );
    (
        status,
        [
            ("content-type", "text/html; charset=utf-8"),
            ("content-security-policy", CSP),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "same-origin"),
            ("cache-control", "no-store"),
        ],
        doc,
    )
        .into_response()
}

pub(crate) fn fragment(body: String) -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("content-security-policy", CSP),
            ("cache-control", "no-store"),
        ],
        body,
    )
        .into_response()
}

/// The logged-in browser user, with the session's CSRF token.
pub struct Viewer {
    pub user: User,
    pub grant: Grant,
    pub csrf: String,
}

pub(crate) async fn viewer(st: &ApiState, headers: &HeaderMap) -> Option<Viewer> {
    let (user, csrf) = session::lookup(st, headers).await?;
    let grant = user.grant.clone();
    grant.can_log_in().then_some(Viewer { user, grant, csrf })
}

pub(crate) fn to_login(root: &str, back: &str) -> Response {
    let target = match session::safe_redirect(back) {
        Some(b) => format!("/{root}/login?page_redirect={b}"),
        None => format!("/{root}/login"),
    };
    (StatusCode::SEE_OTHER, [("location", target)]).into_response()
}

/// ANSI colour codes to spans (classes only); every other escape sequence is dropped.
pub fn ansi_to_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut open = false;
    let mut rest = text;
    while let Some(i) = rest.find('\u{1b}') {
        out.push_str(&esc_links(&rest[..i]));
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(r.len());
            let (params, tail) = r.split_at(end);
            let cmd = tail.chars().next();
            rest = tail.get(1..).unwrap_or("");
            if cmd == Some('m') {
                if open {
                    out.push_str("</span>");
                    open = false;
                }
                let classes: Vec<String> = params
                    .split(';')
                    .filter_map(|p| p.parse::<u32>().ok())
                    .filter_map(|c| match c {
                        1 => Some("b".to_string()),
                        30..=37 => Some(format!("c{}", c - 30)),
                        90..=97 => Some(format!("c{}", c - 90)),
                        _ => None,
                    })
                    .collect();
                if !classes.is_empty() {
                    out.push_str(&format!("<span class=\"{}\">", classes.join(" ")));
                    open = true;
                }
            }
        }
    }
    out.push_str(&esc_links(rest));
    if open {
        out.push_str("</span>");
    }
    out
}

/// Escapes text and makes its http(s) URLs links; no other scheme ever becomes a link.
pub fn esc_links(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = ["http://", "https://"]
            .iter()
            .filter_map(|p| rest.find(p))
            .min();
        let Some(i) = next else {
            out.push_str(&esc(rest));
            return out;
        };
        out.push_str(&esc(&rest[..i]));
        let tail = &rest[i..];
        let mut end = tail
            .find(|c: char| c.is_whitespace() || c.is_control() || "<>\"'`".contains(c))
            .unwrap_or(tail.len());
        // Sentence punctuation after a URL is not part of it (the scheme always stays, so the
        // loop moves forward).
        while end > 0 && ".,;:!?)]".contains(tail[..end].chars().last().unwrap_or(' ')) {
            end -= 1;
        }
        let url = &tail[..end];
        let host_part = url.split("://").nth(1).unwrap_or("");
        if host_part.is_empty() {
            out.push_str(&esc(url));
        } else {
            out.push_str(&format!(
                "<a href=\"{0}\" rel=\"noopener noreferrer nofollow\" target=\"_blank\">{0}</a>",
                esc(url)
            ));
        }
        rest = &tail[end..];
    }
}

/// A commit message's first line, cut to 60 characters; the start of the message (300
/// characters, to keep the dashboard small) is the tooltip.
fn commit_line(m: Option<&str>) -> String {
    let Some(m) = m else {
        return String::new();
    };
    let first = m.lines().next().unwrap_or("");
    let short: String = first.chars().take(60).collect();
    let more = if short.len() < first.len() { "…" } else { "" };
    let tip: String = m.chars().take(300).collect();
    format!("<span title=\"{}\">{}{more}</span>", esc(&tip), esc(&short))
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn status_badge(s: &str) -> String {
    format!(
        "<span class=\"status {0}\">{1}</span>",
        esc(s),
        esc(&s.to_uppercase())
    )
}

/// Builds per page of the dashboard's Builds panel.
pub const DASH_BUILDS: i64 = 20;

/// Which project's builds the dashboard shows, and which page of them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DashQuery {
    pub project: Option<String>,
    pub page: Option<i64>,
    /// Where a link (a notification's, say) leads once signed in: kept through the login.
    pub page_redirect: Option<String>,
}

/// At most this many active or queued tasks are listed on the dashboard.
const DASHBOARD_TASKS: usize = 50;

/// The dashboard's panels, in the described system's layout: messages; active and queued
/// tasks; the projects (each with its latest status and, for those who may, the build form);
/// and the builds of one project, paged. The size stays bounded however many projects and
/// builds there are.
async fn panels_html(st: &ApiState, v: &Viewer, q: &DashQuery) -> String {
    let root = &st.conf.web_root;
    let snap = st.host.snapshot().await.unwrap_or_default();
    let mut s = String::new();
    if st.host.engine.borrow().up == Some(false) {
        s.push_str(
            "<p class=\"engine-down\" role=\"alert\">The Docker engine is not answering: \
             builds that need it wait for it.</p>",
        );
    }
    s.push_str(&crate::manage::messages_html(st, v).await);
    s.push_str("<div class=\"columns\"><div class=\"tasks\">");
    for (title, list) in [
        ("Active tasks", &snap.active),
        ("Queued tasks", &snap.pending),
    ] {
        s.push_str(&format!("<div class=\"panel\"><h2>{title}</h2><table><tr><th>Task</th><th>Project</th><th>Created by</th><th>Created at</th></tr>"));
        let mut shown = 0;
        let mut more = 0;
        for b in list
            .iter()
            .filter(|b| v.grant.may(Action::View, &b.project))
        {
            // The page stays small however long the queue is.
            if shown == DASHBOARD_TASKS {
                more += 1;
                continue;
            }
            shown += 1;
            s.push_str(&format!(
                "<tr><td><a href=\"/{root}/build/{p}/{n}\">{n}</a></td><td>{p}</td><td>{by}</td><td>{at}</td></tr>",
                p = esc(&b.project),
                n = esc(&b.name),
                by = esc(&b.created_by),
                at = esc(&timefmt::legacy(b.created_at))
            ));
        }
        s.push_str("</table>");
        if more > 0 {
            s.push_str(&format!("<p>and {more} more</p>"));
        }
        s.push_str("</div>");
    }
    s.push_str("</div><div class=\"projects\">");
    let projects: Vec<String> = ams_host::project::list(&st.host.data)
        .into_iter()
        .filter(|p| v.grant.may(Action::View, p))
        .collect();
    let latest = st.host.store.latest_builds().await.unwrap_or_default();
    // The chosen project if visible, else the one built most recently, else the first.
    let selected = q
        .project
        .clone()
        .filter(|p| projects.contains(p))
        .or_else(|| {
            projects
                .iter()
                .filter_map(|p| latest.get(p).map(|l| (l.0, p)))
                .max()
                .map(|(_, p)| p.clone())
        })
        .or_else(|| projects.first().cloned());
    s.push_str("<div class=\"panel\"><h2>Projects</h2><table><tr><th>Project</th><th>Latest build</th><th>Disk</th><th></th></tr>");
    for p in &projects {
        let pe = esc(p);
        let last = match latest.get(p) {
            Some((_, name, status)) => format!(
                "<a href=\"/{root}/build/{pe}/{}\">{}</a>",
                esc(name),
                status_badge(status)
            ),
            None => "no builds yet".to_string(),
        };
        let mut actions = String::new();
        if v.grant.may(Action::Operate, p) {
            actions.push_str(&format!(
                "<form class=\"inline\" method=\"post\" action=\"/{root}/projects/{pe}/build\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input name=\"branch\" placeholder=\"branch\" size=\"10\">\
                 <input name=\"commit\" placeholder=\"commit\" size=\"10\">\
                 <input name=\"params\" placeholder=\"NAME=value …\" size=\"14\">\
                 <button type=\"submit\" id=\"trigger-{pe}\">Build</button></form>",
                csrf = esc(&v.csrf)
            ));
        }
        if v.grant.may(Action::SeeDeliveries, p) {
            actions.push_str(&format!(
                " <a href=\"/{root}/admin/{pe}\">Administration</a>"
            ));
        }
        let mark = if selected.as_deref() == Some(p.as_str()) {
            " class=\"selected\""
        } else {
            ""
        };
        let disk = st
            .host
            .metrics
            .disk_of(p)
            .map(human_bytes)
            .unwrap_or_else(|| "…".to_string());
        s.push_str(&format!(
            "<tr{mark}><td><a href=\"/{root}/?project={}\">{pe}</a></td><td>{last}</td>\
             <td class=\"disk\" title=\"the project's folder in the data directory\">{disk}</td><td>{actions}</td></tr>",
            query_value(p)
        ));
    }
    s.push_str("</table></div>");
    if let Some(p) = &selected {
        let pe = esc(p);
        let page = q.page.unwrap_or(1).max(1);
        // One more than shown tells whether an older page exists.
        let mut builds = st
            .host
            .store
            .builds_of(p, DASH_BUILDS + 1, (page - 1) * DASH_BUILDS)
            .await
            .unwrap_or_default();
        let older = builds.len() as i64 > DASH_BUILDS;
        builds.truncate(DASH_BUILDS as usize);
        s.push_str(&format!("<div class=\"panel builds\" id=\"builds\"><h2>Builds of {pe}</h2><table><tr><th>Build</th><th>Status</th><th>Created by</th><th>Created at</th><th>Branch</th><th>Git hash</th><th>Commit</th><th>Log</th><th>7z</th><th>Hash</th></tr>"));
        for b in &builds {
            let n = esc(&b.name);
            s.push_str(&format!(
                "<tr><td><a href=\"/{root}/build/{pe}/{n}\">{n}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td><a href=\"/{root}/output/{pe}/{n}\">output</a></td><td>{}</td><td>{}</td></tr>",
                status_badge(b.status.as_str()),
                esc(&b.created_by),
                esc(&timefmt::legacy(b.created_at)),
                esc(b.branch.as_deref().unwrap_or("")),
                esc(b.git_hash.as_deref().map(|h| &h[..h.len().min(12)]).unwrap_or("")),
                commit_line(b.commit_message.as_deref()),
                if b.archive_name.is_some() {
                    format!("<a href=\"/{root}/dl/{pe}/{n}\">7z</a>")
                } else if b.output_deleted_at.is_some() {
                    "deleted".to_string()
                } else {
                    String::new()
                },
                esc(b.archive_hash.as_deref().unwrap_or(""))
            ));
        }
        s.push_str("</table><p class=\"pager\">");
        let link = |n: i64, label: &str| {
            format!(
                "<a href=\"/{root}/?project={}&amp;page={n}\">{label}</a> ",
                query_value(p)
            )
        };
        if page > 1 {
            s.push_str(&link(page - 1, "← newer"));
        }
        if older {
            s.push_str(&link(page + 1, "older →"));
        }
        s.push_str("</p></div>");
    }
    s.push_str("</div></div>");
    s
}

/// A value for a URL query, percent-encoded (and then safe inside an HTML attribute).
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn dashboard(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<DashQuery>,
) -> Response {
    let root = st.conf.web_root.clone();
    let back = q.page_redirect.as_deref().unwrap_or("");
    let Some(v) = viewer(&st, &headers).await else {
        return to_login(&root, back);
    };
    if let Some(target) = session::safe_redirect(back) {
        return (
            StatusCode::SEE_OTHER,
            [("location", format!("/{root}/{target}"))],
        )
            .into_response();
    }
    // The levels per project, or the highest when there are many (the Account page lists all).
    let level = esc(&if v.grant.projects.len() <= 3 {
        v.grant.describe()
    } else {
        format!("up to {}", v.grant.top().name())
    });
    // The live refresh asks for the same view.
    let mut src = format!("/{root}/panels");
    if let Some(p) = &q.project {
        src.push_str(&format!(
            "?project={}&page={}",
            query_value(p),
            q.page.unwrap_or(1).max(1)
        ));
    }
    let body = format!(
        "<header><h1>AMS-Build</h1><p>Signed in as <strong>{}</strong> ({level}) · \
         <a href=\"/{root}/account\">Account</a>{users} \
         <form class=\"inline\" method=\"post\" action=\"/{root}/logout\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Log out</button></form></p></header>\
         <main id=\"panels\" data-src=\"{}\" data-events=\"/{root}/events\">{}</main>",
        esc(&v.user.name),
        esc(&v.csrf),
        esc(&src),
        panels_html(&st, &v, &q).await,
        users = if v.grant.manages_users() {
            format!(" · <a href=\"/{root}/users\">Users</a>")
        } else {
            String::new()
        },
    );
    html(StatusCode::OK, "Dashboard", &root, &body)
}

async fn panels(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<DashQuery>,
) -> Response {
    match viewer(&st, &headers).await {
        Some(v) => fragment(panels_html(&st, &v, &q).await),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// How often a live stream re-checks its session, besides on each event it sends.
const RECHECK: Duration = Duration::from_secs(30);

/// Server push of "something changed" to the dashboard (coalesced, with keep-alives). The
/// session is checked again before each event and every [`RECHECK`]: a stream ends with its
/// session (logout, expiry, password change, removed user).
async fn events(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if viewer(&st, &headers).await.is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut rx = st.host.changes.subscribe();
    let headers = session_headers(&headers);
    let stream = async_stream(move |tx| async move {
        let mut tick = tokio::time::interval(RECHECK);
        tick.tick().await;
        loop {
            let changed = tokio::select! {
                r = rx.recv() => match r {
                    Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Err(_) => return,
                },
                _ = tick.tick() => false,
            };
            if viewer(&st, &headers).await.is_none() {
                return;
            }
            if changed
                && tx
                    .send(Event::default().event("change").data("1"))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(20)))
        .into_response()
}

/// A stream fed by a task through a small bounded channel.
fn async_stream<F, Fut>(f: F) -> impl futures_core::Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let gone = tx.clone();
    // The task ends as soon as the client goes, not at its next send: a stream that is
    // silent (no change, a quiet build) must not keep a task per closed connection.
    let task = f(tx);
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = gone.closed() => {}
        }
    });
    tokio_stream_from(rx)
}

/// Only what a live stream needs to check its session again: the cookie, not every header
/// the client sent.
fn session_headers(headers: &HeaderMap) -> HeaderMap {
    let mut slim = HeaderMap::new();
    for v in headers.get_all(axum::http::header::COOKIE) {
        slim.append(axum::http::header::COOKIE, v.clone());
    }
    slim
}

/// Aborts a spawned task when dropped.
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Event>,
) -> impl futures_core::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}

async fn find(st: &ApiState, v: &Viewer, project: &str, name: &str) -> Option<BuildRecord> {
    if !v.grant.may(Action::View, project) {
        return None;
    }
    st.host
        .store
        .build_by_name(project, name)
        .await
        .ok()
        .flatten()
}

fn stages_html(b: &BuildRecord) -> String {
    let mut s = String::from("<table><tr><th>Stage</th><th>Result</th><th>Exit code</th><th>Started</th><th>Duration</th></tr>");
    for st in &b.stages {
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2} s</td></tr>",
            esc(&st.name),
            status_badge(if st.passed { "pass" } else { "fail" }),
            st.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            esc(&timefmt::iso(st.started_at)),
            st.duration_secs
        ));
    }
    s.push_str("</table>");
    if let Some(r) = &b.reason {
        s.push_str(&format!("<p>{}</p>", esc(r)));
    }
    s
}

async fn build_page(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
) -> Response {
    let root = st.conf.web_root.clone();
    let Some(v) = viewer(&st, &headers).await else {
        return to_login(&root, &format!("build/{project}/{name}"));
    };
    let Some(b) = find(&st, &v, &project, &name).await else {
        return not_found(&root);
    };
    let bd = st.host.data.project(&b.project).build(&b.name);
    let len = tokio::fs::metadata(bd.log())
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let (from, text) = read_chunk(&bd.log(), len, len.saturating_sub(TAIL)).await;
    let (p, n) = (esc(&b.project), esc(&b.name));
    let mut body = format!(
        "<p><a href=\"/{root}/\">Dashboard</a></p><h1>{n}</h1>\
         <p>Status <span id=\"status\" class=\"status {st}\">{stu}</span> · project {p} · by {by} · {trig} · branch {branch} · git {git}</p>{msg}",
        st = esc(b.status.as_str()),
        stu = esc(&b.status.as_str().to_uppercase()),
        by = esc(&b.created_by),
        trig = esc(&b.trigger),
        branch = esc(b.branch.as_deref().unwrap_or("-")),
        git = esc(b.git_hash.as_deref().unwrap_or("-")),
        msg = b
            .commit_message
            .as_deref()
            .map(|m| format!("<pre class=\"commit\">{}</pre>", esc_links(m)))
            .unwrap_or_default(),
    );
    if v.grant.may(Action::Operate, &b.project) {
        let csrf = esc(&v.csrf);
        if !b.status.is_final() {
            body.push_str(&format!("<form class=\"inline\" method=\"post\" action=\"/{root}/build/{p}/{n}/cancel\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\" id=\"cancel\">Cancel</button></form>"));
        } else {
            body.push_str(&format!("<form class=\"inline\" method=\"post\" action=\"/{root}/build/{p}/{n}/rebuild\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\" id=\"rebuild\">Rebuild</button></form> "));
            body.push_str(&format!("<form class=\"inline\" method=\"post\" action=\"/{root}/build/{p}/{n}/delete-output\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Delete output</button></form>"));
        }
    }
    if b.tests.is_some() {
        if let Ok(Some(report)) = st.host.store.test_report(b.id).await {
            body.push_str(&tests_html(&report));
        }
    }
    if let Ok(Some(files)) = crate::api::archive_files(&st, &b).await {
        body.push_str(&files_html(&root, &b, &files));
    }
    body.push_str(&format!(
        "<h2>Stages</h2><div id=\"stages\" data-src=\"/{root}/build/{p}/{n}/stages\">{}</div>\
         <h2>Log</h2><p><a href=\"/{root}/output/{p}/{n}\" download>Download the whole log</a>{}\
         {} <label><input type=\"checkbox\" id=\"follow\" checked> follow</label></p>\
         <p id=\"trimmed\" hidden>Earlier lines left the page to keep it light; the download has them all.</p>",
        stages_html(&b),
        if from > 0 {
            format!(
                " · <button type=\"button\" id=\"load-more\" data-src=\"/{root}/build/{p}/{n}/log\" \
                 data-before=\"{from}\">Load earlier lines</button> ({} KiB not shown)",
                from.div_ceil(1024)
            )
        } else {
            String::new()
        },
        if b.archive_name.is_some() {
            format!(" · <a id=\"archive\" href=\"/{root}/dl/{p}/{n}\">7z</a>")
        } else {
            String::new()
        },
    ));
    let stream = if b.status.is_final() {
        String::new()
    } else {
        format!(" data-stream=\"/{root}/build/{p}/{n}/stream?from={len}\"")
    };
    body.push_str(&format!(
        "<pre id=\"log\"{stream}>{}</pre>",
        ansi_to_html(&String::from_utf8_lossy(&text))
    ));
    html(StatusCode::OK, &b.name, &root, &body)
}

/// The build page's test section: totals, then the failed tests first with their messages.
fn tests_html(r: &ams_core::junit::TestReport) -> String {
    let t = &r.totals;
    let mut h = format!(
        "<h2 id=\"tests\">Tests</h2><p class=\"tests-totals\"><strong>{} tests</strong> · \
         <span class=\"status pass\">{} passed</span> · <span class=\"status fail\">{} failed</span> · \
         <span class=\"status error\">{} errors</span> · {} skipped · {:.2} s · {} report file(s)</p>",
        t.tests, t.passed, t.failed, t.errors, t.skipped, t.time_secs, t.files
    );
    if t.files == 0 && r.unreadable.is_empty() {
        h.push_str("<p>No file in the output matched the pipeline's <code>test-reports</code> patterns.</p>");
    }
    if !r.failures.is_empty() {
        h.push_str("<h3>Failed tests</h3><ol class=\"failed-tests\">");
        for f in &r.failures {
            let who = match &f.class {
                Some(c) if !c.is_empty() => format!("{}.{}", c, f.name),
                _ => f.name.clone(),
            };
            h.push_str(&format!(
                "<li><details><summary><span class=\"status {kind}\">{kindu}</span> <code>{who}</code> \
                 <small>{file}{suite}</small></summary><pre>{msg}</pre></details></li>",
                kind = if f.kind == "error" { "error" } else { "fail" },
                kindu = esc(&f.kind.to_uppercase()),
                who = esc(&who),
                file = esc(&f.file),
                suite = if f.suite.is_empty() {
                    String::new()
                } else {
                    format!(" · {}", esc(&f.suite))
                },
                msg = esc(&f.message),
            ));
        }
        h.push_str("</ol>");
        if r.failures_truncated {
            h.push_str(&format!(
                "<p>Only the first {} failed tests are listed.</p>",
                r.failures.len()
            ));
        }
    }
    if !r.unreadable.is_empty() {
        h.push_str("<h3>Report files not read</h3><ul>");
        for u in &r.unreadable {
            h.push_str(&format!(
                "<li><code>{}</code>: {}</li>",
                esc(&u.file),
                esc(&u.reason)
            ));
        }
        h.push_str("</ul>");
    }
    h
}

/// The most archive entries the build page lists (the API lists them all).
const FILES_SHOWN: usize = 500;

/// The build page's list of the archive's files, each file a link that downloads it alone.
fn files_html(root: &str, b: &BuildRecord, files: &[ams_archive::ArchivedFile]) -> String {
    let n_files = files.iter().filter(|f| f.kind == "file").count();
    let mut h = format!(
        "<h2 id=\"files\">Files</h2><details{}><summary>{} files in the archive</summary>\
         <table class=\"files\"><thead><tr><th>Path</th><th>Size</th></tr></thead><tbody>",
        if n_files <= 30 { " open" } else { "" },
        n_files
    );
    for f in files.iter().filter(|f| f.kind != "dir").take(FILES_SHOWN) {
        let cell = if f.kind == "file" {
            format!(
                "<a href=\"/{root}/{}\" download>{}</a>",
                esc(&crate::api::file_link(&b.project, &b.name, &f.path)),
                esc(&f.path)
            )
        } else {
            format!("{} <small>(link)</small>", esc(&f.path))
        };
        h.push_str(&format!(
            "<tr><td class=\"path\">{cell}</td><td class=\"num\">{}</td></tr>",
            f.size
        ));
    }
    h.push_str("</tbody></table>");
    let listed = files.iter().filter(|f| f.kind != "dir").count();
    if listed > FILES_SHOWN {
        h.push_str(&format!(
            "<p>{FILES_SHOWN} of {listed} entries shown; <code>GET api/builds/{}/files</code> lists them all.</p>",
            esc(&b.name)
        ));
    }
    h.push_str("</details>");
    h
}

/// Reads the log bytes `[start, end)`, moving `start` forward to the beginning of a line when it
/// falls inside one, so a chunk holds whole lines (and whole UTF-8 characters). Returns the
/// real start and the bytes.
async fn read_chunk(path: &std::path::Path, end: u64, start: u64) -> (u64, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut buf = Vec::new();
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return (end, buf);
    };
    // One byte before `start` tells whether it is already a line start.
    let probe = start.saturating_sub(1);
    if f.seek(std::io::SeekFrom::Start(probe)).await.is_err() {
        return (end, buf);
    }
    let _ = (&mut f)
        .take(end.saturating_sub(probe))
        .read_to_end(&mut buf)
        .await;
    if start == 0 {
        return (0, buf);
    }
    let skip = match buf.iter().position(|&c| c == b'\n') {
        Some(i) => i + 1,
        // One line longer than the chunk: show it from the cut.
        None => 1,
    };
    let skip = skip.min(buf.len());
    (probe + skip as u64, buf.split_off(skip))
}

/// An earlier part of a log, for "load earlier lines": up to [`TAIL`] bytes of whole lines
/// ending before byte `before`, as text; `x-log-start` says where it begins (0: the first line).
async fn log_chunk(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(v) = viewer(&st, &headers).await else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Some(b) = find(&st, &v, &project, &name).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let path = st.host.data.project(&b.project).build(&b.name).log();
    let len = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let Some(before) = q
        .get("before")
        .and_then(|f| f.parse::<u64>().ok())
        .filter(|b| *b <= len)
    else {
        return (
            StatusCode::BAD_REQUEST,
            "give ?before= a byte offset within the log",
        )
            .into_response();
    };
    let (start, bytes) = read_chunk(&path, before, before.saturating_sub(TAIL)).await;
    (
        [
            ("content-type", "text/plain; charset=utf-8".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            ("cache-control", "no-store".to_string()),
            ("x-log-start", start.to_string()),
        ],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response()
}

async fn stages_fragment(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
) -> Response {
    let Some(v) = viewer(&st, &headers).await else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    match find(&st, &v, &project, &name).await {
        Some(b) => fragment(stages_html(&b)),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The live log from byte `from`, as `log` events, then one `end` event with the status.
async fn stream(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(v) = viewer(&st, &headers).await else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Some(b) = find(&st, &v, &project, &name).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let from: u64 = q.get("from").and_then(|f| f.parse().ok()).unwrap_or(0);
    let path = st.host.data.project(&b.project).build(&b.name).log();
    let hub = st.host.hub.clone();
    let store = st.host.store.clone();
    let headers = session_headers(&headers);
    let events = async_stream(move |tx| async move {
        let (btx, mut brx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(8);
        let id = b.id;
        let mut follower = Aborting(tokio::spawn(async move {
            ams_host::log::follow_from(&hub, id, &path, from, &btx).await
        }));
        let mut carry: Vec<u8> = Vec::new();
        let mut checked = tokio::time::Instant::now();
        loop {
            let chunk = tokio::select! {
                c = brx.recv() => match c {
                    Some(c) => Some(c),
                    None => break,
                },
                _ = tokio::time::sleep_until(checked + RECHECK) => None,
            };
            // The stream ends with the session, even while the build runs on.
            if checked.elapsed() >= RECHECK {
                if viewer(&st, &headers).await.is_none() {
                    return;
                }
                checked = tokio::time::Instant::now();
            }
            let Some(chunk) = chunk else { continue };
            let text = ams_host::log::take_utf8(&mut carry, &chunk);
            if tx
                .send(Event::default().event("log").data(text))
                .await
                .is_err()
            {
                return;
            }
        }
        let status = match (&mut follower.0).await {
            Ok(Ok(Some(s))) => s,
            _ => store
                .build_by_id(id)
                .await
                .ok()
                .flatten()
                .map(|b| b.status.as_str().to_string())
                .unwrap_or_default(),
        };
        let _ = tx.send(Event::default().event("end").data(status)).await;
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(20)))
        .into_response()
}

/// A form post from a page: a session, its CSRF token in the form, and our own Origin.
pub(crate) async fn form_viewer(
    st: &ApiState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Viewer, Response> {
    let root = &st.conf.web_root;
    let v = viewer(st, headers)
        .await
        .ok_or_else(|| to_login(root, ""))?;
    let sent = form.get("csrf").map(String::as_str).unwrap_or("");
    if !secrets_equal(sent, &v.csrf) || !session::same_origin(headers, st.conf.use_ssl) {
        return Err(refused(
            root,
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token",
        ));
    }
    Ok(v)
}

pub(crate) fn back(to: String) -> Response {
    (StatusCode::SEE_OTHER, [("location", to)]).into_response()
}

pub(crate) fn not_found(root: &str) -> Response {
    html(
        StatusCode::NOT_FOUND,
        "Not found",
        root,
        "<h1>Not found</h1><p>There is nothing here, or you may not see it.</p>",
    )
}

/// A refused form, with the reason and the way back.
/// The status a refused command answers with, as `HostError` decides it.
pub(crate) fn host_status(e: &ams_host::error::HostError) -> StatusCode {
    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub(crate) fn refused(root: &str, status: StatusCode, why: &str) -> Response {
    html(
        status,
        "Refused",
        root,
        &format!(
            "<h1>Refused</h1><p class=\"error\">{}</p><p><a href=\"/{root}/\">Dashboard</a></p>",
            esc(why)
        ),
    )
}

async fn trigger_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(project): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let root = st.conf.web_root.clone();
    let v = match form_viewer(&st, &headers, &f).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !v.grant.may(Action::View, &project) {
        return not_found(&root);
    }
    if !v.grant.may(Action::Operate, &project) {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "you may not trigger builds of this project",
        );
    }
    let opt = |k: &str| {
        f.get(k)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let Ok(name) = ams_core::names::ProjectName::new(&project) else {
        return not_found(&root);
    };
    // `NAME=value` pairs, one per line or separated by spaces.
    let mut params = std::collections::BTreeMap::new();
    for pair in opt("params").unwrap_or_default().split_whitespace() {
        match pair.split_once('=') {
            Some((k, val)) if !k.is_empty() => {
                params.insert(k.to_string(), val.to_string());
            }
            _ => {
                return refused(
                    &root,
                    StatusCode::BAD_REQUEST,
                    &format!("`{pair}` is not NAME=value; write each parameter as NAME=value"),
                )
            }
        }
    }
    let req = BuildRequest {
        project: name,
        branch: opt("branch"),
        commit: opt("commit"),
        actor: v.user.name.clone(),
        trigger: ams_core::names::Trigger::Web,
        params,
    };
    match st.host.build(req).await {
        Ok(b) => {
            let text = format!("Queued build {}", b.name);
            note(
                &st,
                &v.user.name,
                "pending",
                &text,
                Some(&b.project),
                Some(&b.name),
            )
            .await;
            back(format!("/{root}/build/{}/{}", b.project, b.name))
        }
        Err(e) => {
            let text = format!("Could not trigger a build of {project}: {e}");
            note(&st, &v.user.name, "error", &text, Some(&project), None).await;
            refused(&root, host_status(&e), &e.to_string())
        }
    }
}

/// A build form's viewer (session and CSRF checked) and its build, which the viewer may
/// operate on; otherwise the answer to give.
async fn operable_build(
    st: &ApiState,
    headers: &HeaderMap,
    project: &str,
    name: &str,
    f: &HashMap<String, String>,
) -> Result<(Viewer, ams_store::BuildRecord), Response> {
    let root = &st.conf.web_root;
    let v = form_viewer(st, headers, f).await?;
    let Some(b) = find(st, &v, project, name).await else {
        return Err(not_found(root));
    };
    if !v.grant.may(Action::Operate, &b.project) {
        return Err(refused(root, StatusCode::FORBIDDEN, "you may not do that"));
    }
    Ok((v, b))
}

async fn build_action(
    st: ApiState,
    headers: HeaderMap,
    project: String,
    name: String,
    f: HashMap<String, String>,
    delete: bool,
) -> Response {
    let root = st.conf.web_root.clone();
    let (v, b) = match operable_build(&st, &headers, &project, &name, &f).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let r = if delete {
        st.host.delete_output(b.build_id(), &v.user.name).await
    } else {
        st.host.cancel(b.build_id(), &v.user.name).await.map(|_| ())
    };
    let what = if delete {
        "delete the output of"
    } else {
        "cancel"
    };
    match r {
        Ok(()) => {
            let text = if delete {
                format!("Deleted the output of {}", b.name)
            } else {
                format!("Asked build {} to cancel", b.name)
            };
            note(
                &st,
                &v.user.name,
                "ok",
                &text,
                Some(&b.project),
                Some(&b.name),
            )
            .await;
            back(format!("/{root}/build/{}/{}", b.project, b.name))
        }
        Err(e) => {
            let text = format!("Could not {what} {}: {e}", b.name);
            note(
                &st,
                &v.user.name,
                "error",
                &text,
                Some(&b.project),
                Some(&b.name),
            )
            .await;
            refused(&root, host_status(&e), &e.to_string())
        }
    }
}

/// The build page's Rebuild: the same commit again, by the viewer; on to the new build's page.
async fn rebuild_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let root = st.conf.web_root.clone();
    let (v, b) = match operable_build(&st, &headers, &project, &name, &f).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match st
        .host
        .rebuild(&b, &v.user.name, ams_core::names::Trigger::Web)
        .await
    {
        Ok(n) => {
            let text = format!("Queued build {} (again of {})", n.name, b.name);
            note(
                &st,
                &v.user.name,
                "pending",
                &text,
                Some(&n.project),
                Some(&n.name),
            )
            .await;
            back(format!("/{root}/build/{}/{}", n.project, n.name))
        }
        Err(e) => {
            let text = format!("Could not rebuild {}: {e}", b.name);
            note(
                &st,
                &v.user.name,
                "error",
                &text,
                Some(&b.project),
                Some(&b.name),
            )
            .await;
            refused(&root, host_status(&e), &e.to_string())
        }
    }
}

async fn cancel_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    build_action(st, headers, project, name, f, false).await
}

async fn delete_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    build_action(st, headers, project, name, f, true).await
}

/// The secrets section of a project's admin page: names, when and by whom, a form to set one
/// and one to remove each. Never a value: they are write-only.
async fn secrets_html(st: &ApiState, root: &str, project: &str, csrf: &str) -> String {
    let pe = esc(project);
    let mut body = String::from(
        "<h2>Secrets</h2><p class=\"muted\">Given as environment variables to the stages of \
         builds whose pipeline.json names them in <code>\"secrets\"</code>, for the branches \
         that pipeline-config.json's <code>\"secret-branches\"</code> lists, and masked in their \
         logs. Values are write-only: no page or API answer shows one again. For a value of \
         several lines use <code>amsbuild secret set</code> or the API.</p>",
    );
    match ams_host::secrets::list(&st.host.data, &st.host.store, project).await {
        Ok(list) if list.is_empty() => body.push_str("<p>No secrets.</p>"),
        Ok(list) => {
            body.push_str(
                "<table class=\"secrets\"><tr><th>Name</th><th>Set</th><th>By</th><th></th></tr>",
            );
            for s in list {
                let n = esc(&s.name);
                body.push_str(&format!(
                    "<tr><td><code>{n}</code></td><td>{at}</td><td>{by}</td><td><form \
                     class=\"inline\" method=\"post\" \
                     action=\"/{root}/admin/{pe}/secrets/{n}/remove\"><input type=\"hidden\" \
                     name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Remove</button>\
                     </form></td></tr>",
                    at = esc(&timefmt::legacy(s.set_at)),
                    by = esc(&s.set_by),
                ));
            }
            body.push_str("</table>");
        }
        Err(e) => body.push_str(&format!("<p class=\"error\">{}</p>", esc(&e.to_string()))),
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"/{root}/admin/{pe}/secrets\" autocomplete=\"off\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input name=\"name\" placeholder=\"NAME\" maxlength=\"64\" required \
         pattern=\"[A-Z_][A-Z0-9_]*\" title=\"capital letters, digits and _\"> \
         <input type=\"password\" name=\"value\" placeholder=\"value (8 characters or more)\" \
         minlength=\"8\" required autocomplete=\"new-password\"> \
         <button type=\"submit\">Set secret</button></form>"
    ));
    body
}

/// A secret form's post: an ADMIN of the project (404 for a project the user cannot see).
async fn secret_form_viewer(
    st: &ApiState,
    headers: &HeaderMap,
    project: &str,
    f: &HashMap<String, String>,
) -> Result<Viewer, Response> {
    let root = &st.conf.web_root;
    let v = form_viewer(st, headers, f).await?;
    if !v.grant.may(Action::View, project) || !ams_host::project::exists(&st.host.data, project) {
        return Err(not_found(root));
    }
    if !v.grant.may(Action::ManageSecrets, project) {
        return Err(refused(
            root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN manage a project's secrets",
        ));
    }
    Ok(v)
}

async fn secret_set_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(project): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let v = match secret_form_viewer(&st, &headers, &project, &f).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let name = f.get("name").map(|n| n.trim()).unwrap_or("");
    let value = f.get("value").map(String::as_str).unwrap_or("");
    let r = ams_host::secrets::set(
        &st.host.data,
        &st.host.store,
        &project,
        name,
        value,
        &v.user.name,
    )
    .await;
    if r.is_ok() {
        tracing::info!("secret {name} of project {project} set by {}", v.user.name);
    }
    let done = format!("Set secret {name} of {project}");
    let failed = format!("Could not set a secret of {project}");
    project_form_outcome(&st, &v.user.name, &project, r, done, failed).await
}

/// The end of a form of a project's admin page: the outcome goes to the user's message
/// panel, then back to the page, or to the refusal with the reason.
async fn project_form_outcome(
    st: &ApiState,
    user: &str,
    project: &str,
    r: Result<(), ams_host::error::HostError>,
    done: String,
    failed: String,
) -> Response {
    let root = &st.conf.web_root;
    match r {
        Ok(()) => {
            note(st, user, "ok", &done, Some(project), None).await;
            back(format!("/{root}/admin/{project}"))
        }
        Err(e) => {
            note(
                st,
                user,
                "error",
                &format!("{failed}: {e}"),
                Some(project),
                None,
            )
            .await;
            refused(root, host_status(&e), &e.to_string())
        }
    }
}

async fn secret_remove_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let v = match secret_form_viewer(&st, &headers, &project, &f).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let r = ams_host::secrets::remove(&st.host.data, &st.host.store, &project, &name).await;
    if r.is_ok() {
        tracing::info!(
            "secret {name} of project {project} removed by {}",
            v.user.name
        );
    }
    let done = format!("Removed secret {name} of {project}");
    let failed = format!("Could not remove secret {name} of {project}");
    project_form_outcome(&st, &v.user.name, &project, r, done, failed).await
}

/// ADMIN and SERVER ADMIN: a project's secrets (names only; set and remove), webhook
/// deliveries (with replay) and notifications.
async fn admin_page(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> Response {
    let root = st.conf.web_root.clone();
    let Some(v) = viewer(&st, &headers).await else {
        return to_login(&root, &format!("admin/{project}"));
    };
    if !v.grant.may(Action::View, &project) || !ams_host::project::exists(&st.host.data, &project) {
        return not_found(&root);
    }
    if !v.grant.may(Action::SeeDeliveries, &project) {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN see this page",
        );
    }
    let pe = esc(&project);
    let csrf = esc(&v.csrf);
    let mut body =
        format!("<p><a href=\"/{root}/\">Dashboard</a></p><h1>{pe}: administration</h1>");
    if v.grant.may(Action::ManageSecrets, &project) {
        body.push_str(&secrets_html(&st, &root, &project, &csrf).await);
    }
    body.push_str("<h2>Webhook deliveries</h2><table><tr><th>#</th><th>Received</th><th>Sender</th><th>Event</th><th>Delivery id</th><th>Verdict</th><th>Builds</th><th></th></tr>");
    for d in st
        .host
        .store
        .deliveries_of(&project, 200)
        .await
        .unwrap_or_default()
    {
        let builds: Vec<String> = d
            .builds
            .iter()
            .map(|b| format!("<a href=\"/{root}/build/{pe}/{0}\">{0}</a>", esc(b)))
            .collect();
        body.push_str(&format!(
            "<tr><td>{id}</td><td>{at}</td><td>{sender}</td><td>{event}</td><td>{did}</td><td>{verdict}{reason}</td><td>{builds}</td>\
             <td><form class=\"inline\" method=\"post\" action=\"/{root}/admin/{pe}/replay/{id}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Replay</button></form></td></tr>",
            id = d.id,
            at = esc(&timefmt::legacy(d.received_at)),
            sender = esc(&d.sender),
            event = esc(&d.event),
            did = esc(d.delivery_id.as_deref().unwrap_or("")),
            verdict = esc(&d.verdict),
            reason = d.reason.as_deref().map(|r| format!(": {}", esc(r))).unwrap_or_default(),
            builds = builds.join(" ")
        ));
    }
    body.push_str("</table><h2>Notifications</h2><table><tr><th>Sent</th><th>Build</th><th>Hook</th><th>Event</th><th>To</th><th>Outcome</th><th>Attempts</th></tr>");
    for n in st
        .host
        .store
        .notifications_of(&project, 200)
        .await
        .unwrap_or_default()
    {
        let tries: Vec<String> = n
            .attempts
            .iter()
            .map(|a| format!("{} ({} ms)", esc(&a.outcome), a.millis))
            .collect();
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&timefmt::legacy(n.created_at)),
            esc(&n.build_name),
            esc(&n.hook),
            esc(&n.event),
            esc(&n.target_host),
            esc(&n.outcome),
            tries.join(", ")
        ));
    }
    body.push_str("</table>");
    html(
        StatusCode::OK,
        &format!("{project} administration"),
        &root,
        &body,
    )
}

async fn replay_form(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((project, id)): Path<(String, i64)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let root = st.conf.web_root.clone();
    let v = match form_viewer(&st, &headers, &f).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let owned = st
        .host
        .store
        .delivery_payload(id)
        .await
        .ok()
        .flatten()
        .is_some_and(|(d, _, _)| d.project == project);
    if !owned || !v.grant.may(Action::SeeDeliveries, &project) {
        return not_found(&root);
    }
    match ams_host::control::replay(&st.host, id, &v.user.name).await {
        Ok(_) => {
            let text = format!("Replayed delivery {id} of {project}");
            note(&st, &v.user.name, "ok", &text, Some(&project), None).await;
            back(format!("/{root}/admin/{project}"))
        }
        Err(e) => {
            let text = format!("Could not replay delivery {id} of {project}: {e}");
            note(&st, &v.user.name, "error", &text, Some(&project), None).await;
            refused(&root, StatusCode::CONFLICT, &e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_task_ends_when_its_client_goes() {
        struct Flag(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Flag {
            fn drop(&mut self) {
                if let Some(t) = self.0.take() {
                    let _ = t.send(());
                }
            }
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        // A silent stream: its task never sends, so only the client's going can end it.
        let s = async_stream(move |_tx| async move {
            let _flag = Flag(Some(done_tx));
            std::future::pending::<()>().await;
        });
        drop(s);
        // Whether it ran or not, the task's future is gone (the flag fired or was dropped).
        let _ = tokio::time::timeout(Duration::from_secs(10), done_rx)
            .await
            .expect("the task ended with its client");
    }

    #[test]
    fn only_http_and_https_urls_become_links() {
        assert_eq!(
            esc_links("see https://example.com/a?b=1&c=<x>. ok"),
            "see <a href=\"https://example.com/a?b=1&amp;c=\" rel=\"noopener noreferrer nofollow\" \
             target=\"_blank\">https://example.com/a?b=1&amp;c=</a>&lt;x&gt;. ok"
        );
        assert_eq!(
            esc_links("javascript:alert(1) data:text/html,<b> file:///etc/passwd"),
            "javascript:alert(1) data:text/html,&lt;b&gt; file:///etc/passwd"
        );
        assert_eq!(
            esc_links("\"https://x.example/\"onmouseover=alert(1)"),
            "&quot;<a href=\"https://x.example/\" rel=\"noopener noreferrer nofollow\" \
             target=\"_blank\">https://x.example/</a>&quot;onmouseover=alert(1)"
        );
        assert_eq!(esc_links("http:// nothing"), "http:// nothing");
        assert_eq!(esc_links("(http://a.example)."), "(<a href=\"http://a.example\" rel=\"noopener noreferrer nofollow\" target=\"_blank\">http://a.example</a>).");
    }

    #[test]
    fn ansi_becomes_classes_and_markup_is_escaped() {
        assert_eq!(
            ansi_to_html("\u{1b}[1;31mred <b>\u{1b}[0m plain & \u{1b}[2Kgone"),
            "<span class=\"b c1\">red &lt;b&gt;</span> plain &amp; gone"
        );
        assert_eq!(
            ansi_to_html("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
    }
}
