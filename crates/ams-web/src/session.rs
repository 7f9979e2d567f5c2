//! Browser sessions: login, logout, the session cookie, CSRF and login throttling.
//!
//! A session id is 256 random bits, stored only as its SHA-256. The cookie is HttpOnly,
//! SameSite=Lax, Path=/, and under TLS also Secure with the `__Host-` prefix. Login always makes
//! a new id. Sessions end when idle and at an absolute limit, at logout, and when the password
//! changes. A state-changing request made with the cookie must carry the session's CSRF token
//! (`csrf` form field or `X-CSRF-Token` header) and, when it sends an Origin, the site's own.
//! Failed logins are counted per account and per client address; each attempt is reserved in
//! both counts before its password is checked, so concurrent guesses get no more checks than
//! sequential ones. An unknown user costs the same argon2 work as a wrong password, and argon2
//! runs at most [`HASHING`] at a time.

use crate::api::ApiState;
use crate::auth;
use ams_host::timefmt;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// argon2 computations at once (each takes 19 MiB and tens of ms).
pub const HASHING: usize = 2;
/// Failed logins allowed per account, and per client address, in [`WINDOW`].
pub const PER_USER: u32 = 5;
pub const PER_ADDRESS: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
const MAX_TRACKED: usize = 10_000;

/// The client's address, added to each request by [`crate::serve`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The address a request is throttled under (an IPv6 client by its /64), as text.
pub(crate) fn client_ip(addr: Option<axum::Extension<ClientAddr>>) -> String {
    addr.map(|a| crate::limits::client_key(a.0 .0.ip()).to_string())
        .unwrap_or_default()
}

/// Login throttling and the argon2 budget.
#[derive(Debug)]
pub struct LoginGuard {
    fails: Mutex<HashMap<String, (u32, Instant)>>,
    hashing: Semaphore,
}

impl Default for LoginGuard {
    fn default() -> Self {
        LoginGuard {
            fails: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(HASHING),
        }
    }
}

/// A password check that holds its place in the account's and the address's allowance from
/// before the check until its verdict: dropped, it stays counted as a failure (also when the
/// client went away mid-check); [`Attempt::succeeded`] takes it back.
#[must_use = "an attempt is counted as a failure unless it succeeded"]
#[derive(Debug)]
pub(crate) struct Attempt<'a> {
    guard: &'a LoginGuard,
    user: String,
    addr: String,
}

impl LoginGuard {
    /// Reserves one attempt for `user` from `addr`, in both counters at once, or None when
    /// either allowance is used up in the [`WINDOW`]. Checking and counting under one lock is
    /// what keeps concurrent guesses from all passing the check before any is counted.
    pub(crate) fn reserve(&self, user: &str, addr: &str) -> Option<Attempt<'_>> {
        // Keyed by a hash: a name of any length (a form allows megabytes) costs 66 bytes.
        let user = format!("u:{}", auth::token_hash(&user.to_lowercase()));
        let addr = format!("a:{addr}");
        let mut m = self.fails.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > MAX_TRACKED {
            m.retain(|_, (_, since)| since.elapsed() < WINDOW);
        }
        let live = |k: &str| {
            m.get(k)
                .filter(|(_, since)| since.elapsed() < WINDOW)
                .map_or(0, |(n, _)| *n)
        };
        if live(&user) >= PER_USER || live(&addr) >= PER_ADDRESS {
            return None;
        }
        for key in [&user, &addr] {
            let e = m.entry(key.clone()).or_insert((0, Instant::now()));
            if e.1.elapsed() >= WINDOW {
                *e = (0, Instant::now());
            }
            e.0 += 1;
        }
        Some(Attempt {
            guard: self,
            user,
            addr,
        })
    }

    /// Hashes a new password within the hashing budget, off the async threads.
    pub async fn hash(&self, password: String) -> Result<String, String> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|_| "the host is stopping".to_string())?;
        tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Verifies a password within the hashing budget, off the async threads.
    pub async fn verify(&self, hash: String, password: String) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || auth::verify_password(&hash, &password))
            .await
            .unwrap_or(false)
    }
}

impl Attempt<'_> {
    /// The password was right: the attempt does not count against the address, and the
    /// account's earlier failures are forgiven.
    pub(crate) fn succeeded(self) {
        let mut m = self.guard.fails.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&self.user);
        if let Some((n, _)) = m.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A hash to check unknown users against, so that they cost what a wrong password costs.
fn decoy_hash() -> String {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY
        .get_or_init(|| auth::hash_password(&auth::random_secret(16)).unwrap_or_default())
        .clone()
}

pub fn cookie_name(tls: bool) -> &'static str {
    if tls {
        "__Host-ams_session"
    } else {
        "ams_session"
    }
}

/// The value of a cookie in the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The live session named by the request's cookie: its user and CSRF token.
pub async fn lookup(st: &ApiState, headers: &HeaderMap) -> Option<(ams_store::User, String)> {
    let id = cookie(headers, cookie_name(st.conf.use_ssl))?;
    st.host
        .store
        .session(
            &auth::token_hash(&id),
            timefmt::now(),
            st.conf.session_idle_secs as f64,
            st.conf.session_max_secs as f64,
        )
        .await
        .ok()?
}

/// Whether the request's Origin (when it sends one) is this site.
pub fn same_origin(headers: &HeaderMap, tls: bool) -> bool {
    let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let scheme = if tls { "https" } else { "http" };
    origin == format!("{scheme}://{host}")
}

/// Constant-time equality of two secrets.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A `page_redirect` that stays on this site: a relative path, nothing else.
pub fn safe_redirect(target: &str) -> Option<&str> {
    let ok = !target.is_empty()
        && target.len() <= 512
        && !target.starts_with(['/', '\\'])
        && !target.contains("..")
        && !target.contains("://")
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/?=&%+".contains(&b));
    ok.then_some(target)
}

/// Escapes text for HTML (the one rule: the templates' escaper is the same function).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let _ = crate::view::escape_into(&mut out, s);
    out
}

/// The login page (its own answers: an error message, the redirect target kept).
fn login_form(root: &str, status: StatusCode, redirect: &str, message: &str) -> Response {
    crate::view::render(
        status,
        &crate::view::LoginT {
            chrome: crate::view::Chrome::new(root, "Log in", None),
            redirect,
            message,
        },
    )
}

pub async fn login_page(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let redirect = q
        .get("page_redirect")
        .and_then(|r| safe_redirect(r))
        .unwrap_or("");
    login_form(&st.conf.web_root, StatusCode::OK, redirect, "")
}

const GENERIC: &str = "wrong user name or password";

pub async fn login(
    State(st): State<ApiState>,
    addr: Option<axum::Extension<ClientAddr>>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let root = st.conf.web_root.clone();
    if !same_origin(&headers, st.conf.use_ssl) {
        return login_form(&root, StatusCode::FORBIDDEN, "", "cross-site login refused");
    }
    let ip = client_ip(addr);
    let user = f
        .get("username")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let password = f.get("password").cloned().unwrap_or_default();
    let redirect = f
        .get("page_redirect")
        .and_then(|r| safe_redirect(r))
        .unwrap_or("")
        .to_string();
    let Some(attempt) = st.guard.reserve(&user, &ip) else {
        return login_form(
            &root,
            StatusCode::TOO_MANY_REQUESTS,
            &redirect,
            "too many failed logins; try again later",
        );
    };
    let record = st.host.store.user(&user).await.ok().flatten();
    let hash = record
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(decoy_hash);
    let good = st.guard.verify(hash, password).await;
    let allowed = record.as_ref().is_some_and(|u| u.grant.can_log_in());
    let Some(u) = record.filter(|_| good && allowed) else {
        drop(attempt);
        return login_form(&root, StatusCode::UNAUTHORIZED, &redirect, GENERIC);
    };
    attempt.succeeded();
    // A fresh id at every login; an old session of this browser ends.
    if let Some(old) = cookie(&headers, cookie_name(st.conf.use_ssl)) {
        let _ = st.host.store.end_session(&auth::token_hash(&old)).await;
    }
    let id = auth::random_secret(32);
    let csrf = auth::random_secret(32);
    // Made only if the checked password is still the user's (a change meanwhile ends it).
    let made = st
        .host
        .store
        .create_session(
            &auth::token_hash(&id),
            &u.name,
            &csrf,
            timefmt::now(),
            &u.password_hash,
        )
        .await;
    match made {
        Ok(true) => {}
        Ok(false) => {
            return login_form(
                &root,
                StatusCode::UNAUTHORIZED,
                &redirect,
                "the password changed meanwhile; log in again",
            );
        }
        Err(e) => {
            tracing::error!("cannot record a session of {}: {e}", u.name);
            // The cause (a full disk, say) is the host's state, not the account's.
            let (code, why) = if e.is_unavailable() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot log in now: {e}"),
                )
            } else {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot log in now: internal error".to_string(),
                )
            };
            return login_form(&root, code, &redirect, &why);
        }
    }
    let secure = if st.conf.use_ssl { "; Secure" } else { "" };
    let set = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        cookie_name(st.conf.use_ssl),
        st.conf.session_max_secs
    );
    let target = format!("/{root}/{redirect}");
    (
        StatusCode::SEE_OTHER,
        [("set-cookie", set), ("location", target)],
    )
        .into_response()
}

pub async fn logout(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let name = cookie_name(st.conf.use_ssl);
    let Some(id) = cookie(&headers, name) else {
        return (
            StatusCode::SEE_OTHER,
            [("location", format!("/{}/login", st.conf.web_root))],
        )
            .into_response();
    };
    let hash = auth::token_hash(&id);
    let now = timefmt::now();
    let live = st
        .host
        .store
        .session(
            &hash,
            now,
            st.conf.session_idle_secs as f64,
            st.conf.session_max_secs as f64,
        )
        .await
        .ok()
        .flatten();
    if let Some((_, csrf)) = live {
        let sent = f.get("csrf").map(String::as_str).unwrap_or("");
        if !secrets_equal(sent, &csrf) || !same_origin(&headers, st.conf.use_ssl) {
            return crate::pages::refused(
                &st.conf.web_root,
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token",
            );
        }
        let _ = st.host.store.end_session(&hash).await;
    }
    let secure = if st.conf.use_ssl { "; Secure" } else { "" };
    (
        StatusCode::SEE_OTHER,
        [
            (
                "set-cookie",
                format!("{name}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{secure}"),
            ),
            ("location", format!("/{}/login", st.conf.web_root)),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_stay_on_the_site() {
        assert_eq!(safe_redirect("output/p/b_1"), Some("output/p/b_1"));
        for bad in [
            "//evil.com",
            "/x",
            "https://evil.com",
            "\\\\evil",
            "a/../b",
            "x\"y",
            "",
            "a b",
        ] {
            assert_eq!(safe_redirect(bad), None, "{bad}");
        }
    }

    #[test]
    fn throttle_keys_stay_small_whatever_the_name() {
        let g = LoginGuard::default();
        let huge = "x".repeat(2 << 20);
        drop(g.reserve(&huge, "127.0.0.1"));
        drop(g.reserve("Bob", "127.0.0.1"));
        let m = g.fails.lock().unwrap();
        assert!(
            m.keys().all(|k| k.len() <= 66),
            "{:?}",
            m.keys().map(|k| k.len()).collect::<Vec<_>>()
        );
        // The name is compared without case, as before.
        assert!(m.contains_key(&format!("u:{}", auth::token_hash("bob"))));
    }

    #[test]
    fn escaping() {
        assert_eq!(esc("<script>\"'&"), "&lt;script&gt;&quot;&#39;&amp;");
    }

    #[test]
    fn throttling_reserves_per_user_and_address() {
        let g = LoginGuard::default();
        let held: Vec<_> = (0..PER_USER)
            .map(|_| g.reserve("Alice", "1.2.3.4").expect("within the allowance"))
            .collect();
        assert!(
            g.reserve("ALICE", "9.9.9.9").is_none(),
            "attempts in flight count, per account, whatever the address"
        );
        assert!(g.reserve("bob", "1.2.3.4").is_some());
        let mut held = held.into_iter();
        held.next().unwrap().succeeded();
        drop(held);
        assert!(
            g.reserve("alice", "5.5.5.5").is_some(),
            "a success forgives the account"
        );
        for i in 0..PER_ADDRESS {
            let a = g.reserve(&format!("user{i}"), "7.7.7.7");
            assert!(a.is_some(), "attempt {i}");
        }
        assert!(
            g.reserve("carol", "7.7.7.7").is_none(),
            "the address is used up"
        );
        assert!(g.reserve("carol", "7.7.7.8").is_some());
        let g = LoginGuard::default();
        for _ in 0..PER_ADDRESS {
            g.reserve("dave", "8.8.8.8").expect("allowed").succeeded();
        }
        assert!(
            g.reserve("erin", "8.8.8.8").is_some(),
            "successes do not use up the address"
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "ab"));
    }
}
