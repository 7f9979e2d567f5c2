//! `docker.args` of pipeline.json: the `docker run` flags a project may give, turned into
//! container options for the Engine API. Flags that break isolation need the private
//! pipeline-config.json to trust them; unknown flags are errors.

use serde::{Deserialize, Serialize};

/// Container options taken from `docker.args`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DockerOptions {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub memory: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    pub network: Option<String>,
    pub shm_size: Option<i64>,
    pub read_only: bool,
    pub tmpfs: Vec<String>,
    pub cap_drop: Vec<String>,
    // The options below break isolation and are only set when trusted.
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub devices: Vec<String>,
    pub pid_mode: Option<String>,
    pub ipc_mode: Option<String>,
    pub uts_mode: Option<String>,
    pub security_opt: Vec<String>,
    pub binds: Vec<String>,
    pub volumes: Vec<String>,
}

/// Splits a command line the way a POSIX shell would for words: single quotes, double quotes
/// and backslashes. No expansion of any kind happens.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().inspect(|c| crate::work::add(c.len_utf8()));
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err("unclosed single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => cur.push(ch),
                            Some(ch) => {
                                cur.push('\\');
                                cur.push(ch);
                            }
                            None => return Err("unclosed double quote".into()),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err("unclosed double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    cur.push(ch);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Parses sizes such as `512m`, `2g`, `1048576`, as docker does (binary units).
pub fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1i64 << 20),
        Some('g') => (&t[..t.len() - 1], 1i64 << 30),
        Some('t') => (&t[..t.len() - 1], 1i64 << 40),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 512m, 2g)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("`{s}` must be a positive size"));
    }
    let bytes = n * mult as f64;
    // Checked after the conversion: `0.5` bytes would become 0, which the engine reads as
    // "no limit".
    if !(1.0..9.0e18).contains(&bytes) {
        return Err(format!("`{s}` is not a usable size (examples: 512m, 2g)"));
    }
    Ok(bytes as i64)
}

/// Normalises a trust entry of pipeline-config.json (`"--network host"`, `"-v"`) to the key
/// that [`parse`] reports for the flag.
pub fn trust_key(entry: &str) -> String {
    let e = entry.trim().trim_start_matches('-');
    let mut parts = e.split(|c: char| c.is_whitespace() || c == '=');
    // The flag compares without case; a value (a network's name) keeps its own.
    let flag = parts.next().unwrap_or("").to_ascii_lowercase();
    let flag = match flag.as_str() {
        "v" | "mount" => "volume",
        "net" => "network",
        f => f,
    };
    match parts.find(|p| !p.is_empty()) {
        Some(v) => format!("{flag}={v}"),
        None => flag.to_string(),
    }
}

/// Checks an `allow-docker-args` entry: a flag that breaks isolation or raises a limit,
/// written alone (`"--cap-add"` allows every capability), or `--network NAME` and
/// `--pid|--ipc|--uts host` with their value. Anything else could never match and would
/// silently allow nothing.
pub fn check_trust_entry(entry: &str) -> Result<(), String> {
    let key = trust_key(entry);
    let (flag, value) = match key.split_once('=') {
        Some((f, v)) => (f, Some(v)),
        None => (key.as_str(), None),
    };
    const ALONE: &[&str] = &[
        "privileged",
        "cap-add",
        "device",
        "security-opt",
        "volume",
        "memory",
        "cpus",
        "pids-limit",
        "shm-size",
    ];
    match (flag, value) {
        (f, None) if ALONE.contains(&f) => Ok(()),
        (f, Some(_)) if ALONE.contains(&f) => Err(format!(
            "`{entry}`: write `--{f}` alone; a trusted flag allows every value"
        )),
        ("network", Some(_)) => Ok(()),
        ("pid" | "ipc" | "uts", Some("host")) => Ok(()),
        _ => Err(format!(
            "`{entry}` is not a flag that can be trusted; use one of --privileged, --cap-add, \
             --device, --security-opt, -v, --memory, --cpus, --pids-limit, --shm-size, \
             --network NAME, --network container, --pid host, --ipc host, --uts host"
        )),
    }
}

/// The registry an image reference names: its first path component when that looks like a
/// host (has a `.` or `:`, or is `localhost`), else `docker.io`.
pub fn image_registry(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// The operator's container limits (web_conf.json), which untrusted `docker.args` may lower
/// but never raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory: i64,
    pub nano_cpus: i64,
    pub pids: i64,
}

/// Fills in the operator's limits where `docker.args` set none, and refuses a value above a
/// limit unless the private config trusts that flag (`"--memory"`, `"--cpus"`,
/// `"--pids-limit"`, `"--shm-size"`). `--shm-size` may not exceed the memory limit.
pub fn apply_limits(o: &mut DockerOptions, l: Limits, trusted: &[String]) -> Result<(), String> {
    let trusts = |k: &str| trusted.iter().any(|t| t == k);
    // Zero or less would mean "no limit" to the engine: never accepted, trusted or not.
    for (flag, v) in [
        ("--memory", o.memory),
        ("--cpus", o.nano_cpus),
        ("--pids-limit", o.pids_limit),
        ("--shm-size", o.shm_size),
    ] {
        if matches!(v, Some(n) if n <= 0) {
            return Err(format!("`{flag}` must be positive; 0 would lift the limit"));
        }
    }
    let check =
        |flag: &str, key: &str, asked: Option<i64>, limit: i64, shown: &dyn Fn(i64) -> String| {
            match asked {
                Some(v) if v > limit && !trusts(key) => Err(format!(
                "`{flag} {}` is above the host's limit of {} (web_conf.json); docker.args may only \
                 lower limits unless the project's private config/pipeline-config.json lists \
                 \"{flag}\" in \"allow-docker-args\"",
                shown(v),
                shown(limit)
            )),
                _ => Ok(()),
            }
        };
    let bytes = |v: i64| format!("{}m", v >> 20);
    let cpus = |v: i64| format!("{}", v as f64 / 1e9);
    let count = |v: i64| v.to_string();
    check("--memory", "memory", o.memory, l.memory, &bytes)?;
    check(
        "--shm-size",
        "shm-size",
        o.shm_size,
        o.memory.unwrap_or(l.memory).min(l.memory),
        &bytes,
    )?;
    check("--cpus", "cpus", o.nano_cpus, l.nano_cpus, &cpus)?;
    check("--pids-limit", "pids-limit", o.pids_limit, l.pids, &count)?;
    o.memory.get_or_insert(l.memory);
    o.nano_cpus.get_or_insert(l.nano_cpus);
    o.pids_limit.get_or_insert(l.pids);
    Ok(())
}

/// Longest `docker.args` accepted, in bytes, as written and once its `{variables}` are
/// expanded: room for dozens of flags, and a bound on the work and the messages.
pub const MAX_ARGS_BYTES: usize = 4096;

/// Parses `docker.args`. `trusted` holds the keys (see [`trust_key`]) that the private config
/// allows. The error names the flag and the fix.
pub fn parse(args: &str, trusted: &[String]) -> Result<DockerOptions, String> {
    if args.len() > MAX_ARGS_BYTES {
        return Err(format!(
            "is {} bytes long once its {{variables}} are expanded, over the limit of \
             {MAX_ARGS_BYTES}: give docker.args only `docker run` flags, and environment \
             variables in \"environment\"",
            args.len()
        ));
    }
    let words = split_words(args)?;
    let mut o = DockerOptions::default();
    let mut i = 0;
    let need_trust = |key: &str, shown: &str| -> Result<(), String> {
        if trusted.iter().any(|t| t == key) {
            Ok(())
        } else {
            Err(format!(
                "`{shown}` breaks the container's isolation; it is allowed only when the \
                 project's private config/pipeline-config.json lists \"{shown}\" in \
                 \"allow-docker-args\""
            ))
        }
    };
    while i < words.len() {
        let w = words[i].clone();
        i += 1;
        // Split `--flag=value` and short forms with glued values (`-eX=1`).
        let (flag, glued): (String, Option<String>) = if let Some(rest) = w.strip_prefix("--") {
            match rest.split_once('=') {
                Some((f, v)) => (format!("--{f}"), Some(v.to_string())),
                None => (w.clone(), None),
            }
        } else if w.starts_with('-')
            && w.chars().count() > 2
            && !matches!(w.as_str(), "-it" | "-ti")
        {
            // `-` and one character (which may take several bytes) is the flag.
            let cut = w.char_indices().nth(2).map(|(i, _)| i).unwrap_or(w.len());
            (w[..cut].to_string(), Some(w[cut..].to_string()))
        } else {
            (w.clone(), None)
        };
        let mut value = |name: &str| -> Result<String, String> {
            if let Some(v) = glued.clone() {
                return Ok(v);
            }
            let v = words
                .get(i)
                .cloned()
                .ok_or_else(|| format!("`{name}` needs a value"))?;
            i += 1;
            Ok(v)
        };
        match flag.as_str() {
            "-i" | "-t" | "-it" | "-ti" | "--rm" | "--interactive" | "--tty" | "-d"
            | "--detach" | "--init" => {}
            "-e" | "--env" => {
                let v = value(&flag)?;
                match v.split_once('=') {
                    Some((k, val)) if !k.is_empty() => o.env.push((k.to_string(), val.to_string())),
                    _ => return Err(format!("`{flag} {v}` must have the form NAME=value")),
                }
            }
            "-w" | "--workdir" => o.workdir = Some(value(&flag)?),
            "-u" | "--user" => o.user = Some(value(&flag)?),
            "-m" | "--memory" => {
                let v = value(&flag)?;
                let n = parse_size(&v)?;
                // The engine's own minimum; below it (or 0) it refuses or means "no limit".
                if n < 6 << 20 {
                    return Err(format!(
                        "`{flag} {v}` is below the smallest memory limit, 6m"
                    ));
                }
                o.memory = Some(n);
            }
            "--shm-size" => o.shm_size = Some(parse_size(&value(&flag)?)?),
            "--cpus" => {
                let v = value(&flag)?;
                let n: f64 = v
                    .parse()
                    .ok()
                    .filter(|n: &f64| n.is_finite() && *n >= 0.01 && *n <= 1e6)
                    .ok_or_else(|| format!("`--cpus {v}` must be a number of at least 0.01"))?;
                o.nano_cpus = Some((n * 1e9) as i64);
            }
            "--pids-limit" => {
                let v = value(&flag)?;
                let n: i64 = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("`--pids-limit {v}` must be a positive integer"))?;
                o.pids_limit = Some(n);
            }
            "--network" | "--net" => {
                let v = value(&flag)?;
                // `none` isolates more and `bridge` is the default; any other name joins an
                // engine object (another network, the host's, another container's).
                if v.starts_with("container:") {
                    need_trust("network=container", "--network container:…")?;
                } else if !matches!(v.as_str(), "none" | "bridge" | "default") {
                    need_trust(&format!("network={v}"), &format!("--network {v}"))?;
                }
                o.network = Some(v);
            }
            "--read-only" => o.read_only = true,
            "--tmpfs" => o.tmpfs.push(value(&flag)?),
            "--cap-drop" => o.cap_drop.push(value(&flag)?),
            "--privileged" => {
                need_trust("privileged", "--privileged")?;
                o.privileged = true;
            }
            "--cap-add" => {
                need_trust("cap-add", "--cap-add")?;
                o.cap_add.push(value(&flag)?);
            }
            "--device" => {
                need_trust("device", "--device")?;
                o.devices.push(value(&flag)?);
            }
            "--pid" | "--ipc" | "--uts" => {
                let v = value(&flag)?;
                let name = &flag[2..];
                if v != "private" && !v.is_empty() {
                    need_trust(&format!("{name}={v}"), &format!("{flag} {v}"))?;
                }
                let slot = match name {
                    "pid" => &mut o.pid_mode,
                    "ipc" => &mut o.ipc_mode,
                    _ => &mut o.uts_mode,
                };
                *slot = Some(v);
            }
            "--security-opt" => {
                need_trust("security-opt", "--security-opt")?;
                o.security_opt.push(value(&flag)?);
            }
            "-v" | "--volume" => {
                let v = value(&flag)?;
                let source = v.split(':').next().unwrap_or("");
                let host_path = source.starts_with('/')
                    || source.starts_with('.')
                    || source.starts_with('~')
                    || !v.contains(':');
                // A host path or a named volume: both reach outside the build (a named volume
                // is shared by every container of the engine).
                need_trust("volume", "-v")?;
                if host_path || source.contains("docker.sock") {
                    o.binds.push(v);
                } else {
                    o.volumes.push(v);
                }
            }
            "--name" => {
                return Err(
                    "`--name` is not allowed: AMS-Build names the container {project}{build_hash}"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "unknown or unsupported flag `{other}`; supported: -e, -w, -u, --memory, \
                     --cpus, --pids-limit, --network, --shm-size, --read-only, --tmpfs, \
                     --cap-drop, -it, --rm (and, when trusted, --privileged, --cap-add, \
                     --device, --pid, --ipc, --uts, --security-opt, -v)"
                ))
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_flags() {
        let o = parse(
            "-it --rm -e A=1 --env=B='x y' -w /src -u 1000 --memory 512m --cpus 1.5 \
             --pids-limit 100 --network none --shm-size 64m",
            &[],
        )
        .unwrap();
        assert_eq!(
            o.env,
            vec![("A".into(), "1".into()), ("B".into(), "x y".into())]
        );
        assert_eq!(o.workdir.as_deref(), Some("/src"));
        assert_eq!(o.user.as_deref(), Some("1000"));
        assert_eq!(o.memory, Some(512 << 20));
        assert_eq!(o.nano_cpus, Some(1_500_000_000));
        assert_eq!(o.pids_limit, Some(100));
        assert_eq!(o.network.as_deref(), Some("none"));
        assert_eq!(o.shm_size, Some(64 << 20));
    }

    #[test]
    fn refuses_isolation_breakers_unless_trusted() {
        for (args, key) in [
            ("--privileged", "privileged"),
            ("--cap-add SYS_ADMIN", "cap-add"),
            ("--device /dev/kvm", "device"),
            ("--network host", "network=host"),
            ("--net=host", "network=host"),
            ("--pid host", "pid=host"),
            ("-v /:/host", "volume"),
            ("-v /var/run/docker.sock:/var/run/docker.sock", "volume"),
            ("--volume=/etc:/etc", "volume"),
            ("-v othersvolume:/x", "volume"),
            ("--network othersnet", "network=othersnet"),
            ("--network container:db", "network=container"),
        ] {
            let err = parse(args, &[]).unwrap_err();
            assert!(err.contains("pipeline-config.json"), "{args}: {err}");
            parse(args, &[key.to_string()]).unwrap_or_else(|e| panic!("{args}: {e}"));
        }
    }

    #[test]
    fn limits_cannot_be_lifted_by_rounding_to_zero() {
        for args in [
            "--memory 0.5",
            "-m0.1",
            "--memory 1k",
            "--cpus 0.0000000001",
            "--cpus 0",
            "--shm-size 0.2",
            "--pids-limit 0",
            "--pids-limit -1",
        ] {
            assert!(parse(args, &[]).is_err(), "{args}");
        }
        let l = Limits {
            memory: 2 << 30,
            nano_cpus: 2_000_000_000,
            pids: 4096,
        };
        let mut o = DockerOptions {
            memory: Some(0),
            ..Default::default()
        };
        assert!(apply_limits(&mut o, l, &["memory".into()]).is_err());
    }

    #[test]
    fn image_registries() {
        assert_eq!(image_registry("busybox"), "docker.io");
        assert_eq!(image_registry("library/busybox:1"), "docker.io");
        assert_eq!(image_registry("ghcr.io/o/x:1"), "ghcr.io");
        assert_eq!(image_registry("10.0.0.1:5000/x"), "10.0.0.1:5000");
        assert_eq!(image_registry("localhost/x"), "localhost");
    }

    #[test]
    fn trust_keys_normalise() {
        assert_eq!(trust_key("--network host"), "network=host");
        assert_eq!(trust_key("-v"), "volume");
        assert_eq!(trust_key("--privileged"), "privileged");
        assert_eq!(trust_key("--pid=host"), "pid=host");
    }

    #[test]
    fn named_volume_is_not_a_host_path() {
        let o = parse("-v cache:/cache", &["volume".into()]).unwrap();
        assert_eq!(o.volumes, vec!["cache:/cache".to_string()]);
        assert!(o.binds.is_empty());
    }

    #[test]
    fn limits_can_be_lowered_but_not_raised_without_trust() {
        let l = Limits {
            memory: 2 << 30,
            nano_cpus: 2_000_000_000,
            pids: 4096,
        };
        let mut o = parse(
            "--memory 512m --cpus 1 --pids-limit 100 --shm-size 64m",
            &[],
        )
        .unwrap();
        apply_limits(&mut o, l, &[]).unwrap();
        assert_eq!(
            (o.memory, o.nano_cpus, o.pids_limit),
            (Some(512 << 20), Some(1_000_000_000), Some(100))
        );
        let mut o = parse("", &[]).unwrap();
        apply_limits(&mut o, l, &[]).unwrap();
        assert_eq!(
            (o.memory, o.nano_cpus, o.pids_limit),
            (Some(2 << 30), Some(2_000_000_000), Some(4096))
        );
        for (args, key) in [
            ("--memory 100g", "memory"),
            ("--cpus 64", "cpus"),
            ("--pids-limit 1000000", "pids-limit"),
            ("--shm-size 8g", "shm-size"),
            ("--memory 512m --shm-size 1g", "shm-size"),
        ] {
            let mut o = parse(args, &[]).unwrap();
            let e = apply_limits(&mut o, l, &[]).unwrap_err();
            assert!(e.contains("above the host's limit"), "{args}: {e}");
            let trusted = vec![trust_key(&format!("--{key}"))];
            let mut o = parse(args, &trusted).unwrap();
            apply_limits(&mut o, l, &trusted).unwrap_or_else(|e| panic!("{args}: {e}"));
        }
    }

    #[test]
    fn unknown_flag_is_a_clear_error() {
        let e = parse("--frobnicate", &[]).unwrap_err();
        assert!(e.contains("--frobnicate"), "{e}");
        assert!(parse("--name x", &[]).is_err());
        assert!(parse("-e", &[]).unwrap_err().contains("needs a value"));
        assert!(parse("--memory lots", &[]).is_err());
    }

    #[test]
    fn multibyte_flags_are_errors_not_panics() {
        for args in ["-é", "-éx", "--é", "-\u{1F600}=1", "é", "-"] {
            let _ = parse(args, &[]);
        }
        assert!(parse("-é", &[]).unwrap_err().contains("-é"));
    }

    #[test]
    fn long_args_are_refused() {
        let ok = "--rm ".repeat(MAX_ARGS_BYTES / 5);
        assert!(parse(&ok, &[]).is_ok());
        let e = parse(&format!("{ok}--rm-"), &[]).unwrap_err();
        assert!(e.contains("over the limit of 4096"), "{e}");
    }

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            split_words(r#"a 'b c' "d \"e\"" f\ g"#).unwrap(),
            vec!["a", "b c", "d \"e\"", "f g"]
        );
        assert!(split_words("'open").is_err());
    }

    mod props {
        use super::*;
        use crate::protocol::shell_quote;
        use proptest::prelude::*;

        /// Quotes a word with double quotes, escaping what a shell would.
        fn double_quote(w: &str) -> String {
            let mut out = String::from("\"");
            for c in w.chars() {
                if matches!(c, '"' | '\\' | '$' | '`') {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
            out
        }

        /// Quotes a word with a backslash before every character.
        fn backslashed(w: &str) -> String {
            w.chars().flat_map(|c| ['\\', c]).collect()
        }

        /// docker.args made of real flags, glued and spaced, and values near the edges.
        fn args() -> impl Strategy<Value = String> {
            let token = prop_oneof![
                prop::sample::select(vec![
                    "-e",
                    "--env",
                    "-w",
                    "--workdir",
                    "-u",
                    "--user",
                    "-m",
                    "--memory",
                    "--cpus",
                    "--pids-limit",
                    "--network",
                    "--net",
                    "--shm-size",
                    "--read-only",
                    "--tmpfs",
                    "--cap-drop",
                    "--privileged",
                    "--cap-add",
                    "--device",
                    "--pid",
                    "--ipc",
                    "--uts",
                    "--security-opt",
                    "-v",
                    "--volume",
                    "--name",
                    "-it",
                    "--rm",
                    "-",
                    "--",
                    "-é",
                    "--é=1",
                    "-\u{1F600}=1",
                ])
                .prop_map(str::to_string),
                prop::sample::select(vec![
                    "512m",
                    "2g",
                    "0.5",
                    "0.0000001",
                    "1e-300",
                    "1e300",
                    "1e400",
                    "-1",
                    "0",
                    "NaN",
                    "inf",
                    "1",
                    "b",
                    "kb",
                    "host",
                    "none",
                    "bridge",
                    "container:db",
                    "private",
                    "/:/host",
                    "cache:/cache",
                    "A=1",
                    "=1",
                    "é",
                    "'",
                    "\"",
                    "\\",
                    "' '",
                    "\"x y\"",
                ])
                .prop_map(str::to_string),
                "[-a-z=:/.0-9]{0,6}",
                any::<String>(),
            ];
            let sep = prop::sample::select(vec![" ", "=", "", "\t", "\u{a0}"]);
            prop::collection::vec((token, sep), 0..12).prop_map(|v| {
                v.into_iter()
                    .flat_map(|(t, s)| [t, s.to_string()])
                    .collect()
            })
        }

        /// docker.args that mostly parse: flags with a value each, glued or not, among them
        /// numbers at the edges of what a limit can be.
        fn flag_pairs() -> impl Strategy<Value = String> {
            let flag = prop::sample::select(vec![
                "-m",
                "--memory",
                "--cpus",
                "--pids-limit",
                "--shm-size",
                "--network",
                "--pid",
                "--ipc",
                "-e",
                "-w",
                "-u",
                "--tmpfs",
                "--cap-drop",
            ]);
            let value = prop_oneof![
                prop::sample::select(vec![
                    "512m",
                    "0.5",
                    "0.0000001",
                    "1e-300",
                    "0.1k",
                    "1",
                    "1e300",
                    "none",
                    "host",
                    "private",
                    "A=1",
                ])
                .prop_map(str::to_string),
                (0.0..2.0f64).prop_map(|f| f.to_string()),
            ];
            let glue = prop::sample::select(vec![" ", "="]);
            prop::collection::vec((flag, glue, value), 0..5).prop_map(|v| {
                v.into_iter()
                    .map(|(f, g, v)| {
                        let g = if f.starts_with("--") { g } else { " " };
                        format!("{f}{g}{v}")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        }

        proptest! {
            #![proptest_config(crate::work::cases(256))]

            /// Words quoted back in any of the three ways split into the same words.
            #[test]
            fn quoted_words_split_back(words in prop::collection::vec(any::<String>(), 0..8), how in 0..3u8, sep in "[ \t\n]{1,3}") {
                let quote = match how {
                    0 => shell_quote,
                    1 => double_quote,
                    _ => backslashed,
                };
                // A backslash-quoted empty word is no word at all.
                let want: Vec<String> = if how == 2 {
                    words.iter().filter(|w| !w.is_empty()).cloned().collect()
                } else {
                    words.clone()
                };
                let line: Vec<String> = words.iter().map(|w| quote(w)).collect();
                prop_assert_eq!(split_words(&line.join(&sep)), Ok(want));
            }

            /// Splitting looks at each character once, whatever the text.
            #[test]
            fn split_words_is_total_and_linear(s in prop_oneof![args(), any::<String>()]) {
                let (_, work) = crate::work::count(|| split_words(&s));
                prop_assert!(work <= s.len() as u64, "{} units for {} bytes", work, s.len());
            }

            /// Whatever the text, untrusted docker.args never break isolation and never set a
            /// limit of zero (which the engine reads as no limit at all).
            #[test]
            fn untrusted_args_stay_inside(s in prop_oneof![3 => args(), 3 => flag_pairs(), 1 => any::<String>()]) {
                if let Ok(o) = parse(&s, &[]) {
                    prop_assert!(!o.privileged && o.cap_add.is_empty() && o.devices.is_empty());
                    prop_assert!(o.security_opt.is_empty() && o.binds.is_empty() && o.volumes.is_empty());
                    for m in [&o.pid_mode, &o.ipc_mode, &o.uts_mode].into_iter().flatten() {
                        prop_assert!(m.is_empty() || m == "private", "{}", m);
                    }
                    if let Some(n) = &o.network {
                        prop_assert!(matches!(n.as_str(), "none" | "bridge" | "default"), "{}", n);
                    }
                    for v in [o.memory, o.nano_cpus, o.pids_limit, o.shm_size].into_iter().flatten() {
                        prop_assert!(v >= 1, "a limit of {} from {:?}", v, s);
                    }
                }
            }

            /// With every flag trusted, parsing is still total (no panic on any text), and
            /// text past the cap is refused whole.
            #[test]
            fn trusted_parse_is_total(s in args()) {
                let long = s.repeat(MAX_ARGS_BYTES / s.len().max(1) + 1);
                prop_assert!(long.len() <= MAX_ARGS_BYTES || parse(&long, &[]).is_err());
                let all: Vec<String> = ["privileged", "cap-add", "device", "volume", "security-opt", "network=host", "pid=host"]
                    .iter().map(|k| k.to_string()).collect();
                let _ = parse(&s, &all);
            }
        }
    }
}
