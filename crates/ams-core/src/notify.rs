//! Outbound notifications, the IO-free part: out-webhooks of webhooks.json, their triggers,
//! `{variables}`, the Discord message with Discord's published limits applied, and the address
//! classes the SSRF guard refuses.

use crate::error::ConfigError;
use crate::status::BuildStatus;
use crate::vars;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Variables of out-webhook strings.
pub const NOTIFY_VARS: &[&str] = &[
    "app_name",
    "app_version",
    "quote",
    "base_web_address",
    "project",
    "build_name",
    "build_index",
    "build_hash",
    "git_hash",
    "7z_hash",
    "trigger_method",
    "actor",
    "created",
    "status",
    "legacy_status",
    "canceled_by",
    "7z_link",
    "output_log",
];

/// Templates written for the described system that would double an address here: its
/// `{output_log}` and `{7z_link}` were paths to put after `{base_web_address}`, ours are whole
/// links. One line per such use, with the fix, for the start-up log.
pub fn doubled_links(webhooks_json: &str) -> Vec<String> {
    let mut out = Vec::new();
    for var in ["output_log", "7z_link"] {
        for sep in ["/", ""] {
            let pat = format!("{{base_web_address}}{sep}{{{var}}}");
            if webhooks_json.contains(&pat) {
                out.push(format!(
                    "webhooks.json: `{pat}` doubles the address: {{{var}}} is a whole link \
                     here (in the described system it was a path); write {{{var}}} alone (see {})",
                    crate::compat::COMPAT_DOC
                ));
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookType {
    Discord,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    BuildComplete,
    BuildStarted,
    BuildFailed,
    BuildFixed,
    /// The build ended ERROR: the host or its engine failed, not the project.
    BuildError,
}

impl Trigger {
    pub fn parse(s: &str) -> Option<Trigger> {
        match s {
            "build-complete" => Some(Trigger::BuildComplete),
            "build-started" => Some(Trigger::BuildStarted),
            "build-failed" => Some(Trigger::BuildFailed),
            "build-fixed" => Some(Trigger::BuildFixed),
            "build-error" => Some(Trigger::BuildError),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Trigger::BuildComplete => "build-complete",
            Trigger::BuildStarted => "build-started",
            Trigger::BuildFailed => "build-failed",
            Trigger::BuildFixed => "build-fixed",
            Trigger::BuildError => "build-error",
        }
    }
}

/// What happened to a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildEvent {
    Started,
    /// Finished with `status`; `previous` is the status of the branch's previous finished build.
    Finished {
        status: BuildStatus,
        previous: Option<BuildStatus>,
    },
}

impl Trigger {
    /// Whether this trigger fires for the event.
    pub fn fires(self, e: BuildEvent) -> bool {
        match (self, e) {
            (Trigger::BuildStarted, BuildEvent::Started) => true,
            (Trigger::BuildComplete, BuildEvent::Finished { .. }) => true,
            (Trigger::BuildFailed, BuildEvent::Finished { status, .. }) => {
                matches!(status, BuildStatus::Fail | BuildStatus::Warn)
            }
            (Trigger::BuildError, BuildEvent::Finished { status, .. }) => {
                status == BuildStatus::Error
            }
            (Trigger::BuildFixed, BuildEvent::Finished { status, previous }) => {
                status == BuildStatus::Pass && matches!(previous, Some(p) if p != BuildStatus::Pass)
            }
            _ => false,
        }
    }
}

/// One out-webhook, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct OutWebhook {
    pub name: String,
    pub kind: HookType,
    pub triggers: Vec<Trigger>,
    pub url: String,
    /// HMAC key of `json` hooks.
    pub secret: Option<String>,
    /// The message template (`default` and `embeds`), strings still holding `{variables}`.
    pub data: Value,
}

const FILE: &str = "webhooks.json";

fn check_strings(path: &str, v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::String(s) => {
            if let Some(name) = vars::first_unknown(s, NOTIFY_VARS) {
                return Err(ConfigError::field(
                    FILE,
                    path,
                    format!(
                        "unknown variable `{{{name}}}`; known variables are {}",
                        NOTIFY_VARS.join(", ")
                    ),
                ));
            }
            Ok(())
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| check_strings(&format!("{path}[{i}]"), x)),
        Value::Object(m) => m
            .iter()
            .try_for_each(|(k, x)| check_strings(&format!("{path}.{k}"), x)),
        _ => Ok(()),
    }
}

/// Validates the out-webhooks of webhooks.json. Unknown variables are reported here, when the
/// configuration is loaded, never when a message is sent.
pub fn parse_out_webhooks(items: &[Value]) -> Result<Vec<OutWebhook>, ConfigError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("out-webhooks[{i}]");
        let f = |k: &str| format!("{path}.{k}");
        let obj = item
            .as_object()
            .ok_or_else(|| ConfigError::field(FILE, &path, "expected an object"))?;
        for k in obj.keys() {
            if !["hook-name", "type", "trigger", "url", "secret", "data"].contains(&k.as_str()) {
                return Err(ConfigError::field(FILE, f(k), "is not a known key"));
            }
        }
        let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
        let name = s("hook-name")
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| ConfigError::field(FILE, f("hook-name"), "is missing"))?;
        let kind = match s("type").as_deref() {
            Some("discord") => HookType::Discord,
            Some("json") => HookType::Json,
            other => {
                return Err(ConfigError::field(
                    FILE,
                    f("type"),
                    format!("must be \"discord\" or \"json\", not {other:?}"),
                ))
            }
        };
        let trig_values: Vec<Value> =
            match obj.get("trigger") {
                Some(Value::Array(a)) => a.clone(),
                Some(v @ Value::String(_)) => vec![v.clone()],
                _ => return Err(ConfigError::field(
                    FILE,
                    f("trigger"),
                    "is missing; use build-complete, build-started, build-failed, build-fixed or build-error",
                )),
            };
        let mut triggers = Vec::new();
        for t in trig_values {
            let name = t.as_str().unwrap_or("");
            triggers.push(Trigger::parse(name).ok_or_else(|| {
                ConfigError::field(
                    FILE,
                    f("trigger"),
                    format!("unknown trigger `{name}`; use build-complete, build-started, build-failed, build-fixed or build-error"),
                )
            })?);
        }
        let url = s("url").ok_or_else(|| ConfigError::field(FILE, f("url"), "is missing"))?;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ConfigError::field(FILE, f("url"), "must be an http(s) URL"));
        }
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        check_strings(&f("data"), &data)?;
        out.push(OutWebhook {
            name,
            kind,
            triggers,
            url,
            secret: s("secret"),
            data,
        });
    }
    Ok(out)
}

/// The host part of a URL, the only part ever shown: the rest may carry a token.
pub fn url_host(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.split(['/', '?', '#']).next().unwrap_or("");
    hostport.rsplit('@').next().unwrap_or("").to_string()
}

/// Counts as Discord does (UTF-16 code units).
fn len16(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Cuts `s` to at most `max` (UTF-16 units), ending with an ellipsis when cut.
pub fn cut(s: &str, max: usize) -> String {
    if len16(s) <= max {
        return s.to_string();
    }
    let mut out = String::new();
    let mut n = 0;
    for c in s.chars() {
        let w = c.len_utf16();
        if n + w > max.saturating_sub(1) {
            break;
        }
        out.push(c);
        n += w;
    }
    out.push('…');
    out
}

fn expand_all(v: &Value, values: &BTreeMap<&str, String>) -> Value {
    match v {
        Value::String(s) => Value::String(vars::expand(s, values).unwrap_or_else(|_| s.clone())),
        Value::Array(a) => Value::Array(a.iter().map(|x| expand_all(x, values)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), expand_all(x, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn text_of(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Builds the Discord execute-webhook body from a hook's `data` template and the variables,
/// within every limit Discord publishes, and with mentions disabled.
pub fn discord_message(data: &Value, values: &BTreeMap<&str, String>) -> Value {
    let d = expand_all(data, values);
    let default = d.get("default").cloned().unwrap_or(Value::Null);
    let mut msg = Map::new();
    let mut content = text_of(default.get("content")).unwrap_or_default();
    if let Some(name) = text_of(default.get("username")) {
        let mut u = name;
        for banned in ["clyde", "discord"] {
            while let Some(i) = u.to_ascii_lowercase().find(banned) {
                u.replace_range(i..i + banned.len(), "");
            }
        }
        let u = cut(u.trim(), 80);
        if !u.is_empty() {
            msg.insert("username".into(), json!(u));
        }
    }
    if let Some(a) = text_of(default.get("avatar_url")) {
        if a.starts_with("https://") || a.starts_with("http://") {
            msg.insert("avatar_url".into(), json!(a));
        }
    }
    let mut embeds = Vec::new();
    for e in d
        .get("embeds")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(10)
    {
        let mut o = Map::new();
        if let Some(t) = text_of(e.get("title")) {
            o.insert("title".into(), json!(cut(&t, 256)));
        }
        if let Some(t) = text_of(e.get("description")) {
            o.insert("description".into(), json!(cut(&t, 4096)));
        }
        if let Some(u) = text_of(e.get("url")).filter(|u| u.starts_with("http")) {
            o.insert("url".into(), json!(u));
        }
        match e.get("color") {
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                o.insert("color".into(), json!(n.as_u64().unwrap_or(0) & 0xFF_FFFF));
            }
            Some(Value::String(s)) => {
                let s = s.trim_start_matches('#').trim_start_matches("0x");
                if let Ok(n) = u64::from_str_radix(s, 16).or_else(|_| s.parse()) {
                    o.insert("color".into(), json!(n & 0xFF_FFFF));
                }
            }
            _ => {}
        }
        if let Some(t) = text_of(e.get("timestamp")) {
            o.insert("timestamp".into(), json!(t));
        }
        let footer = match e.get("footer") {
            Some(Value::Object(f)) => text_of(f.get("text")),
            other => text_of(other),
        };
        if let Some(f) = footer {
            o.insert("footer".into(), json!({"text": cut(&f, 2048)}));
        }
        if let Some(Value::Object(a)) = e.get("author") {
            if let Some(n) = text_of(a.get("name")) {
                o.insert("author".into(), json!({"name": cut(&n, 256)}));
            }
        }
        let fields: Vec<Value> = e
            .get("fields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(25)
            .map(|f| {
                let name = text_of(f.get("name")).unwrap_or_else(|| "-".into());
                let value = text_of(f.get("value")).unwrap_or_else(|| "-".into());
                json!({"name": cut(&name, 256), "value": cut(&value, 1024),
                       "inline": f.get("inline").and_then(Value::as_bool).unwrap_or(false)})
            })
            .collect();
        if !fields.is_empty() {
            o.insert("fields".into(), Value::Array(fields));
        }
        if !o.is_empty() {
            embeds.push(Value::Object(o));
        }
    }
    fit_total(&mut embeds, 6000);
    if content.trim().is_empty() && embeds.is_empty() {
        content =
            vars::expand("{project} build {build_index}: {status}", values).unwrap_or_default();
    }
    if !content.is_empty() {
        msg.insert("content".into(), json!(cut(&content, 2000)));
    }
    if !embeds.is_empty() {
        msg.insert("embeds".into(), Value::Array(embeds));
    }
    // Nobody is pinged, whatever a branch or commit message says.
    msg.insert("allowed_mentions".into(), json!({"parse": []}));
    Value::Object(msg)
}

/// The texts Discord adds up for its 6,000 limit, as JSON pointers into `embeds`.
fn counted(embeds: &[Value]) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (i, e) in embeds.iter().enumerate() {
        for k in ["title", "description"] {
            if let Some(s) = e.get(k).and_then(Value::as_str) {
                out.push((format!("/{i}/{k}"), len16(s)));
            }
        }
        if let Some(s) = e.pointer("/footer/text").and_then(Value::as_str) {
            out.push((format!("/{i}/footer/text"), len16(s)));
        }
        if let Some(s) = e.pointer("/author/name").and_then(Value::as_str) {
            out.push((format!("/{i}/author/name"), len16(s)));
        }
        for (j, f) in e
            .get("fields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for k in ["name", "value"] {
                if let Some(s) = f.get(k).and_then(Value::as_str) {
                    out.push((format!("/{i}/fields/{j}/{k}"), len16(s)));
                }
            }
        }
    }
    out
}

/// Shortens texts until the message's total is within `max`: every text in proportion first,
/// then the longest ones for what rounding left over.
fn fit_total(embeds: &mut [Value], max: usize) {
    let mut arr = Value::Array(embeds.to_vec());
    let shrink = |arr: &mut Value, ptr: &str, keep: usize| {
        if let Some(v) = arr.pointer_mut(ptr) {
            let s = v.as_str().unwrap_or("").to_string();
            *v = json!(cut(&s, keep.max(1)));
        }
    };
    let items = counted(arr.as_array().map(Vec::as_slice).unwrap_or(&[]));
    let total: usize = items.iter().map(|x| x.1).sum();
    if total > max {
        for (ptr, len) in &items {
            let keep = len * max / total;
            if keep < *len {
                shrink(&mut arr, ptr, keep);
            }
        }
    }
    for _ in 0..1000 {
        let items = counted(arr.as_array().map(Vec::as_slice).unwrap_or(&[]));
        let total: usize = items.iter().map(|x| x.1).sum();
        if total <= max {
            break;
        }
        let Some((ptr, len)) = items.iter().max_by_key(|x| x.1).cloned() else {
            break;
        };
        if len <= 1 {
            break;
        }
        shrink(&mut arr, &ptr, len.saturating_sub(total - max));
    }
    if let Value::Array(a) = arr {
        for (slot, v) in embeds.iter_mut().zip(a) {
            *slot = v;
        }
    }
}

/// Addresses a notification may not reach unless the host's configuration allows it:
/// loopback, private, link-local (and so cloud metadata), unspecified, multicast, CGNAT, ULA.
pub fn ip_is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || v.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        }
        IpAddr::V6(v) => {
            if let Some(v4) = v.to_ipv4_mapped() {
                return ip_is_internal(IpAddr::V4(v4));
            }
            let s = v.segments();
            // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48) reaches IPv4 addresses.
            if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1) {
                return true;
            }
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubled_links_are_found_with_the_fix() {
        let w = doubled_links(r#"{"content": "[View]({base_web_address}/{output_log})"}"#);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("write {output_log} alone"), "{}", w[0]);
        assert!(doubled_links(r#"{"content": "[View]({output_log})"}"#).is_empty());
        assert_eq!(doubled_links("{base_web_address}{7z_link}").len(), 1);
    }

    fn values() -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        m.insert("project", "demo".to_string());
        m.insert("build_index", "7".to_string());
        m.insert("status", "PASS".to_string());
        m
    }

    #[test]
    fn parses_hooks_and_reports_unknown_variables_at_load() {
        let ok = json!([{"hook-name": "d", "type": "discord", "trigger": "build-complete",
            "url": "https://discord.com/api/webhooks/1/tok",
            "data": {"default": {"content": "{project} {status}"}, "embeds": [{"title": "{build_name}"}]}}]);
        let h = parse_out_webhooks(ok.as_array().unwrap()).unwrap();
        assert_eq!(h[0].triggers, vec![Trigger::BuildComplete]);
        let bad = json!([{"hook-name": "d", "type": "discord", "trigger": "build-complete",
            "url": "https://x", "data": {"embeds": [{"fields": [{"name": "{stauts}"}]}]}}]);
        let e = parse_out_webhooks(bad.as_array().unwrap()).unwrap_err();
        assert_eq!(e.field, "out-webhooks[0].data.embeds[0].fields[0].name");
        let bad = json!([{"hook-name": "d", "type": "slack", "trigger": "build-complete", "url": "https://x"}]);
        assert!(parse_out_webhooks(bad.as_array().unwrap()).is_err());
        let bad =
            json!([{"hook-name": "d", "type": "json", "trigger": "on-push", "url": "https://x"}]);
        assert!(parse_out_webhooks(bad.as_array().unwrap()).is_err());
    }

    #[test]
    fn triggers() {
        use BuildStatus::*;
        let fin = |s, p| BuildEvent::Finished {
            status: s,
            previous: p,
        };
        assert!(Trigger::BuildComplete.fires(fin(Cancel, None)));
        assert!(!Trigger::BuildComplete.fires(BuildEvent::Started));
        assert!(Trigger::BuildStarted.fires(BuildEvent::Started));
        assert!(Trigger::BuildFailed.fires(fin(Warn, None)));
        assert!(!Trigger::BuildFailed.fires(fin(Pass, None)));
        assert!(Trigger::BuildFixed.fires(fin(Pass, Some(Fail))));
        assert!(!Trigger::BuildFixed.fires(fin(Pass, Some(Pass))));
        assert!(!Trigger::BuildFixed.fires(fin(Pass, None)));
        assert!(Trigger::BuildError.fires(fin(Error, Some(Pass))));
        assert!(!Trigger::BuildFailed.fires(fin(Error, None)));
        assert!(!Trigger::BuildError.fires(fin(Fail, None)));
        assert!(Trigger::BuildComplete.fires(fin(Error, None)));
        assert_eq!(Trigger::parse("build-error"), Some(Trigger::BuildError));
    }

    #[test]
    fn discord_limits_are_met() {
        let long = "x".repeat(10_000);
        let fields: Vec<Value> = (0..30)
            .map(|_| json!({"name": long, "value": long}))
            .collect();
        let embeds: Vec<Value> = (0..12)
            .map(|_| json!({"title": long, "description": long, "footer": {"text": long}, "fields": fields}))
            .collect();
        let data = json!({"default": {"content": long, "username": "My Discord Clyde bot"}, "embeds": embeds});
        let m = discord_message(&data, &values());
        assert!(len16(m["content"].as_str().unwrap()) <= 2000);
        assert!(m["content"].as_str().unwrap().ends_with('…'));
        let u = m["username"].as_str().unwrap().to_ascii_lowercase();
        assert!(!u.contains("discord") && !u.contains("clyde"), "{u}");
        let e = m["embeds"].as_array().unwrap();
        assert!(e.len() <= 10);
        let total: usize = counted(e).iter().map(|x| x.1).sum();
        assert!(total <= 6000, "{total}");
        for emb in e {
            assert!(len16(emb["title"].as_str().unwrap()) <= 256);
            assert!(emb["fields"].as_array().unwrap().len() <= 25);
            for f in emb["fields"].as_array().unwrap() {
                assert!(len16(f["value"].as_str().unwrap()) <= 1024);
            }
        }
        assert_eq!(m["allowed_mentions"], json!({"parse": []}));
    }

    #[test]
    fn variables_expand_and_an_empty_message_gets_a_default() {
        let m = discord_message(
            &json!({"embeds": [{"title": "{project} #{build_index}"}]}),
            &values(),
        );
        assert_eq!(m["embeds"][0]["title"], "demo #7");
        let m = discord_message(&json!({}), &values());
        assert_eq!(m["content"], "demo build 7: PASS");
    }

    #[test]
    fn only_the_host_of_a_url_is_shown() {
        assert_eq!(
            url_host("https://discord.com/api/webhooks/123/SECRET"),
            "discord.com"
        );
        assert_eq!(
            url_host("http://user:pw@127.0.0.1:9000/x?t=1"),
            "127.0.0.1:9000"
        );
    }

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "100.64.0.1",
            "192.0.0.170",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::7f00:1",
        ] {
            assert!(ip_is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "162.159.128.233", "2606:4700::6810:84e5"] {
            assert!(!ip_is_internal(a.parse().unwrap()), "{a}");
        }
    }
}
