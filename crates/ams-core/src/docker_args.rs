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
    let mut chars = s.chars();
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
    Ok((n * mult as f64) as i64)
}

/// Normalises a trust entry of pipeline-config.json (`"--network host"`, `"-v"`) to the key
/// that [`parse`] reports for the flag.
pub fn trust_key(entry: &str) -> String {
    let e = entry.trim().trim_start_matches('-').to_ascii_lowercase();
    let mut parts = e.split(|c: char| c.is_whitespace() || c == '=');
    let flag = parts.next().unwrap_or("");
    let flag = match flag {
        "v" | "mount" => "volume",
        "net" => "network",
        f => f,
    };
    match parts.find(|p| !p.is_empty()) {
        Some(v) => format!("{flag}={v}"),
        None => flag.to_string(),
    }
}

/// Parses `docker.args`. `trusted` holds the keys (see [`trust_key`]) that the private config
/// allows. The error names the flag and the fix.
pub fn parse(args: &str, trusted: &[String]) -> Result<DockerOptions, String> {
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
        } else if w.starts_with('-') && w.len() > 2 && !matches!(w.as_str(), "-it" | "-ti") {
            (w[..2].to_string(), Some(w[2..].to_string()))
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
            "-m" | "--memory" => o.memory = Some(parse_size(&value(&flag)?)?),
            "--shm-size" => o.shm_size = Some(parse_size(&value(&flag)?)?),
            "--cpus" => {
                let v = value(&flag)?;
                let n: f64 = v
                    .parse()
                    .ok()
                    .filter(|n: &f64| n.is_finite() && *n > 0.0)
                    .ok_or_else(|| format!("`--cpus {v}` must be a positive number"))?;
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
                if v == "host" {
                    need_trust("network=host", "--network host")?;
                } else if v.starts_with("container:") {
                    need_trust("network=container", "--network container:…")?;
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
                if host_path || source.contains("docker.sock") {
                    need_trust("volume", "-v")?;
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
        ] {
            let err = parse(args, &[]).unwrap_err();
            assert!(err.contains("pipeline-config.json"), "{args}: {err}");
            parse(args, &[key.to_string()]).unwrap_or_else(|e| panic!("{args}: {e}"));
        }
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
        let o = parse("-v cache:/cache", &[]).unwrap();
        assert_eq!(o.volumes, vec!["cache:/cache".to_string()]);
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
    fn splits_like_a_shell() {
        assert_eq!(
            split_words(r#"a 'b c' "d \"e\"" f\ g"#).unwrap(),
            vec!["a", "b c", "d \"e\"", "f g"]
        );
        assert!(split_words("'open").is_err());
    }
}
