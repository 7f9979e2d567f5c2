//! web_conf.json: the host's configuration, with the described system's keys and ours.

use crate::docker_args::parse_size;
use crate::error::ConfigError;
use crate::retention;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SslConf {
    pub cert_file: Option<String>,
    pub ca_bundle_file: Option<String>,
    pub private_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConf {
    pub webhook_ip: String,
    pub webhook_port: u16,
    pub web_interface_ip: String,
    pub web_interface_port: u16,
    pub web_address: String,
    pub web_root: String,
    pub use_ssl: bool,
    pub ssl: SslConf,
    /// Builds that may run at once.
    pub max_active_builds: usize,
    /// Default build timeout; pipeline.json `timeout` overrides it.
    pub build_timeout_secs: u64,
    /// A build log is cut with a marker past this many bytes.
    pub log_max_bytes: u64,
    /// A build output larger than this (apparent size: sparse files count in full) is not
    /// archived; the build says why and keeps the folder.
    pub archive_max_bytes: u64,
    /// The most bytes a project's caches (pipeline.json `caches`) may hold; the least recently
    /// used entries are removed past it.
    pub cache_max_bytes: u64,
    /// A build that needs the engine while it is not answering waits this long for it, then
    /// fails with the reason.
    pub engine_wait_secs: u64,
    /// On SIGTERM or SIGINT, running builds get this long to finish (no new build starts, the
    /// queue is kept); those still running after it are stopped and end ERROR.
    pub shutdown_grace_secs: u64,
    /// Container limits applied unless docker.args sets them.
    pub container_memory: String,
    pub container_cpus: f64,
    pub container_pids_limit: i64,
    /// When set, builds may only use images from these registries (host names such as
    /// `docker.io` or `registry.example.com:5000`); an image without a registry is docker.io.
    pub allowed_registries: Option<Vec<String>>,
    /// Let notifications reach loopback, private and link-local addresses (tests, LAN chat).
    pub notify_allow_private: bool,
    /// Timeout of one notification request, 1 to 10 seconds.
    pub notify_timeout_secs: u64,
    /// A web session ends after this long without use…
    pub session_idle_secs: u64,
    /// …and after this long in any case.
    pub session_max_secs: u64,
    /// Retention default: keep the files of each project's newest this many final builds
    /// (a project's pipeline-config.json `retention.keep-builds` overrides it). Off when null.
    pub retention_keep_builds: Option<u64>,
    /// Retention default: remove the files of final builds that finished more than this many
    /// days ago (`retention.max-age-days` overrides it). Off when null.
    pub retention_max_age_days: Option<f64>,
    /// The delivery log keeps a webhook delivery's body (for replay) this many days; older
    /// bodies are dropped, the rest of the record stays. Null: kept as long as the record.
    pub delivery_body_max_age_days: Option<f64>,
    /// When set, `GET /metrics` answers only requests with `Authorization: Bearer <token>`;
    /// unset, it needs no authentication.
    pub metrics_token: Option<String>,
    /// The Docker engines builds run on. `None`: one local engine (`DOCKER_HOST` or the local
    /// socket) with `max_active_builds` slots.
    pub engines: Option<Vec<EngineConf>>,
}

/// The client certificate files of an engine reached over TCP with mutual TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineTls {
    /// PEM file with the certificate authority that signed the engine's certificate.
    pub ca: String,
    /// PEM file with this host's client certificate.
    pub cert: String,
    /// PEM file with the client certificate's private key.
    pub key: String,
}

/// One Docker engine of the pool (web_conf.json `engines[i]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConf {
    pub name: String,
    /// `unix:///path/docker.sock` (an engine on this machine: builds bind-mount the host's
    /// folders) or `tcp://HOST:PORT` (an engine elsewhere: source and output travel through
    /// the Engine API's archive endpoint).
    pub host: String,
    #[serde(default)]
    pub tls: Option<EngineTls>,
    /// Builds that may run on it at once.
    pub slots: usize,
    /// What it offers; a pipeline's `docker.labels` must all be among them.
    #[serde(default)]
    pub labels: Vec<String>,
}

impl EngineConf {
    /// Whether the engine shares this machine's file system (a Unix socket).
    pub fn is_local(&self) -> bool {
        self.host.is_empty() || self.host.starts_with("unix://")
    }
}

/// Most labels an engine or a pipeline may name.
pub const MAX_LABELS: usize = 32;

/// What is wrong with a label, if anything: 1 to 64 letters, digits, `-`, `_`, `.`.
pub fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() || label.len() > 64 {
        Some("must be 1 to 64 characters")
    } else if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        Some("may hold only letters, digits, '-', '_' and '.'")
    } else {
        None
    }
}

/// Days a webhook delivery's body is kept by default.
pub const DELIVERY_BODY_DAYS: f64 = 7.0;

impl Default for WebConf {
    fn default() -> Self {
        WebConf {
            webhook_ip: "0.0.0.0".into(),
            webhook_port: 8081,
            web_interface_ip: "0.0.0.0".into(),
            web_interface_port: 8080,
            web_address: "localhost".into(),
            web_root: "ams-build".into(),
            use_ssl: false,
            ssl: SslConf::default(),
            max_active_builds: 2,
            build_timeout_secs: 3600,
            log_max_bytes: 64 << 20,
            archive_max_bytes: 8 << 30,
            cache_max_bytes: 5 << 30,
            engine_wait_secs: 300,
            shutdown_grace_secs: 30,
            container_memory: "2g".into(),
            container_cpus: 2.0,
            container_pids_limit: 4096,
            allowed_registries: None,
            notify_allow_private: false,
            notify_timeout_secs: 10,
            session_idle_secs: 8 * 3600,
            session_max_secs: 7 * 24 * 3600,
            retention_keep_builds: None,
            retention_max_age_days: None,
            delivery_body_max_age_days: Some(DELIVERY_BODY_DAYS),
            metrics_token: None,
            engines: None,
        }
    }
}

/// What is wrong with a `web_root`, if anything. Every URL is `/{web_root}/…`: an empty root
/// would make `//host/…` links and redirects that leave the site, and a slash, a dot segment or
/// a character outside the unreserved set would change or break the routes.
fn web_root_problem(root: &str) -> Option<&'static str> {
    if root.is_empty() {
        Some("is empty")
    } else if root.starts_with('/') || root.ends_with('/') {
        Some("starts or ends with a slash")
    } else if root.contains(['/', '\\']) {
        Some("has more than one path segment")
    } else if root == "." || root == ".." {
        Some("is a dot segment")
    } else if root.len() > 64 {
        Some("is longer than 64 characters")
    } else if !root
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
    {
        Some("has a character other than letters, digits, '-', '_', '.' and '~'")
    } else {
        None
    }
}

/// The longest `shutdown_grace_secs` taken.
pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 86_400;

/// The shortest `metrics_token` taken.
pub const METRICS_TOKEN_MIN: usize = 16;

impl WebConf {
    pub const FILE: &'static str = "web_conf.json";

    /// Parses the file's text. `file` is the path shown in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let cfg: WebConf = serde_json::from_str(text).map_err(|e| {
            let mut ce = ConfigError::json(file, &e);
            if ce.message.starts_with("unknown field `user_ssl`") {
                // The described system's SSL example spells the key so; its code read use_ssl.
                ce.message = format!(
                    "unknown key `user_ssl`: the described system's documentation misspells \
                     `use_ssl`; rename it to \"use_ssl\" (see {})",
                    crate::compat::COMPAT_DOC
                );
            } else if ce.message.starts_with("unknown field") {
                ce.message = format!(
                    "{}; remove the key or correct its spelling",
                    ce.message.replacen("unknown field", "unknown key", 1)
                );
            }
            ce
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, msg: &str| Err(ConfigError::field(file, field, msg));
        if self.max_active_builds == 0 || self.max_active_builds > 256 {
            return bad("max_active_builds", "must be from 1 to 256");
        }
        if self.build_timeout_secs == 0 {
            return bad("build_timeout_secs", "must be at least 1");
        }
        if self.shutdown_grace_secs > MAX_SHUTDOWN_GRACE_SECS {
            return bad(
                "shutdown_grace_secs",
                &format!(
                    "must be at most {MAX_SHUTDOWN_GRACE_SECS} (a day); 0 stops running builds at once"
                ),
            );
        }
        if self.log_max_bytes < 4096 {
            return bad("log_max_bytes", "must be at least 4096");
        }
        if let Some(problem) = web_root_problem(&self.web_root) {
            return bad(
                "web_root",
                &format!(
                    "{problem}; it must be one non-empty path segment without slashes, of \
                     letters, digits, '-', '_', '.' and '~', such as \"ams-build\" (the default)"
                ),
            );
        }
        match parse_size(&self.container_memory) {
            Err(e) => return bad("container_memory", &e),
            // The engine refuses a memory limit under 6 MiB: every build would fail there.
            Ok(n) if n < 6 << 20 => {
                return bad(
                    "container_memory",
                    "is under 6m, the least the Docker engine takes; give at least \"6m\"",
                )
            }
            Ok(_) => {}
        }
        if !(self.container_cpus > 0.0 && self.container_cpus.is_finite()) {
            return bad("container_cpus", "must be a positive number");
        }
        if !(1..=10).contains(&self.notify_timeout_secs) {
            return bad("notify_timeout_secs", "must be from 1 to 10");
        }
        if self.session_idle_secs == 0 || self.session_max_secs < self.session_idle_secs {
            return bad(
                "session_max_secs",
                "sessions need session_idle_secs ≥ 1 and session_max_secs ≥ session_idle_secs",
            );
        }
        if let Some(list) = &self.allowed_registries {
            if let Some(r) = list
                .iter()
                .find(|r| r.is_empty() || r.contains('/') || r.chars().any(char::is_whitespace))
            {
                return bad(
                    "allowed_registries",
                    &format!("`{r}` is not a registry host; write names such as \"docker.io\" or \"registry.example.com:5000\""),
                );
            }
        }
        if self.container_pids_limit <= 0 {
            return bad("container_pids_limit", "must be a positive number");
        }
        if self
            .retention_keep_builds
            .is_some_and(|n| !retention::keep_builds_ok(n))
        {
            return bad("retention_keep_builds", retention::KEEP_BUILDS_RULE);
        }
        if self
            .retention_max_age_days
            .is_some_and(|d| !retention::max_age_ok(d))
        {
            return bad("retention_max_age_days", retention::MAX_AGE_RULE);
        }
        if self
            .delivery_body_max_age_days
            .is_some_and(|d| !retention::max_age_ok(d))
        {
            return bad(
                "delivery_body_max_age_days",
                "must be a number of days greater than 0 (such as 7; fractions allowed), or \
                 null to keep delivery bodies as long as their records",
            );
        }
        if let Some(t) = &self.metrics_token {
            if t.len() < METRICS_TOKEN_MIN || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(
                    "metrics_token",
                    &format!(
                        "must be at least {METRICS_TOKEN_MIN} printable ASCII characters \
                         without spaces (it is sent as `Authorization: Bearer <token>`), or \
                         null for a /metrics without authentication"
                    ),
                );
            }
        }
        if let Some(engines) = &self.engines {
            self.validate_engines(file, engines)?;
        }
        Ok(())
    }

    fn validate_engines(&self, file: &str, engines: &[EngineConf]) -> Result<(), ConfigError> {
        let bad = |field: String, msg: String| Err(ConfigError::field(file, field, msg));
        if engines.is_empty() {
            return bad(
                "engines".into(),
                "is an empty list, so no build could run; list at least one engine, or remove \
                 the key for the one local engine"
                    .into(),
            );
        }
        if engines.len() > 64 {
            return bad("engines".into(), "lists more than 64 engines".into());
        }
        for (i, e) in engines.iter().enumerate() {
            let at = |k: &str| format!("engines[{i}].{k}");
            if let Some(p) = label_problem(&e.name) {
                return bad(
                    at("name"),
                    format!("`{}` {p}", crate::error::clip(&e.name, 64)),
                );
            }
            if engines[..i].iter().any(|o| o.name == e.name) {
                return bad(
                    at("name"),
                    format!("`{}` names two engines; give each its own name", e.name),
                );
            }
            // The same engine twice would take twice its slots of builds at once.
            if let Some(o) = engines[..i].iter().find(|o| o.host == e.host) {
                return bad(
                    at("host"),
                    format!(
                        "`{}` is engine `{}` already; list each engine once and give it all \
                         its slots",
                        crate::error::clip(&e.host, 200),
                        o.name
                    ),
                );
            }
            if e.slots == 0 || e.slots > 256 {
                return bad(at("slots"), "must be from 1 to 256".into());
            }
            if let Some(rest) = e.host.strip_prefix("unix://") {
                if !rest.starts_with('/') {
                    return bad(
                        at("host"),
                        "a Unix socket needs an absolute path, as in \
                         \"unix:///var/run/docker.sock\""
                            .into(),
                    );
                }
                if e.tls.is_some() {
                    return bad(
                        at("tls"),
                        "is for engines reached over TCP; remove it from a unix:// engine".into(),
                    );
                }
            } else if let Some(rest) = e.host.strip_prefix("tcp://") {
                let ok = rest
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return bad(
                        at("host"),
                        format!(
                            "`{}` has no host and port; write \"tcp://HOST:PORT\", as in \
                             \"tcp://10.0.0.5:2376\"",
                            crate::error::clip(&e.host, 100)
                        ),
                    );
                }
                if e.tls.is_none() {
                    return bad(
                        at("tls"),
                        "is missing: an engine over TCP is reached only with mutual TLS; add \
                         \"tls\": {\"ca\": …, \"cert\": …, \"key\": …} with the engine's CA and \
                         this host's client certificate and key"
                            .into(),
                    );
                }
            } else {
                return bad(
                    at("host"),
                    format!(
                        "`{}` is neither unix:///PATH nor tcp://HOST:PORT",
                        crate::error::clip(&e.host, 100)
                    ),
                );
            }
            if let Some(t) = &e.tls {
                for (k, v) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
                    if v.trim().is_empty() {
                        return bad(
                            format!("engines[{i}].tls.{k}"),
                            "is empty; give the path of a PEM file".into(),
                        );
                    }
                }
            }
            if e.labels.len() > MAX_LABELS {
                return bad(at("labels"), format!("has more than {MAX_LABELS} labels"));
            }
            for (j, l) in e.labels.iter().enumerate() {
                if let Some(p) = label_problem(l) {
                    return bad(
                        format!("engines[{i}].labels[{j}]"),
                        format!("`{}` {p}", crate::error::clip(l, 64)),
                    );
                }
            }
        }
        Ok(())
    }

    /// The engines builds run on: those of `engines`, or the one local engine (`host` empty:
    /// `DOCKER_HOST` or the local socket) with `max_active_builds` slots.
    pub fn engine_list(&self) -> Vec<EngineConf> {
        match &self.engines {
            Some(list) => list.clone(),
            None => vec![EngineConf {
                name: "local".into(),
                host: String::new(),
                tls: None,
                slots: self.max_active_builds,
                labels: Vec::new(),
            }],
        }
    }

    /// The retention every project has unless its pipeline-config.json says otherwise.
    pub fn retention(&self) -> retention::Policy {
        retention::Policy {
            keep_builds: self.retention_keep_builds.map(|n| n as u32),
            max_age_days: self.retention_max_age_days,
        }
    }

    /// Whether builds may use `image` (see `allowed_registries`).
    pub fn registry_allowed(&self, image: &str) -> bool {
        match &self.allowed_registries {
            None => true,
            Some(list) => {
                let r = crate::docker_args::image_registry(image);
                list.iter().any(|a| a.eq_ignore_ascii_case(r))
            }
        }
    }

    pub fn memory_bytes(&self) -> i64 {
        parse_size(&self.container_memory).unwrap_or(2 << 30)
    }

    /// `http(s)://{web_address}:{web_interface_port}/{web_root}/`, the base of every link.
    pub fn base_web_address(&self) -> String {
        let scheme = if self.use_ssl { "https" } else { "http" };
        format!(
            "{scheme}://{}:{}/{}/",
            self.web_address, self.web_interface_port, self.web_root
        )
    }

    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip() {
        let d = WebConf::default();
        assert_eq!(WebConf::parse(&d.to_pretty_json(), "w").unwrap(), d);
        assert_eq!(WebConf::parse("{}", "w").unwrap(), d);
    }

    #[test]
    fn engines_are_checked_with_the_key_and_the_fix() {
        let ok = r#"{"engines": [
            {"name": "local", "host": "unix:///var/run/docker.sock", "slots": 2},
            {"name": "b1", "host": "tcp://10.0.0.5:2376",
             "tls": {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"},
             "slots": 4, "labels": ["linux", "big"]}]}"#;
        let c = WebConf::parse(ok, "web_conf.json").unwrap();
        let list = c.engine_list();
        assert_eq!(list.len(), 2);
        assert!(list[0].is_local() && !list[1].is_local());
        assert_eq!(list[1].labels, ["linux", "big"]);
        // Without the key: one local engine with max_active_builds slots.
        let one = WebConf::parse(r#"{"max_active_builds": 3}"#, "w").unwrap();
        let list = one.engine_list();
        assert_eq!(
            (list.len(), list[0].slots, list[0].is_local()),
            (1, 3, true)
        );
        for (text, field, fix) in [
            (r#"{"engines": []}"#, "engines", "at least one engine"),
            (
                r#"{"engines": [{"name": "a", "host": "tcp://h:1", "slots": 1}]}"#,
                "engines[0].tls",
                "mutual TLS",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "tcp://h", "slots": 1}]}"#,
                "engines[0].host",
                "tcp://HOST:PORT",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "ssh://h", "slots": 1}]}"#,
                "engines[0].host",
                "unix:///PATH",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "unix:///s", "slots": 0}]}"#,
                "engines[0].slots",
                "1 to 256",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "unix:///s", "slots": 1},
                                {"name": "a", "host": "unix:///t", "slots": 1}]}"#,
                "engines[1].name",
                "its own name",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "unix:///s", "slots": 1},
                                {"name": "b", "host": "unix:///s", "slots": 1}]}"#,
                "engines[1].host",
                "is engine `a` already",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "unix:///s", "slots": 1, "labels": ["b c"]}]}"#,
                "engines[0].labels[0]",
                "letters, digits",
            ),
            (
                r#"{"engines": [{"name": "a", "host": "unix:///s", "slots": 1,
                   "tls": {"ca": "a", "cert": "b", "key": "c"}}]}"#,
                "engines[0].tls",
                "over TCP",
            ),
        ] {
            let e = WebConf::parse(text, "web_conf.json").unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(fix), "{e}");
            assert!(e.to_string().starts_with("web_conf.json"), "{e}");
        }
        let e = WebConf::parse(
            r#"{"engines": [{"name": "a", "host": "unix:///s", "slot": 1}]}"#,
            "web_conf.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`slot`"), "{e}");
    }

    #[test]
    fn the_documented_user_ssl_typo_names_the_fix() {
        let e = WebConf::parse("{\n\"user_ssl\": false\n}", "web_conf.json").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(e.message.contains("rename it to \"use_ssl\""), "{e}");
        assert!(e.message.contains("coming-from-python"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = WebConf::parse("{\n  \"web_port\": 1\n}", "/x/web_conf.json").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/x/web_conf.json: line 2"), "{s}");
        assert!(s.contains("`web_port`"), "{s}");
    }

    #[test]
    fn syntax_error_names_line() {
        let e = WebConf::parse("{\n\"use_ssl\": true,,\n}", "w").unwrap_err();
        assert_eq!(e.position.unwrap().0, 2);
    }

    #[test]
    fn invalid_values_are_refused() {
        assert_eq!(
            WebConf::parse(r#"{"max_active_builds": 0}"#, "w")
                .unwrap_err()
                .field,
            "max_active_builds"
        );
        assert!(WebConf::parse(r#"{"container_memory": "x"}"#, "w").is_err());
        let e = WebConf::parse(r#"{"container_memory": "4m"}"#, "w").unwrap_err();
        assert!(e.to_string().contains("6m"), "{e}");
        assert!(WebConf::parse(r#"{"container_memory": "6m"}"#, "w").is_ok());
        let e = WebConf::parse(r#"{"shutdown_grace_secs": 86401}"#, "w").unwrap_err();
        assert_eq!(e.field, "shutdown_grace_secs");
        assert!(e.to_string().contains("at most 86400"), "{e}");
        for ok in [0, 86_400] {
            let text = format!(r#"{{"shutdown_grace_secs": {ok}}}"#);
            assert_eq!(WebConf::parse(&text, "w").unwrap().shutdown_grace_secs, ok);
        }
        for (text, field) in [
            (r#"{"retention_keep_builds": 0}"#, "retention_keep_builds"),
            (
                r#"{"retention_keep_builds": 5000000000}"#,
                "retention_keep_builds",
            ),
            (r#"{"retention_max_age_days": 0}"#, "retention_max_age_days"),
            (
                r#"{"retention_max_age_days": -2.5}"#,
                "retention_max_age_days",
            ),
            (
                r#"{"delivery_body_max_age_days": 0}"#,
                "delivery_body_max_age_days",
            ),
        ] {
            let e = WebConf::parse(text, "/d/web_conf.json").unwrap_err();
            assert_eq!(e.field, field, "{text}");
            assert!(e.to_string().contains("or null to keep"), "{e}");
        }
    }

    #[test]
    fn retention_is_off_by_default_and_read_when_set() {
        let d = WebConf::default();
        assert!(d.retention().keeps_all());
        assert!(d
            .to_pretty_json()
            .contains("\"retention_keep_builds\": null"));
        let c = WebConf::parse(
            r#"{"retention_keep_builds": 20, "retention_max_age_days": 30}"#,
            "w",
        )
        .unwrap();
        assert_eq!(c.retention().keep_builds, Some(20));
        assert_eq!(c.retention().max_age_days, Some(30.0));
    }

    #[test]
    fn a_metrics_token_is_long_printable_and_optional() {
        assert_eq!(WebConf::parse("{}", "w").unwrap().metrics_token, None);
        let ok = WebConf::parse(r#"{"metrics_token": "0123456789abcdef"}"#, "w").unwrap();
        assert_eq!(ok.metrics_token.as_deref(), Some("0123456789abcdef"));
        for bad in ["", "short", "0123456789 abcdef", "0123456789abcdé"] {
            let text = serde_json::json!({ "metrics_token": bad }).to_string();
            let e = WebConf::parse(&text, "w").unwrap_err();
            assert_eq!(e.field, "metrics_token", "{bad:?}");
        }
    }

    #[test]
    fn web_root_is_one_plain_path_segment() {
        for good in ["ams-build", "ci", "ams.ci_2~x", "AMS"] {
            let text = format!(r#"{{"web_root": "{good}"}}"#);
            assert_eq!(WebConf::parse(&text, "w").unwrap().web_root, good);
        }
        for bad in [
            "",
            "/",
            "/ams-build",
            "ams-build/",
            "a/b",
            "\\\\evil.example",
            ".",
            "..",
            "a b",
            "a?b",
            "a#b",
            "{x}",
            "%2e",
            "é",
        ] {
            let text = serde_json::json!({ "web_root": bad }).to_string();
            let e = WebConf::parse(&text, "/d/web_conf.json").unwrap_err();
            assert_eq!(e.field, "web_root", "{bad:?}");
            let s = e.to_string();
            assert!(s.starts_with("/d/web_conf.json: field `web_root`: "), "{s}");
            assert!(s.contains("such as \"ams-build\""), "{s}");
        }
        let long = "a".repeat(65);
        assert!(WebConf::parse(&format!(r#"{{"web_root": "{long}"}}"#), "w").is_err());
    }

    /// A deserializer that only records the field names a derived `Deserialize` asks for: the
    /// exact keys the parser accepts, whatever serialization would show.
    struct FieldNames<'a>(&'a mut Vec<&'static str>);

    impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct with named fields"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.extend_from_slice(fields);
            Err(serde::de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        let mut names = Vec::new();
        let _ = T::deserialize(FieldNames(&mut names));
        assert!(
            !names.is_empty(),
            "{} is not a plain struct",
            std::any::type_name::<T>()
        );
        names
    }

    /// Every key web_conf.json may hold, as `key` or `outer.inner`, with its default.
    fn accepted_keys() -> std::collections::BTreeMap<String, serde_json::Value> {
        // The keys whose value is itself an object of keys, and the type that reads it.
        let nested: &[(&str, Vec<&'static str>)] = &[("ssl", fields_of::<SslConf>())];
        let defaults = serde_json::to_value(WebConf::default()).unwrap();
        let mut out = std::collections::BTreeMap::new();
        for key in fields_of::<WebConf>() {
            let default = defaults.get(key).cloned().unwrap_or_else(|| {
                panic!("`{key}` is accepted but missing from the serialized defaults")
            });
            match nested.iter().find(|(k, _)| *k == key) {
                Some((_, inner)) => {
                    for sub in inner {
                        let d = default.get(sub).cloned().unwrap_or_else(|| {
                            panic!("`{key}.{sub}` is missing from the serialized defaults")
                        });
                        out.insert(format!("{key}.{sub}"), d);
                    }
                }
                None => assert!(
                    !default.is_object(),
                    "`{key}` holds an object: add its type to `nested` above"
                ),
            }
            out.insert(key.to_string(), default);
        }
        out
    }

    /// The rows of the first table of docs/web_conf.md whose header starts with `Key`:
    /// (key without backticks, default cell).
    fn documented_rows(doc: &str) -> Vec<(String, String)> {
        let cells = |line: &str| -> Vec<String> {
            line.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        };
        let mut lines = doc.lines().skip_while(|l| {
            !(l.trim_start().starts_with('|') && cells(l).first().is_some_and(|c| c == "Key"))
        });
        assert!(lines.next().is_some(), "no table with a `Key` column");
        lines
            .skip(1) // the |---| line
            .take_while(|l| l.trim_start().starts_with('|'))
            .map(|l| {
                let c = cells(l);
                let key = c[0]
                    .strip_prefix('`')
                    .and_then(|k| k.strip_suffix('`'))
                    .unwrap_or_else(|| panic!("first cell is not a key in backticks: {l}"));
                (key.to_string(), c.get(1).cloned().unwrap_or_default())
            })
            .collect()
    }

    fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        }
    }

    #[test]
    fn docs_table_lists_exactly_the_accepted_keys() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/web_conf.md");
        let doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let accepted = accepted_keys();
        let rows = documented_rows(&doc);

        let mut documented = std::collections::BTreeSet::new();
        for (key, _) in &rows {
            assert!(
                documented.insert(key.clone()),
                "`{key}` has two rows in {path}"
            );
        }
        let missing: Vec<_> = accepted
            .keys()
            .filter(|k| !documented.contains(*k))
            .collect();
        let extra: Vec<_> = documented
            .iter()
            .filter(|k| !accepted.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{path} and the parser disagree: accepted but not documented {missing:?}; \
             documented but not accepted {extra:?}"
        );

        for (key, cell) in &rows {
            let default = &accepted[key];
            // Each key is accepted on its own, with its default, by the parser itself.
            let text = match key.split_once('.') {
                Some((outer, inner)) => serde_json::json!({ outer: { inner: default } }),
                None => serde_json::json!({ key.as_str(): default }),
            };
            WebConf::parse(&text.to_string(), "w").unwrap_or_else(|e| panic!("`{key}`: {e}"));
            if default.is_object() {
                continue; // its keys have rows of their own
            }
            let written = cell
                .split('`')
                .nth(1)
                .unwrap_or_else(|| panic!("`{key}`: the default cell has no `value`: {cell}"));
            let shown: serde_json::Value = serde_json::from_str(written)
                .unwrap_or_else(|e| panic!("`{key}`: default `{written}` is not JSON: {e}"));
            assert!(
                same_json(&shown, default),
                "`{key}`: {path} says the default is {shown}, the code says {default}"
            );
        }
        assert!(WebConf::parse(r#"{"not_a_key": 1}"#, "w").is_err());
    }
}
