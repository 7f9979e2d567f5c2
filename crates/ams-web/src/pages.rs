//! Server-rendered pages: the dashboard (message panel, active and queued tasks, projects and
//! builds) with panels pushed live over server-sent events, the build page with its stages and
//! a live log, and the forms that trigger, cancel and delete. Everything user-controlled is
//! escaped on the server; the page script sets text only with `textContent`; no inline script.

use crate::api::ApiState;
use crate::manage::note;
use crate::session::{self, esc, secrets_equal};
use crate::view::{self, Chrome};
use ams_core::access::{Action, Grant};
use ams_store::{BuildRecord, BuildRow, User};
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
        .route(&format!("/{root}/static/favicon/{{name}}"), get(favicon))
        .route("/", get(to_dashboard))
        .route(&format!("/{root}"), get(to_dashboard))
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
        .route(&format!("/{root}/engines"), get(engines_page))
        .route(&format!("/{root}/project/{{project}}"), get(project_page))
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
        // Any other address: the styled "not found" page, not an empty answer. (The API's
        // own addresses answer JSON from its router.)
        .fallback(unknown_address)
        .with_state(state)
}

async fn unknown_address(State(st): State<ApiState>) -> Response {
    not_found(&st.conf.web_root)
}

/// `/` and `/{web_root}` lead to the dashboard (which leads to the login page when needed).
async fn to_dashboard(State(st): State<ApiState>) -> Response {
    back(format!("/{}/", st.conf.web_root))
}

/// A status favicon (`pass.svg`, `fail.svg`, …), for the build page and its live updates.
async fn favicon(Path(name): Path<String>) -> Response {
    match name.strip_suffix(".svg").and_then(view::favicon_svg) {
        Some(svg) => (
            [
                ("content-type", "image/svg+xml"),
                ("cache-control", "public, max-age=86400"),
                ("x-content-type-options", "nosniff"),
            ],
            svg,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
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

/// A fragment's or live stream's viewer: without a session, 401.
impl axum::extract::FromRequestParts<ApiState> for Viewer {
    type Rejection = StatusCode;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        viewer(st, &parts.headers)
            .await
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// A page's viewer: without a session, the login page, which comes back to this page after.
pub struct PageViewer(pub Viewer);

impl axum::extract::FromRequestParts<ApiState> for PageViewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        match viewer(st, &parts.headers).await {
            Some(v) => Ok(PageViewer(v)),
            None => {
                let root = &st.conf.web_root;
                let path = parts.uri.path();
                let mut back = path
                    .strip_prefix(&format!("/{root}/"))
                    .unwrap_or("")
                    .to_string();
                if let Some(q) = parts.uri.query() {
                    back.push('?');
                    back.push_str(q);
                }
                Err(to_login(root, &back))
            }
        }
    }
}

/// A form post from a page, checked once here: a session, its CSRF token in the form, and
/// our own Origin. `pairs` is the form as sent (a field may repeat).
pub struct FormViewer {
    pub v: Viewer,
    pub pairs: Vec<(String, String)>,
}

impl FormViewer {
    /// A field's first value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    /// The form with one value per field (the first).
    pub fn map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        for (k, v) in &self.pairs {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        m
    }
}

impl axum::extract::FromRequest<ApiState> for FormViewer {
    type Rejection = Response;

    async fn from_request(
        req: axum::extract::Request,
        st: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let Form(pairs) = Form::<Vec<(String, String)>>::from_request(req, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let root = &st.conf.web_root;
        let v = viewer(st, &headers)
            .await
            .ok_or_else(|| to_login(root, ""))?;
        let sent = pairs
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if !secrets_equal(sent, &v.csrf) || !session::same_origin(&headers, st.conf.use_ssl) {
            return Err(refused(
                root,
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token",
            ));
        }
        Ok(FormViewer { v, pairs })
    }
}

pub(crate) fn to_login(root: &str, back: &str) -> Response {
    let target = match session::safe_redirect(back) {
        Some(b) => format!("/{root}/login?page_redirect={b}"),
        None => format!("/{root}/login"),
    };
    (StatusCode::SEE_OTHER, [("location", target)]).into_response()
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

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while u + 1 < UNITS.len() && n >> (10 * (u + 1)) > 0 {
        u += 1;
    }
    if u == 0 {
        return format!("{n} B");
    }
    // Tenths of the unit, rounded half to even as `{:.1}` of the quotient would be (in whole
    // numbers: float formatting took 8 % of a dashboard's time, a figure per project).
    let div = 1u128 << (10 * u);
    let scaled = u128::from(n) * 10;
    let (mut q, r) = (scaled / div, scaled % div);
    if 2 * r > div || (2 * r == div && q % 2 == 1) {
        q += 1;
    }
    format!("{}.{} {}", q / 10, q % 10, UNITS[u])
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
pub struct PanelsV {
    pub root: String,
    pub csrf: String,
    pub engine_down: bool,
    /// The host is stopping (see docs/web_conf.md, "Stopping the host").
    pub stopping: bool,
    pub messages: Vec<MessageV>,
    pub tasks: Vec<TaskListV>,
    pub projects: Vec<ProjectRowV>,
    pub selected: Option<BuildListV>,
}

pub struct MessageV {
    pub kind: String,
    pub at: view::Ts,
    pub text: String,
    pub link: Option<String>,
}

pub struct TaskListV {
    pub title: &'static str,
    pub rows: Vec<TaskV>,
    pub more: usize,
}

pub struct TaskV {
    pub project: String,
    pub name: String,
    pub index: i64,
    pub by: String,
    pub at: view::Ts,
}

pub struct ProjectRowV {
    pub name: String,
    pub query: String,
    /// The latest build's name and status.
    pub latest: Option<(String, String)>,
    pub disk: String,
    pub can_operate: bool,
    pub can_admin: bool,
    pub selected: bool,
}

/// A page of one project's builds (the dashboard's Builds panel, the project page's list).
pub struct BuildListV {
    pub root: String,
    pub project: String,
    pub query: String,
    pub builds: Vec<BuildRowV>,
    pub newer: Option<i64>,
    pub older: Option<i64>,
}

pub struct BuildRowV {
    pub project: String,
    pub trigger: String,
    pub name: String,
    pub index: i64,
    pub status: &'static str,
    pub by: String,
    pub at: view::Ts,
    pub duration: Option<String>,
    pub branch: String,
    pub git: String,
    pub git_short: String,
    pub commit_line: String,
    pub commit_tip: String,
    pub archive: bool,
    pub deleted: bool,
    pub hash: String,
    /// `failed/total` of its test reports.
    pub tests: Option<String>,
}

impl BuildRowV {
    pub fn of(b: &BuildRecord) -> BuildRowV {
        BuildRowV::of_row(b.row(), b.tests.as_ref())
    }

    /// From the row as the store holds it (a page of builds is read without records).
    pub fn of_row(b: BuildRow<'_>, tests: Option<&ams_core::junit::TestTotals>) -> BuildRowV {
        let first = b
            .commit_message
            .and_then(|m| m.lines().next())
            .unwrap_or("");
        let short: String = first.chars().take(60).collect();
        let more = if short.len() < first.len() { "…" } else { "" };
        let git = b.git_hash.unwrap_or_default();
        BuildRowV {
            project: b.project.to_owned(),
            trigger: b.trigger.to_owned(),
            name: b.name.to_owned(),
            index: b.build_index,
            status: b.status.as_str(),
            by: b.created_by.to_owned(),
            at: view::Ts::at(b.created_at),
            duration: match (b.started_at, b.finished_at) {
                (Some(s), Some(f)) if f >= s => Some(human_secs(f - s)),
                _ => None,
            },
            branch: b.branch.unwrap_or_default().to_owned(),
            git_short: git.chars().take(10).collect(),
            git: git.to_owned(),
            commit_line: short + more,
            commit_tip: b
                .commit_message
                .map(|m| m.chars().take(300).collect())
                .unwrap_or_default(),
            archive: b.archive_name.is_some(),
            deleted: b.output_deleted_at.is_some(),
            hash: b.archive_hash.unwrap_or_default().to_owned(),
            tests: tests.map(|t| format!("{}/{} tests failed", t.failing(), t.tests)),
        }
    }
}

/// A duration for people: `0.4 s`, `12 s`, `3 min 05 s`, `2 h 04 min`.
pub fn human_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

#[derive(askama::Template)]
#[template(path = "panels_fragment.html")]
struct PanelsT {
    p: PanelsV,
}

#[derive(askama::Template)]
#[template(path = "dashboard.html")]
struct DashboardT {
    chrome: Chrome,
    name: String,
    level: String,
    src: String,
    p: PanelsV,
}

async fn panels_view(st: &ApiState, v: &Viewer, q: &DashQuery) -> PanelsV {
    let root = st.conf.web_root.clone();
    let snap = st.host.snapshot().await.unwrap_or_default();
    let messages = crate::manage::messages_view(st, v).await;
    let tasks = [
        ("Active tasks", &snap.active),
        ("Queued tasks", &snap.pending),
    ]
    .into_iter()
    .map(|(title, list)| {
        let visible: Vec<&BuildRecord> = list
            .iter()
            .filter(|b| v.grant.may(Action::View, &b.project))
            .collect();
        TaskListV {
            title,
            more: visible.len().saturating_sub(DASHBOARD_TASKS),
            rows: visible
                .into_iter()
                .take(DASHBOARD_TASKS)
                .map(|b| TaskV {
                    project: b.project.clone(),
                    name: b.name.clone(),
                    index: b.build_index,
                    by: b.created_by.clone(),
                    at: view::Ts::at(b.created_at),
                })
                .collect(),
        }
    })
    .collect();
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
    let rows = projects
        .iter()
        .map(|p| ProjectRowV {
            name: p.clone(),
            query: query_value(p),
            latest: latest.get(p).map(|(_, n, s)| (n.clone(), s.clone())),
            disk: st
                .host
                .metrics
                .disk_of(p)
                .map(human_bytes)
                .unwrap_or_else(|| "…".to_string()),
            can_operate: v.grant.may(Action::Operate, p),
            can_admin: v.grant.may(Action::SeeDeliveries, p),
            selected: selected.as_deref() == Some(p.as_str()),
        })
        .collect();
    let selected = match selected {
        Some(p) => Some(build_list(st, &p, q.page.unwrap_or(1), None).await),
        None => None,
    };
    PanelsV {
        root,
        csrf: v.csrf.clone(),
        engine_down: st.host.engine.borrow().up == Some(false),
        stopping: snap.stopping,
        messages,
        tasks,
        projects: rows,
        selected,
    }
}

/// A page of a project's builds, [`DASH_BUILDS`] to a page, newest first; with `filter`, only
/// those it keeps.
pub async fn build_list(
    st: &ApiState,
    project: &str,
    page: i64,
    filter: Option<&BuildFilter>,
) -> BuildListV {
    let page = page.clamp(1, crate::api::MAX_PAGE);
    // One more than shown tells whether an older page exists. The rows are read in place.
    let sql = filter.map(BuildFilter::sql).unwrap_or_default();
    let pairs: Vec<(&str, &str)> = sql.iter().map(|(c, v)| (*c, v.as_str())).collect();
    let mut builds = st
        .host
        .store
        .builds_where_fold(
            project,
            &pairs,
            DASH_BUILDS + 1,
            (page - 1) * DASH_BUILDS,
            Vec::new(),
            |rows, b| rows.push(BuildRowV::of_row(b.row, b.tests().as_ref())),
        )
        .await
        .unwrap_or_default();
    let older = builds.len() as i64 > DASH_BUILDS;
    builds.truncate(DASH_BUILDS as usize);
    BuildListV {
        root: st.conf.web_root.clone(),
        project: project.to_string(),
        query: query_value(project),
        builds,
        newer: (page > 1).then_some(page - 1),
        older: older.then_some(page + 1),
    }
}

/// The project page's build filters.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct BuildFilter {
    pub branch: Option<String>,
    pub status: Option<String>,
    pub actor: Option<String>,
    pub page: Option<i64>,
}

impl BuildFilter {
    fn clean(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }

    /// The filters as the store's column filters.
    pub fn sql(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(b) = Self::clean(&self.branch) {
            out.push(("branch", b.to_string()));
        }
        if let Some(s) = Self::clean(&self.status) {
            out.push(("status", s.to_ascii_lowercase()));
        }
        if let Some(a) = Self::clean(&self.actor) {
            out.push(("created_by", a.to_string()));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.sql().is_empty()
    }
}

/// Kept as they are in a query value: RFC 3986's unreserved characters.
const QUERY_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A value for a URL query, percent-encoded (and then safe inside an HTML attribute).
fn query_value(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, QUERY_KEEP).to_string()
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
    let level = if v.grant.projects.len() <= 3 {
        v.grant.describe()
    } else {
        format!("up to {}", v.grant.top().name())
    };
    // The live refresh asks for the same view.
    let mut src = format!("/{root}/panels");
    if let Some(p) = &q.project {
        src.push_str(&format!(
            "?project={}&page={}",
            query_value(p),
            q.page.unwrap_or(1).max(1)
        ));
    }
    let t = DashboardT {
        chrome: Chrome::new(&root, "Dashboard", Some(&v)).section("dashboard"),
        name: v.user.name.clone(),
        level,
        src,
        p: panels_view(&st, &v, &q).await,
    };
    view::render(StatusCode::OK, &t)
}

async fn panels(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<DashQuery>,
) -> Response {
    match viewer(&st, &headers).await {
        Some(v) => view::render_fragment(&PanelsT {
            p: panels_view(&st, &v, &q).await,
        }),
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

/// The part of the build page that changes as the build goes: its buttons, archive link,
/// reason, stages, tests and files.
pub struct LiveV {
    pub root: String,
    pub project: String,
    pub name: String,
    pub status: String,
    pub final_: bool,
    pub deleted: bool,
    pub can_operate: bool,
    pub csrf: String,
    pub archive: bool,
    pub hash: String,
    pub hash_kind: String,
    pub reason: Option<String>,
    pub stages: Vec<StageV>,
    pub tests: Option<ams_core::junit::TestReport>,
    pub tests_time: String,
    pub files: Option<FilesV>,
}

pub struct StageV {
    pub name: String,
    pub result: &'static str,
    pub exit: String,
    pub started: view::Ts,
    pub duration: String,
}

pub struct FilesV {
    pub count: usize,
    pub rows: Vec<FileV>,
    pub hidden: usize,
}

pub struct FileV {
    pub path: String,
    pub size: u64,
    pub link: Option<String>,
}

/// The most archive entries the build page lists (the API lists them all).
const FILES_SHOWN: usize = 500;

async fn live_view(st: &ApiState, v: &Viewer, b: &BuildRecord) -> LiveV {
    let tests = match b.tests {
        Some(_) => st.host.store.test_report(b.id).await.ok().flatten(),
        None => None,
    };
    let files = crate::api::archive_files(st, b)
        .await
        .ok()
        .flatten()
        .map(|list| {
            let shown: Vec<&ams_archive::ArchivedFile> =
                list.iter().filter(|f| f.kind != "dir").collect();
            FilesV {
                count: list.iter().filter(|f| f.kind == "file").count(),
                hidden: shown.len().saturating_sub(FILES_SHOWN),
                rows: shown
                    .into_iter()
                    .take(FILES_SHOWN)
                    .map(|f| FileV {
                        path: f.path.clone(),
                        size: f.size,
                        link: (f.kind == "file")
                            .then(|| crate::api::file_link(&b.project, &b.name, &f.path)),
                    })
                    .collect(),
            }
        });
    LiveV {
        root: st.conf.web_root.clone(),
        project: b.project.clone(),
        name: b.name.clone(),
        status: b.status.as_str().to_string(),
        final_: b.status.is_final(),
        deleted: b.output_deleted_at.is_some(),
        can_operate: v.grant.may(Action::Operate, &b.project),
        csrf: v.csrf.clone(),
        archive: b.archive_name.is_some() && b.output_deleted_at.is_none(),
        hash: b.archive_hash.clone().unwrap_or_default(),
        hash_kind: b.archive_hash_kind.clone().unwrap_or_default(),
        reason: b.reason.clone(),
        stages: b
            .stages
            .iter()
            .map(|s| StageV {
                name: s.name.clone(),
                result: if s.passed { "pass" } else { "fail" },
                exit: s
                    .exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                started: view::Ts::at(s.started_at),
                duration: human_secs(s.duration_secs),
            })
            .collect(),
        tests_time: tests
            .as_ref()
            .map(|t| human_secs(t.totals.time_secs))
            .unwrap_or_default(),
        tests,
        files,
    }
}

#[derive(askama::Template)]
#[template(path = "build_live.html")]
struct LiveT {
    live: LiveV,
}

#[derive(askama::Template)]
#[template(path = "build.html")]
struct BuildT {
    chrome: Chrome,
    b: BuildRowV,
    started: Option<view::Ts>,
    params: Vec<(String, String)>,
    commit_html: Option<String>,
    live: LiveV,
    from: u64,
    hidden_kib: u64,
    first_line: u64,
    stream: Option<String>,
    log_html: String,
}

async fn build_page(
    State(st): State<ApiState>,
    PageViewer(v): PageViewer,
    Path((project, name)): Path<(String, String)>,
) -> Response {
    let root = st.conf.web_root.clone();
    let Some(b) = find(&st, &v, &project, &name).await else {
        return not_found(&root);
    };
    let bd = st.host.data.project(&b.project).build(&b.name);
    let len = tokio::fs::metadata(bd.log())
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let (from, text) = read_chunk(&bd.log(), len, len.saturating_sub(TAIL)).await;
    let first_line = count_lines(&bd.log(), from).await + 1;
    let t = BuildT {
        chrome: Chrome::new(&root, format!("{} #{}", b.project, b.build_index), Some(&v))
            .icon_for(b.status.as_str()),
        b: BuildRowV::of(&b),
        started: b.started_at.map(view::Ts::at),
        params: b
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        commit_html: b.commit_message.as_deref().map(esc_links),
        live: live_view(&st, &v, &b).await,
        from,
        hidden_kib: from.div_ceil(1024),
        first_line,
        stream: (!b.status.is_final())
            .then(|| format!("/{root}/build/{}/{}/stream?from={len}", b.project, b.name)),
        log_html: log_lines_html(&String::from_utf8_lossy(&text), first_line),
    };
    view::render(StatusCode::OK, &t)
}

/// The number of lines that end before byte `upto` of the log (its `\n` bytes).
async fn count_lines(path: &std::path::Path, upto: u64) -> u64 {
    use tokio::io::AsyncReadExt;
    if upto == 0 {
        return 0;
    }
    let Ok(f) = tokio::fs::File::open(path).await else {
        return 0;
    };
    let mut r = f.take(upto);
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    while let Ok(k) = r.read(&mut buf).await {
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&c| c == b'\n').count() as u64;
    }
    n
}

/// A log as numbered lines, `first` the number of its first line: each line a `span.line`
/// with an anchor (`#L120`) and its ANSI colours as classes (carried across lines). The text
/// of the lines, newlines included, is the log's text exactly.
pub fn log_lines_html(text: &str, first: u64) -> String {
    let mut out = String::with_capacity(text.len() * 2 + 64);
    let mut classes: Vec<String> = Vec::new();
    let mut n = first;
    let mut rest = text;
    while !rest.is_empty() {
        let (line, tail) = match rest.find('\n') {
            Some(i) => (&rest[..=i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let amsline = line.starts_with("[amsbuild] ");
        // Bare: the page's script adds the number links (`#L120` works without it).
        out.push_str(&format!(
            "<span class=\"line{}\" id=\"L{n}\">",
            if amsline { " amsline" } else { "" }
        ));
        out.push_str(&ansi_line(line, &mut classes));
        out.push_str("</span>");
        n += 1;
        rest = tail;
    }
    out
}

/// One line with ANSI colour codes as spans of classes; `classes` carries the colours on to
/// the next line. Every other escape sequence is dropped.
fn ansi_line(line: &str, classes: &mut Vec<String>) -> String {
    let open = |c: &[String]| {
        if c.is_empty() {
            String::new()
        } else {
            format!("<span class=\"{}\">", c.join(" "))
        }
    };
    let mut out = open(classes);
    let mut rest = line;
    while let Some(i) = rest.find('\u{1b}') {
        out.push_str(&esc_links(&rest[..i]));
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(r.len());
            let (params, tail) = r.split_at(end);
            let cmd = tail.chars().next();
            rest = tail.get(1..).unwrap_or("");
            if cmd == Some('m') {
                if !classes.is_empty() {
                    out.push_str("</span>");
                }
                for c in params.split(';').map(|p| p.parse::<u32>().unwrap_or(0)) {
                    match c {
                        0 => classes.clear(),
                        1 => classes.push("b".into()),
                        30..=37 | 90..=97 => {
                            classes.retain(|k| k == "b");
                            classes.push(format!("c{}", c % 10));
                        }
                        _ => {}
                    }
                }
                out.push_str(&open(classes));
            }
        }
    }
    out.push_str(&esc_links(rest));
    if !classes.is_empty() {
        out.push_str("</span>");
    }
    out
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
/// ending before byte `before`, as text; `x-log-start` says where it begins (0: the first line)
/// and `x-log-first-line` the number of its first line.
async fn log_chunk(
    State(st): State<ApiState>,
    v: Viewer,
    Path((project, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
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
    let first_line = count_lines(&path, start).await + 1;
    (
        [
            ("content-type", "text/plain; charset=utf-8".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            ("cache-control", "no-store".to_string()),
            ("x-log-start", start.to_string()),
            ("x-log-first-line", first_line.to_string()),
        ],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response()
}

async fn stages_fragment(
    State(st): State<ApiState>,
    v: Viewer,
    Path((project, name)): Path<(String, String)>,
) -> Response {
    match find(&st, &v, &project, &name).await {
        Some(b) => view::render_fragment(&LiveT {
            live: live_view(&st, &v, &b).await,
        }),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The live log from byte `from`, as `log` events, then one `end` event with the status.
async fn stream(
    State(st): State<ApiState>,
    v: Viewer,
    headers: HeaderMap,
    Path((project, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
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

pub(crate) fn back(to: String) -> Response {
    (StatusCode::SEE_OTHER, [("location", to)]).into_response()
}

pub(crate) fn not_found(root: &str) -> Response {
    view::render(
        StatusCode::NOT_FOUND,
        &view::MessageT {
            chrome: Chrome::new(root, "Not found", None),
            heading: "Not found",
            message: "There is nothing here, or you may not see it.",
            class: "muted",
        },
    )
}

/// A refused form, with the reason and the way back.
/// The status a refused command answers with, as `HostError` decides it.
pub(crate) fn host_status(e: &ams_host::error::HostError) -> StatusCode {
    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub(crate) fn refused(root: &str, status: StatusCode, why: &str) -> Response {
    view::render(
        status,
        &view::MessageT {
            chrome: Chrome::new(root, "Refused", None),
            heading: "Refused",
            message: why,
            class: "error",
        },
    )
}

impl Viewer {
    /// The viewer as the operations layer sees it.
    pub fn who(&self) -> crate::ops::Who<'_> {
        crate::ops::Who {
            name: &self.user.name,
            grant: &self.grant,
        }
    }
}

/// A refused operation as a page: 404 alike for what may not be seen, else the reason.
pub(crate) fn op_refused(root: &str, e: &crate::ops::OpError) -> Response {
    use crate::ops::OpError;
    match e {
        OpError::NotFound => not_found(root),
        OpError::Forbidden(m) => refused(root, StatusCode::FORBIDDEN, m),
        OpError::Bad(m) => refused(root, StatusCode::BAD_REQUEST, m),
        OpError::Host(h) => refused(root, host_status(h), &h.to_string()),
        OpError::Internal => refused(root, StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn trigger_form(
    State(st): State<ApiState>,
    Path(project): Path<String>,
    fv: FormViewer,
) -> Response {
    let root = st.conf.web_root.clone();
    let v = &fv.v;
    let opt = |k: &str| {
        fv.get(k)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
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
    let r = crate::ops::trigger(
        &st,
        v.who(),
        &project,
        opt("branch"),
        opt("commit"),
        params,
        ams_core::names::Trigger::Web,
    )
    .await;
    match r {
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
            if !matches!(e, crate::ops::OpError::NotFound) {
                let text = format!("Could not trigger a build of {project}: {e}");
                note(&st, &v.user.name, "error", &text, Some(&project), None).await;
            }
            op_refused(&root, &e)
        }
    }
}

/// The result of a build form's operation: a message for the viewer, then the build page (or
/// the reason it was refused).
async fn after_build_action(
    st: &ApiState,
    v: &Viewer,
    name: &str,
    r: Result<(String, BuildRecord), crate::ops::OpError>,
    failed: &str,
) -> Response {
    let root = &st.conf.web_root;
    match r {
        Ok((text, b)) => {
            let kind = if text.starts_with("Queued") {
                "pending"
            } else {
                "ok"
            };
            note(
                st,
                &v.user.name,
                kind,
                &text,
                Some(&b.project),
                Some(&b.name),
            )
            .await;
            back(format!("/{root}/build/{}/{}", b.project, b.name))
        }
        Err(e) => {
            if !matches!(e, crate::ops::OpError::NotFound) {
                let text = format!("Could not {failed} {name}: {e}");
                note(st, &v.user.name, "error", &text, None, None).await;
            }
            op_refused(root, &e)
        }
    }
}

/// The build page's Rebuild: the same commit again, by the viewer; on to the new build's page.
async fn rebuild_form(
    State(st): State<ApiState>,
    Path((project, name)): Path<(String, String)>,
    fv: FormViewer,
) -> Response {
    let r = crate::ops::rebuild(
        &st,
        fv.v.who(),
        Some(&project),
        &name,
        ams_core::names::Trigger::Web,
    )
    .await
    .map(|(n, b)| (format!("Queued build {} (again of {})", n.name, b.name), n));
    after_build_action(&st, &fv.v, &name, r, "rebuild").await
}

async fn cancel_form(
    State(st): State<ApiState>,
    Path((project, name)): Path<(String, String)>,
    fv: FormViewer,
) -> Response {
    let r = crate::ops::cancel(&st, fv.v.who(), Some(&project), &name)
        .await
        .map(|b| (format!("Asked build {} to cancel", b.name), b));
    after_build_action(&st, &fv.v, &name, r, "cancel").await
}

async fn delete_form(
    State(st): State<ApiState>,
    Path((project, name)): Path<(String, String)>,
    fv: FormViewer,
) -> Response {
    let r = crate::ops::delete_output(&st, fv.v.who(), Some(&project), &name)
        .await
        .map(|b| (format!("Deleted the output of {}", b.name), b));
    after_build_action(&st, &fv.v, &name, r, "delete the output of").await
}

/// A secret form's post: an ADMIN of the project (404 for a project the user cannot see).
/// A secret form's poster must be an ADMIN of the project (404 for a project it cannot see).
fn may_manage_secrets(st: &ApiState, v: &Viewer, project: &str) -> Option<Response> {
    let root = &st.conf.web_root;
    if !v.grant.may(Action::View, project) || !ams_host::project::exists(&st.host.data, project) {
        return Some(not_found(root));
    }
    if !v.grant.may(Action::ManageSecrets, project) {
        return Some(refused(
            root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN manage a project's secrets",
        ));
    }
    None
}

async fn secret_set_form(
    State(st): State<ApiState>,
    Path(project): Path<String>,
    fv: FormViewer,
) -> Response {
    let v = &fv.v;
    if let Some(r) = may_manage_secrets(&st, v, &project) {
        return r;
    }
    let name = fv.get("name").map(|n| n.trim()).unwrap_or("");
    let value = fv.get("value").unwrap_or("");
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
    Path((project, name)): Path<(String, String)>,
    fv: FormViewer,
) -> Response {
    let v = &fv.v;
    if let Some(r) = may_manage_secrets(&st, v, &project) {
        return r;
    }
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
    PageViewer(v): PageViewer,
    Path(project): Path<String>,
) -> Response {
    let root = st.conf.web_root.clone();
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
    let secrets = if v.grant.may(Action::ManageSecrets, &project) {
        Some(ams_host::secrets::list(&st.host.data, &st.host.store, &project).await)
    } else {
        None
    };
    let (secrets, secrets_error) = match secrets {
        None => (None, None),
        Some(Ok(list)) => (
            Some(
                list.into_iter()
                    .map(|s| SecretV {
                        name: s.name,
                        at: view::Ts::at(s.set_at),
                        by: s.set_by,
                    })
                    .collect(),
            ),
            None,
        ),
        Some(Err(e)) => (Some(Vec::new()), Some(e.to_string())),
    };
    let deliveries = st
        .host
        .store
        .deliveries_of(&project, 200)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|d| DeliveryV {
            id: d.id,
            at: view::Ts::at(d.received_at),
            sender: d.sender,
            event: d.event,
            delivery_id: d.delivery_id.unwrap_or_default(),
            verdict: d.verdict,
            reason: d.reason,
            builds: d.builds,
        })
        .collect();
    let notifications = st
        .host
        .store
        .notifications_of(&project, 200)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|n| NotificationV {
            at: view::Ts::at(n.created_at),
            attempts: n
                .attempts
                .iter()
                .map(|a| format!("{} ({} ms)", a.outcome, a.millis))
                .collect::<Vec<_>>()
                .join(", "),
            build: n.build_name,
            hook: n.hook,
            event: n.event,
            to: n.target_host,
            outcome: n.outcome,
        })
        .collect();
    let t = AdminT {
        chrome: Chrome::new(&root, format!("{project} administration"), Some(&v)),
        csrf: v.csrf.clone(),
        secrets,
        secrets_error,
        deliveries,
        notifications,
        project,
    };
    view::render(StatusCode::OK, &t)
}

pub struct SecretV {
    pub name: String,
    pub at: view::Ts,
    pub by: String,
}

pub struct DeliveryV {
    pub id: i64,
    pub at: view::Ts,
    pub sender: String,
    pub event: String,
    pub delivery_id: String,
    pub verdict: String,
    pub reason: Option<String>,
    pub builds: Vec<String>,
}

pub struct NotificationV {
    pub at: view::Ts,
    pub build: String,
    pub hook: String,
    pub event: String,
    pub to: String,
    pub outcome: String,
    pub attempts: String,
}

#[derive(askama::Template)]
#[template(path = "admin.html")]
struct AdminT {
    chrome: Chrome,
    project: String,
    csrf: String,
    secrets: Option<Vec<SecretV>>,
    secrets_error: Option<String>,
    deliveries: Vec<DeliveryV>,
    notifications: Vec<NotificationV>,
}

async fn replay_form(
    State(st): State<ApiState>,
    Path((project, id)): Path<(String, i64)>,
    fv: FormViewer,
) -> Response {
    let root = st.conf.web_root.clone();
    let v = &fv.v;
    match crate::ops::replay(&st, v.who(), Some(&project), id).await {
        Ok(_) => {
            let text = format!("Replayed delivery {id} of {project}");
            note(&st, &v.user.name, "ok", &text, Some(&project), None).await;
            back(format!("/{root}/admin/{project}"))
        }
        Err(crate::ops::OpError::Bad(e)) => {
            let text = format!("Could not replay delivery {id} of {project}: {e}");
            note(&st, &v.user.name, "error", &text, Some(&project), None).await;
            refused(&root, StatusCode::CONFLICT, &e)
        }
        Err(e) => op_refused(&root, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query values keep RFC 3986's unreserved characters and encode every other byte.
    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("other-00_a.b~"), "other-00_a.b~");
        assert_eq!(query_value("a b&c=d/é\"<"), "a%20b%26c%3Dd%2F%C3%A9%22%3C");
        assert_eq!(query_value(""), "");
    }

    /// Sizes in whole-number arithmetic read as `{:.1}` of the float quotient did, ties
    /// included.
    #[test]
    fn human_bytes_reads_as_the_float_formatting_did() {
        let float = |n: u64| {
            const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
            let (mut v, mut u) = (n as f64, 0);
            while v >= 1024.0 && u + 1 < UNITS.len() {
                v /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{n} B")
            } else {
                format!("{v:.1} {}", UNITS[u])
            }
        };
        let mut x: u64 = 1;
        let mut values = vec![
            0,
            1,
            1023,
            1024,
            1075,
            1280,
            1281,
            2560,
            1 << 20,
            (1 << 20) - 1,
        ];
        values.extend([u64::MAX, 1 << 40, (1 << 50) + 123, 1_048_576 * 5 / 4]);
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values.push(x >> (x % 64));
        }
        for n in values {
            assert_eq!(human_bytes(n), float(n), "{n}");
        }
    }

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
        let mut c = Vec::new();
        assert_eq!(
            ansi_line("\u{1b}[1;31mred <b>\u{1b}[0m plain & \u{1b}[2Kgone", &mut c),
            "<span class=\"b c1\">red &lt;b&gt;</span> plain &amp; gone"
        );
        assert_eq!(
            ansi_line("<script>alert(1)</script>", &mut c),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        // Colours carry on to the next line, and each line is its own numbered element whose
        // text is the log's text exactly.
        let html = log_lines_html("\u{1b}[32mgreen\nstill\u{1b}[0m\n[amsbuild] x", 7);
        assert_eq!(
            html,
            "<span class=\"line\" id=\"L7\"><span class=\"c2\">green\n</span></span>\
             <span class=\"line\" id=\"L8\"><span class=\"c2\">still</span>\n</span>\
             <span class=\"line amsline\" id=\"L9\">[amsbuild] x</span>"
        );
    }

    #[test]
    fn the_history_chart_has_one_bar_per_finished_build() {
        assert!(history_chart(&[]).bars.is_empty());
        let rec = |i: i64, status: &str, secs: f64| -> BuildRecord {
            serde_json::from_value(serde_json::json!({
                "id": i, "project": "p", "build_index": i, "name": format!("p_{i}"),
                "hash": "h", "status": status, "trigger": "cli", "created_by": "me",
                "created_at": 0.0, "started_at": 10.0, "finished_at": 10.0 + secs,
                "stages": []
            }))
            .unwrap()
        };
        // Newest first, as the store lists them; the running build has no bar.
        let builds = [
            rec(4, "running", 0.0),
            rec(3, "fail", 1.0),
            rec(2, "pass", 4.0),
            rec(1, "warn", 2.0),
        ];
        let c = history_chart(&builds);
        let order: Vec<(i64, &str)> = c.bars.iter().map(|b| (b.index, b.class)).collect();
        assert_eq!(
            order,
            [(1, "warn"), (2, "pass"), (3, "fail")],
            "oldest left"
        );
        // The longest build is the full height; the others in proportion.
        let h: Vec<f64> = c.bars.iter().map(|b| b.h.parse().unwrap()).collect();
        let full = (c.base - 10) as f64;
        assert_eq!(h[1], full);
        assert!(
            (h[0] - full / 2.0).abs() < 0.1 && (h[2] - full / 4.0).abs() < 0.1,
            "{h:?}"
        );
        assert!(
            c.desc.starts_with("3 builds: 1 passed, 1 failed"),
            "{}",
            c.desc
        );
    }
}

/// The project page's data.
pub struct ProjectV {
    pub name: String,
    pub csrf: String,
    pub can_operate: bool,
    pub can_admin: bool,
    pub latest_status: Option<String>,
    pub sample: usize,
    pub pass_rate: String,
    pub median: String,
    pub total: i64,
    pub disk: String,
    pub chart: ChartV,
    pub branches: Vec<BranchV>,
    pub schedules: Vec<ScheduleV>,
    pub schedules_error: Option<String>,
    pub webhooks: Vec<WebhookV>,
    pub webhooks_error: Option<String>,
    pub list: BuildListV,
    pub f_branch: String,
    pub f_actor: String,
    pub statuses: Vec<StatusOptV>,
    pub filtered: bool,
    /// The filters as a query prefix for the pager (`branch=x&`; the template escapes it).
    pub filter_query: String,
}

pub struct StatusOptV {
    pub value: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

pub struct BranchV {
    pub branch: String,
    pub name: String,
    pub index: i64,
    pub status: String,
    pub at: view::Ts,
}

pub struct ScheduleV {
    pub cron: String,
    pub branch: Option<String>,
    pub next: Option<view::Ts>,
    pub error: Option<String>,
}

pub struct WebhookV {
    pub name: String,
    pub branch: Option<String>,
    pub auth: String,
}

/// The history chart: one bar per finished build, oldest left, its height the duration.
pub struct ChartV {
    pub width: u32,
    pub height: u32,
    pub base: u32,
    pub bar_w: String,
    pub bars: Vec<BarV>,
    pub max_label: String,
    pub desc: String,
}

pub struct BarV {
    pub name: String,
    pub index: i64,
    pub status: String,
    pub class: &'static str,
    pub x: String,
    pub y: String,
    pub h: String,
    pub label: String,
}

/// The builds the chart and the pass rate look at.
const HISTORY: i64 = 100;

/// The chart of `builds` (newest first, as the store lists them).
pub fn history_chart(builds: &[BuildRecord]) -> ChartV {
    let (width, height, base) = (800u32, 160u32, 150u32);
    let done: Vec<&BuildRecord> = builds
        .iter()
        .rev()
        .filter(|b| b.status.is_final())
        .collect();
    let dur = |b: &BuildRecord| match (b.started_at, b.finished_at) {
        (Some(s), Some(f)) if f >= s => f - s,
        _ => 0.0,
    };
    let max = done.iter().map(|b| dur(b)).fold(0.0f64, f64::max);
    // The bars fill the width (at most 30 px each for a short history).
    let slot = width as f64 / (done.len().max(27)) as f64;
    let bar_w = slot * 0.8;
    let usable = (base - 10) as f64;
    let (mut passed, mut failed) = (0, 0);
    let bars = done
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let d = dur(b);
            let h = if max > 0.0 {
                (d / max * usable).max(2.0)
            } else {
                2.0
            };
            let status = b.status.as_str();
            let class = match status {
                "pass" | "dummy" => {
                    passed += 1;
                    "pass"
                }
                "fail" => {
                    failed += 1;
                    "fail"
                }
                "warn" => "warn",
                "error" => "error",
                _ => "other",
            };
            BarV {
                name: b.name.clone(),
                index: b.build_index,
                status: status.to_string(),
                class,
                x: format!("{:.1}", i as f64 * slot + (slot - bar_w) / 2.0),
                y: format!("{:.1}", base as f64 - h),
                h: format!("{h:.1}"),
                label: human_secs(d),
            }
        })
        .collect::<Vec<_>>();
    ChartV {
        width,
        height,
        base,
        bar_w: format!("{bar_w:.1}"),
        desc: format!(
            "{} build{}: {passed} passed, {failed} failed; the longest took {}",
            bars.len(),
            if bars.len() == 1 { "" } else { "s" },
            human_secs(max)
        ),
        bars,
        max_label: human_secs(max),
    }
}

#[derive(askama::Template)]
#[template(path = "project.html")]
struct ProjectT {
    chrome: Chrome,
    pr: ProjectV,
}

/// `/{web_root}/project/{name}`: latest status per branch, the history chart and pass rate,
/// schedules and webhooks (never a secret), disk use, and the builds with filters and pages.
async fn project_page(
    State(st): State<ApiState>,
    PageViewer(v): PageViewer,
    Path(project): Path<String>,
    Query(f): Query<BuildFilter>,
) -> Response {
    let root = st.conf.web_root.clone();
    if !v.grant.may(Action::View, &project) || !ams_host::project::exists(&st.host.data, &project) {
        return not_found(&root);
    }
    let recent = st
        .host
        .store
        .builds_of(&project, HISTORY, 0)
        .await
        .unwrap_or_default();
    let finished: Vec<&BuildRecord> = recent
        .iter()
        .filter(|b| b.status.is_final() && !matches!(b.status.as_str(), "skip" | "cancel"))
        .collect();
    let passed = finished
        .iter()
        .filter(|b| matches!(b.status.as_str(), "pass" | "dummy"))
        .count();
    let mut durations: Vec<f64> = finished
        .iter()
        .filter_map(|b| Some(b.finished_at? - b.started_at?))
        .collect();
    durations.sort_by(|a, b| a.total_cmp(b));
    let branches = st
        .host
        .store
        .latest_per_branch(&project, 20)
        .await
        .unwrap_or_default()
        .iter()
        .map(|b| BranchV {
            branch: b.branch.clone().unwrap_or_default(),
            name: b.name.clone(),
            index: b.build_index,
            status: b.status.as_str().to_string(),
            at: view::Ts::at(b.created_at),
        })
        .collect();
    let (schedules, schedules_error) = match ams_host::schedule::overview(&st.host, &project).await
    {
        Ok(list) => (
            list.into_iter()
                .map(|s| ScheduleV {
                    cron: s.cron,
                    branch: s.branch,
                    next: s.next.map(|t| view::Ts::at(t as f64)),
                    error: s.error,
                })
                .collect(),
            None,
        ),
        Err(e) => (Vec::new(), Some(e)),
    };
    let data = st.host.data.clone();
    let name = project.clone();
    let hooks = tokio::task::spawn_blocking(move || {
        ams_host::project::webhooks(&data.project(&name)).map(|(c, _)| c.in_webhooks)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let (webhooks, webhooks_error) = match hooks {
        Ok(list) => (
            list.into_iter()
                .map(|w| WebhookV {
                    auth: match (&w.secret, w.allow_unsigned) {
                        (Some(_), _) => "signature (HMAC-SHA256)".to_string(),
                        (None, true) => "no signature (allow_unsigned)".to_string(),
                        (None, false) => "no secret set: deliveries are refused".to_string(),
                    } + &format!(", {} actor(s)", w.authorized_actors.len()),
                    name: w.name,
                    branch: w.branch,
                })
                .collect(),
            None,
        ),
        Err(e) if e.ends_with(ams_host::project::NO_WEBHOOKS) => {
            (Vec::new(), Some("No webhooks.json.".to_string()))
        }
        Err(_) => (
            Vec::new(),
            Some("webhooks.json cannot be read; see the host's log.".to_string()),
        ),
    };
    let status_now = f
        .status
        .as_deref()
        .map(str::trim)
        .unwrap_or("")
        .to_ascii_lowercase();
    let statuses = [
        ("", "any"),
        ("pass", "pass"),
        ("fail", "fail"),
        ("warn", "warn"),
        ("error", "error"),
        ("running", "running"),
        ("pending", "pending"),
        ("cancel", "cancel"),
        ("skip", "skip"),
        ("dummy", "dummy"),
    ]
    .into_iter()
    .map(|(value, label)| StatusOptV {
        value,
        label,
        selected: value == status_now,
    })
    .collect();
    let filter_query: String = f
        .sql()
        .iter()
        .map(|(k, val)| {
            let key = if *k == "created_by" { "actor" } else { k };
            format!("{key}={}&", query_value(val))
        })
        .collect();
    let list = build_list(
        &st,
        &project,
        f.page.unwrap_or(1),
        (!f.is_empty()).then_some(&f),
    )
    .await;
    let pr = ProjectV {
        csrf: v.csrf.clone(),
        can_operate: v.grant.may(Action::Operate, &project),
        can_admin: v.grant.may(Action::SeeDeliveries, &project),
        latest_status: recent.first().map(|b| b.status.as_str().to_string()),
        sample: finished.len(),
        pass_rate: if finished.is_empty() {
            "–".to_string()
        } else {
            format!("{:.0} %", passed as f64 * 100.0 / finished.len() as f64)
        },
        median: durations
            .get(durations.len() / 2)
            .map(|d| human_secs(*d))
            .unwrap_or_else(|| "–".to_string()),
        total: recent.first().map(|b| b.build_index).unwrap_or(0),
        disk: st
            .host
            .metrics
            .disk_of(&project)
            .map(human_bytes)
            .unwrap_or_else(|| "…".to_string()),
        chart: history_chart(&recent),
        branches,
        schedules,
        schedules_error,
        webhooks,
        webhooks_error,
        list,
        f_branch: f.branch.clone().unwrap_or_default(),
        f_actor: f.actor.clone().unwrap_or_default(),
        statuses,
        filtered: !f.is_empty(),
        filter_query,
        name: project.clone(),
    };
    let t = ProjectT {
        chrome: Chrome::new(&root, project.as_str(), Some(&v)).section("projects"),
        pr,
    };
    view::render(StatusCode::OK, &t)
}

pub struct ProjectListRowV {
    pub name: String,
    pub latest: Option<(String, String)>,
    pub disk: String,
}

#[derive(askama::Template)]
#[template(path = "projects.html")]
struct ProjectsT {
    chrome: Chrome,
    rows: Vec<ProjectListRowV>,
}

/// `/{web_root}/projects`: the projects the viewer may see, each with its latest status.
pub async fn projects_page(State(st): State<ApiState>, PageViewer(v): PageViewer) -> Response {
    let root = st.conf.web_root.clone();
    let latest = st.host.store.latest_builds().await.unwrap_or_default();
    let rows = ams_host::project::list(&st.host.data)
        .into_iter()
        .filter(|p| v.grant.may(Action::View, p))
        .map(|p| ProjectListRowV {
            latest: latest.get(&p).map(|(_, n, s)| (n.clone(), s.clone())),
            disk: st
                .host
                .metrics
                .disk_of(&p)
                .map(human_bytes)
                .unwrap_or_else(|| "…".to_string()),
            name: p,
        })
        .collect();
    let t = ProjectsT {
        chrome: Chrome::new(&root, "Projects", Some(&v)).section("projects"),
        rows,
    };
    view::render(StatusCode::OK, &t)
}

#[derive(askama::Template)]
#[template(path = "engines.html")]
struct EnginesT {
    chrome: Chrome,
    engines: Vec<ams_host::host::EngineHealth>,
}

/// The Docker engines builds run on, their state, version, slots in use and last error
/// (SERVER ADMIN only; anyone else gets the same 404 as a missing page).
pub async fn engines_page(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    let root = st.conf.web_root.clone();
    let Some(v) = viewer(&st, &headers).await else {
        return to_login(&root, "engines");
    };
    if !v.grant.is_server_admin() {
        return not_found(&root);
    }
    let t = EnginesT {
        chrome: Chrome::new(&root, "Engines", Some(&v)),
        engines: st.host.engines.borrow().clone(),
    };
    view::render(StatusCode::OK, &t)
}
