//! The `amsbuild` binary: command line, configuration loading and wiring. The logic lives in
//! the library crates; this file only parses arguments and connects the pieces.

use ams_core::access::{Grant, Level};
use ams_core::pipeline;
use ams_core::private_config::PrivateConfig;
use ams_core::status::BuildStatus;
use ams_core::webconf::WebConf;
use ams_docker::DockerExecutor;
use ams_host::control;
use ams_host::host::{BuildRef, Host, HostConfig};
use ams_host::log::BuildLog;
use ams_host::worker::{self, ExecRequest, StopReason, StopSignal};
use ams_host::{project, timefmt, DataDir};
use anyhow::{anyhow, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "amsbuild",
    version,
    about = "A lightweight self-hosted CI server",
    after_help = "The data directory is ./ams-data unless --data-dir or AMSBUILD_HOME says \
                  otherwise. Commands other than serve, project, user, token, run, backup, \
                  completions and man talk to the running host through its control socket there."
)]
struct Cli {
    /// The data directory (web_conf.json, ams.db, projects/).
    #[arg(
        long,
        global = true,
        env = "AMSBUILD_HOME",
        default_value = "./ams-data"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A build, named the same way for `log`, `cancel` and `delete-output`: its full name, or its
/// project and index.
#[derive(clap::Args, Debug)]
struct BuildArg {
    /// The build's full name as `amsbuild builds` shows it (`PROJECT/NAME` when several projects
    /// have a build of that name), or its project when INDEX follows.
    #[arg(value_name = "BUILD|PROJECT")]
    build: String,
    /// The build's number in PROJECT: 1 for its first build, 2 for the next.
    #[arg(value_name = "INDEX", value_parser = clap::value_parser!(i64).range(1..))]
    index: Option<i64>,
}

impl BuildArg {
    fn to_ref(&self) -> BuildRef {
        BuildRef::from_args(&self.build, self.index)
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the host: the build queue, workers, the web interface, webhooks and the local
    /// control socket.
    Serve,
    /// Create and list projects, and show or reset their pinned SSH host keys.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Manage the users of the web interface and API.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage API tokens (`Authorization: Bearer …`).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage a project's secrets: held by the host, never in the repository, given to the
    /// stages of the builds that may have them as environment variables, masked in logs.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Ask the running host to queue a build.
    Build {
        /// The project to build.
        project: String,
        /// The branch to build (default: the project's configured branch, else the remote's
        /// default branch).
        #[arg(long, conflicts_with = "commit")]
        branch: Option<String>,
        /// The exact commit to build.
        #[arg(long)]
        commit: Option<String>,
        /// Follow the log to the end; exit 0 only for PASS.
        #[arg(long)]
        wait: bool,
        /// A parameter for the stages, `NAME=VALUE` (repeat for more); each must be declared
        /// in pipeline.json's `parameters`.
        #[arg(short = 'p', long = "param", value_name = "NAME=VALUE", value_parser = param_pair)]
        params: Vec<(String, String)>,
    },
    /// List a project's builds, newest first.
    Builds {
        /// The project whose builds to list.
        project: String,
        /// How many to list.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a project's webhook deliveries, newest first.
    Deliveries {
        /// The project whose deliveries to list.
        project: String,
        /// How many to list.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a project's notifications and their attempts, newest first.
    Notifications {
        /// The project whose notifications to list.
        project: String,
        /// How many to list.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replay a recorded webhook delivery (by the `#N` that `deliveries` shows first on each
    /// line) through the webhook's current filters.
    Replay {
        /// `#N` or `N`.
        delivery: String,
    },
    /// Cancel a pending or running build: `cancel BUILD` or `cancel PROJECT INDEX`.
    Cancel {
        #[command(flatten)]
        build: BuildArg,
    },
    /// Build a finished build's commit again (same branch and commit): `rebuild BUILD` or
    /// `rebuild PROJECT INDEX`.
    Rebuild {
        #[command(flatten)]
        build: BuildArg,
    },
    /// Delete a finished build's folder, log and archive: `delete-output BUILD` or
    /// `delete-output PROJECT INDEX`.
    DeleteOutput {
        #[command(flatten)]
        build: BuildArg,
    },
    /// Show the active and pending builds.
    Status,
    /// Show the Docker engines builds run on: state, version, slots in use, last error.
    Engines,
    /// Run retention now through the running host: remove the folders, logs and archives of
    /// the finished builds that the projects' retention no longer keeps (their records stay,
    /// marked deleted). The host also does this by itself every hour.
    Gc {
        /// Only list what would be removed and the bytes it would free.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a consistent copy of the database (ams.db) to FILE, mode 0600, while the host
    /// runs or not; an existing FILE is never overwritten. Then say what else to copy.
    Backup {
        /// Where to write the copy (a new file).
        file: PathBuf,
    },
    /// Follow a build's log to its end: `log BUILD` or `log PROJECT INDEX`; exit 0 only for
    /// PASS.
    Log {
        #[command(flatten)]
        build: BuildArg,
    },
    /// Internal: pack a folder into a 7z archive and hash it, printing JSON (used by the host so
    /// that the encoder's memory is returned to the system when it exits).
    #[command(name = "__pack", hide = true)]
    Pack {
        /// The folder to pack.
        src: PathBuf,
        /// The archive to write.
        dest: PathBuf,
        /// The hash to compute of the archive (crc32, crc64, sha1, sha256, blake2sp).
        hash: Option<String>,
    },
    /// Run ./pipeline.json once, without a host, through the same executor.
    Run {
        /// Directory holding pipeline.json (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Print a shell completion script to standard output (e.g. `amsbuild completions bash >
    /// /etc/bash_completion.d/amsbuild`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output (e.g. `amsbuild man | man -l -`), or
    /// the page of one command (`amsbuild man user add`).
    Man {
        /// The command whose page to print; none: the page of amsbuild itself.
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Add a user. The password comes from a prompt that does not echo, or --password-stdin.
    Add {
        /// The user's login name.
        name: String,
        /// The level on each given project: 0 NO AUTH, 1 USER, 2 WEBHOOK, 3 MODERATOR,
        /// 4 ADMIN; or 5, SERVER ADMIN, on every project (then give no projects).
        #[arg(long)]
        level: u8,
        /// Comma-separated projects, each at --level.
        #[arg(long, default_value = "")]
        projects: String,
        /// A project at --level (repeatable; adds to --projects).
        #[arg(long = "project")]
        project: Vec<String>,
        /// Read the password from the first line of standard input instead of a prompt.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password; the user's sessions end and its API tokens are revoked.
    Passwd {
        /// The user whose password to change.
        name: String,
        /// Read the password from the first line of standard input instead of a prompt.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the users.
    List,
    /// Change a user's levels. `--level N` alone: N on each of its projects (5: SERVER ADMIN).
    /// `--projects LIST`: exactly these projects, at --level or else as they were. `--project P
    /// --level N`: N on P only, the other projects untouched.
    Set {
        /// The user to change.
        name: String,
        /// The level to set: 0 NO AUTH, 1 USER, 2 WEBHOOK, 3 MODERATOR, 4 ADMIN, 5 SERVER ADMIN.
        #[arg(long)]
        level: Option<u8>,
        /// Comma-separated: the user's projects become exactly these.
        #[arg(long, conflicts_with = "project")]
        projects: Option<String>,
        /// One project to set --level on, leaving the others (repeatable).
        #[arg(long = "project", requires = "level")]
        project: Vec<String>,
    },
    /// Remove a user, with its sessions and tokens.
    Remove {
        /// The user to remove.
        name: String,
    },
    /// Import the users of the described (Python) system's users.json: names, levels and
    /// projects. Their passwords cannot be carried over, so each is created locked until
    /// `amsbuild user passwd NAME` sets one. A name already here refuses the whole file.
    Import {
        /// The users.json file (the described system kept it in CI-Host/data/).
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create an API token for a user; it is printed once.
    Create {
        /// The user the token acts as.
        #[arg(long)]
        user: String,
        /// A label to tell the user's tokens apart.
        #[arg(long, default_value = "cli")]
        label: String,
    },
    /// List a user's tokens (never their secrets).
    List {
        /// The user whose tokens to list.
        #[arg(long)]
        user: String,
    },
    /// Revoke a token by its id.
    Revoke {
        /// The user the token belongs to.
        #[arg(long)]
        user: String,
        /// The token's id, as `token list` shows it.
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
enum SecretCmd {
    /// Set (or replace) a secret. The value is read from standard input, never from the
    /// command line (which other users of the machine can see): piped in whole (one trailing
    /// newline dropped), or typed at a prompt that does not echo.
    Set {
        /// The project the secret belongs to.
        project: String,
        /// The secret's name, an environment variable name such as DEPLOY_TOKEN.
        name: String,
    },
    /// List a project's secrets: names, when and by whom each was set. Never a value.
    List {
        /// The project whose secrets to list.
        project: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm {
        /// The project the secret belongs to.
        project: String,
        /// The secret's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ProjectCmd {
    /// Create a project and clone its source.
    ///
    /// For an SSH remote, the server's host key is pinned in the project's own
    /// master/config/known_hosts on first use (the fingerprint is printed); see `project
    /// ssh-hostkey`.
    Add {
        /// The project's name: no `/`, `\`, `..` or spaces, not starting with `.` or `-`.
        name: String,
        /// The git URL to clone (https, http, ssh, git or file), e.g.
        /// ssh://git@example.com/team/repo.git.
        #[arg(long)]
        git: String,
        /// The branch to check out (default: the remote's default branch).
        #[arg(long)]
        branch: Option<String>,
        /// A private SSH key (without a passphrase) for the remote: copied into the project's
        /// master/config/ under its file name (mode 0600) and named by "ssh-key" in
        /// pipeline-config.json before the clone, which uses it, as every later git operation
        /// and trusted host command does.
        #[arg(long, value_name = "FILE")]
        ssh_key: Option<std::path::PathBuf>,
    },
    /// Show (or --reset) the SSH host key pinned for a project's remote.
    ///
    /// The keys are in the project's master/config/known_hosts, shown as host, key type and
    /// SHA256 fingerprint. A server whose key differs from the pinned one is refused; after a
    /// deliberate change of the server's key, reset, and the next connection pins the new key
    /// (its fingerprint shows in the build log and the host's log).
    SshHostkey {
        /// The project.
        name: String,
        /// Forget the pinned keys: the next connection pins the server's key again.
        #[arg(long)]
        reset: bool,
    },
    /// Create a blank project skeleton with an example pipeline.json.
    Init {
        /// The project's name: no `/`, `\`, `..` or spaces, not starting with `.` or `-`.
        name: String,
    },
    /// List the projects.
    List,
}

/// `println!` that ends the program quietly when standard output is closed (`amsbuild status
/// | head`), instead of panicking on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `eprintln!` that never panics: a closed standard error (`amsbuild log B 2>&- | head`) loses
/// the message instead of ending the command with a panic.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Parses `-p NAME=VALUE`.
fn param_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (for outbound notifications).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // AMSBUILD_LOG: a level (`debug`) or `target=level` directives (`info,ams_host=debug`);
    // anything else means `info`. (`Targets` rather than `EnvFilter`: no regex engine in the
    // binary.)
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = std::env::var("AMSBUILD_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        // A closed standard error loses the line; never a panic in the fallback report.
        .log_internal_errors(false)
        // Colours only on a terminal: a pipe, a file, journald or `docker logs` get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(filter)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("amsbuild: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            errln!("amsbuild: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "cli".into())
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    // Paths go into container mounts and child processes: always absolute.
    let root = std::path::absolute(&cli.data_dir)
        .with_context(|| format!("bad data directory {}", cli.data_dir.display()))?;
    let data = DataDir::new(root);
    let sock = data.socket();
    match cli.cmd {
        Cmd::Serve => serve(data).await,
        Cmd::Project(ProjectCmd::Init { name }) => {
            let p = project::init(&data, &name).map_err(|e| anyhow!(e))?;
            outln!("created project {name} at {}", p.root.display());
            outln!(
                "edit {} and {}",
                p.master_source().join("pipeline.json").display(),
                p.config().join(PrivateConfig::FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Project(ProjectCmd::Add {
            name,
            git,
            branch,
            ssh_key,
        }) => {
            let (p, pinned) =
                project::add(&data, &name, &git, branch.as_deref(), ssh_key.as_deref())
                    .await
                    .map_err(|e| anyhow!(e))?;
            for l in pinned {
                outln!("{l}");
            }
            outln!("created project {name} at {}", p.root.display());
            if !p.master_source().join("pipeline.json").exists() {
                outln!("note: the repository has no pipeline.json at its root yet; builds fail until it has one");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Project(ProjectCmd::SshHostkey { name, reset }) => {
            for l in project::ssh_hostkey(&data, &name, reset).map_err(|e| anyhow!(e))? {
                outln!("{l}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Project(ProjectCmd::List) => {
            for n in project::list(&data) {
                outln!("{n}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build {
            project,
            branch,
            commit,
            wait,
            params,
        } => {
            let params: serde_json::Map<String, Value> = params
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let v = control::request(
                &sock,
                &json!({"cmd": "build", "project": project, "branch": branch,
                        "commit": commit, "actor": actor(), "params": params}),
            )
            .await
            .map_err(|e| anyhow!(e))?;
            let name = v["build"]["name"].as_str().unwrap_or_default().to_string();
            errln!("queued build {name}");
            if !wait {
                outln!("{name}");
                return Ok(ExitCode::SUCCESS);
            }
            follow(
                &sock,
                &BuildRef::Name {
                    project: Some(project),
                    name,
                },
            )
            .await
        }
        Cmd::Log { build } => follow(&sock, &build.to_ref()).await,
        Cmd::Builds {
            project,
            limit,
            json: as_json,
        } => {
            let v = control::request(
                &sock,
                &json!({"cmd": "builds", "project": project, "limit": limit}),
            )
            .await
            .map_err(|e| anyhow!(e))?;
            let builds = v["builds"].as_array().cloned().unwrap_or_default();
            if as_json {
                outln!("{}", serde_json::to_string_pretty(&builds)?);
            } else {
                if builds.is_empty() {
                    errln!("project {project} has no builds yet");
                }
                for b in builds {
                    print_build(&b);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Deliveries {
            project,
            limit,
            json: as_json,
        } => {
            let v = control::request(
                &sock,
                &json!({"cmd": "deliveries", "project": project, "limit": limit}),
            )
            .await
            .map_err(|e| anyhow!(e))?;
            let list = v["deliveries"].as_array().cloned().unwrap_or_default();
            if as_json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                if list.is_empty() {
                    errln!("project {project} has no webhook deliveries yet");
                }
                for d in list {
                    let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
                    outln!(
                        "#{}  {}  {:<9} {} {} via {}  id {}  {}{}",
                        d["id"].as_i64().unwrap_or(0),
                        d["received_at"]
                            .as_f64()
                            .map(timefmt::legacy)
                            .unwrap_or_default(),
                        s("verdict"),
                        s("sender"),
                        s("event"),
                        s("webhook"),
                        s("delivery_id"),
                        d["builds"]
                            .as_array()
                            .map(|b| b
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default(),
                        d["reason"]
                            .as_str()
                            .map(|r| format!("  ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Notifications {
            project,
            limit,
            json: as_json,
        } => {
            let v = control::request(
                &sock,
                &json!({"cmd": "notifications", "project": project, "limit": limit}),
            )
            .await
            .map_err(|e| anyhow!(e))?;
            let list = v["notifications"].as_array().cloned().unwrap_or_default();
            if as_json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                if list.is_empty() {
                    errln!("project {project} has sent no notifications yet");
                }
                for n in list {
                    let s = |k: &str| n[k].as_str().unwrap_or("-").to_string();
                    let tries: Vec<String> = n["attempts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| a["outcome"].as_str().unwrap_or("?").to_string())
                        .collect();
                    outln!(
                        "{}  {} {} `{}` to {}  {}  [{}]",
                        n["created_at"]
                            .as_f64()
                            .map(timefmt::legacy)
                            .unwrap_or_default(),
                        s("build_name"),
                        s("event"),
                        s("hook"),
                        s("target_host"),
                        s("outcome"),
                        tries.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay { delivery } => {
            let delivery: i64 = delivery.trim_start_matches('#').parse().map_err(|_| {
                anyhow!("`{delivery}` is not a delivery number; give the #N that `amsbuild deliveries PROJECT` shows")
            })?;
            let v = control::request(
                &sock,
                &json!({"cmd": "replay", "id": delivery, "actor": actor()}),
            )
            .await
            .map_err(|e| anyhow!(e))?;
            match v["builds"].as_array() {
                Some(b) if !b.is_empty() => {
                    for n in b {
                        outln!("{}", n.as_str().unwrap_or_default());
                    }
                }
                _ => outln!(
                    "nothing to build{}",
                    v["ignored"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { build } => {
            let r = build.to_ref();
            let v = control::request_on(&sock, "cancel", &r, &actor())
                .await
                .map_err(|e| anyhow!(e))?;
            outln!(
                "cancel requested for {}",
                v["build"]["name"].as_str().unwrap_or(&r.to_string())
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rebuild { build } => {
            let r = build.to_ref();
            let v = control::request_on(&sock, "rebuild", &r, &actor())
                .await
                .map_err(|e| anyhow!(e))?;
            outln!(
                "queued build {} (again of {r})",
                v["build"]["name"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DeleteOutput { build } => {
            let r = build.to_ref();
            let v = control::request_on(&sock, "delete-output", &r, &actor())
                .await
                .map_err(|e| anyhow!(e))?;
            outln!(
                "deleted the output of {}",
                v["build"]["name"].as_str().unwrap_or(&r.to_string())
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => {
            let v = control::request(&sock, &json!({"cmd": "status"}))
                .await
                .map_err(|e| anyhow!(e))?;
            for list in ["active", "pending"] {
                outln!("{list}:");
                for b in v[list].as_array().cloned().unwrap_or_default() {
                    print_build(&b);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Engines => {
            let v = control::request(&sock, &json!({"cmd": "engines"}))
                .await
                .map_err(|e| anyhow!(e))?;
            outln!(
                "{:<16} {:<8} {:<10} {:>5}  {:<28} {}",
                "ENGINE",
                "STATE",
                "VERSION",
                "SLOTS",
                "HOST",
                "LAST ERROR"
            );
            for e in v["engines"].as_array().cloned().unwrap_or_default() {
                let state = match e["up"].as_bool() {
                    Some(true) => "up",
                    Some(false) => "down",
                    None => "unknown",
                };
                let host = e["host"]
                    .as_str()
                    .filter(|h| !h.is_empty())
                    .unwrap_or("(local)");
                outln!(
                    "{:<16} {:<8} {:<10} {:>5}  {:<28} {}",
                    e["name"].as_str().unwrap_or("?"),
                    state,
                    e["version"].as_str().unwrap_or("-"),
                    format!("{}/{}", e["in_use"], e["slots"]),
                    host,
                    e["last_error"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gc { dry_run } => gc(&sock, dry_run).await,
        Cmd::Backup { file } => backup(&data, &file).await,
        Cmd::Run { dir } => run_local(&dir).await,
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "amsbuild", &mut out);
            write_stdout(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { command } => {
            let mut cmd = Cli::command();
            // Gives each command its full name (`amsbuild-user-add`, `amsbuild user add`).
            cmd.build();
            let mut page = &cmd;
            for word in &command {
                page = page
                    .get_subcommands()
                    .find(|c| c.get_name() == word && !c.is_hide_set())
                    .ok_or_else(|| anyhow!("`{}` is not an amsbuild command", command.join(" ")))?;
            }
            let mut out = Vec::new();
            clap_mangen::Man::new(page.clone())
                .source(format!("amsbuild {}", env!("CARGO_PKG_VERSION")))
                .manual("AMS-Build")
                .render(&mut out)?;
            write_stdout(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::User(u) => users(&data, u).await,
        Cmd::Token(t) => tokens(&data, t).await,
        Cmd::Secret(c) => secrets(&data, c).await,
        Cmd::Pack { src, dest, hash } => {
            let kind = match hash.as_deref() {
                None => None,
                Some(h) => Some(
                    pipeline::HashKind::parse(h).ok_or_else(|| anyhow!("unknown hash `{h}`"))?,
                ),
            };
            let s = ams_archive::pack_dir(&src, &dest)?;
            let hash = match kind {
                Some(k) => Some(ams_archive::hash_file(&dest, k)?),
                None => None,
            };
            outln!(
                "{}",
                json!({"files": s.files, "dirs": s.dirs, "symlinks": s.symlinks,
                       "skipped": s.skipped, "bytes": s.bytes,
                       "hash_kind": kind.map(|k| k.name()), "hash": hash})
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Bytes for people: `512 B`, `1.5 KiB`, `12.0 MiB`, `3.2 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `amsbuild gc [--dry-run]`: one retention run through the host, printed per project.
async fn gc(sock: &Path, dry_run: bool) -> Result<ExitCode> {
    let v = control::request(
        sock,
        &json!({"cmd": "gc", "dry_run": dry_run, "actor": actor()}),
    )
    .await
    .map_err(|e| anyhow!(e))?;
    let r = &v["report"];
    let projects = r["projects"].as_array().cloned().unwrap_or_default();
    if projects.is_empty() {
        outln!(
            "no project has a retention: set retention_keep_builds or retention_max_age_days \
             in web_conf.json, or \"retention\" in a project's pipeline-config.json"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut failed = false;
    for p in &projects {
        let name = p["project"].as_str().unwrap_or("?");
        if let Some(e) = p["error"].as_str() {
            failed = true;
            outln!("{name}: left alone: {e}");
            continue;
        }
        let policy = match (
            p["policy"]["keep_builds"].as_u64(),
            p["policy"]["max_age_days"].as_f64(),
        ) {
            (Some(n), Some(d)) => format!("keep-builds {n}, max-age-days {d}"),
            (Some(n), None) => format!("keep-builds {n}"),
            (None, Some(d)) => format!("max-age-days {d}"),
            (None, None) => "keep every build".into(),
        };
        let builds = p["builds"].as_array().cloned().unwrap_or_default();
        if builds.is_empty() {
            outln!("{name} ({policy}): nothing to remove");
            continue;
        }
        let bytes = p["bytes"].as_u64().unwrap_or(0);
        outln!(
            "{name} ({policy}): {verb} {} build(s), {}",
            builds.len(),
            human(bytes)
        );
        for b in builds {
            let s = |k: &str| b[k].as_str().unwrap_or("-").to_string();
            match b["error"].as_str() {
                Some(e) => {
                    failed = true;
                    outln!("  {}  {}  kept: {e}", s("name"), s("status").to_uppercase());
                }
                None => outln!(
                    "  {}  {}  {}  {}",
                    s("name"),
                    s("status").to_uppercase(),
                    human(b["bytes"].as_u64().unwrap_or(0)),
                    s("why")
                ),
            }
        }
    }
    let total = r["bytes"].as_u64().unwrap_or(0);
    outln!(
        "{} {} ({total} bytes)",
        if dry_run { "would free" } else { "freed" },
        human(total)
    );
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `amsbuild backup FILE`: a consistent copy of the database, then what else to copy.
async fn backup(data: &DataDir, file: &Path) -> Result<ExitCode> {
    let dest = std::path::absolute(file)
        .with_context(|| format!("bad backup file name {}", file.display()))?;
    let info = ams_store::backup(&data.db(), &dest)
        .await
        .map_err(|e| anyhow!(e))?;
    outln!(
        "wrote {} (mode 0600): {} builds, {}; its integrity check passed",
        dest.display(),
        info.builds,
        human(info.bytes)
    );
    outln!("the database holds the records only; to restore a host, also copy:");
    outln!(
        "  {} and {}: the host's configuration and its id",
        data.web_conf().display(),
        data.host_id_file().display()
    );
    outln!(
        "  {}: each project's private pipeline-config.json, webhooks.json and keys (in no \
         repository: copy them at least)",
        data.projects().join("*/master/config").display()
    );
    if data.secrets_key().exists() {
        outln!(
            "  {}: the key of the projects' secrets (the copy holds them sealed; without the \
             key they cannot be opened). Keep it apart from the copy, as safe as the secrets",
            data.secrets_key().display()
        );
    }
    outln!(
        "  the rest of {}: sources, build folders, logs and archives (large)",
        data.projects().display()
    );
    let conf = std::fs::read_to_string(data.web_conf())
        .ok()
        .and_then(|t| WebConf::parse(&t, "web_conf.json").ok());
    match conf {
        Some(c) => {
            let files: Vec<String> = [&c.ssl.cert_file, &c.ssl.ca_bundle_file, &c.ssl.private_file]
                .into_iter()
                .flatten()
                .map(|f| data.root().join(f).display().to_string())
                .collect();
            if !files.is_empty() {
                outln!("  the TLS files: {}", files.join(", "));
            }
        }
        None => outln!("  the TLS files web_conf.json names under \"ssl\", if any"),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_build(b: &Value) {
    let s = |k: &str| b[k].as_str().unwrap_or("-").to_string();
    outln!(
        "{:<8} {}  {}  by {}  git {}{}{}",
        s("status").to_uppercase(),
        s("name"),
        b["created_at"]
            .as_f64()
            .map(timefmt::legacy)
            .unwrap_or_default(),
        s("created_by"),
        b["git_hash"]
            .as_str()
            .map(|h| &h[..h.len().min(12)])
            .unwrap_or("-"),
        b["reason"]
            .as_str()
            .map(|r| format!("  ({r})"))
            .unwrap_or_default(),
        if b["output_deleted_at"].is_number() {
            "  [output deleted]"
        } else {
            ""
        }
    );
}

async fn follow(sock: &Path, build: &BuildRef) -> Result<ExitCode> {
    use std::io::Write;
    let (name, status) = control::follow_log(sock, build, &mut |t| {
        let mut o = std::io::stdout().lock();
        if let Err(e) = o.write_all(t.as_bytes()).and_then(|()| o.flush()) {
            // The reader went away (`amsbuild log B | head`): stop following, quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    })
    .await
    .map_err(|e| anyhow!(e))?;
    errln!("build {name}: {}", status.to_uppercase());
    Ok(if status == "pass" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Writes generated text to standard output; a closed pipe (`| head`) is a quiet end.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn read_password(from_stdin: bool) -> Result<String> {
    let pw = if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "no terminal to ask for the password on; pipe it in with --password-stdin"
            );
        }
        let a = rpassword::prompt_password("password: ")?;
        let b = rpassword::prompt_password("again: ")?;
        if a != b {
            anyhow::bail!("the passwords differ");
        }
        a
    };
    if pw.chars().count() < ams_web::auth::MIN_PASSWORD {
        anyhow::bail!(
            "the password is too short: use at least {} characters",
            ams_web::auth::MIN_PASSWORD
        );
    }
    Ok(pw)
}

fn parse_level(n: u8) -> Result<Level> {
    Level::try_from(n).map_err(|e| anyhow!(e))
}

fn parse_projects(data: &DataDir, list: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for n in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    }
    for n in &names {
        if !project::exists(data, n) {
            anyhow::bail!("no project named `{n}`");
        }
    }
    Ok(names)
}

async fn open_store(data: &DataDir) -> Result<ams_store::Store> {
    data.create()
        .with_context(|| format!("cannot create the data directory {}", data.root().display()))?;
    ams_store::Store::open(&data.db())
        .await
        .with_context(|| format!("cannot open {}", data.db().display()))
}

/// What `amsbuild user set` asks for (the host's operator may give anything).
struct SetGrant {
    level: Option<Level>,
    /// The user's projects become exactly these.
    projects: Option<Vec<String>>,
    /// Set `level` on these only.
    project: Vec<String>,
}

impl SetGrant {
    fn apply(&self, g: &Grant) -> std::result::Result<Grant, String> {
        let mut out = g.clone();
        if self.level == Some(Level::ServerAdmin) {
            if self.projects.is_some() || !self.project.is_empty() {
                return Err(
                    "SERVER ADMIN is on every project already; give --level 5 without projects"
                        .into(),
                );
            }
            return Ok(Grant::server_admin());
        }
        if !self.project.is_empty() {
            // `requires = "level"` makes sure of it.
            let level = self.level.unwrap_or(Level::NoAuth);
            out.server_admin = false;
            for p in &self.project {
                out.projects.insert(p.clone(), level);
            }
            return Ok(out);
        }
        if let Some(list) = &self.projects {
            // Projects kept keep their level unless --level says otherwise; a new one takes
            // --level, or the user's one level if it has just one.
            let levels: std::collections::BTreeSet<Level> = g.projects.values().copied().collect();
            let single = (levels.len() == 1)
                .then(|| levels.into_iter().next())
                .flatten();
            out.server_admin = false;
            out.projects = list
                .iter()
                .map(|p| {
                    self.level
                        .or_else(|| g.projects.get(p).copied())
                        .or(single)
                        .map(|l| (p.clone(), l))
                        .ok_or_else(|| format!("give --level for the new project `{p}`"))
                })
                .collect::<std::result::Result<_, _>>()?;
            return Ok(out);
        }
        match self.level {
            Some(level) => {
                if g.projects.is_empty() {
                    return Err("the user has no projects; give --projects or --project".into());
                }
                out.server_admin = false;
                for l in out.projects.values_mut() {
                    *l = level;
                }
                Ok(out)
            }
            None => Err("give --level, --projects or --project".into()),
        }
    }
}

async fn users(data: &DataDir, cmd: UserCmd) -> Result<ExitCode> {
    let store = open_store(data).await?;
    match cmd {
        UserCmd::Add {
            name,
            level,
            projects,
            project,
            password_stdin,
        } => {
            ams_core::names::validate_project_name(&name)
                .map_err(|e| anyhow!("{}", e.replace("project name", "user name")))?;
            let level = parse_level(level)?;
            let projects = parse_projects(data, &[projects, project.join(",")].join(","))?;
            if level == Level::ServerAdmin && !projects.is_empty() {
                anyhow::bail!(
                    "SERVER ADMIN is on every project already; give --level 5 without --projects"
                );
            }
            let grant = Grant::uniform(level.into(), &projects);
            let pw = read_password(password_stdin)?;
            let now = timefmt::now();
            store
                .create_user(&ams_store::User {
                    name: name.clone(),
                    password_hash: ams_web::auth::hash_password(&pw).map_err(|e| anyhow!(e))?,
                    grant: grant.clone(),
                    created_at: now,
                    password_changed_at: now,
                })
                .await?;
            outln!("added user {name} ({})", grant.describe());
        }
        UserCmd::Passwd {
            name,
            password_stdin,
        } => {
            let pw = read_password(password_stdin)?;
            let hash = ams_web::auth::hash_password(&pw).map_err(|e| anyhow!(e))?;
            if !store.set_password(&name, &hash, timefmt::now()).await? {
                anyhow::bail!("no user named `{name}`");
            }
            outln!(
                "changed the password of {name}; its sessions have ended and its API tokens \
                 are revoked"
            );
        }
        UserCmd::List => {
            for u in store.users().await? {
                let locked = if u.password_hash.starts_with(LOCKED_PREFIX) {
                    "  (locked: no password yet; set one with `amsbuild user passwd`)"
                } else {
                    ""
                };
                outln!("{:<24} {}{locked}", u.name, u.grant.describe());
            }
        }
        UserCmd::Import { file } => {
            let imported = import_users(&store, &file).await?;
            for line in imported {
                outln!("{line}");
            }
        }
        UserCmd::Set {
            name,
            level,
            projects,
            project,
        } => {
            let level = level.map(parse_level).transpose()?;
            let projects = projects.map(|p| parse_projects(data, &p)).transpose()?;
            let project = parse_projects(data, &project.join(","))?;
            let edit = SetGrant {
                level,
                projects,
                project,
            };
            match store.update_grant(&name, |g| edit.apply(g)).await {
                Ok(Some(g)) => outln!("updated user {name}: {}", g.describe()),
                Ok(None) => anyhow::bail!("no user named `{name}`"),
                Err(ams_store::StoreError::Invalid(e)) => anyhow::bail!("{e}"),
                Err(e) => return Err(e.into()),
            }
        }
        UserCmd::Remove { name } => {
            if !store.remove_user(&name).await? {
                anyhow::bail!("no user named `{name}`");
            }
            outln!("removed user {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tokens(data: &DataDir, cmd: TokenCmd) -> Result<ExitCode> {
    let store = open_store(data).await?;
    match cmd {
        TokenCmd::Create { user, label } => {
            if store.user(&user).await?.is_none() {
                anyhow::bail!("no user named `{user}`");
            }
            let token = format!("ams_{}", ams_web::auth::random_secret(32));
            let id = store
                .create_token(
                    &user,
                    &label,
                    &ams_web::auth::token_hash(&token),
                    timefmt::now(),
                    None,
                )
                .await?
                .ok_or_else(|| anyhow!("no user named `{user}`"))?;
            errln!("token {id} for {user}; it is shown only now:");
            outln!("{token}");
        }
        TokenCmd::List { user } => {
            for t in store.tokens_of(&user).await? {
                outln!(
                    "{:<4} {:<20} created {}  last used {}",
                    t.id,
                    t.label,
                    timefmt::legacy(t.created_at),
                    t.last_used
                        .map(timefmt::legacy)
                        .unwrap_or_else(|| "never".into())
                );
            }
        }
        TokenCmd::Revoke { user, id } => {
            if !store.revoke_token(&user, id).await? {
                anyhow::bail!("no token {id} of user `{user}`");
            }
            outln!("revoked token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a secret's value: all of standard input (one trailing newline dropped), or a prompt
/// that does not echo when standard input is a terminal. Never an argument.
fn read_secret_value(name: &str) -> Result<String> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(rpassword::prompt_password(format!("value of {name}: "))?);
    }
    let max = ams_core::secrets::MAX_VALUE_BYTES as u64;
    let mut bytes = Vec::new();
    stdin.lock().take(max + 3).read_to_end(&mut bytes)?;
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| anyhow!("the value on standard input is not UTF-8 text"))
}

async fn secrets(data: &DataDir, cmd: SecretCmd) -> Result<ExitCode> {
    let store = open_store(data).await?;
    let fail = |e: ams_host::error::HostError| anyhow!(e.detail());
    match cmd {
        SecretCmd::Set { project, name } => {
            // The name is checked before the value is asked for.
            ams_core::secrets::validate_name(&name).map_err(|e| anyhow!(e))?;
            if !project::exists(data, &project) {
                anyhow::bail!("no project named `{project}`");
            }
            let value = read_secret_value(&name)?;
            let by = format!("{} (cli)", actor());
            ams_host::secrets::set(data, &store, &project, &name, &value, &by)
                .await
                .map_err(fail)?;
            outln!("set secret {name} of project {project}");
        }
        SecretCmd::List { project, json } => {
            let list = ams_host::secrets::list(data, &store, &project)
                .await
                .map_err(fail)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                outln!("project {project} has no secrets");
            } else {
                for s in list {
                    outln!(
                        "{:<32} set {}  by {}",
                        s.name,
                        timefmt::legacy(s.set_at),
                        s.set_by
                    );
                }
            }
        }
        SecretCmd::Rm { project, name } => {
            ams_host::secrets::remove(data, &store, &project, &name)
                .await
                .map_err(fail)?;
            outln!("removed secret {name} of project {project}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How a locked account's password hash begins: no password verifies against it (it is no
/// argon2 hash), and `user list` shows the account as locked.
const LOCKED_PREFIX: &str = "!locked";

/// Imports the described system's users.json (locked accounts, see `UserCmd::Import`) and
/// returns the lines to print: each user, its levels, and how to unlock it. A user named
/// `admin` that is the described system's test account (a USER without projects) is left out
/// when this host's `admin` is to be made; any name already here refuses the whole file.
async fn import_users(store: &ams_store::Store, file: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let users = ams_core::compat::parse_users_json(&text).map_err(|mut e| {
        e.file = file.display().to_string();
        anyhow!(
            "{e}\nfix the file and start again, or move it away to start without its users (see {})",
            ams_core::compat::COMPAT_DOC
        )
    })?;
    let existing = store.users().await?;
    let first = existing.is_empty();
    let mut lines = Vec::new();
    let mut to_create = Vec::new();
    for u in users {
        if let Some(o) = existing
            .iter()
            .find(|o| o.name.eq_ignore_ascii_case(&u.name))
        {
            anyhow::bail!(
                "{}: user `{}` exists here already (as `{}`); remove it from the file, or \
                 remove the user here first (`amsbuild user remove {}`), then import again",
                file.display(),
                u.name,
                o.name,
                o.name
            );
        }
        let test_account = !u.grant.server_admin
            && u.grant.projects.is_empty()
            && u.name.eq_ignore_ascii_case("admin");
        if first && test_account {
            lines.push(format!(
                "users.json: `{}` (the described system's test account, no projects) is not \
                 imported: `admin` is this host's SERVER ADMIN",
                u.name
            ));
            continue;
        }
        to_create.push(u);
    }
    let now = timefmt::now();
    for u in &to_create {
        store
            .create_user(&ams_store::User {
                name: u.name.clone(),
                password_hash: format!(
                    "{LOCKED_PREFIX}: imported from users.json; no password is set"
                ),
                grant: u.grant.clone(),
                created_at: now,
                password_changed_at: now,
            })
            .await?;
        let notes = if u.notes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", u.notes.join("; "))
        };
        lines.push(format!(
            "imported user {} ({}){notes}: locked until a password is set with \
             `amsbuild user passwd {}` (the described system's passwords cannot be carried over)",
            u.name,
            u.grant.describe(),
            u.name
        ));
    }
    lines.push(format!(
        "imported {} user(s) from {}; see {}",
        to_create.len(),
        file.display(),
        ams_core::compat::COMPAT_DOC
    ));
    Ok(lines)
}

/// Loads web_conf.json, writing the defaults on first start.
fn load_conf(data: &DataDir) -> Result<WebConf> {
    let path = data.web_conf();
    match std::fs::read_to_string(&path) {
        Ok(text) => WebConf::parse(&text, &path.display().to_string()).map_err(|e| anyhow!(e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let conf = WebConf::default();
            ams_host::paths::write_private(&path, (conf.to_pretty_json() + "\n").as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            tracing::info!("wrote default configuration to {}", path.display());
            Ok(conf)
        }
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// The engines of web_conf.json (or the one local engine), each with its executor. A TLS file
/// that cannot be read stops the start, naming the key and the file.
fn engine_pool(conf: &WebConf, data: &DataDir) -> Result<Vec<ams_host::host::Engine>> {
    let mut out = Vec::new();
    for (i, e) in conf.engine_list().into_iter().enumerate() {
        let target = match (&e.tls, e.host.as_str()) {
            (_, "") => ams_docker::EngineTarget::Default,
            (None, h) => ams_docker::EngineTarget::Unix(h.to_string()),
            (Some(t), h) => ams_docker::EngineTarget::Tls {
                addr: h.to_string(),
                ca: data.root().join(&t.ca),
                cert: data.root().join(&t.cert),
                key: data.root().join(&t.key),
            },
        };
        target.check().map_err(|m| {
            let (field, why) = m.split_once(": ").unwrap_or(("tls", m.as_str()));
            anyhow!(
                "{}: field `engines[{i}].{field}`: {why} (relative paths are relative to the \
                 data directory)",
                data.web_conf().display()
            )
        })?;
        out.push(ams_host::host::Engine {
            name: e.name,
            slots: e.slots,
            labels: e.labels,
            host: e.host,
            executor: Arc::new(DockerExecutor::for_target(target)),
        });
    }
    Ok(out)
}

async fn serve(data: DataDir) -> Result<ExitCode> {
    // Signal handlers first, so a SIGTERM during start-up is a clean stop, not a kill.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    data.create()
        .with_context(|| format!("cannot create the data directory {}", data.root().display()))?;
    let conf = load_conf(&data)?;
    // HTTPS problems stop the start before anything listens: never fall back to plain HTTP.
    let certs = if conf.use_ssl {
        let files = ams_web::tls::CertFiles::from_conf(&conf.ssl, data.root(), &data.web_conf())
            .map_err(|e| anyhow!(e))?;
        Some(ams_web::tls::Certs::load(files).map_err(|e| anyhow!(e))?)
    } else {
        None
    };
    let tls = certs.as_ref().map(|c| c.acceptor());
    let scheme = if conf.use_ssl { "https" } else { "http" };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let listener = control::bind(&data.socket())
        .await
        .map_err(|e| anyhow!(e))?;
    let engines = engine_pool(&conf, &data)?;
    let shutdown = CancellationToken::new();
    let store = ams_store::Store::open(&data.db())
        .await
        .context("cannot open the database")?;
    let metrics = Arc::new(ams_host::metrics::Metrics::new());
    // The notifier stops after the host, so the last builds' events still go out.
    let notify_stop = CancellationToken::new();
    let (notifier, notify_task) = ams_notify::start(
        data.clone(),
        Arc::new(conf.clone()),
        store.clone(),
        metrics.clone(),
        notify_stop.clone(),
    );
    for p in ams_notify::startup_problems(&data) {
        tracing::error!("{p}");
    }
    for w in ams_notify::startup_warnings(&data) {
        tracing::warn!("{w}");
    }
    let (host, handle) = Host::start_pool(
        HostConfig {
            data: data.clone(),
            conf: conf.clone(),
            packer: std::env::current_exe().ok(),
            events: Some(notifier),
            metrics: metrics.clone(),
            store: Some(store),
        },
        engines,
    )
    .await
    .context("cannot start the host")?;
    let users_json = data.root().join(ams_core::compat::USERS_FILE);
    let first_start = handle.store.user_count().await.unwrap_or(1) == 0;
    if first_start && users_json.exists() {
        // The described system's users, imported once, before the first admin is made.
        let lines = import_users(&handle.store, &users_json).await?;
        let done = data
            .root()
            .join(format!("{}.imported", ams_core::compat::USERS_FILE));
        std::fs::rename(&users_json, &done).with_context(|| {
            format!("cannot rename {} after importing it", users_json.display())
        })?;
        for line in lines {
            outln!("{line}");
        }
        outln!(
            "{} is renamed {}; it is not read again",
            users_json.display(),
            done.display()
        );
    } else if users_json.exists() {
        tracing::warn!(
            "{} is read only on the first start, when the database has no users; to import \
             its users now run `amsbuild user import {}` (see {})",
            users_json.display(),
            users_json.display(),
            ams_core::compat::COMPAT_DOC
        );
    }
    if first_start {
        // `admin`, unless users.json brought a user of that name.
        let taken = handle.store.users().await?;
        let free = |n: &str| !taken.iter().any(|u| u.name.eq_ignore_ascii_case(n));
        let admin = ["admin".to_string(), "amsbuild-admin".to_string()]
            .into_iter()
            .chain((2..).map(|i| format!("amsbuild-admin-{i}")))
            .find(|n| free(n))
            .unwrap_or_default();
        let pw = ams_web::auth::random_password();
        let now = timefmt::now();
        handle
            .store
            .create_user(&ams_store::User {
                name: admin.clone(),
                password_hash: ams_web::auth::hash_password(&pw).map_err(|e| anyhow!(e))?,
                grant: Grant::server_admin(),
                created_at: now,
                password_changed_at: now,
            })
            .await?;
        outln!(
            "first start: created the user `{admin}` (SERVER ADMIN) with the password {pw}\n\
             it is shown only now; change it with `amsbuild user passwd {admin}`\n\
             note: this `{admin}` administers every project and user; the described Python \
             system's first-run `admin` was a USER without projects (see {})",
            ams_core::compat::COMPAT_DOC
        );
    }
    tracing::info!(
        "amsbuild {} serving data directory {} ({} build slots); control socket {}",
        env!("CARGO_PKG_VERSION"),
        data.root().display(),
        conf.max_active_builds,
        data.socket().display()
    );
    let control_task = tokio::spawn(control::serve(handle.clone(), listener, shutdown.clone()));

    for w in ams_web::webhook::startup_warnings(&handle) {
        tracing::warn!("{w}");
    }
    for w in project::ssh_startup_warnings(&data) {
        tracing::warn!("{w}");
    }
    let hooks = ams_web::webhook::router(
        ams_web::webhook::WebhookState {
            host: handle.clone(),
        },
        &conf.web_root,
    );
    let api_state = ams_web::api::ApiState {
        host: Arc::new(handle.clone()),
        conf: Arc::new(conf.clone()),
        guard: Arc::default(),
        lists: Arc::default(),
    };
    let web = ams_web::api::router(api_state.clone(), &conf.web_root)
        .merge(ams_web::api::files_router(
            api_state.clone(),
            &conf.web_root,
        ))
        .merge(ams_web::api::pages_router(
            api_state.clone(),
            &conf.web_root,
        ))
        .merge(ams_web::manage::router(api_state.clone(), &conf.web_root))
        .merge(ams_web::api::health_router(api_state.clone()))
        .merge(ams_web::metrics::router(api_state.clone()))
        .merge(ams_web::badge::router(api_state.clone(), &conf.web_root))
        .merge(ams_web::pages::router(api_state, &conf.web_root));
    let bind = |ip: &str, port: u16, what: &'static str| {
        let addr = format!("{ip}:{port}");
        let file = data.web_conf();
        async move {
            tokio::net::TcpListener::bind(&addr).await.with_context(|| {
                format!(
                    "cannot listen for {what} on {addr}; change it in {}",
                    file.display()
                )
            })
        }
    };
    let shared = conf.webhook_port != 0
        && conf.webhook_port == conf.web_interface_port
        && conf.webhook_ip == conf.web_interface_ip;
    let mut web_tasks = Vec::new();
    if shared {
        let l = bind(
            &conf.web_interface_ip,
            conf.web_interface_port,
            "the web interface",
        )
        .await?;
        let addr = l.local_addr()?;
        tracing::info!(
            "web interface listening on {scheme}://{addr}/{}/",
            conf.web_root
        );
        tracing::info!(
            "webhooks listening on {scheme}://{addr}/{}/request",
            conf.web_root
        );
        web_tasks.push(tokio::spawn(ams_web::serve(
            l,
            web.merge(hooks),
            tls.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    } else {
        let l = bind(&conf.webhook_ip, conf.webhook_port, "webhooks").await?;
        tracing::info!(
            "webhooks listening on {scheme}://{}/{}/request",
            l.local_addr()?,
            conf.web_root
        );
        web_tasks.push(tokio::spawn(ams_web::serve(
            l,
            hooks,
            tls.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
        let l = bind(
            &conf.web_interface_ip,
            conf.web_interface_port,
            "the web interface",
        )
        .await?;
        tracing::info!(
            "web interface listening on {scheme}://{}/{}/",
            l.local_addr()?,
            conf.web_root
        );
        web_tasks.push(tokio::spawn(ams_web::serve(
            l,
            web,
            tls,
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    let host_task = tokio::spawn(host.run());
    let schedule_task = tokio::spawn(ams_host::schedule::run(handle.clone(), shutdown.clone()));

    // A renewed certificate is taken up without a restart.
    let reload = || match &certs {
        Some(c) => match c.reload() {
            Ok(()) => tracing::info!("SIGHUP: reloaded the TLS certificate"),
            Err(e) => tracing::error!("SIGHUP: kept the old TLS certificate: {e}"),
        },
        None => tracing::info!("SIGHUP: nothing to reload (use_ssl is false)"),
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("interrupt: stopping"); break; }
            _ = hup.recv() => reload(),
        }
    }
    // First step: the running builds get the grace to finish while no queued build starts and
    // everything else goes on serving and queueing; a second signal ends it early. The drain
    // is asked even when nothing seems to run, so no build starts after this point.
    let grace = Duration::from_secs(conf.shutdown_grace_secs);
    if !grace.is_zero() {
        let drained = handle.drain();
        tokio::pin!(drained);
        let running = handle.snapshot().await.map(|s| s.active.len()).unwrap_or(0);
        if running > 0 {
            tracing::info!(
                "waiting up to {} s for {running} running build(s) to finish; no queued build \
                 starts; send SIGTERM again to stop them now (shutdown_grace_secs in {})",
                grace.as_secs(),
                data.web_conf().display()
            );
        }
        let until = tokio::time::Instant::now() + grace;
        loop {
            tokio::select! {
                _ = &mut drained => {
                    if running > 0 {
                        tracing::info!("no build runs any more: stopping");
                    }
                    break;
                }
                _ = tokio::time::sleep_until(until) => {
                    tracing::warn!(
                        "shutdown_grace_secs ({} s) is over: stopping the builds still running",
                        grace.as_secs()
                    );
                    break;
                }
                _ = term.recv() => {
                    tracing::warn!("SIGTERM again: stopping the running builds now");
                    break;
                }
                _ = int.recv() => {
                    tracing::warn!("interrupt again: stopping the running builds now");
                    break;
                }
                _ = hup.recv() => reload(),
            }
        }
    }
    shutdown.cancel();
    handle.shutdown().await;
    let _ = host_task.await;
    let _ = schedule_task.await;
    let _ = control_task.await;
    for t in web_tasks {
        let _ = t.await;
    }
    // Notifications still queued get 10 s; a slow receiver never holds the stop longer.
    notify_stop.cancel();
    let notify_abort = notify_task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(10), notify_task)
        .await
        .is_err()
    {
        notify_abort.abort();
        tracing::warn!("stopped without waiting longer for pending notifications");
    }
    let _ = std::fs::remove_file(data.socket());
    tracing::info!("stopped; pending builds stay queued for the next start");
    Ok(ExitCode::SUCCESS)
}

/// `amsbuild run`: one pipeline, no host, no database. The source is mounted as it is.
async fn run_local(dir: &Path) -> Result<ExitCode> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let file = dir.join("pipeline.json");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{}: cannot read it; run this in a folder with a pipeline.json",
            file.display()
        )
    })?;
    let p = pipeline::parse(&text).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
    for w in &p.warnings {
        errln!("warning: {w}");
    }
    // A local run says at once that the engine is missing rather than waiting for it.
    let conf = WebConf {
        engine_wait_secs: 0,
        ..WebConf::default()
    };
    let private = PrivateConfig::default();
    let project = ams_core::names::sanitize_container_name(
        &dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or("local".into()),
    );
    let work = std::env::temp_dir().join(format!("amsbuild-run-{}", worker::random_hex(6)));
    let output_dir = work.join("build");
    std::fs::create_dir_all(&output_dir)?;
    let hash = worker::random_hex(20);
    let git_hash = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let mut values = std::collections::BTreeMap::new();
    for (k, v) in [
        ("project", project.clone()),
        ("build_name", format!("{project}_local")),
        ("build_hash", hash.clone()),
        ("build_index", "0".into()),
        ("git_hash", git_hash),
        ("actor", actor()),
        ("created", timefmt::compact(timefmt::now())),
        ("project_dir", s(&dir)),
        ("build_dir", s(&work)),
        ("master_source_dir", s(&dir)),
        ("build_source_dir", s(&dir)),
        ("master_build_name", "master".into()),
    ] {
        values.insert(k, v);
    }
    let params = ams_core::pipeline::resolve_parameters(&p.parameters, &Default::default())
        .map_err(|e| anyhow!("pipeline.json: {e}; `amsbuild run` gives only the defaults"))?;
    let mut log = BuildLog::stdout(conf.log_max_bytes);
    if !p.prepare.master_dir_commands.is_empty() || !p.prepare.build_dir_commands.is_empty() {
        log.line("prepare-build host commands are not run by `amsbuild run`");
    }
    if !p.secrets.is_empty() {
        log.line(&format!(
            "secrets withheld: `amsbuild run` has no host to hold them; the stages run without {}",
            p.secrets.join(", ")
        ));
    }
    if p.dummy_build {
        log.line("dummy build: no container is run");
        return Ok(ExitCode::SUCCESS);
    }
    let stop = Arc::new(StopSignal::default());
    let stop2 = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop2.stop(StopReason::Cancel {
                by: "interrupt".into(),
            });
        }
    });
    let timeout = p.timeout_secs.unwrap_or(conf.build_timeout_secs);
    let mut labels = HashMap::new();
    labels.insert(ams_docker::LABEL_PROJECT.to_string(), project.clone());
    let executor = DockerExecutor::new();
    let started = Instant::now();
    let req = ExecRequest {
        pipeline: &p,
        vars: &values,
        private: &private,
        conf: &conf,
        container_name: ams_core::names::sanitize_container_name(&format!("{project}{hash}")),
        labels,
        source_dir: dir.clone(),
        output_dir: output_dir.clone(),
        ci_dir: work.join(".ams-ci"),
        caches: Vec::new(),
        deadline: started + Duration::from_secs(timeout),
        timeout_secs: timeout,
        secrets: &[],
        params: &params,
    };
    if !p.caches.is_empty() {
        log.line("caches are kept only by the host; `amsbuild run` starts them empty");
    }
    let outcome = worker::execute(&executor, req, &mut log, &stop).await;
    let _ = std::fs::remove_dir_all(work.join(".ams-ci"));
    errln!(
        "{}{} in {:.2} s; build output kept in {}",
        outcome.status,
        outcome
            .reason
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64(),
        output_dir.display()
    );
    if outcome.status == BuildStatus::Pass {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands and arguments without help text, by their full command path.
    fn without_help(c: &clap::Command, missing: &mut Vec<String>) {
        let path = c.get_bin_name().unwrap_or(c.get_name()).to_string();
        if c.get_about().is_none() && c.get_long_about().is_none() {
            missing.push(format!("command `{path}`"));
        }
        for a in c.get_arguments() {
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("argument `{}` of `{path}`", a.get_id()));
            }
        }
        for sub in c.get_subcommands() {
            without_help(sub, missing);
        }
    }

    #[test]
    fn every_command_and_argument_has_help() {
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        without_help(&cmd, &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        // The walk reaches the nested commands and every argument kind.
        let mut count = 0;
        fn all(c: &clap::Command, n: &mut usize) {
            *n += 1 + c.get_arguments().count();
            c.get_subcommands().for_each(|s| all(s, n));
        }
        all(&cmd, &mut count);
        assert!(count > 80, "walked only {count} commands and arguments");
    }

    #[test]
    fn the_three_build_commands_take_the_same_references() {
        for cmd in ["log", "cancel", "delete-output"] {
            let parse = |args: &[&str]| {
                let mut v = vec!["amsbuild", cmd];
                v.extend_from_slice(args);
                Cli::try_parse_from(v).map(|c| match c.cmd {
                    Cmd::Log { build } | Cmd::Cancel { build } | Cmd::DeleteOutput { build } => {
                        build.to_ref()
                    }
                    other => panic!("{other:?}"),
                })
            };
            assert_eq!(
                parse(&["app_1_build_3"]).unwrap(),
                BuildRef::Name {
                    project: None,
                    name: "app_1_build_3".into()
                }
            );
            assert_eq!(
                parse(&["app/3"]).unwrap(),
                BuildRef::Name {
                    project: Some("app".into()),
                    name: "3".into()
                }
            );
            assert_eq!(
                parse(&["app", "3"]).unwrap(),
                BuildRef::Index {
                    project: "app".into(),
                    index: 3
                }
            );
            for bad in [&["app", "0"][..], &["app", "x"], &["app", "-1"], &[]] {
                assert!(parse(bad).is_err(), "{cmd} {bad:?}");
            }
        }
    }
}
