//! The pages that manage people and things rather than builds: the message panel, the account
//! page (API tokens and the password), user management for ADMIN (the users of its own
//! projects) and SERVER ADMIN (everyone), and project creation for SERVER ADMIN.
//!
//! Rules: every change is a POST with the session's CSRF token and our Origin
//! ([`pages::form_viewer`]); who may change whom is decided in `ams_core::access`
//! ([`Grant::may_manage`], [`Grant::may_grant`]); a user never edits or removes their own grant
//! here, so the last SERVER ADMIN cannot lock everyone out by accident.

use crate::api::ApiState;
use crate::auth;
use crate::pages::{self, back, form_viewer, html, not_found, refused, status_badge, Viewer};
use crate::session::esc;
use ams_core::access::{Action, Grant, Level};
use ams_host::timefmt;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;

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
        .route(&format!("/{root}/projects"), post(create_project))
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
pub async fn messages_html(st: &ApiState, v: &Viewer) -> String {
    let root = &st.conf.web_root;
    let list = st
        .host
        .store
        .messages_of(&v.user.name, MESSAGES_SHOWN)
        .await
        .unwrap_or_default();
    let mut s = String::from("<div class=\"panel\" id=\"messages\"><h2>Messages</h2>");
    let shown: Vec<_> = list
        .iter()
        .filter(|m| {
            m.project
                .as_deref()
                .is_none_or(|p| v.grant.may(Action::View, p))
        })
        .collect();
    if shown.is_empty() {
        s.push_str("<p>No messages.</p></div>");
        return s;
    }
    s.push_str("<ul class=\"messages\">");
    for m in shown {
        let text = match (&m.project, &m.build) {
            (Some(p), Some(b)) => format!(
                "<a href=\"/{root}/build/{}/{}\">{}</a>",
                esc(p),
                esc(b),
                esc(&m.text)
            ),
            _ => esc(&m.text),
        };
        s.push_str(&format!(
            "<li class=\"message\">{} <time>{}</time> {text}</li>",
            status_badge(&m.kind),
            esc(&timefmt::legacy(m.at)),
        ));
    }
    s.push_str(&format!(
        "</ul><form class=\"inline\" method=\"post\" action=\"/{root}/messages/clear\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Clear messages</button></form></div>",
        esc(&v.csrf)
    ));
    s
}

/// The form fields; `projects` may repeat (checkboxes).
struct Fields {
    one: HashMap<String, String>,
    projects: Vec<String>,
}

impl Fields {
    fn new(pairs: Vec<(String, String)>) -> Self {
        let mut one = HashMap::new();
        let mut projects = Vec::new();
        for (k, v) in pairs {
            if k == "projects" {
                if !v.is_empty() && !projects.contains(&v) {
                    projects.push(v);
                }
            } else {
                one.insert(k, v);
            }
        }
        Fields { one, projects }
    }

    fn get(&self, k: &str) -> &str {
        self.one.get(k).map(|s| s.trim()).unwrap_or("")
    }

    /// The raw value (passwords are not trimmed).
    fn raw(&self, k: &str) -> &str {
        self.one.get(k).map(String::as_str).unwrap_or("")
    }
}

async fn posted(
    st: &ApiState,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<(Viewer, Fields), Response> {
    let f = Fields::new(pairs);
    let v = form_viewer(st, headers, &f.one).await?;
    Ok((v, f))
}

async fn clear_messages(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, _) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let _ = st.host.store.clear_messages(&v.user.name).await;
    let _ = st.host.changes.send(());
    back(format!("/{}/", st.conf.web_root))
}

fn header(root: &str, v: &Viewer, title: &str) -> String {
    let mut links =
        format!("<a href=\"/{root}/\">Dashboard</a> · <a href=\"/{root}/account\">Account</a>");
    if v.grant.manages_users() {
        links.push_str(&format!(" · <a href=\"/{root}/users\">Users</a>"));
    }
    format!("<p>{links}</p><h1>{}</h1>", esc(title))
}

async fn account_page(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    let root = st.conf.web_root.clone();
    let Some(v) = pages::viewer(&st, &headers).await else {
        return pages::to_login(&root, "account");
    };
    account(&st, &v, None).await
}

/// The account page; `fresh` is a token just created, shown this once.
async fn account(st: &ApiState, v: &Viewer, fresh: Option<(&str, &str)>) -> Response {
    let root = &st.conf.web_root;
    let csrf = esc(&v.csrf);
    let mut b = header(root, v, &format!("Account of {}", v.user.name));
    b.push_str(&format!(
        "<p>Level {} · projects {}</p>",
        esc(v.grant.level.name()),
        esc(&if v.grant.is_server_admin() {
            "all".to_string()
        } else {
            v.user.projects.join(", ")
        })
    ));
    if let Some((label, token)) = fresh {
        b.push_str(&format!(
            "<div class=\"panel fresh\"><p>New token <strong>{}</strong>. Copy it now: it is shown only \
             this once and stored only as a hash.</p><pre id=\"new-token\">{}</pre>\
             <p>Use it as <code>Authorization: Bearer …</code>.</p></div>",
            esc(label),
            esc(token)
        ));
    }
    b.push_str("<h2>API tokens</h2><table><tr><th>#</th><th>Label</th><th>Created</th><th>Last used</th><th></th></tr>");
    for t in st
        .host
        .store
        .tokens_of(&v.user.name)
        .await
        .unwrap_or_default()
    {
        b.push_str(&format!(
            "<tr><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td><form class=\"inline\" method=\"post\" \
             action=\"/{root}/account/tokens/{id}/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\">Revoke</button></form></td></tr>",
            esc(&t.label),
            esc(&timefmt::legacy(t.created_at)),
            esc(&t.last_used.map(timefmt::legacy).unwrap_or_else(|| "never".into())),
            id = t.id,
        ));
    }
    b.push_str(&format!(
        "</table><form method=\"post\" action=\"/{root}/account/tokens\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input name=\"label\" placeholder=\"label, e.g. deploy script\" required maxlength=\"100\">\
         <button type=\"submit\" id=\"create-token\">Create a token</button></form>\
         <h2>Password</h2><form method=\"post\" action=\"/{root}/account/password\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Current <input type=\"password\" name=\"current\" autocomplete=\"current-password\" required></label> \
         <label>New <input type=\"password\" name=\"new\" autocomplete=\"new-password\" minlength=\"{min}\" required></label> \
         <button type=\"submit\">Change the password</button></form>\
         <p>Changing the password ends every session of this account, this one included.</p>",
        min = auth::MIN_PASSWORD
    ));
    html(StatusCode::OK, "Account", root, &b)
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

async fn create_token(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, f) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let root = &st.conf.web_root;
    let label = f.get("label");
    if label.is_empty() || label.chars().count() > 100 {
        return refused(
            root,
            StatusCode::BAD_REQUEST,
            "give the token a label of 1 to 100 characters",
        );
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
        )
        .await
    {
        Ok(_) => {
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

async fn revoke_token(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, _) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
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
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, f) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let root = &st.conf.web_root;
    // Guessing the current password through a stolen session meets the login throttle.
    let ip = crate::session::client_ip(addr);
    let Some(attempt) = st.guard.reserve(&v.user.name, &ip) else {
        return refused(
            root,
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts; try again later",
        );
    };
    if !st
        .guard
        .verify(v.user.password_hash.clone(), f.raw("current").to_string())
        .await
    {
        drop(attempt);
        return refused(root, StatusCode::FORBIDDEN, "the current password is wrong");
    }
    attempt.succeeded();
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
                "Changed your password; other sessions have ended",
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

fn grant_of(u: &ams_store::User) -> Grant {
    Grant {
        level: Level::try_from(u.level).unwrap_or(Level::NoAuth),
        projects: u.projects.clone(),
    }
}

/// The levels this viewer may give, as `<option>`s with `selected` on `current`.
fn level_options(v: &Viewer, current: u8) -> String {
    (0..=5u8)
        .filter_map(|n| Level::try_from(n).ok())
        .filter(|l| v.grant.may_grant(*l, &[]).is_ok())
        .map(|l| {
            format!(
                "<option value=\"{}\"{}>{}</option>",
                u8::from(l),
                if u8::from(l) == current {
                    " selected"
                } else {
                    ""
                },
                esc(l.name())
            )
        })
        .collect()
}

fn project_boxes(managed: &[String], checked: &[String], id: &str) -> String {
    managed
        .iter()
        .map(|p| {
            format!(
                "<label><input type=\"checkbox\" name=\"projects\" value=\"{pe}\" id=\"{id}-{pe}\"{}> {pe}</label> ",
                if checked.contains(p) { " checked" } else { "" },
                pe = esc(p),
            )
        })
        .collect()
}

async fn users_page(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    let root = st.conf.web_root.clone();
    let Some(v) = pages::viewer(&st, &headers).await else {
        return pages::to_login(&root, "users");
    };
    if !v.grant.manages_users() {
        return refused(
            &root,
            StatusCode::FORBIDDEN,
            "only ADMIN and SERVER ADMIN manage users",
        );
    }
    let all = ams_host::project::list(&st.host.data);
    let managed = v.grant.managed_projects(&all);
    let csrf = esc(&v.csrf);
    let mut b = header(&root, &v, "Users");
    b.push_str("<table><tr><th>User</th><th>Level and projects</th><th></th></tr>");
    for u in st.host.store.users().await.unwrap_or_default() {
        let g = grant_of(&u);
        let ue = esc(&u.name);
        if u.name == v.user.name {
            b.push_str(&format!(
                "<tr><td>{ue} (you)</td><td>{} · {}</td><td></td></tr>",
                esc(g.level.name()),
                esc(&u.projects.join(", "))
            ));
            continue;
        }
        if !v.grant.may_manage(&g) {
            continue;
        }
        // Projects outside this viewer's reach are shown, not editable.
        let others: Vec<&String> = u.projects.iter().filter(|p| !managed.contains(p)).collect();
        let others = if others.is_empty() {
            String::new()
        } else {
            format!(
                " <span class=\"muted\">also: {}</span>",
                esc(&others
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
            )
        };
        let mut actions = format!(
            "<form class=\"inline\" method=\"post\" action=\"/{root}/users/{ue}/remove\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\" id=\"remove-{ue}\">Remove</button></form>"
        );
        if v.grant.is_server_admin() {
            actions.push_str(&format!(
                "<form class=\"inline\" method=\"post\" action=\"/{root}/users/{ue}/password\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"password\" name=\"password\" placeholder=\"new password\" autocomplete=\"new-password\" minlength=\"{}\" required>\
                 <button type=\"submit\">Set password</button></form>",
                auth::MIN_PASSWORD
            ));
        }
        b.push_str(&format!(
            "<tr><td>{ue}</td><td><form class=\"inline\" method=\"post\" action=\"/{root}/users/{ue}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><select name=\"level\">{}</select> {}{others} \
             <button type=\"submit\" id=\"save-{ue}\">Save</button></form></td><td>{actions}</td></tr>",
            level_options(&v, u.level),
            project_boxes(&managed, &u.projects, &format!("p-{ue}")),
        ));
    }
    b.push_str(&format!(
        "</table><h2>Add a user</h2><form method=\"post\" action=\"/{root}/users\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input name=\"name\" placeholder=\"name\" required> \
         <input type=\"password\" name=\"password\" placeholder=\"password\" autocomplete=\"new-password\" minlength=\"{}\" required> \
         <select name=\"level\">{}</select> {} <button type=\"submit\" id=\"add-user\">Add</button></form>",
        auth::MIN_PASSWORD,
        level_options(&v, Level::User.into()),
        project_boxes(&managed, &[], "new"),
    ));
    if v.grant.is_server_admin() {
        b.push_str(&format!(
            "<h2>Create a project</h2><form method=\"post\" action=\"/{root}/projects\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input name=\"name\" placeholder=\"name\" required> \
             <input name=\"git\" placeholder=\"git URL (empty: a blank project)\" size=\"40\"> \
             <input name=\"branch\" placeholder=\"branch (optional)\"> \
             <button type=\"submit\" id=\"create-project\">Create</button></form>"
        ));
    }
    html(StatusCode::OK, "Users", &root, &b)
}

/// Checks the level field and the chosen projects against what exists and what the viewer may
/// give.
fn wanted(v: &Viewer, f: &Fields, all: &[String]) -> Result<(Level, Vec<String>), String> {
    let level = f
        .get("level")
        .parse::<u8>()
        .map_err(|_| "choose a level".to_string())
        .and_then(Level::try_from)?;
    if let Some(p) = f.projects.iter().find(|p| !all.contains(p)) {
        return Err(format!("there is no project `{p}`"));
    }
    v.grant.may_grant(level, &f.projects)?;
    Ok((level, f.projects.clone()))
}

async fn add_user(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, f) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
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
    let (level, projects) = match wanted(&v, &f, &all) {
        Ok(x) => x,
        Err(e) => return refused(&root, StatusCode::FORBIDDEN, &e),
    };
    if v.grant.level == Level::Admin && projects.is_empty() {
        return refused(
            &root,
            StatusCode::BAD_REQUEST,
            "choose at least one of your projects for the new user",
        );
    }
    let hash = match new_password_hash(&st, f.raw("password")).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let now = timefmt::now();
    let user = ams_store::User {
        name: name.clone(),
        password_hash: hash,
        level: level.into(),
        projects,
        created_at: now,
        password_changed_at: now,
    };
    match st.host.store.create_user(&user).await {
        Ok(()) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!("Added the user {name} ({})", level.name()),
                None,
                None,
            )
            .await;
            back(format!("/{root}/users"))
        }
        Err(e) => refused(&root, StatusCode::CONFLICT, &e.to_string()),
    }
}

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
        Some(u) if v.grant.may_manage(&grant_of(&u)) => Ok(u),
        _ => Err(not_found(root)),
    }
}

async fn set_user(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, f) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let root = st.conf.web_root.clone();
    let u = match target(&st, &v, &name).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let all = ams_host::project::list(&st.host.data);
    let (level, chosen) = match wanted(&v, &f, &all) {
        Ok(x) => x,
        Err(e) => return refused(&root, StatusCode::FORBIDDEN, &e),
    };
    // The viewer's projects are replaced by the choice; the others stay as they were.
    let managed = v.grant.managed_projects(&all);
    let mut projects: Vec<String> = u
        .projects
        .iter()
        .filter(|p| !managed.contains(p))
        .cloned()
        .collect();
    projects.extend(chosen);
    match st
        .host
        .store
        .set_grant(&name, Some(level.into()), Some(&projects))
        .await
    {
        Ok(true) => {
            note(
                &st,
                &v.user.name,
                "ok",
                &format!(
                    "Set {name} to {} on {}",
                    level.name(),
                    if projects.is_empty() {
                        "no projects".to_string()
                    } else {
                        projects.join(", ")
                    }
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

async fn reset_password(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, f) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
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
                &format!("Set a new password for {name}; their sessions have ended"),
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
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, _) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let root = st.conf.web_root.clone();
    let u = match target(&st, &v, &name).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    if !v.grant.is_server_admin() {
        if let Some(p) = u.projects.iter().find(|p| !v.grant.projects.contains(p)) {
            return refused(
                &root,
                StatusCode::FORBIDDEN,
                &format!(
                    "{name} also works on `{p}`, which you do not manage; untick your projects \
                     instead"
                ),
            );
        }
    }
    match st.host.store.remove_user(&name).await {
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
        _ => not_found(&root),
    }
}

async fn create_project(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let (v, f) = match posted(&st, &headers, pairs).await {
        Ok(x) => x,
        Err(r) => return r,
    };
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
            ams_host::project::init(&task_st.host.data, &name)
        } else {
            ams_host::project::add(&task_st.host.data, &name, &git, branch.as_deref()).await
        };
        match &made {
            Ok(_) => {
                let text = format!("Created the project {name}");
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
