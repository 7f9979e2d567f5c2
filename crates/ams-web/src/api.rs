//! The JSON API under `/{web_root}/api/`, with the described system's paths and shapes
//! (docs/api.md): tasks, projects, a project's info, builds and tasks, `{field}/{value}` filters
//! as path pairs, and the current user; plus POSTs to trigger, cancel and delete output.
//!
//! Authentication is by API token (`Authorization: Bearer …`). Errors are consistent: 401 when
//! not logged in, 403 when logged in without the right, 404 when unknown or not visible, so the
//! existence of a project never leaks to a user without access to it.

use crate::{auth, session};
use ams_core::access::{Action, Grant};
use ams_host::error::HostError;
use ams_host::timefmt::{self, TimeText};
use ams_host::HostHandle;
use ams_store::{BuildRecord, BuildRow, User};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

#[derive(Clone)]
pub struct ApiState {
    /// Shared: axum clones the state for every request, and a handle is a dozen channels.
    pub host: std::sync::Arc<HostHandle>,
    pub conf: std::sync::Arc<ams_core::webconf::WebConf>,
    pub guard: std::sync::Arc<crate::session::LoginGuard>,
    pub lists: std::sync::Arc<ListCache>,
}

/// Build-list responses of the current data generation (`Store::generation`): scripts
/// and dashboards that poll the same page are answered without a query until something
/// changes. Emptied whenever the generation moves; bounded in entries and bytes.
#[derive(Debug, Default)]
pub struct ListCache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    generation: u64,
    bytes: usize,
    entries: HashMap<String, axum::body::Bytes>,
}

impl ListCache {
    pub const MAX_ENTRIES: usize = 64;
    pub const MAX_BYTES: usize = 2 << 20;

    fn get(&self, generation: u64, key: &str) -> Option<axum::body::Bytes> {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (c.generation == generation)
            .then(|| c.entries.get(key).cloned())
            .flatten()
    }

    fn put(&self, generation: u64, key: String, body: axum::body::Bytes) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.generation != generation {
            if generation < c.generation {
                return; // made from older data than the cache holds
            }
            *c = CacheInner {
                generation,
                ..Default::default()
            };
        }
        // Requests that missed together all store the same page: a page stored again takes
        // the place (and the bytes) of the one before, or those requests would fill the
        // bound and keep every other page out until the generation moves.
        let old = c.entries.get(&key).map(|b| b.len());
        let entries = c.entries.len() + usize::from(old.is_none());
        let bytes = c.bytes - old.unwrap_or(0) + body.len();
        if entries > Self::MAX_ENTRIES || bytes > Self::MAX_BYTES {
            return;
        }
        c.bytes = bytes;
        c.entries.insert(key, body);
    }
}

/// An API error with its status; never shows internals.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized,
    Forbidden(String),
    NotFound,
    Bad(String),
    /// The database cannot take the change now (a full disk, say): 503 with the reason.
    Unavailable(String),
    Internal,
    /// A command the host refused: the status is the one `HostError` decides.
    Host(HostError),
    /// A request axum or a body reader refused (415, 413, 400…), with its reason.
    Rejected(StatusCode, String),
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        ApiError::Host(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "not logged in".to_string()),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not found".to_string()),
            ApiError::Bad(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error".to_string(),
            ),
            ApiError::Rejected(code, m) => (code, m),
            ApiError::Host(e) => (
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                e.to_string(),
            ),
        };
        let mut r = (code, Json(json!({"error": msg}))).into_response();
        if code == StatusCode::UNAUTHORIZED {
            if let Ok(v) = "Bearer".parse() {
                r.headers_mut().insert("WWW-Authenticate", v);
            }
        }
        r
    }
}

/// An optional JSON body: none (or only white space) is `None`; a body must come with
/// `Content-Type: application/json` (else 415) and be JSON (else 400). Refusals are
/// [`ApiError`]s, so they answer `{"error": …}` like every other API error.
pub struct OptionalJson(pub Option<Value>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for OptionalJson {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, st: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let essence = v
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                essence == "application/json"
                    || (essence.starts_with("application/") && essence.ends_with("+json"))
            })
            .unwrap_or(false);
        let bytes = axum::body::Bytes::from_request(req, st)
            .await
            .map_err(|e| ApiError::Rejected(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        if !json_type {
            return Err(ApiError::Rejected(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with `Content-Type: application/json`".into(),
            ));
        }
        serde_json::from_slice(&bytes)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| ApiError::Bad(format!("the body is not valid JSON: {e}")))
    }
}

/// Every API error is JSON `{"error": …}`. The handlers' own errors are [`ApiError`]s; this
/// wraps what axum answers by itself: its extractors' rejections (a bad path parameter or
/// query), the 405 of a method a path does not take (axum adds its `Allow` afterwards) and anything else
/// that is not JSON already. Successful answers pass untouched.
async fn json_errors(r: Response) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let status = r.status();
    let is_json = r
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let msg = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.insert(
        CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(
        parts,
        axum::body::Body::from(json!({ "error": msg }).to_string()),
    )
}

/// Paths under the API that it does not serve.
async fn api_not_found() -> ApiError {
    ApiError::NotFound
}

/// The authenticated caller.
pub struct Caller {
    pub user: User,
    pub grant: Grant,
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &ApiState) -> Result<Self, Self::Rejection> {
        let bearer = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let user = if let Some(token) = bearer {
            st.host
                .store
                .token_user(&auth::token_hash(token), timefmt::now())
                .await
                .map_err(|_| ApiError::Internal)?
                .ok_or(ApiError::Unauthorized)?
        } else {
            let tls = st.conf.use_ssl;
            let (user, csrf) = session::lookup(st, &parts.headers)
                .await
                .ok_or(ApiError::Unauthorized)?;
            // A cookie is sent by the browser on its own: changes need the CSRF token too.
            if !matches!(parts.method.as_str(), "GET" | "HEAD") {
                let sent = parts
                    .headers
                    .get("x-csrf-token")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !session::secrets_equal(sent, &csrf)
                    || !session::same_origin(&parts.headers, tls)
                {
                    return Err(ApiError::Forbidden("missing or wrong CSRF token".into()));
                }
            }
            parts.extensions.insert(CsrfToken(csrf));
            user
        };
        let grant = user.grant.clone();
        if !grant.can_log_in() {
            return Err(ApiError::Forbidden(format!(
                "{} accounts cannot use the API",
                grant.top().name()
            )));
        }
        Ok(Caller { user, grant })
    }
}

/// The session's CSRF token, for pages that render forms.
#[derive(Debug, Clone)]
pub struct CsrfToken(pub String);

impl From<crate::ops::OpError> for ApiError {
    fn from(e: crate::ops::OpError) -> Self {
        use crate::ops::OpError;
        match e {
            OpError::NotFound => ApiError::NotFound,
            OpError::Forbidden(m) => ApiError::Forbidden(m),
            OpError::Bad(m) => ApiError::Bad(m),
            OpError::Host(h) => ApiError::Host(h),
            OpError::Internal => ApiError::Internal,
        }
    }
}

impl Caller {
    /// The caller as the operations layer sees it.
    pub fn who(&self) -> crate::ops::Who<'_> {
        crate::ops::Who {
            name: &self.user.name,
            grant: &self.grant,
        }
    }
}

pub fn router(state: ApiState, web_root: &str) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(openapi))
        .route("/user", get(user))
        .route("/tasks", get(tasks))
        .route("/tasks/{*rest}", get(tasks_filtered))
        .route("/projects", get(projects))
        .route("/projects/name/{name}", get(project))
        .route("/projects/name/{name}/build", post(trigger))
        .route("/projects/name/{name}/{*rest}", get(project_part))
        .route("/projects/name/{name}/deliveries", get(deliveries))
        .route("/projects/name/{name}/notifications", get(notifications))
        .route("/projects/name/{name}/secrets", get(secrets_list))
        .route(
            "/projects/name/{name}/secrets/{secret}",
            put(secret_put).delete(secret_delete),
        )
        .route("/deliveries/{id}/replay", post(replay))
        .route("/builds/{name}/cancel", post(cancel))
        .route("/builds/{name}/rebuild", post(rebuild))
        .route(
            "/projects/name/{name}/builds/{build}/rebuild",
            post(rebuild_in_project),
        )
        .route("/builds/{name}/delete-output", post(delete_output))
        .route("/builds/{name}/tests", get(build_tests))
        .route("/builds/{name}/files", get(build_files))
        .route(
            "/projects/name/{name}/builds/{build}/cancel",
            post(cancel_in_project),
        )
        .route(
            "/projects/name/{name}/builds/{build}/delete-output",
            post(delete_output_in_project),
        )
        .fallback(api_not_found)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state);
    Router::new().nest(&format!("/{web_root}/api"), api)
}

/// Login, logout and the start page.
pub fn pages_router(state: ApiState, web_root: &str) -> Router {
    Router::new()
        .route(
            &format!("/{web_root}/login"),
            get(session::login_page).post(session::login),
        )
        .route(&format!("/{web_root}/logout"), post(session::logout))
        .with_state(state)
}

/// `GET /healthz`, without authentication: 200 when the database and the Docker engine answer,
/// 503 with the reason otherwise (for load balancers and service monitors).
pub fn health_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz(State(st): State<ApiState>) -> Response {
    let database = match st.host.store.ping().await {
        Ok(()) => "ok",
        Err(_) => "the database does not answer",
    };
    let engine = match st.host.engine.borrow().up {
        Some(true) => "ok",
        Some(false) => "the Docker engine is not answering; builds that need it wait for it",
        None => "the Docker engine has not answered yet",
    };
    let ok = database == "ok" && engine == "ok";
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("cache-control", "no-store")],
        Json(json!({
            "status": if ok { "ok" } else { "unavailable" },
            "database": database,
            "engine": engine,
        })),
    )
        .into_response()
}

/// Every (method, path) the API router serves, as the OpenAPI document names them. A unit
/// test holds the document to this list, and an integration test calls every path.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/openapi.json"),
    ("get", "/user"),
    ("get", "/tasks"),
    ("get", "/tasks/{list}"),
    ("get", "/projects"),
    ("get", "/projects/name/{name}"),
    ("get", "/projects/name/{name}/project_info"),
    ("get", "/projects/name/{name}/builds"),
    ("get", "/projects/name/{name}/tasks"),
    ("get", "/projects/name/{name}/deliveries"),
    ("get", "/projects/name/{name}/notifications"),
    ("get", "/projects/name/{name}/secrets"),
    ("put", "/projects/name/{name}/secrets/{secret}"),
    ("delete", "/projects/name/{name}/secrets/{secret}"),
    ("post", "/projects/name/{name}/build"),
    ("post", "/builds/{name}/cancel"),
    ("post", "/builds/{name}/rebuild"),
    ("post", "/projects/name/{name}/builds/{build}/rebuild"),
    ("post", "/builds/{name}/delete-output"),
    ("get", "/builds/{name}/tests"),
    ("get", "/builds/{name}/files"),
    ("post", "/projects/name/{name}/builds/{build}/cancel"),
    ("post", "/projects/name/{name}/builds/{build}/delete-output"),
    ("post", "/deliveries/{id}/replay"),
];

pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

fn iso_opt(t: Option<f64>) -> Value {
    t.map(|t| json!(timefmt::iso(t))).unwrap_or(Value::Null)
}

/// A build in the described system's shape, with ISO 8601 times and our fields beside it.
/// Serialized straight from the row (no intermediate map, no allocation of its own) on the hot
/// list path.
#[derive(serde::Serialize)]
pub struct BuildJson<'a> {
    name: &'a str,
    hash: &'a str,
    git_hash: Option<&'a str>,
    build_id: i64,
    status: &'a str,
    created_by: &'a str,
    created_at: TimeText,
    canceled_by: Option<&'a str>,
    canceled_at: Option<TimeText>,
    #[serde(rename = "7z_link")]
    archive_link: Option<BuildPath<'a>>,
    #[serde(rename = "7z_hash")]
    archive_hash: Option<&'a str>,
    output_log: BuildPath<'a>,
    project: &'a str,
    trigger: &'a str,
    /// The described system's word for the trigger (`webhook`, `www_interface`).
    trigger_method: &'a str,
    /// The described system's word for the status (`warning`, `DEBUG-DUMMY-BUILD`).
    legacy_status: &'static str,
    branch: Option<&'a str>,
    commit: Option<&'a str>,
    reason: Option<&'a str>,
    stages: &'a [ams_store::StageResult],
    created_at_iso: TimeText,
    started_at_iso: Option<TimeText>,
    finished_at_iso: Option<TimeText>,
    canceled_at_iso: Option<TimeText>,
    /// When the build's folder, log and archive were deleted (delete-output or retention).
    output_deleted_at_iso: Option<TimeText>,
    /// The totals of its JUnit test reports, when the pipeline names any.
    tests: Option<&'a ams_core::junit::TestTotals>,
}

/// `{prefix}/{project}/{build}`, a build's address under the API, written straight into the
/// JSON.
struct BuildPath<'a>(&'static str, &'a str, &'a str);

impl serde::Serialize for BuildPath<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/{}/{}", self.0, self.1, self.2))
    }
}

impl<'a> BuildJson<'a> {
    pub fn new(
        b: BuildRow<'a>,
        stages: &'a [ams_store::StageResult],
        tests: Option<&'a ams_core::junit::TestTotals>,
    ) -> BuildJson<'a> {
        BuildJson {
            name: b.name,
            hash: b.hash,
            git_hash: b.git_hash,
            build_id: b.build_index,
            status: b.status.as_str(),
            created_by: b.created_by,
            created_at: timefmt::legacy_text(b.created_at),
            canceled_by: b.canceled_by,
            canceled_at: b.canceled_at.map(timefmt::legacy_text),
            archive_link: b.archive_name.map(|_| BuildPath("dl", b.project, b.name)),
            archive_hash: b.archive_hash,
            output_log: BuildPath("output", b.project, b.name),
            project: b.project,
            trigger: b.trigger,
            trigger_method: ams_core::names::Trigger::parse(b.trigger)
                .map(ams_core::compat::trigger_method)
                .unwrap_or(b.trigger),
            legacy_status: ams_core::compat::legacy_status(b.status),
            branch: b.branch,
            commit: b.commit,
            reason: b.reason,
            stages,
            created_at_iso: timefmt::iso_text(b.created_at),
            started_at_iso: b.started_at.map(timefmt::iso_text),
            finished_at_iso: b.finished_at.map(timefmt::iso_text),
            canceled_at_iso: b.canceled_at.map(timefmt::iso_text),
            output_deleted_at_iso: b.output_deleted_at.map(timefmt::iso_text),
            tests,
        }
    }
}

impl<'a> From<&'a BuildRecord> for BuildJson<'a> {
    fn from(b: &'a BuildRecord) -> Self {
        BuildJson::new(b.row(), &b.stages, b.tests.as_ref())
    }
}

pub fn build_json(b: &BuildRecord) -> Value {
    serde_json::to_value(BuildJson::from(b)).unwrap_or(Value::Null)
}

fn task_json(b: &BuildRecord) -> Value {
    json!({
        "task_name": b.name, "task_hash": b.hash, "project": b.project,
        "created_by": b.created_by, "created_at": timefmt::legacy(b.created_at),
        "started_at": b.started_at.map(|t| json!(t)).unwrap_or(json!(-1)),
        "created_at_iso": timefmt::iso(b.created_at), "started_at_iso": iso_opt(b.started_at),
    })
}

/// Keeps the items whose fields equal the values of `pairs` (`field/value/field/value`). A
/// status may be given in either system's word (`warn` or `warning`).
fn filter(items: Vec<Value>, pairs: &[&str]) -> Result<Vec<Value>, ApiError> {
    if !pairs.len().is_multiple_of(2) {
        return Err(ApiError::Bad("filters come in field/value pairs".into()));
    }
    let same = |field: &str, have: &str, want: &str| {
        have == want
            || (matches!(field, "status" | "legacy_status")
                && ams_core::compat::parse_status_word(have).is_some()
                && ams_core::compat::parse_status_word(have)
                    == ams_core::compat::parse_status_word(want))
    };
    Ok(items
        .into_iter()
        .filter(|it| {
            pairs.chunks(2).all(|p| match it.get(p[0]) {
                Some(Value::String(s)) => same(p[0], s, p[1]),
                Some(Value::Null) => p[1] == "null",
                Some(Value::Number(n)) => n.to_string() == p[1],
                Some(Value::Bool(b)) => b.to_string() == p[1],
                Some(_) => false,
                None => false,
            })
        })
        .collect())
}

/// `?compat=python`: the described system's API shapes for the caller that asks, so its
/// clients read what they read there: a filtered list that matches exactly one item is that
/// item, and `status` holds its words (`warning`, `DEBUG-DUMMY-BUILD`). Without it our shapes
/// stay as they are (a list is always a list). Any other value is 400.
fn compat_python(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("compat").map(String::as_str) {
        None => Ok(false),
        Some("python") => Ok(true),
        Some(other) => Err(ApiError::Bad(format!(
            "compat takes `python` (the described system's API shapes), not `{}`",
            ams_core::error::clip(other, 64)
        ))),
    }
}

/// A filtered list as the caller asked: under `?compat=python` one match is the item itself,
/// and builds carry the described system's status words.
fn shaped(list: Vec<Value>, filtered: bool, python: bool) -> Value {
    if !python {
        return Value::Array(list);
    }
    let mut list: Vec<Value> = list
        .into_iter()
        .map(|mut v| {
            if let Some(w) = v.get("legacy_status").cloned() {
                v["status"] = w;
            }
            v
        })
        .collect();
    if filtered && list.len() == 1 {
        list.pop().unwrap_or(Value::Null)
    } else {
        Value::Array(list)
    }
}

fn segments(rest: &str) -> Vec<&str> {
    rest.split('/').filter(|s| !s.is_empty()).collect()
}

/// The caller: `level` and `level_name` are the highest level held (the described system had
/// one), `projects` the project names, `levels` the level on each.
async fn user(c: Caller) -> Json<Value> {
    let top = c.grant.top();
    let levels: serde_json::Map<String, Value> = c
        .grant
        .projects
        .iter()
        .map(|(p, l)| {
            (
                p.clone(),
                json!({"level": u8::from(*l), "level_name": l.name()}),
            )
        })
        .collect();
    Json(json!({
        "name": c.user.name,
        "level": u8::from(top),
        "level_name": top.name(),
        "server_admin": c.grant.is_server_admin(),
        "projects": c.grant.projects.keys().collect::<Vec<_>>(),
        "levels": levels,
    }))
}

async fn visible_tasks(st: &ApiState, c: &Caller) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let snap = st.host.snapshot().await.map_err(|_| ApiError::Internal)?;
    let vis = |b: &&BuildRecord| c.grant.may(Action::View, &b.project);
    Ok((
        snap.active.iter().filter(vis).map(task_json).collect(),
        snap.pending.iter().filter(vis).map(task_json).collect(),
    ))
}

async fn tasks(State(st): State<ApiState>, c: Caller) -> Result<Json<Value>, ApiError> {
    let (active, pending) = visible_tasks(&st, &c).await?;
    Ok(Json(json!({"active": active, "pending": pending})))
}

async fn tasks_filtered(
    State(st): State<ApiState>,
    c: Caller,
    Path(rest): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let python = compat_python(&q)?;
    let seg = segments(&rest);
    let (active, pending) = visible_tasks(&st, &c).await?;
    let list = match seg.first() {
        Some(&"active") => active,
        Some(&"queued") | Some(&"pending") => pending,
        _ => return Err(ApiError::NotFound),
    };
    Ok(Json(shaped(
        filter(list, &seg[1..])?,
        seg.len() > 1,
        python,
    )))
}

async fn projects(State(st): State<ApiState>, c: Caller) -> Json<Value> {
    let list: Vec<Value> = ams_host::project::list(&st.host.data)
        .into_iter()
        .filter(|p| c.grant.may(Action::View, p))
        .map(|p| json!({"name": p, "base_path": st.host.data.project(&p).root}))
        .collect();
    Json(Value::Array(list))
}

/// The project if the caller may see it; otherwise 404, whether it exists or not.
fn visible(st: &ApiState, c: &Caller, name: &str) -> Result<(), ApiError> {
    if ams_host::project::exists(&st.host.data, name) && c.grant.may(Action::View, name) {
        Ok(())
    } else {
        Err(ApiError::NotFound)
    }
}

async fn project_info(st: &ApiState, name: &str) -> Result<Value, ApiError> {
    let info = st
        .host
        .store
        .project_info(name)
        .await
        .map_err(|_| ApiError::Internal)?;
    Ok(match info {
        Some(i) => json!({"ProjectName": name, "latest_build_index": i.latest_build_index,
            "latest_build_key": i.latest_build_key, "last_created_time": i.last_created_time,
            "last_execute_time": i.last_execute_time, "last_complete_time": i.last_complete_time}),
        None => json!({"ProjectName": name, "latest_build_index": 0, "latest_build_key": null,
            "last_created_time": null, "last_execute_time": null, "last_complete_time": null}),
    })
}

async fn project_tasks(st: &ApiState, c: &Caller, name: &str) -> Result<Value, ApiError> {
    let (active, pending) = visible_tasks(st, c).await?;
    let mine =
        |l: Vec<Value>| -> Vec<Value> { l.into_iter().filter(|t| t["project"] == name).collect() };
    Ok(json!({"active": mine(active), "pending": mine(pending)}))
}

/// Builds newest first, a page at a time: `?page=1&per_page=50&fields=name,status`.
/// `?per_page=` (1 to 500, default 50) and `?page=` (from 1) as (limit, offset).
/// The highest page number a list accepts (past the end, a page is simply empty).
pub const MAX_PAGE: i64 = 1_000_000;

fn page_args(q: &HashMap<String, String>) -> (i64, i64) {
    let per_page: i64 = q
        .get("per_page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
        .clamp(1, 500);
    let page: i64 = q
        .get("page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, MAX_PAGE);
    (per_page, (page - 1).saturating_mul(per_page))
}

/// (column, value) filters that SQL applies.
type ColumnFilters<'a> = Vec<(&'static str, &'a str)>;

/// Splits `field/value` pairs into those SQL can apply (columns) and the rest.
fn split_filters<'a>(pairs: &[&'a str]) -> Result<(ColumnFilters<'a>, Vec<&'a str>), ApiError> {
    if !pairs.len().is_multiple_of(2) {
        return Err(ApiError::Bad("filters come in field/value pairs".into()));
    }
    let mut sql = Vec::new();
    let mut rest = Vec::new();
    for p in pairs.chunks(2) {
        // A status in either system's word is the status column's word.
        if matches!(p[0], "status" | "legacy_status") {
            if let Some(st) = ams_core::compat::parse_status_word(p[1]) {
                sql.push(("status", st.as_str()));
                continue;
            }
        }
        match ams_store::BUILD_FILTER_COLUMNS
            .iter()
            .find(|(field, _)| *field == p[0])
        {
            Some((_, col)) => sql.push((*col, p[1])),
            None => rest.extend_from_slice(p),
        }
    }
    Ok((sql, rest))
}

/// Room for one build's JSON in a list (a build of the benchmark's is about 1 KB).
const BUILD_JSON_BYTES: usize = 1280;

/// The common case of a build list, all fields and column filters only: from [`ListCache`], or
/// serialized straight from the records. `None` when the general path is needed.
async fn builds_direct(
    st: &ApiState,
    name: &str,
    q: &HashMap<String, String>,
    pairs: &[&str],
) -> Option<Result<Response, ApiError>> {
    if q.contains_key("fields") {
        return None;
    }
    let (sql, rest) = match split_filters(pairs) {
        Ok(x) => x,
        Err(e) => return Some(Err(e)),
    };
    if !rest.is_empty() {
        return None;
    }
    let (per_page, skip) = page_args(q);
    let key = format!("{name}\u{0}{sql:?}\u{0}{per_page}\u{0}{skip}");
    // Read before the query: the data seen is at least this new.
    let generation = st.host.store.generation();
    let json = [("content-type", "application/json")];
    if let Some(body) = st.lists.get(generation, &key) {
        return Some(Ok((json, body).into_response()));
    }
    // One allocation for the page: a build is about 1 KB of JSON, and growing the buffer from
    // serde_json's default by doubling copied each page several times. Each build is written
    // straight from SQLite's row.
    let mut buf = Vec::with_capacity(64 + per_page as usize * BUILD_JSON_BYTES);
    buf.push(b'[');
    let written = st
        .host
        .store
        .builds_where_fold(name, &sql, per_page, skip, Ok(buf), |out, b| {
            if let Ok(buf) = out {
                if buf.len() > 1 {
                    buf.push(b',');
                }
                let (stages, tests) = (b.stages(), b.tests());
                let one = BuildJson::new(b.row, &stages, tests.as_ref());
                if let Err(e) = serde_json::to_writer(&mut *buf, &one) {
                    *out = Err(e);
                }
            }
        })
        .await;
    Some(match written {
        Ok(Ok(mut bytes)) => {
            bytes.push(b']');
            // The cache counts a page's length, so it keeps no spare capacity.
            bytes.shrink_to_fit();
            let body = axum::body::Bytes::from(bytes);
            st.lists.put(generation, key, body.clone());
            Ok((json, body).into_response())
        }
        Ok(Err(_)) | Err(_) => Err(ApiError::Internal),
    })
}

async fn builds(
    st: &ApiState,
    name: &str,
    q: &HashMap<String, String>,
    pairs: &[&str],
) -> Result<Value, ApiError> {
    let (per_page, skip) = page_args(q);
    let (sql, rest) = split_filters(pairs)?;
    let list: Vec<Value> = if rest.is_empty() {
        // Every filter is a column: SQL filters and cuts the page.
        st.host
            .store
            .builds_where(name, &sql, per_page, skip)
            .await
            .map_err(|_| ApiError::Internal)?
            .iter()
            .map(build_json)
            .collect()
    } else {
        // Other fields are matched on the JSON, reading the builds in bounded chunks, so memory
        // stays flat however many builds there are.
        const CHUNK: i64 = 500;
        let mut out = Vec::new();
        let mut matched = 0i64;
        let mut offset = 0;
        loop {
            let chunk = st
                .host
                .store
                .builds_where(name, &sql, CHUNK, offset)
                .await
                .map_err(|_| ApiError::Internal)?;
            let n = chunk.len() as i64;
            for v in filter(chunk.iter().map(build_json).collect(), &rest)? {
                if matched >= skip {
                    out.push(v);
                }
                matched += 1;
                if out.len() as i64 >= per_page {
                    break;
                }
            }
            offset += CHUNK;
            if n < CHUNK || out.len() as i64 >= per_page {
                break;
            }
        }
        out
    };
    Ok(Value::Array(match q.get("fields") {
        Some(f) => {
            let keep: Vec<&str> = f.split(',').map(str::trim).collect();
            list.into_iter()
                .map(|b| {
                    let m: Map<String, Value> = b
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| keep.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    Value::Object(m)
                })
                .collect()
        }
        None => list,
    }))
}

async fn project(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    visible(&st, &c, &name)?;
    let python = compat_python(&q)?;
    let builds = match builds(&st, &name, &q, &[]).await? {
        Value::Array(l) => shaped(l, false, python),
        other => other,
    };
    Ok(Json(json!({
        "name": name,
        "base_path": st.host.data.project(&name).root,
        "project_info": project_info(&st, &name).await?,
        "builds": builds,
        "tasks": project_tasks(&st, &c, &name).await?,
    })))
}

async fn project_part(
    State(st): State<ApiState>,
    c: Caller,
    Path((name, rest)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    visible(&st, &c, &name)?;
    let python = compat_python(&q)?;
    let seg = segments(&rest);
    Ok(Json(match seg.first() {
        Some(&"project_info") if seg.len() == 1 => project_info(&st, &name).await?,
        Some(&"builds") | Some(&"build") => {
            if !python {
                if let Some(r) = builds_direct(&st, &name, &q, &seg[1..]).await {
                    return r;
                }
            }
            let list = builds(&st, &name, &q, &seg[1..]).await?;
            match list {
                Value::Array(l) => shaped(l, seg.len() > 1, python),
                other => other,
            }
        }
        Some(&"tasks") if seg.len() == 1 => project_tasks(&st, &c, &name).await?,
        Some(&"tasks") => {
            let t = project_tasks(&st, &c, &name).await?;
            let list = match seg.get(1) {
                Some(&"active") => t["active"].clone(),
                Some(&"queued") | Some(&"pending") => t["pending"].clone(),
                _ => return Err(ApiError::NotFound),
            };
            shaped(
                filter(list.as_array().cloned().unwrap_or_default(), &seg[2..])?,
                seg.len() > 2,
                python,
            )
        }
        _ => return Err(ApiError::NotFound),
    })
    .into_response())
}

/// ADMIN and SERVER ADMIN see a project's webhook deliveries and notifications.
fn admin(st: &ApiState, c: &Caller, project: &str) -> Result<(), ApiError> {
    allowed(
        st,
        c,
        project,
        Action::SeeDeliveries,
        "only ADMIN and SERVER ADMIN see deliveries and notifications",
    )
}

/// The caller may see `project` (else 404) and do `action` on it (else 403 with `why`).
fn allowed(
    st: &ApiState,
    c: &Caller,
    project: &str,
    action: Action,
    why: &str,
) -> Result<(), ApiError> {
    visible(st, c, project)?;
    if c.grant.may(action, project) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(why.into()))
    }
}

fn limit(q: &HashMap<String, String>) -> i64 {
    q.get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .clamp(1, 1000)
}

async fn deliveries(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    admin(&st, &c, &name)?;
    let d = st
        .host
        .store
        .deliveries_of(&name, limit(&q))
        .await
        .map_err(|_| ApiError::Internal)?;
    Ok(Json(json!(d)))
}

async fn notifications(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    admin(&st, &c, &name)?;
    let n = st
        .host
        .store
        .notifications_of(&name, limit(&q))
        .await
        .map_err(|_| ApiError::Internal)?;
    Ok(Json(json!(n)))
}

async fn replay(
    State(st): State<ApiState>,
    c: Caller,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let (_, v) = crate::ops::replay(&st, c.who(), None, id).await?;
    Ok(Json(v))
}

/// ADMIN and SERVER ADMIN manage a project's secrets; no answer ever holds a value.
fn secret_keeper(st: &ApiState, c: &Caller, project: &str) -> Result<(), ApiError> {
    allowed(
        st,
        c,
        project,
        Action::ManageSecrets,
        "only ADMIN and SERVER ADMIN manage a project's secrets",
    )
}

/// A secret as listed: its name, when and by whom it was set.
pub fn secret_json(s: &ams_store::SecretInfo) -> Value {
    json!({"name": s.name, "set_at": timefmt::iso(s.set_at), "set_by": s.set_by})
}

async fn secrets_list(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    secret_keeper(&st, &c, &name)?;
    let list = ams_host::secrets::list(&st.host.data, &st.host.store, &name).await?;
    Ok(Json(Value::Array(list.iter().map(secret_json).collect())))
}

/// `PUT` with `{"value": "…"}` (`Content-Type: application/json`): sets or replaces the
/// secret. The answer names it only.
async fn secret_put(
    State(st): State<ApiState>,
    c: Caller,
    Path((name, secret)): Path<(String, String)>,
    OptionalJson(body): OptionalJson,
) -> Result<Json<Value>, ApiError> {
    secret_keeper(&st, &c, &name)?;
    let value = body
        .as_ref()
        .and_then(|v| v.get("value"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::Bad("send the value as a JSON object: {\"value\": \"…\"}".into())
        })?;
    ams_host::secrets::set(
        &st.host.data,
        &st.host.store,
        &name,
        &secret,
        value,
        &c.user.name,
    )
    .await?;
    tracing::info!("secret {secret} of project {name} set by {}", c.user.name);
    let list = ams_host::secrets::list(&st.host.data, &st.host.store, &name).await?;
    let set = list
        .iter()
        .find(|s| s.name == secret)
        .map(secret_json)
        .unwrap_or_else(|| json!({"name": secret}));
    Ok(Json(set))
}

async fn secret_delete(
    State(st): State<ApiState>,
    c: Caller,
    Path((name, secret)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    secret_keeper(&st, &c, &name)?;
    ams_host::secrets::remove(&st.host.data, &st.host.store, &name, &secret).await?;
    tracing::info!(
        "secret {secret} of project {name} removed by {}",
        c.user.name
    );
    Ok(Json(json!({"removed": secret})))
}

async fn trigger(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
    OptionalJson(body): OptionalJson,
) -> Result<Response, ApiError> {
    crate::ops::may_operate(c.who(), &name)?;
    let b = body.unwrap_or(Value::Null);
    if !(b.is_null() || b.is_object()) {
        return Err(ApiError::Bad(
            "the body is a JSON object: {\"branch\": …} or {\"commit\": …}".into(),
        ));
    }
    for k in ["branch", "commit"] {
        if !matches!(b.get(k), None | Some(Value::Null) | Some(Value::String(_))) {
            return Err(ApiError::Bad(format!("`{k}` must be a string")));
        }
    }
    let params = match b.get("params") {
        None | Some(Value::Null) => Default::default(),
        Some(p) => serde_json::from_value(p.clone()).map_err(|_| {
            ApiError::Bad("`params` is an object of NAME: \"value\" strings".into())
        })?,
    };
    let s = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_string);
    let r = crate::ops::trigger(
        &st,
        c.who(),
        &name,
        s("branch"),
        s("commit"),
        params,
        ams_core::names::Trigger::Api,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"build": build_json(&r)}))).into_response())
}

async fn cancel_build(
    st: ApiState,
    c: Caller,
    project: Option<&str>,
    name: &str,
) -> Result<Json<Value>, ApiError> {
    let b = crate::ops::cancel(&st, c.who(), project, name).await?;
    Ok(Json(json!({"build": build_json(&b)})))
}

async fn rebuild_build(
    st: ApiState,
    c: Caller,
    project: Option<&str>,
    name: &str,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (b, _) =
        crate::ops::rebuild(&st, c.who(), project, name, ams_core::names::Trigger::Api).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"build": build_json(&b)}))))
}

async fn rebuild(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    rebuild_build(st, c, None, &name).await
}

async fn rebuild_in_project(
    State(st): State<ApiState>,
    c: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    rebuild_build(st, c, Some(&project), &name).await
}

async fn delete_build_output(
    st: ApiState,
    c: Caller,
    project: Option<&str>,
    name: &str,
) -> Result<Json<Value>, ApiError> {
    crate::ops::delete_output(&st, c.who(), project, name).await?;
    Ok(Json(json!({"ok": true})))
}

async fn cancel(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    cancel_build(st, c, None, &name).await
}

async fn delete_output(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    delete_build_output(st, c, None, &name).await
}

async fn cancel_in_project(
    State(st): State<ApiState>,
    c: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    cancel_build(st, c, Some(&project), &name).await
}

async fn delete_output_in_project(
    State(st): State<ApiState>,
    c: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_build_output(st, c, Some(&project), &name).await
}

/// A build the caller may see, by name; `?project=` picks one when the name alone is ambiguous.
async fn viewable_build(
    st: &ApiState,
    c: &Caller,
    name: &str,
    q: &HashMap<String, String>,
) -> Result<BuildRecord, ApiError> {
    let project = q.get("project").map(String::as_str);
    Ok(crate::ops::visible_build(st, c.who(), project, name).await?)
}

/// `GET api/builds/{name}/tests`: the build's test report (totals, failed tests with their
/// messages, unreadable report files); `"report": null` when it read none.
async fn build_tests(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let b = viewable_build(&st, &c, &name, &q).await?;
    let report = st
        .host
        .store
        .test_report(b.id)
        .await
        .map_err(|_| ApiError::Internal)?;
    Ok(Json(
        json!({"build": b.name, "project": b.project, "report": report}),
    ))
}

/// The entries of a build's 7z archive (`None`: it has none), read from the archive's header.
pub async fn archive_files(
    st: &ApiState,
    b: &BuildRecord,
) -> Result<Option<Vec<ams_archive::ArchivedFile>>, ApiError> {
    if b.archive_name.is_none() || b.output_deleted_at.is_some() {
        return Ok(None);
    }
    let path = st.host.data.project(&b.project).build(&b.name).archive;
    tokio::task::spawn_blocking(move || match ams_archive::list(&path) {
        Ok(files) => Ok(Some(files)),
        Err(ams_archive::ArchiveError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => {
            tracing::warn!("cannot list {}: {e}", path.display());
            Err(ApiError::Internal)
        }
    })
    .await
    .map_err(|_| ApiError::Internal)?
}

/// `GET api/builds/{name}/files`: the files of the build's archive, each with the link that
/// downloads it alone.
async fn build_files(
    State(st): State<ApiState>,
    c: Caller,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let b = viewable_build(&st, &c, &name, &q).await?;
    let files = archive_files(&st, &b).await?;
    let archived = files.is_some();
    let files = files.unwrap_or_default();
    let total = files.len();
    let offset: usize = q.get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .clamp(1, 10_000);
    let list: Vec<Value> = files
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|f| {
            let mut v = json!({"path": f.path, "kind": f.kind, "size": f.size, "mode": f.mode});
            if f.kind == "file" {
                v["link"] = json!(file_link(&b.project, &b.name, &f.path));
            }
            v
        })
        .collect();
    Ok(Json(
        json!({"build": b.name, "project": b.project, "archived": archived, "total": total,
               "offset": offset, "files": list}),
    ))
}

/// The download link of one archived file, relative to the web root like `7z_link`; every
/// segment percent-encoded.
pub fn file_link(project: &str, build: &str, path: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
    const SEGMENT: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'/')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'`')
        .add(b'{')
        .add(b'}')
        .add(b'\\')
        .add(b'^')
        .add(b'|')
        .add(b'[')
        .add(b']')
        .add(b'\'')
        .add(b'&')
        .add(b'+')
        .add(b';')
        .add(b'=');
    let enc = |s: &str| utf8_percent_encode(s, SEGMENT).to_string();
    let segs: Vec<String> = path.split('/').map(enc).collect();
    format!("dl/{}/{}/file/{}", enc(project), enc(build), segs.join("/"))
}

/// Writes into the response body from the blocking extractor, a chunk at a time; fails
/// (stopping the extraction) when the client has gone.
struct BodyWriter(tokio::sync::mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>);

impl std::io::Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(axum::body::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `/{web_root}/dl/{project}/{build}/file/{path}`: one file of the build's archive, as an
/// attachment, decompressing only what it needs. The path is matched exactly against the
/// archive's entries (never the file system); links and folders answer 404.
async fn archive_file(
    State(st): State<ApiState>,
    c: Caller,
    Path((project, build, path)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (b, dir) = recorded(&st, &c, &project, &build).await?;
    if b.archive_name.is_none() || b.output_deleted_at.is_some() {
        return Err(ApiError::NotFound);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (found_tx, found_rx) = tokio::sync::oneshot::channel::<u64>();
    let archive = dir.archive.clone();
    let name = path.clone();
    // One pass over the archive's header: the entry is checked, its size told, then its
    // bytes streamed; any error before the size is a 404.
    tokio::task::spawn_blocking(move || {
        let mut w = BodyWriter(tx.clone());
        let mut found_tx = Some(found_tx);
        let mut found = |size: u64| {
            if let Some(t) = found_tx.take() {
                let _ = t.send(size);
            }
        };
        if let Err(e) = ams_archive::extract_one(&archive, &name, &mut found, &mut w) {
            if !matches!(
                e,
                ams_archive::ExtractError::Write(_)
                    | ams_archive::ExtractError::NotFound(_)
                    | ams_archive::ExtractError::NotAFile(..)
            ) {
                tracing::warn!("{}: {name}: {e}", archive.display());
            }
            // The body ends with an error: the client sees a cut transfer, never a short file
            // that looks whole.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let size = found_rx.await.map_err(|_| ApiError::NotFound)?;
    let entry_path = path;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let base = entry_path.rsplit('/').next().unwrap_or("file");
    let ascii: String = base
        .chars()
        .map(|ch| {
            if ch.is_ascii_graphic() && !matches!(ch, '"' | '\\' | ';' | '%') || ch == ' ' {
                ch
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        percent_encoding::utf8_percent_encode(base, percent_encoding::NON_ALPHANUMERIC)
    );
    Ok((
        [
            ("content-type", "application/octet-stream".to_string()),
            ("content-disposition", disposition),
            ("content-length", size.to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            (
                "content-security-policy",
                "default-src 'none'; sandbox".to_string(),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Downloads: `/{web_root}/output/{project}/{build}` (the log, text/plain) and
/// `/{web_root}/dl/{project}/{build}` (the 7z, as an attachment). The file's path comes from the
/// database record, never from the URL: a URL that names no recorded build of a visible project
/// answers 404, whatever `..`, encodings, backslashes or NUL bytes it holds.
pub fn files_router(state: ApiState, web_root: &str) -> Router {
    Router::new()
        .route(
            &format!("/{web_root}/output/{{project}}/{{build}}"),
            get(output_log),
        )
        .route(
            &format!("/{web_root}/dl/{{project}}/{{build}}"),
            get(archive),
        )
        .route(
            &format!("/{web_root}/dl/{{project}}/{{build}}/file/{{*path}}"),
            get(archive_file),
        )
        .with_state(state)
}

async fn recorded(
    st: &ApiState,
    c: &Caller,
    project: &str,
    build: &str,
) -> Result<(BuildRecord, ams_host::paths::BuildDir), ApiError> {
    visible(st, c, project)?;
    let b = st
        .host
        .store
        .build_by_name(project, build)
        .await
        .map_err(|_| ApiError::Internal)?
        .ok_or(ApiError::NotFound)?;
    let dir = st.host.data.project(&b.project).build(&b.name);
    Ok((b, dir))
}

async fn output_log(
    State(st): State<ApiState>,
    c: Caller,
    Path((project, build)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (_, dir) = recorded(&st, &c, &project, &build).await?;
    let file = tokio::fs::File::open(dir.log())
        .await
        .map_err(|_| ApiError::NotFound)?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            ("content-type", "text/plain; charset=utf-8"),
            ("x-content-type-options", "nosniff"),
            ("content-security-policy", "default-src 'none'; sandbox"),
        ],
        body,
    )
        .into_response())
}

async fn archive(
    State(st): State<ApiState>,
    c: Caller,
    Path((project, build)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (b, dir) = recorded(&st, &c, &project, &build).await?;
    if b.archive_name.is_none() {
        return Err(ApiError::NotFound);
    }
    let file = tokio::fs::File::open(&dir.archive)
        .await
        .map_err(|_| ApiError::NotFound)?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let disposition = format!(
        "attachment; filename=\"{}.7z\"",
        b.name.replace(['"', '\\'], "_")
    );
    Ok((
        [
            ("content-type", "application/x-7z-compressed".to_string()),
            ("content-disposition", disposition),
            ("x-content-type-options", "nosniff".to_string()),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_cache_serves_only_its_generation_and_stays_bounded() {
        let c = ListCache::default();
        let b = |s: &str| axum::body::Bytes::from(s.to_string());
        c.put(1, "k".into(), b("one"));
        assert_eq!(c.get(1, "k"), Some(b("one")));
        assert_eq!(
            c.get(2, "k"),
            None,
            "a newer generation never sees older data"
        );
        c.put(2, "k".into(), b("two"));
        assert_eq!(c.get(2, "k"), Some(b("two")));
        c.put(1, "k".into(), b("stale"));
        assert_eq!(
            c.get(2, "k"),
            Some(b("two")),
            "older results are not stored"
        );
        assert_eq!(c.get(1, "k"), None);
        for i in 0..(ListCache::MAX_ENTRIES + 10) {
            c.put(3, format!("k{i}"), b("x"));
        }
        assert!(c
            .get(3, &format!("k{}", ListCache::MAX_ENTRIES + 5))
            .is_none());
        c.put(
            4,
            "big".into(),
            axum::body::Bytes::from(vec![0u8; ListCache::MAX_BYTES + 1]),
        );
        assert!(c.get(4, "big").is_none());
    }

    #[test]
    fn a_page_stored_again_does_not_fill_the_list_cache() {
        // Fifty requests that missed at once store the same page fifty times; a page stored
        // later must still fit.
        let c = ListCache::default();
        let page = axum::body::Bytes::from(vec![b'x'; ListCache::MAX_BYTES / 8]);
        for _ in 0..50 {
            c.put(1, "builds".into(), page.clone());
        }
        c.put(1, "filtered".into(), axum::body::Bytes::from_static(b"[]"));
        assert_eq!(
            c.get(1, "filtered"),
            Some(axum::body::Bytes::from_static(b"[]"))
        );
        assert_eq!(c.get(1, "builds"), Some(page));
        // A page that grows in place is still held to the bound.
        c.put(
            1,
            "builds".into(),
            axum::body::Bytes::from(vec![0u8; ListCache::MAX_BYTES]),
        );
        assert_eq!(
            c.get(1, "builds").map(|b| b.len()),
            Some(ListCache::MAX_BYTES / 8)
        );
    }

    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.push((method.clone(), path.clone()));
            }
        }
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        routes.sort();
        assert_eq!(documented, routes);
    }

    #[test]
    fn the_openapi_document_lists_every_status() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["Build"]["properties"]["status"]
            ["enum"]
            .as_array()
            .expect("the Build schema's status enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let all: Vec<&str> = ams_core::status::BuildStatus::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(listed, all);
    }

    /// docs/api.md has one `### `METHOD /ams-build/api/PATH`` section per route, and none for
    /// a route the server does not have.
    #[test]
    fn the_api_reference_describes_exactly_the_routes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md");
        let doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut documented: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`'))
            .filter_map(|h| {
                let (method, rest) = h.split_once(' ')?;
                let p = rest.strip_prefix("/ams-build/api")?;
                Some((method.to_ascii_lowercase(), p.to_string()))
            })
            .collect();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        routes.sort();
        assert_eq!(documented, routes, "{path} and api::ROUTES disagree");
    }
}
