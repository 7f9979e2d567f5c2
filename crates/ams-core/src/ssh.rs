//! SSH for a project's git remote, as rules without IO: the `ssh` command line git gets (the
//! project's key and its own `known_hosts`, pinned on first use), the checks a private key file
//! must pass before ssh sees it, the host keys a `known_hosts` file pins, and ssh's failures put
//! into words that name the file and the fix (ssh itself, in batch mode, often says only
//! "Permission denied").

use ssh_key::known_hosts::{HostPatterns, KnownHosts};
use ssh_key::{HashAlg, PrivateKey};

/// The name of a project's pinned host keys, in its private `master/config/`.
pub const KNOWN_HOSTS: &str = "known_hosts";

/// The most bytes of a private key file the host reads (real keys are a few KiB).
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// The `GIT_SSH_COMMAND` for a project: batch mode (never a prompt), the key alone when there is
/// one (`IdentitiesOnly`), and, with `known_hosts`, that file alone for the server's host key:
/// a server seen for the first time is pinned there (trust on first use), a changed key is
/// refused. Host names are written in the clear and only the key ssh negotiated is written, so
/// the file shows what was pinned.
///
/// The paths are quoted for the shell git runs the command with, and `%` is doubled since ssh
/// expands `%` tokens in both; a path ssh cannot take whole is an error.
pub fn ssh_command(key: Option<&str>, known_hosts: Option<&str>) -> Result<String, String> {
    let mut cmd = String::from("ssh -o BatchMode=yes");
    if let Some(k) = key {
        cmd.push_str(" -o IdentitiesOnly=yes -i ");
        cmd.push_str(&crate::protocol::shell_quote(&ssh_path(k)?));
    }
    if let Some(kh) = known_hosts {
        cmd.push_str(" -o StrictHostKeyChecking=accept-new -o UpdateHostKeys=no");
        cmd.push_str(" -o HashKnownHosts=no -o CheckHostIP=no -o ");
        cmd.push_str(&crate::protocol::shell_quote(&format!(
            "UserKnownHostsFile=\"{}\"",
            ssh_path(kh)?
        )));
    }
    Ok(cmd)
}

/// A path as ssh reads it in `-i` and `-o …File=`: `%` doubled; quotes, backslashes, `${` and
/// control characters refused (ssh would read them as syntax).
fn ssh_path(p: &str) -> Result<String, String> {
    if p.contains(['"', '\\']) || p.contains("${") || p.chars().any(char::is_control) {
        return Err(format!(
            "ssh cannot be given the path {p}: it holds a quote, a backslash, `${{` or a \
             control character; move the data directory to a plain path"
        ));
    }
    Ok(p.replace('%', "%%"))
}

/// Why a private key file cannot be used by the host. [`KeyProblem::message`] words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// The file is not there.
    Missing,
    /// The host's user cannot read it (the error as the system said it).
    Unreadable(String),
    /// Group or others may read or write it (the mode bits).
    TooOpen(u32),
    /// It is protected by a passphrase, which no one can type for the host.
    Passphrase,
    /// It holds a public key (`….pub`), not the private one.
    PublicKey,
    /// It is not a private key at all.
    NotAKey(String),
}

impl KeyProblem {
    /// The message for the key at `path` (as the operator should read it), with the fix.
    pub fn message(&self, path: &str) -> String {
        let q = crate::protocol::shell_quote(path);
        match self {
            KeyProblem::Missing => format!(
                "the SSH key {path} does not exist: put the private key there (chmod 600 {q})"
            ),
            KeyProblem::Unreadable(e) => format!(
                "cannot read the SSH key {path}: {e}; it must belong to the host's user and be \
                 readable by it: chown it to that user and chmod 600 {q}"
            ),
            KeyProblem::TooOpen(mode) => format!(
                "the SSH key {path} has mode {:04o}: other users of this machine may read it, \
                 and ssh refuses such a key; run chmod 600 {q}",
                mode & 0o7777
            ),
            KeyProblem::Passphrase => format!(
                "the SSH key {path} is protected by a passphrase, which the host cannot type; \
                 give it a key without one: a copy with the passphrase removed \
                 (cp KEY k && ssh-keygen -p -N '' -f k) or a new deploy key \
                 (ssh-keygen -t ed25519 -N '' -f k, its k.pub added to the repository)"
            ),
            KeyProblem::PublicKey => format!(
                "{path} holds a public key; the host needs the private key (the file of the \
                 same name without `.pub`)"
            ),
            KeyProblem::NotAKey(why) => format!(
                "{path} is not an SSH private key ({why}); give the private key file as \
                 ssh-keygen wrote it (it starts with `-----BEGIN OPENSSH PRIVATE KEY-----`)"
            ),
        }
    }
}

/// Whether a key file's mode lets group or others at it (ssh then ignores the key).
pub fn too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Checks a private key file's contents: a key ssh can load without a passphrase. OpenSSH's
/// own format is parsed; the older PEM formats are recognised by their armour and headers.
pub fn check_private_key(bytes: &[u8]) -> Result<(), KeyProblem> {
    if bytes.len() > MAX_KEY_BYTES {
        return Err(KeyProblem::NotAKey(format!(
            "it is over {} KiB",
            MAX_KEY_BYTES / 1024
        )));
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(KeyProblem::NotAKey("it is not text".into()));
    };
    let t = text.trim_start();
    if t.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        return match PrivateKey::from_openssh(t) {
            Ok(k) if k.is_encrypted() => Err(KeyProblem::Passphrase),
            Ok(_) => Ok(()),
            Err(e) => Err(KeyProblem::NotAKey(format!("it does not parse: {e}"))),
        };
    }
    if t.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || (t.starts_with("-----BEGIN ") && t.contains("Proc-Type: 4,ENCRYPTED"))
    {
        return Err(KeyProblem::Passphrase);
    }
    let first = t.lines().next().unwrap_or("");
    if first.starts_with("-----BEGIN ") && first.ends_with(" PRIVATE KEY-----") {
        return Ok(());
    }
    if first.starts_with("ssh-")
        || first.starts_with("ecdsa-")
        || first.starts_with("sk-")
        || first.starts_with("---- BEGIN SSH2 PUBLIC KEY")
    {
        return Err(KeyProblem::PublicKey);
    }
    Err(KeyProblem::NotAKey(
        "it has no `-----BEGIN … PRIVATE KEY-----` line".into(),
    ))
}

/// One host key a `known_hosts` file pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The host patterns as written (`[127.0.0.1]:2222`, `github.com`), or `(hashed name)`.
    pub hosts: String,
    /// The key's algorithm, as ssh names it (`ssh-ed25519`).
    pub algorithm: String,
    /// `SHA256:…`, as `ssh-keygen -l` and ssh's own messages show it.
    pub fingerprint: String,
    /// `@revoked` or `@cert-authority`, when the line has a marker.
    pub marker: Option<String>,
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(m) = &self.marker {
            write!(f, "{m} ")?;
        }
        write!(f, "{} {} {}", self.hosts, self.algorithm, self.fingerprint)
    }
}

/// The pins of a `known_hosts` text, in order; lines that are no host key are left out.
pub fn pins(known_hosts: &str) -> Vec<Pin> {
    KnownHosts::new(known_hosts)
        .filter_map(Result::ok)
        .map(|e| Pin {
            hosts: match e.host_patterns() {
                HostPatterns::Patterns(p) => p.join(","),
                HostPatterns::HashedName { .. } => "(hashed name)".to_string(),
            },
            algorithm: e.public_key().algorithm().to_string(),
            fingerprint: e.public_key().fingerprint(HashAlg::Sha256).to_string(),
            marker: e.marker().map(|m| m.as_str().to_string()),
        })
        .collect()
}

/// The pins in `after` that `before` did not hold: what ssh pinned on first use in between.
pub fn new_pins(before: &str, after: &str) -> Vec<Pin> {
    let old: std::collections::HashSet<&str> = before.lines().map(str::trim).collect();
    let added: String = after
        .lines()
        .filter(|l| !old.contains(l.trim()))
        .map(|l| format!("{l}\n"))
        .collect();
    pins(&added)
}

/// The build-log (and CLI) line for a host key pinned on first use.
pub fn first_use_line(project: &str, pin: &Pin) -> String {
    format!(
        "ssh: pinned the host key of {} on first use: {} {} (in master/config/{KNOWN_HOSTS}; if \
         that is not the server's key, run `amsbuild project ssh-hostkey {project} --reset`)",
        pin.hosts, pin.algorithm, pin.fingerprint
    )
}

/// Who asks ssh to connect, for [`explain_failure`]'s messages.
#[derive(Debug, Clone, Copy)]
pub struct SshContext<'a> {
    pub project: &'a str,
    /// The key given to ssh, as the operator knows its path; `None`: the host user's own keys.
    pub key: Option<&'a str>,
}

/// Our own words for what ssh printed on `stderr` when a connection failed, or `None` when it
/// is not an SSH failure we know (git's own message is then the best there is).
pub fn explain_failure(stderr: &str, ctx: SshContext<'_>) -> Option<String> {
    let key = ctx.key.unwrap_or("KEY");
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("has changed and you have requested strict checking")
    {
        let host = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("Host key for ")?
                    .split_once(" has changed")
                    .map(|(h, _)| h.to_string())
            })
            .unwrap_or_else(|| "the server".into());
        let shown = stderr
            .lines()
            .find(|l| l.starts_with("SHA256:"))
            .map(|l| format!(" ({})", l.trim_end_matches('.')))
            .unwrap_or_default();
        return Some(format!(
            "the SSH host key of {host} has changed: the key the server shows{shown} is not the \
             one pinned in the project's master/config/{KNOWN_HOSTS}, so the host refuses to \
             connect (someone may be intercepting the connection). If the server's key was \
             replaced on purpose, compare the fingerprint with its operator and run \
             `amsbuild project ssh-hostkey {} --reset`; the next connection pins the new key",
            ctx.project
        ));
    }
    if stderr.contains("Host key verification failed") {
        return Some(format!(
            "ssh could not verify the server's host key against the project's \
             master/config/{KNOWN_HOSTS} (a revoked key, or a file ssh cannot write); see \
             `amsbuild project ssh-hostkey {}`",
            ctx.project
        ));
    }
    if stderr.contains("UNPROTECTED PRIVATE KEY FILE") || stderr.contains("bad permissions") {
        let mode = stderr
            .lines()
            .find_map(|l| l.strip_prefix("Permissions ")?.split_whitespace().next())
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0o644);
        return Some(KeyProblem::TooOpen(mode).message(key));
    }
    if stderr.contains("incorrect passphrase") || stderr.contains("Enter passphrase") {
        return Some(KeyProblem::Passphrase.message(key));
    }
    if stderr.contains("Permission denied (publickey") {
        return Some(match ctx.key {
            Some(k) => format!(
                "the SSH server refused the key {k} (Permission denied (publickey)): add its \
                 public key (ssh-keygen -y -f {} prints it) to the repository's deploy keys or \
                 the account's keys on the server",
                crate::protocol::shell_quote(k)
            ),
            None => format!(
                "the SSH server refused the host user's own keys (Permission denied \
                 (publickey)): give the project a key: \"ssh-key\" in its pipeline-config.json \
                 (or `amsbuild project add {} --git URL --ssh-key FILE` for a new project)",
                ctx.project
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // Throwaway keys made for these tests (ssh-keygen -t ed25519), never used anywhere else.
    const PLAIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACCa/H7gr55kp7f8baV/wyKCZ01lxOeSCa8Psqhf86egWwAAAIjJjiMyyY4j
MgAAAAtzc2gtZWQyNTUxOQAAACCa/H7gr55kp7f8baV/wyKCZ01lxOeSCa8Psqhf86egWw
AAAEDsjY4lpky3fwzL42hSOj7P3fxvLf/PvNnXC13TKDD5SZr8fuCvnmSnt/xtpX/DIoJn
TWXE55IJrw+yqF/zp6BbAAAABHRlc3QB
-----END OPENSSH PRIVATE KEY-----
";
    // The same kind of key with the passphrase `secret`.
    const ENCRYPTED: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABDsmQGnaH
Zjte7cD/oCCofwAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIJpKXLwSz/puH3iz
vW1ZLIAbpg4ehYioznntFg4N5PbOAAAAkCSNLkwUL69Rd8QaJyhrfgqk+KU2qevhO6tUR5
prp9YHvJIefh2poXKKUct9D+0qtVtLrRTUnesxvO/7/Cq3epQYE09rl/ZeAHX4ghmxhfuD
dYspAV3m6F/lMnr/5UxNQY70eZEYuRJjlK5O1O998+zDXIJJhqwtxEHPIqSSEGpP+qqL1I
yZNFaNeqVbpYMitg==
-----END OPENSSH PRIVATE KEY-----
";
    const PUBLIC: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJr8fuCvnmSnt/xtpX/DIoJnTWXE55IJrw+yqF/zp6Bb test\n";

    #[test]
    fn private_keys_are_told_apart() {
        assert_eq!(check_private_key(PLAIN.as_bytes()), Ok(()));
        assert_eq!(
            check_private_key(ENCRYPTED.as_bytes()),
            Err(KeyProblem::Passphrase)
        );
        assert_eq!(
            check_private_key(PUBLIC.as_bytes()),
            Err(KeyProblem::PublicKey)
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert_eq!(
            check_private_key(pem.as_bytes()),
            Err(KeyProblem::Passphrase)
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\n";
        assert_eq!(check_private_key(pem.as_bytes()), Ok(()));
        let p8 =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert_eq!(
            check_private_key(p8.as_bytes()),
            Err(KeyProblem::Passphrase)
        );
        assert!(matches!(
            check_private_key(b"hello"),
            Err(KeyProblem::NotAKey(_))
        ));
        let cut = &PLAIN[..120];
        assert!(matches!(
            check_private_key(cut.as_bytes()),
            Err(KeyProblem::NotAKey(_))
        ));
        assert!(matches!(
            check_private_key(&[0xff, 0xfe]),
            Err(KeyProblem::NotAKey(_))
        ));
    }

    #[test]
    fn key_messages_name_the_file_and_the_fix() {
        let m = KeyProblem::Passphrase.message("/d/master/config/id");
        assert!(m.contains("/d/master/config/id") && m.contains("passphrase"));
        assert!(m.contains("ssh-keygen -p -N ''"), "{m}");
        let m = KeyProblem::TooOpen(0o100644).message("/d/k");
        assert!(
            m.contains("mode 0644") && m.contains("chmod 600 '/d/k'"),
            "{m}"
        );
        let m = KeyProblem::Unreadable("Permission denied (os error 13)".into()).message("/d/k");
        assert!(m.contains("cannot read") && m.contains("chown"), "{m}");
        assert!(too_open(0o644) && too_open(0o640) && too_open(0o602));
        assert!(!too_open(0o600) && !too_open(0o400) && !too_open(0o100600));
    }

    #[test]
    fn the_ssh_command_pins_per_project_and_quotes_paths() {
        assert_eq!(ssh_command(None, None).unwrap(), "ssh -o BatchMode=yes");
        let c = ssh_command(Some("/d/it's/id"), Some("/d/50%/known_hosts")).unwrap();
        assert_eq!(
            c,
            "ssh -o BatchMode=yes -o IdentitiesOnly=yes -i '/d/it'\\''s/id' \
             -o StrictHostKeyChecking=accept-new -o UpdateHostKeys=no -o HashKnownHosts=no \
             -o CheckHostIP=no -o 'UserKnownHostsFile=\"/d/50%%/known_hosts\"'"
        );
        assert!(ssh_command(Some("/d/a\"b"), None).is_err());
        assert!(ssh_command(None, Some("/d/${HOME}")).is_err());
    }

    #[test]
    fn pins_are_read_with_their_fingerprints() {
        let kh = format!(
            "# comment\n[127.0.0.1]:2222 {}\n\nnot a key line\n\
             @revoked bad.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJr8fuCvnmSnt/xtpX/DIoJnTWXE55IJrw+yqF/zp6Bb\n",
            PUBLIC.trim()
        );
        let p = pins(&kh);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].hosts, "[127.0.0.1]:2222");
        assert_eq!(p[0].algorithm, "ssh-ed25519");
        // ssh-keygen -lf of the same key.
        assert_eq!(
            p[0].fingerprint,
            "SHA256:qNmVRHMtuwOS/YnXF8TkfUPuCvS7OJouaiMizmswq3o"
        );
        assert_eq!(p[1].marker.as_deref(), Some("@revoked"));
        assert!(p[1]
            .to_string()
            .starts_with("@revoked bad.example ssh-ed25519 SHA256:"));
        let before = format!("[a]:1 {}\n", PUBLIC.trim());
        let after = format!("{before}[b]:2 {}\n", PUBLIC.trim());
        let n = new_pins(&before, &after);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].hosts, "[b]:2");
        assert!(new_pins(&after, &after).is_empty());
        let line = first_use_line("demo", &n[0]);
        assert!(
            line.contains("[b]:2")
                && line.contains("SHA256:qNmVRHMtuwOS")
                && line.contains("ssh-hostkey demo --reset"),
            "{line}"
        );
    }

    #[test]
    fn ssh_failures_get_our_words() {
        let ctx = SshContext {
            project: "demo",
            key: Some("/d/master/config/id"),
        };
        let changed = "@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
            The fingerprint for the ED25519 key sent by the remote host is\n\
            SHA256:yVxkMJ0AhRpmr6xlFJl542/+6+BN0wEjzefEbGQEFOU.\n\
            Host key for [127.0.0.1]:22999 has changed and you have requested strict checking.\n\
            Host key verification failed.\nfatal: Could not read from remote repository.\n";
        let m = explain_failure(changed, ctx).unwrap();
        assert!(
            m.contains("host key of [127.0.0.1]:22999 has changed")
                && m.contains("(SHA256:yVxkMJ0AhRpmr6xlFJl542/+6+BN0wEjzefEbGQEFOU)")
                && m.contains("ssh-hostkey demo --reset"),
            "{m}"
        );
        let denied = "root@127.0.0.1: Permission denied (publickey).\nfatal: Could not read";
        let m = explain_failure(denied, ctx).unwrap();
        assert!(m.contains("refused the key /d/master/config/id"), "{m}");
        let m = explain_failure(denied, SshContext { key: None, ..ctx }).unwrap();
        assert!(
            m.contains("host user's own keys") && m.contains("ssh-key"),
            "{m}"
        );
        let open =
            "WARNING: UNPROTECTED PRIVATE KEY FILE!\nPermissions 0640 for '/d/k' are too open.";
        assert!(explain_failure(open, ctx).unwrap().contains("mode 0640"));
        assert!(explain_failure("fatal: repository not found", ctx).is_none());
    }
}
