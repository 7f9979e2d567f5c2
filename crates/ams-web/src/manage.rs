//! The pages that manage people and things rather than builds: the message panel, the account
//! page (API tokens and the password), user management for ADMIN (the users of its own
//! projects) and SERVER ADMIN (everyone), and project creation for SERVER ADMIN.
//!
//! Rules: every change is a POST with the session's CSRF token and our Origin
//! ([`pages::form_viewer`]); who may change whom is decided in `ams_core::access`
//! ([`Grant::may_manage`], [`Grant::edit`], [`Grant::may_remove`]), on the user's row as it is
//! when the change is written ([`ams_store::Store::update_grant`]); a user never edits or
//! removes their own grant here, so the last SERVER ADMIN cannot lock everyone out by accident.
//! Creating an API token and changing the password need the current password, checked through
//! the login throttle; a new password revokes every token and ends every session.

use crate::api::ApiState;
use crate::auth;
use crate::pages::{self, back, not_found, refused, FormViewer, PageViewer, Viewer};
use ams_core::access::{Action, Change, Grant, Level};
use ams_host::timefmt;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::collections::{BTreeMap, HashMap};

/// Messages shown on the dashboard.
pub const MESSAGES_SHOWN: i64 = 20;

pub fn router(state: ApiState, root: &str) -> Router {
    Router::new()
        .route(&format!("/{root}/messages/clear"), post(clear_messages))
        .route(&format!("/{root}/account"), get(account_page))
        .route(&format!("/{root}/account/tokens"), post(create_token))
        .route(
            &format!("/{root}/account/tokens/{{id}}/revoke"),
            post(revoke_token),
        )
        .route(&format!("/{root}/account/password"), post(change_password))
        .route(&format!("/{root}/users"), get(users_page).post(add_user))
        .route(&format!("/{root}/users/{{name}}"), post(set_user))
        .route(
            &format!("/{root}/users/{{name}}/password"),
            post(reset_password),
        )
        .route(&format!("/{root}/users/{{name}}/remove"), post(remove_user))
        .route(
            &format!("/{root}/projects"),
            get(pages::projects_page).post(create_project),
        )
        .with_state(state)
}

/// Puts a message on a user's panel and tells open dashboards to refresh.
pub async fn note(
    st: &ApiState,
    user: &str,
    kind: &str,
    text: &str,
    project: Option<&str>,
    build: Option<&str>,
) {
    if let Err(e) = st
        .host
        .store
        .add_message(user, kind, text, project, build, timefmt::now())
        .await
    {
        tracing::warn!("cannot keep a message for {user}: {e}");
    }
    let _ = st.host.changes.send(());
}

/// The message panel: the user's own messages, newest first, about projects they still see.
/// The viewer's messages for the dashboard's panel, those about projects they may still see.
pub async fn messages_view(st: &ApiState, v: &Viewer) -> Vec<crate::pages::MessageV> {
    let root = &st.conf.web_root;
    st.host
        .store
        .messages_of(&v.user.name, MESSAGES_SHOWN)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.project
                .as_deref()
                .is_none_or(|p| v.grant.may(Action::View, p))
        })
        .map(|m| crate::pages::MessageV {
            link: match (&m.project, &m.build) {
                (Some(p), Some(b)) => Some(format!("/{root}/build/{p}/{b}")),
                _ => None,
            },
            kind: m.kind,
            at: crate::view::Ts::at(m.at),
            text: m.text,
        })
        .collect()
}

/// The form fields: `level:PROJECT` gives the level on a project (empty: not a member);
/// `projects` may repeat (the described system's shape: one `level` for each listed project).
struct Fields {
    one: HashMap<String, String>,
    projects: Vec<String>,
    levels: BTreeMap<String, String>,
}

/// The prefix of the per-project level fields.
const LEVEL_ON: &str = "level:";

impl Fields {
    fn new(pairs: Vec<(String, String)>) -> Self {
        let mut one = HashMap::new();
        let mut projects = Vec::new();
        let mut levels = BTreeMap::new();
        for (k, v) in pairs {
            if k == "projects" {
                if !v.is_empty() && !projects.contains(&v) {
                    projects.push(v);
                }
            } else if let Some(p) = k.strip_prefix(LEVEL_ON) {
                levels.insert(p.to_string(), v.trim().to_string());
            } else {
                one.insert(k, v);
            }
        }
        Fields {
            one,
            projects,
            levels,
        }
    }

    fn get(&self, k: &str) -> &str {
        self.one.get(k).map(|s| s.trim()).unwrap_or("")
    }

    /// The raw value (passwords are not trimmed).
    fn raw(&self, k: &str) -> &str {
        self.one.get(k).map(String::as_str).unwrap_or("")
    }
}

/// A checked form post (session, CSRF, origin) with its fields.
fn posted(fv: FormViewer) -> (Viewer, Fields) {
    (fv.v, Fields::new(fv.pairs))
}

async fn clear_messages(State(st): State<ApiState>, fv: FormViewer) -> Response {
    let (v, _) = posted(fv);
    let _ = st.host.store.clear_messages(&v.user.name).await;
    let _ = st.host.changes.send(());
    back(format!("/{}/", st.conf.web_root))
}

async fn account_page(State(st): State<ApiState>, PageViewer(v): PageViewer) -> Response {
    account(&st, &v, None).await
}

pub struct TokenV {
    pub id: i64,
    pub label: String,
    pub created: crate::view::Ts,
    pub used: Option<crate::view::Ts>,
}

#[derive(askama::Template)]
#[template(path = "account.html")]
struct AccountT<'a> {
    chrome: crate::view::Chrome,
    name: &'a str,
    access: String,
    csrf: &'a str,
    fresh: Option<(&'a str, &'a str)>,
    tokens: Vec<TokenV>,
    min_pw: usize,
}

/// The account page; `fresh` is a token just created, shown this once.
async fn account(st: &ApiState, v: &Viewer, fresh: Option<(&str, &str)>) -> Response {
    let root = &st.conf.web_root;
    let tokens = st
        .host
        .store
        .tokens_of(&v.user.name)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|t| TokenV {
            id: t.id,
            label: t.label,
            created: crate::view::Ts::at(t.created_at),
            used: t.last_used.map(crate::view::Ts::at),
        })
        .collect();
    let t = AccountT {
        chrome: crate::view::Chrome::new(root, "Account", Some(v)).section("account"),
        name: &v.user.name,
        access: v.grant.describe(),
        csrf: &v.csrf,
        fresh,
        tokens,
        min_pw: auth::MIN_PASSWORD,
    };
    crate::view::render(StatusCode::OK, &t)
}

/// Checks a new password's length and hashes it within the argon2 budget.
async fn new_password_hash(st: &ApiState, password: &str) -> Result<String, Response> {
    let root = &st.conf.web_root;
    if password.chars().count() < auth::MIN_PASSWORD {
        return Err(refused(
            root,
            StatusCode::BAD_REQUEST,
            &format!(
                "the password needs at least {} characters",
                auth::MIN_PASSWORD
            ),
        ));
    }
    st.guard
        .hash(password.to_string())
        .await
        .map_err(|e| refused(root, StatusCode::INTERNAL_SERVER_ERROR, &e))
}

/// Checks the session user's current password through the login throttle: guessing it
/// through a stolen session costs what guessing it at the login form costs.
async fn check_current_password(
    st: &ApiState,
    v: &Viewer,
    addr: Option<axum::Extension<crate::session::ClientAddr>>,
    given: &str,
) -> Result<(), Response> {
    let root = &st.conf.web_root;
    if given.is_empty() {
        return Err(refused(
            root,
            StatusCode::FORBIDDEN,
            "type your current password to confirm",
        ));
    }
    // Guessing the current password through a stolen session meets the login throttle.
    let ip = crate::session::client_ip(addr);
    let Some(attempt) = st.guard.reserve(&v.user.name, &ip) else {
        return Err(refused(
            root,
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts; try again later",
        ));
    };
    if !st
        .guard
        .verify(v.user.password_hash.clone(), given.to_string())
        .await
    {
        drop(attempt);
        return Err(refused(
            root,
            StatusCode::FORBIDDEN,
            "the current password is wrong; type the password you log in with",
        ));
    }
    attempt.succeeded();
    Ok(())
}

async fn create_token(
    State(st): State<ApiState>,
    addr: Option<axum::Extension<crate::session::ClientAddr>>,
    fv: FormViewer,
) -> Response {
    let (v, f) = posted(fv);
    let root = &st.conf.web_root;
    let label = f.get("label");
    if label.is_empty() || label.chars().count() > 100 {
        return refused(
            root,
            StatusCode::BAD_REQUEST,
            "give the token a label of 1 to 100 characters",
        );
    }
    // A stolen session alone does not make a credential that outlives it.
    if let Err(r) = check_current_password(&st, &v, addr, f.raw("current")).await {
        return r;
    }
    let token = format!("ams_{}", auth::random_secret(32));
    match st
        .host
        .store
        .create_token(
            &v.user.name,
            label,
            &auth::token_hash(&token),
            timefmt::now(),
            Some(&v.user.password_hash),
        )
        .await
    {
        Ok(None) => refused(
            root,
            StatusCode::FORBIDDEN,
            "your password changed meanwhile; log in again",
        ),
        Ok(Some(_)) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!("Created the API token `{label}`"),
                None,
                None,
            )
            .await;
            account(&st, &v, Some((label, &token))).await
        }
        Err(e) => refused(root, StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn revoke_token(State(st): State<ApiState>, Path(id): Path<i64>, fv: FormViewer) -> Response {
    let (v, _) = posted(fv);
    let root = &st.conf.web_root;
    // Only one's own tokens: another user's id is simply not found.
    match st.host.store.revoke_token(&v.user.name, id).await {
        Ok(true) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!("Revoked API token {id}"),
                None,
                None,
            )
            .await;
            back(format!("/{root}/account"))
        }
        _ => not_found(root),
    }
}

async fn change_password(
    State(st): State<ApiState>,
    addr: Option<axum::Extension<crate::session::ClientAddr>>,
    fv: FormViewer,
) -> Response {
    let (v, f) = posted(fv);
    let root = &st.conf.web_root;
    if let Err(r) = check_current_password(&st, &v, addr, f.raw("current")).await {
        return r;
    }
    let hash = match new_password_hash(&st, f.raw("new")).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    match st
        .host
        .store
        .set_password(&v.user.name, &hash, timefmt::now())
        .await
    {
        Ok(true) => {
            note(
                &st,
                &v.user.name,
                "ok",
                "Changed your password; every session has ended and every API token is revoked",
                None,
                None,
            )
            .await;
            back(format!("/{root}/login"))
        }
        _ => refused(
            root,
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot change the password",
        ),
    }
}

pub struct OptV {
    pub value: String,
    pub label: &'static str,
    pub selected: bool,
}

/// One project's level choice in the users page.
pub struct LevelFieldV {
    pub project: String,
    pub name: String,
    pub id: String,
    pub options: Vec<OptV>,
}

pub struct UserRowV {
    pub name: String,
    pub me: bool,
    pub describe: String,
    /// The SERVER ADMIN box (SERVER ADMIN viewers only) and whether it is ticked.
    pub server_admin: Option<bool>,
    pub levels: Vec<LevelFieldV>,
    pub others: String,
}

/// The levels this viewer may give on one project, `—` (not a member) first, `current`
/// selected; a level it may not give stays shown as it is.
fn level_options(v: &Viewer, current: Option<Level>) -> Vec<OptV> {
    let max = v.grant.max_grantable().unwrap_or(Level::NoAuth);
    let mut out = vec![OptV {
        value: String::new(),
        label: "—",
        selected: current.is_none(),
    }];
    for l in Level::PER_PROJECT
        .into_iter()
        .filter(|l| *l != Level::NoAuth && *l <= max)
    {
        out.push(OptV {
            value: u8::from(l).to_string(),
            label: l.name(),
            selected: current == Some(l),
        });
    }
    if let Some(c) = current.filter(|c| *c > max || *c == Level::NoAuth) {
        out.push(OptV {
            value: u8::from(c).to_string(),
            label: c.name(),
            selected: true,
        });
    }
    out
}

/// One level choice per project this viewer may change for `target`.
fn level_fields(v: &Viewer, target: &Grant, projects: &[String], id: &str) -> Vec<LevelFieldV> {
    projects
        .iter()
        .filter(|p| v.grant.may_change(target, p))
        .map(|p| LevelFieldV {
            project: p.clone(),
            name: format!("{LEVEL_ON}{p}"),
            id: format!("{id}-{p}"),
            options: level_options(v, target.projects.get(p).copied()),
        })
        .collect()
}

#[derive(askama::Template)]
#[template(path = "users.html")]
struct UsersT {
    chrome: crate::view::Chrome,
    csrf: String,
    users: Vec<UserRowV>,
    new_levels: Vec<LevelFieldV>,
    server_admin: bool,
    min_pw: usize,
}

async fn users_page(State(st): State<ApiState>, PageViewer(v): PageViewer) -> Response {
    let root = st.conf.web_root.clone();
    if !v.grant.manages_users() {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN manage users",
        );
    }
    let all = ams_host::project::list(&st.host.data);
    let managed = v.grant.managed_projects(&all);
    let sa = v.grant.is_server_admin();
    let users = st
        .host
        .store
        .users()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|u| u.name == v.user.name || v.grant.may_manage(&u.grant))
        .map(|u| {
            let g = &u.grant;
            // Entries outside this viewer's reach are shown by project name, not editable.
            let others: Vec<&str> = g
                .projects
                .keys()
                .filter(|p| !managed.contains(p) || !v.grant.may_change(g, p))
                .map(String::as_str)
                .collect();
            UserRowV {
                me: u.name == v.user.name,
                describe: g.describe(),
                server_admin: sa.then_some(g.is_server_admin()),
                levels: level_fields(&v, g, &managed, &format!("p-{}", u.name)),
                others: others.join(", "),
                name: u.name,
            }
        })
        .collect();
    let t = UsersT {
        chrome: crate::view::Chrome::new(&root, "Users", Some(&v)).section("users"),
        csrf: v.csrf.clone(),
        users,
        new_levels: level_fields(&v, &Grant::default(), &managed, "new"),
        server_admin: sa,
        min_pw: auth::MIN_PASSWORD,
    };
    crate::view::render(StatusCode::OK, &t)
}

/// Reads what the form asks for: `level:PROJECT` fields (empty: off the project; projects not
/// named stay as they are) and, from a SERVER ADMIN, the `server_admin` box; or the described
/// system's shape, one `level` for each ticked `projects`, off the unticked ones (level 5:
/// SERVER ADMIN). Whether the viewer may ask it is [`Grant::edit`]'s call.
fn wanted(v: &Viewer, f: &Fields) -> Result<Change, String> {
    let parse = |raw: &str, field: &str| {
        raw.parse::<u8>()
            .map_err(|_| format!("`{field}` is not a level; choose one from the list"))
            .and_then(Level::try_from)
    };
    let legacy = f.one.contains_key("level");
    if legacy && !f.levels.is_empty() {
        return Err(format!(
            "give either `level` with `projects`, or `{LEVEL_ON}PROJECT` fields, not both"
        ));
    }
    if legacy {
        let level = parse(f.get("level"), "level")?;
        if level == Level::ServerAdmin {
            return Ok(Change {
                server_admin: Some(true),
                ..Change::default()
            });
        }
        return Ok(Change {
            projects: f
                .projects
                .iter()
                .map(|p| (p.clone(), Some(level)))
                .collect(),
            drop_unnamed: true,
            server_admin: v.grant.is_server_admin().then_some(false),
        });
    }
    if !f.projects.is_empty() {
        return Err("`projects` needs a `level`".into());
    }
    let mut projects = BTreeMap::new();
    for (p, raw) in &f.levels {
        let level = if raw.is_empty() {
            None
        } else {
            Some(parse(raw, &format!("{LEVEL_ON}{p}"))?)
        };
        projects.insert(p.clone(), level);
    }
    let ticked = !f.get("server_admin").is_empty();
    Ok(Change {
        projects,
        drop_unnamed: false,
        server_admin: if v.grant.is_server_admin() {
            Some(ticked)
        } else {
            ticked.then_some(true)
        },
    })
}

async fn add_user(State(st): State<ApiState>, fv: FormViewer) -> Response {
    let (v, f) = posted(fv);
    let root = st.conf.web_root.clone();
    if !v.grant.manages_users() {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN manage users",
        );
    }
    let name = f.get("name").to_string();
    if let Err(e) = ams_core::names::validate_project_name(&name) {
        return refused(
            &root,
            StatusCode::BAD_REQUEST,
            &e.replace("project name", "user name"),
        );
    }
    let all = ams_host::project::list(&st.host.data);
    let grant = match wanted(&v, &f).and_then(|c| v.grant.create(&c, &all)) {
        Ok(g) => g,
        Err(e) => return refused(&root, StatusCode::FORBIDDEN, &e),
    };
    let hash = match new_password_hash(&st, f.raw("password")).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let now = timefmt::now();
    let text = format!("Added the user {name} ({})", grant.describe());
    let user = ams_store::User {
        name,
        password_hash: hash,
        grant,
        created_at: now,
        password_changed_at: now,
    };
    match st.host.store.create_user(&user).await {
        Ok(()) => {
            note(&st, &v.user.name, "ok", &text, None, None).await;
            back(format!("/{root}/users"))
        }
        Err(e) => refused(&root, StatusCode::CONFLICT, &e.to_string()),
    }
}

/// What a change refused because the target is out of the viewer's reach says; it is answered
/// with a 404 that does not tell whether the user exists.
const OUT_OF_REACH: &str = "out of reach";

/// The target user, if this viewer may manage it; otherwise a 404 that does not tell whether
/// the user exists.
async fn target(st: &ApiState, v: &Viewer, name: &str) -> Result<ams_store::User, Response> {
    let root = &st.conf.web_root;
    if !v.grant.manages_users() {
        return Err(refused(
            root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN manage users",
        ));
    }
    if name == v.user.name {
        return Err(refused(
            root,
            StatusCode::FORBIDDEN,
            "you cannot change your own level, projects or account here; another SERVER ADMIN \
             or `amsbuild user` can",
        ));
    }
    match st.host.store.user(name).await.ok().flatten() {
        Some(u) if v.grant.may_manage(&u.grant) => Ok(u),
        _ => Err(not_found(root)),
    }
}

/// The answer to a refused or failed grant change or removal.
fn change_failed(root: &str, e: ams_store::StoreError) -> Response {
    match e {
        ams_store::StoreError::Invalid(m) if m == OUT_OF_REACH => not_found(root),
        ams_store::StoreError::Invalid(m) => refused(root, StatusCode::FORBIDDEN, &m),
        e => refused(root, StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn set_user(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    fv: FormViewer,
) -> Response {
    let (v, f) = posted(fv);
    let root = st.conf.web_root.clone();
    if let Err(r) = target(&st, &v, &name).await {
        return r;
    }
    let change = match wanted(&v, &f) {
        Ok(c) => c,
        Err(e) => return refused(&root, StatusCode::BAD_REQUEST, &e),
    };
    let all = ams_host::project::list(&st.host.data);
    // Decided again on the row as it is written: entries this viewer may not change are
    // carried over from there, never from an earlier read.
    let done = st
        .host
        .store
        .update_grant(&name, |g| {
            if !v.grant.may_manage(g) {
                return Err(OUT_OF_REACH.into());
            }
            v.grant.edit(g, &change, &all)
        })
        .await;
    match done {
        Ok(Some(g)) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!("Set {name} to {}", g.describe()),
                None,
                None,
            )
            .await;
            back(format!("/{root}/users"))
        }
        Ok(None) => not_found(&root),
        Err(e) => change_failed(&root, e),
    }
}

async fn reset_password(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    fv: FormViewer,
) -> Response {
    let (v, f) = posted(fv);
    let root = st.conf.web_root.clone();
    if !v.grant.is_server_admin() {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "only SERVER ADMIN sets other users' passwords",
        );
    }
    if let Err(r) = target(&st, &v, &name).await {
        return r;
    }
    let hash = match new_password_hash(&st, f.raw("password")).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    match st
        .host
        .store
        .set_password(&name, &hash, timefmt::now())
        .await
    {
        Ok(true) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!(
                    "Set a new password for {name}; their sessions have ended and their API \
                     tokens are revoked"
                ),
                None,
                None,
            )
            .await;
            back(format!("/{root}/users"))
        }
        _ => not_found(&root),
    }
}

async fn remove_user(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    fv: FormViewer,
) -> Response {
    let (v, _) = posted(fv);
    let root = st.conf.web_root.clone();
    if let Err(r) = target(&st, &v, &name).await {
        return r;
    }
    let done = st
        .host
        .store
        .remove_user_if(&name, |g| {
            if !v.grant.may_manage(g) {
                return Err(OUT_OF_REACH.into());
            }
            v.grant.may_remove(g).map_err(|e| format!("{name}: {e}"))
        })
        .await;
    match done {
        Ok(true) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!("Removed the user {name}"),
                None,
                None,
            )
            .await;
            back(format!("/{root}/users"))
        }
        Ok(false) => not_found(&root),
        Err(e) => change_failed(&root, e),
    }
}

async fn create_project(State(st): State<ApiState>, fv: FormViewer) -> Response {
    let (v, f) = posted(fv);
    let root = st.conf.web_root.clone();
    if !v.grant.is_server_admin() {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "only SERVER ADMIN creates projects",
        );
    }
    let name = f.get("name").to_string();
    let git = f.get("git").to_string();
    let branch = Some(f.get("branch").to_string()).filter(|b| !b.is_empty());
    // A clone can take minutes: it runs in its own task, so a browser that gives up does not
    // cut it half-way, and its result reaches the message panel either way.
    let task_st = st.clone();
    let user = v.user.name.clone();
    let task = tokio::spawn(async move {
        let made = if git.is_empty() {
            ams_host::project::init(&task_st.host.data, &name).map(|_| Vec::new())
        } else {
            ams_host::project::add(&task_st.host.data, &name, &git, branch.as_deref(), None)
                .await
                .map(|(_, pinned)| pinned)
        };
        match &made {
            Ok(pinned) => {
                let mut text = format!("Created the project {name}");
                for l in pinned {
                    tracing::info!("project {name}: {l}");
                    text.push_str(&format!(". {l}"));
                }
                note(&task_st, &user, "ok", &text, None, None).await;
            }
            Err(e) => note(&task_st, &user, "error", e, None, None).await,
        }
        made.map(|_| ())
    });
    match task.await {
        Ok(Ok(())) => back(format!("/{root}/")),
        Ok(Err(e)) => refused(&root, StatusCode::BAD_REQUEST, &e),
        Err(e) => refused(&root, StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
