//! The Executor seam: how a build's container is run. [`DockerExecutor`] implements it over the
//! Docker Engine API (bollard); nothing else in the workspace talks to Docker.
//!
//! One call to [`Executor::run`] owns one container from creation to removal: it removes a
//! leftover of the same name, creates the container with its labels and limits, attaches to its
//! output before starting it, streams the output to a bounded channel, stops it (SIGTERM, then
//! SIGKILL after the stop timeout) when told to, and removes it whatever happened. For an
//! engine on another machine it sends the build's folders in and reads the output back through
//! the archive endpoint ([`archive`]) instead of bind mounts.

pub mod archive;

use ams_core::docker_args::DockerOptions;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, DeviceMapping, HostConfig, HostConfigLogConfig, Mount, MountType,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptions, StopContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Label put on every container AMS-Build creates; its value is the data directory's id.
pub const LABEL_HOST: &str = "io.ams-build.host";
/// Label holding the build's database id.
pub const LABEL_BUILD_ID: &str = "io.ams-build.build-id";
/// Label holding the build's name.
pub const LABEL_BUILD_NAME: &str = "io.ams-build.build-name";
/// Label holding the project.
pub const LABEL_PROJECT: &str = "io.ams-build.project";

/// The network builds join unless docker.args says otherwise: a bridge whose containers reach
/// the outside but not each other (inter-container traffic off), so one project's build
/// cannot talk to another's services. On an engine whose default bridge already has
/// inter-container traffic off (dockerd's `icc` set to false), builds join that one instead
/// ([`DEFAULT_BRIDGE`]): Docker sets up its embedded DNS in every container of any other
/// network, a re-exec and a dozen `iptables` runs that cost 30–50 ms per container.
pub const BUILD_NETWORK: &str = "ams-build";

/// The engine's default network.
pub const DEFAULT_BRIDGE: &str = "bridge";

/// The bridge driver's option that says whether containers may reach each other.
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

/// Capabilities of Docker's default set that builds do not get (see `create_body`).
const DROPPED_CAPS: [&str; 2] = ["MKNOD", "NET_RAW"];

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the Docker engine is not reachable ({0}); start dockerd or check DOCKER_HOST")]
    Unreachable(String),
    #[error("image `{image}` is not present and could not be pulled: {message}")]
    ImagePull { image: String, message: String },
    /// The engine refused the container's settings (a 400: a duplicate mount point, an
    /// invalid option), which come from the project's pipeline.json.
    #[error("the Docker engine refused the build's container settings: {0}")]
    Refused(String),
    #[error("docker: {0}")]
    Docker(String),
}

fn docker_err(e: BollardError) -> ExecError {
    match e {
        BollardError::IOError { err } => ExecError::Unreachable(err.to_string()),
        BollardError::HyperResponseError { err } => ExecError::Unreachable(err.to_string()),
        BollardError::HyperLegacyError { err } => ExecError::Unreachable(err.to_string()),
        BollardError::SocketNotFoundError(s) => ExecError::Unreachable(format!("no socket at {s}")),
        BollardError::RequestTimeoutError => ExecError::Unreachable("request timed out".into()),
        BollardError::DockerResponseServerError {
            status_code: 400,
            message,
        } => ExecError::Refused(message),
        other => ExecError::Docker(other.to_string()),
    }
}

/// Longest an engine call that answers at once (connect, create, attach, start, inspect,
/// wait after the end, remove, list) may take: a hung engine fails the call instead of the
/// build waiting for ever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs one engine call under a deadline; a late answer is an unreachable engine.
async fn timed<T>(
    what: &str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, BollardError>>,
) -> Result<Result<T, BollardError>, ExecError> {
    tokio::time::timeout(limit, call).await.map_err(|_| {
        ExecError::Unreachable(format!(
            "the engine did not answer `{what}` within {} s",
            limit.as_secs()
        ))
    })
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Everything needed to run one build container.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub workdir: Option<String>,
    /// Bind mounts made by AMS-Build itself.
    pub mounts: Vec<BindMount>,
    /// Options from docker.args, with host defaults already applied.
    pub options: DockerOptions,
    /// Seconds between SIGTERM and SIGKILL when stopped.
    pub stop_timeout_secs: u64,
    /// Host folders sent into the container before it starts (host folder, path inside),
    /// for engines that cannot bind-mount them.
    pub copy_in: Vec<(PathBuf, String)>,
    /// Container folders read back into host folders once the container has ended, in order.
    pub copy_out: Vec<CopyOut>,
}

/// A folder to read back from the container after its run (see [`archive::extract`]).
#[derive(Debug, Clone, Default)]
pub struct CopyOut {
    pub container: String,
    pub host: PathBuf,
    pub max_bytes: u64,
    /// Whether the host folder is emptied first, so that it holds exactly what the container
    /// left (a cache the build pruned), not that over what was there.
    pub replace: bool,
    /// What the copy did, or why it failed; filled in by [`Executor::run`].
    pub report: Arc<Mutex<Option<Result<archive::Extracted, String>>>>,
}

/// A host folder mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub host: String,
    pub container: String,
    pub read_only: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The main process exited with this code by itself.
    Exited(i64),
    /// It was stopped because `stop` fired; the code it ended with.
    Stopped(i64),
    /// It ended by itself and the engine reports that the kernel killed a process of it for
    /// want of memory (the memory limit); the main process's code.
    OutOfMemory(i64),
}

/// Runs build containers. Implemented by [`DockerExecutor`]; tests may use a fake.
pub trait Executor: Send + Sync + 'static {
    /// Makes sure the image is present, pulling it if not. `progress` gets pull messages.
    fn ensure_image<'a>(
        &'a self,
        image: &'a str,
        progress: &'a (dyn Fn(String) + Send + Sync),
    ) -> BoxFuture<'a, Result<(), ExecError>>;

    /// Runs the container to its end, sending its output (stdout and stderr, in order of
    /// arrival) to `output`. When `stop` fires, the container is stopped gracefully. The
    /// container is removed before this returns, whatever the outcome.
    fn run<'a>(
        &'a self,
        spec: ContainerSpec,
        output: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> BoxFuture<'a, Result<RunEnd, ExecError>>;

    /// Removes every container carrying all the `label=value` pairs, running or not. Returns
    /// their names.
    fn remove_labelled<'a>(
        &'a self,
        labels: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<String>, ExecError>>;

    /// Whether the engine answers, within [`CALL_TIMEOUT`].
    fn ping(&self) -> BoxFuture<'_, Result<(), ExecError>>;

    /// The engine's version, within [`CALL_TIMEOUT`].
    fn version(&self) -> BoxFuture<'_, Result<String, ExecError>> {
        Box::pin(async move { self.ping().await.map(|_| String::new()) })
    }

    /// Whether containers on it can bind-mount this machine's folders; when not, the
    /// worker gives folders as [`ContainerSpec::copy_in`] and [`ContainerSpec::copy_out`].
    fn shares_files(&self) -> bool {
        true
    }
}

/// Where an engine is and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EngineTarget {
    /// `DOCKER_HOST`, else the local socket.
    #[default]
    Default,
    /// A Unix socket on this machine.
    Unix(String),
    /// `tcp://HOST:PORT` with mutual TLS: the CA that signed the engine's certificate, and
    /// this host's client certificate and key (PEM files).
    Tls {
        addr: String,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

impl EngineTarget {
    /// Checks the TLS files as the connection will use them: each can be read and holds
    /// what it should (the CA's certificates, this host's certificate chain, a private key),
    /// and the key is the certificate's. A wrong file stops the start instead of leaving the
    /// engine down with a vague error. The error names the key and the file.
    pub fn check(&self) -> Result<(), String> {
        if let EngineTarget::Tls { ca, cert, key, .. } = self {
            tls_config(ca, cert, key)?;
        }
        Ok(())
    }
}

/// The client configuration of a remote engine: the configured CA alone as roots, and this
/// host's certificate and key. Errors are `tls.FIELD: …` naming the file and the fix.
fn tls_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            format!(
                "tls.{what}: cannot read {}: {e}; give the path of a readable PEM file",
                p.display()
            )
        })
    };
    let certs = |what: &str, p: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, String> {
        let bytes = read(what, p)?;
        let list = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls.{what}: {} is not valid PEM: {e}", p.display()))?;
        if list.is_empty() {
            return Err(format!(
                "tls.{what}: {} holds no certificate (-----BEGIN CERTIFICATE-----)",
                p.display()
            ));
        }
        Ok(list)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("ca", ca)? {
        roots.add(c).map_err(|e| {
            format!(
                "tls.ca: {} holds a certificate that cannot be used: {e}",
                ca.display()
            )
        })?;
    }
    let chain = certs("cert", cert)?;
    let key_der = PrivateKeyDer::from_pem_slice(&read("key", key)?).map_err(|e| {
        format!(
            "tls.key: {} holds no private key (-----BEGIN PRIVATE KEY----- or the RSA/EC \
             forms): {e}",
            key.display()
        )
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "is not the key of the certificate in {}; give the key that was made with \
                     that certificate",
                    cert.display()
                ),
                other => format!(
                    "cannot be used with the certificate in {}: {other}",
                    cert.display()
                ),
            };
            format!("tls.key: {} {why}", key.display())
        })
}

/// The Docker Engine API executor. It connects on first use and keeps the connection; an
/// engine that is down makes each call fail with [`ExecError::Unreachable`] until it is back,
/// so a dead engine fails builds with a clear message instead of stopping the host.
#[derive(Debug, Default)]
pub struct DockerExecutor {
    target: EngineTarget,
    cell: tokio::sync::Mutex<Option<Docker>>,
    /// Held while [`BUILD_NETWORK`] is checked or made, so that one build makes it.
    network_lock: tokio::sync::Mutex<()>,
}

impl DockerExecutor {
    pub fn new() -> Self {
        Self::default()
    }

    /// An executor for the engine at `target`; it connects on first use.
    pub fn for_target(target: EngineTarget) -> Self {
        DockerExecutor {
            target,
            ..Default::default()
        }
    }

    fn connect_now(&self) -> Result<Docker, BollardError> {
        match &self.target {
            EngineTarget::Default => Docker::connect_with_defaults(),
            EngineTarget::Unix(path) => Docker::connect_with_unix(
                path,
                CALL_TIMEOUT.as_secs() * 6,
                bollard::API_DEFAULT_VERSION,
            ),
            EngineTarget::Tls {
                addr,
                ca,
                cert,
                key,
            } => connect_pinned_tls(addr, ca, cert, key),
        }
    }

    /// Connects now (DOCKER_HOST or the local socket) and negotiates the API version, so an
    /// engine older than bollard's default still works.
    pub async fn connect() -> Result<Self, ExecError> {
        let e = Self::new();
        e.docker().await?;
        Ok(e)
    }

    async fn docker(&self) -> Result<Docker, ExecError> {
        let mut cell = self.cell.lock().await;
        if let Some(d) = cell.as_ref() {
            return Ok(d.clone());
        }
        let docker = self.connect_now().map_err(docker_err)?;
        let docker = timed("version", CALL_TIMEOUT, docker.negotiate_version())
            .await?
            .map_err(docker_err)?;
        timed("ping", CALL_TIMEOUT, docker.ping())
            .await?
            .map_err(docker_err)?;
        *cell = Some(docker.clone());
        Ok(docker)
    }

    /// The network a build joins when docker.args names none. The default bridge is asked
    /// for every build (one short call), so an engine restarted with containers allowed to
    /// reach each other is never trusted from an earlier answer.
    async fn default_network(&self) -> Result<&'static str, ExecError> {
        let docker = self.docker().await?;
        match timed(
            "inspect network",
            CALL_TIMEOUT,
            docker.inspect_network(DEFAULT_BRIDGE, None),
        )
        .await?
        {
            Ok(n) if default_bridge_usable(&n) => return Ok(DEFAULT_BRIDGE),
            Ok(_) => {}
            // An engine without a default bridge (dockerd --bridge=none).
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(docker_err(e)),
        }
        self.ensure_network().await?;
        Ok(BUILD_NETWORK)
    }

    /// Checks [`BUILD_NETWORK`], or makes it, for every build that joins it (one short call):
    /// a `docker network prune` takes it whenever no build is on it, and a network of that name
    /// made otherwise is refused.
    async fn ensure_network(&self) -> Result<(), ExecError> {
        let _one = self.network_lock.lock().await;
        let docker = self.docker().await?;
        match timed(
            "inspect network",
            CALL_TIMEOUT,
            docker.inspect_network(BUILD_NETWORK, None),
        )
        .await?
        {
            Ok(n) => {
                if !is_ipv4_bridge_apart(&n) {
                    return Err(ExecError::Docker(format!(
                        "the network `{BUILD_NETWORK}` exists but is not an IPv4 bridge that \
                         keeps containers apart; remove it (docker network rm {BUILD_NETWORK}) \
                         and AMS-Build makes it anew"
                    )));
                }
            }
            Err(e) if is_not_found(&e) => {
                let mut options = HashMap::new();
                options.insert(ICC_OPTION.to_string(), "false".to_string());
                let mut labels = HashMap::new();
                labels.insert("io.ams-build.network".to_string(), "builds".to_string());
                let req = bollard::models::NetworkCreateRequest {
                    name: BUILD_NETWORK.to_string(),
                    driver: Some("bridge".into()),
                    enable_ipv6: Some(false),
                    options: Some(options),
                    labels: Some(labels),
                    ..Default::default()
                };
                match timed("create network", CALL_TIMEOUT, docker.create_network(req)).await? {
                    Ok(_) => {}
                    // Another host on the same engine made it first.
                    Err(BollardError::DockerResponseServerError {
                        status_code: 409, ..
                    }) => {}
                    Err(e) => return Err(docker_err(e)),
                }
            }
            Err(e) => return Err(docker_err(e)),
        }
        Ok(())
    }

    async fn force_remove(&self, name: &str) -> Result<(), ExecError> {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        let docker = self.docker().await?;
        match timed(
            "remove",
            CALL_TIMEOUT,
            docker.remove_container(name, Some(opts)),
        )
        .await?
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // "removal already in progress" is answered with 409.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(docker_err(e)),
        }
    }

    /// The container's settings; it joins `network`.
    fn create_body(spec: &ContainerSpec, network: &str) -> ContainerCreateBody {
        let o = &spec.options;
        let mut binds = o.binds.clone();
        binds.extend(o.volumes.iter().cloned());
        let mut env = spec.env.clone();
        env.extend(o.env.iter().map(|(k, v)| format!("{k}={v}")));
        let devices: Vec<DeviceMapping> = o
            .devices
            .iter()
            .map(|d| {
                let mut parts = d.splitn(3, ':');
                let host = parts.next().unwrap_or("").to_string();
                let cont = parts.next().map(str::to_string).unwrap_or(host.clone());
                let perm = parts.next().unwrap_or("rwm").to_string();
                DeviceMapping {
                    path_on_host: Some(host),
                    path_in_container: Some(cont),
                    cgroup_permissions: Some(perm),
                }
            })
            .collect();
        let tmpfs: HashMap<String, String> = o
            .tmpfs
            .iter()
            .map(|t| match t.split_once(':') {
                Some((p, opts)) => (p.to_string(), opts.to_string()),
                None => (t.clone(), String::new()),
            })
            .collect();
        // Device nodes made in a mounted folder would land on the host's filesystem: no
        // CAP_MKNOD. Raw sockets would let a build forge ARP and take over the traffic of
        // other containers on its bridge (inter-container traffic off filters IP only): no
        // CAP_NET_RAW (ping still works through ICMP datagram sockets, which Docker allows).
        // Either comes back only if the private config trusts `--cap-add`.
        let mut cap_drop = o.cap_drop.clone();
        for cap in DROPPED_CAPS {
            let added = o.cap_add.iter().any(|c| {
                let c = c.to_ascii_uppercase();
                c == cap || c.strip_prefix("CAP_") == Some(cap) || c == "ALL"
            });
            if !o.privileged && !added {
                cap_drop.push(cap.to_string());
            }
        }
        let mut security_opt = o.security_opt.clone();
        if !o.privileged
            && !security_opt
                .iter()
                .any(|s| s.starts_with("no-new-privileges"))
        {
            security_opt.push("no-new-privileges:true".into());
        }
        let host = HostConfig {
            binds: Some(binds),
            mounts: Some(
                spec.mounts
                    .iter()
                    .map(|m| Mount {
                        target: Some(m.container.clone()),
                        source: Some(m.host.clone()),
                        typ: Some(MountType::BIND),
                        read_only: Some(m.read_only),
                        ..Default::default()
                    })
                    .collect(),
            ),
            memory: o.memory,
            // No swap beyond the memory limit.
            memory_swap: o.memory,
            nano_cpus: o.nano_cpus,
            pids_limit: o.pids_limit,
            network_mode: Some(network.to_string()),
            shm_size: o.shm_size,
            privileged: Some(o.privileged),
            cap_add: (!o.cap_add.is_empty()).then(|| o.cap_add.clone()),
            cap_drop: (!cap_drop.is_empty()).then_some(cap_drop),
            devices: (!devices.is_empty()).then_some(devices),
            pid_mode: o.pid_mode.clone(),
            ipc_mode: o.ipc_mode.clone(),
            uts_mode: o.uts_mode.clone(),
            security_opt: Some(security_opt),
            readonly_rootfs: Some(o.read_only),
            tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
            // Output is streamed by attach; the engine keeps no second copy of it.
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(spec.cmd.clone()),
            entrypoint: Some(Vec::new()),
            env: Some(env),
            labels: Some(spec.labels.clone()),
            working_dir: o.workdir.clone().or_else(|| spec.workdir.clone()),
            user: o.user.clone(),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            open_stdin: Some(false),
            stop_timeout: Some(spec.stop_timeout_secs as i64),
            host_config: Some(host),
            ..Default::default()
        }
    }

    /// Reads `out.container` back into `out.host` (see [`archive::extract`]).
    async fn copy_out(
        &self,
        docker: &Docker,
        name: &str,
        out: &CopyOut,
        stop: &CancellationToken,
    ) -> Result<archive::Extracted, ExecError> {
        let opts = bollard::query_parameters::DownloadFromContainerOptionsBuilder::new()
            .path(&out.container)
            .build();
        let stream = Box::pin(guarded(
            docker.download_from_container(name, Some(opts)),
            stop.clone(),
            &out.container,
        ));
        let reader = tokio_util::io::StreamReader::new(stream);
        let sync = tokio_util::io::SyncIoBridge::new(reader);
        let (dest, max, replace) = (out.host.clone(), out.max_bytes, out.replace);
        let handle = tokio::runtime::Handle::current();
        let done = tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            if replace {
                match std::fs::remove_dir_all(&dest) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::create_dir_all(&dest)?;
            archive::extract(sync, &dest, max).map_err(|e| match e {
                archive::ExtractError::Io(e) => e,
                other => std::io::Error::other(other.to_string()),
            })
        })
        .await
        .map_err(|e| ExecError::Docker(format!("reading the output failed: {e}")))?;
        done.map_err(|e| {
            let m = e.to_string();
            if e.kind() == std::io::ErrorKind::TimedOut {
                ExecError::Unreachable(m)
            } else if m.contains("No such container") || m.contains("404") {
                ExecError::Docker(format!(
                    "the output folder {} is missing: {m}",
                    out.container
                ))
            } else {
                ExecError::Docker(format!("cannot read the output back: {m}"))
            }
        })
    }

    async fn run_inner(
        &self,
        spec: &ContainerSpec,
        output: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> Result<RunEnd, ExecError> {
        let network = match spec.options.network.as_deref() {
            None | Some("bridge") | Some("default") if can_forge_traffic(&spec.options) => {
                self.ensure_network().await?;
                BUILD_NETWORK
            }
            None | Some("bridge") | Some("default") => self.default_network().await?,
            // Named by the (trusted) docker.args: made, or checked, like the default.
            Some(BUILD_NETWORK) => {
                self.ensure_network().await?;
                BUILD_NETWORK
            }
            Some(n) => n,
        };
        let create = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        let docker = self.docker().await?;
        let made = timed(
            "create",
            CALL_TIMEOUT,
            docker.create_container(Some(create.clone()), Self::create_body(spec, network)),
        )
        .await?;
        match made {
            Ok(_) => {}
            // A container of the same name can only be a leftover of this very build (a host
            // that stopped mid-build): removed, and made anew.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                self.force_remove(&spec.name).await?;
                timed(
                    "create",
                    CALL_TIMEOUT,
                    docker.create_container(Some(create), Self::create_body(spec, network)),
                )
                .await?
                .map_err(docker_err)?;
            }
            Err(e) => return Err(docker_err(e)),
        }
        if !spec.copy_in.is_empty() {
            // The folders go in as one tar at the root, each under its own path, streamed as
            // the engine reads it.
            let rx = archive::tar_stream(spec.copy_in.clone());
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counted = sent.clone();
            let body = bollard::body_try_stream(tokio_stream_of(rx).map(move |chunk| {
                if let Ok(c) = &chunk {
                    counted.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                chunk
            }));
            let opts = bollard::query_parameters::UploadToContainerOptionsBuilder::new()
                .path("/")
                .build();
            // The whole upload is one request, which bollard's request timeout would cut at
            // two minutes however well it goes (a large source over a slow link): it has no
            // deadline of its own here, and the engine's pings say whether it is still there.
            let uploading = docker.clone().with_timeout(NO_DEADLINE);
            let upload = uploading.upload_to_container(&spec.name, Some(opts), body);
            tokio::select! {
                r = watched(&docker, "the build's folders were sent to it", Some(&sent), upload) => {
                    r?.map_err(|e| match docker_err(e) {
                        ExecError::Unreachable(m) => ExecError::Unreachable(m),
                        other => ExecError::Docker(format!(
                            "cannot send the build's folders into the container: {other}"
                        )),
                    })?;
                }
                _ = stop.cancelled() => return Ok(RunEnd::Stopped(-1)),
            }
        }
        let attach = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            logs: false,
            ..Default::default()
        };
        let mut attached = timed(
            "attach",
            CALL_TIMEOUT,
            docker.attach_container(&spec.name, Some(attach)),
        )
        .await?
        .map_err(docker_err)?;
        timed(
            "start",
            CALL_TIMEOUT,
            docker.start_container(&spec.name, None),
        )
        .await?
        .map_err(docker_err)?;

        let mut stopping = false;
        // After a stop is asked, the engine has the stop timeout and then CALL_TIMEOUT twice
        // (the stop call, the stream's end) before the engine counts as gone.
        let stop_grace = Duration::from_secs(spec.stop_timeout_secs) + 2 * CALL_TIMEOUT;
        let stop_req = async {
            stop.cancelled().await;
            let opts = StopContainerOptionsBuilder::new()
                .t(spec.stop_timeout_secs.min(i32::MAX as u64) as i32)
                .build();
            // The engine sends SIGTERM, waits t seconds, then SIGKILL.
            let _ = timed(
                "stop",
                Duration::from_secs(spec.stop_timeout_secs) + CALL_TIMEOUT,
                docker.stop_container(&spec.name, Some(opts)),
            )
            .await;
        };
        tokio::pin!(stop_req);
        let mut stop_done = false;
        let given_up = async {
            stop.cancelled().await;
            tokio::time::sleep(stop_grace).await;
        };
        tokio::pin!(given_up);
        // An engine that stops answering (killed, network cut) may leave the stream open
        // without data: pinged every 5 s, three failed pings in a row end the run.
        // The first ping one period in: the engine has just answered the create and the start
        // (a ping at once cost every build a round trip before its wait).
        let mut watchdog =
            tokio::time::interval_at(tokio::time::Instant::now() + WATCHDOG_EVERY, WATCHDOG_EVERY);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut missed = 0u32;
        loop {
            tokio::select! {
                _ = watchdog.tick() => {
                    match tokio::time::timeout(WATCHDOG_EVERY, docker.ping()).await {
                        Ok(Ok(_)) => missed = 0,
                        _ => {
                            missed += 1;
                            if missed >= WATCHDOG_MISSES {
                                return Err(ExecError::Unreachable(format!(
                                    "the engine stopped answering during the build (no answer \
                                     to {WATCHDOG_MISSES} pings {} s apart)",
                                    WATCHDOG_EVERY.as_secs()
                                )));
                            }
                        }
                    }
                }
                _ = &mut given_up => {
                    return Err(ExecError::Unreachable(format!(
                        "the engine did not stop container {} within {} s of the stop",
                        spec.name,
                        stop_grace.as_secs()
                    )));
                }
                item = attached.output.next() => match item {
                    Some(Ok(frame)) => {
                        let bytes = frame.into_bytes();
                        // The receiver applies back-pressure; if it is gone, keep draining.
                        let _ = output.send(bytes).await;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(container = %spec.name, "attach stream error: {e}");
                        break;
                    }
                    None => break,
                },
                _ = &mut stop_req, if !stop_done => {
                    stop_done = true;
                    stopping = true;
                }
            }
        }
        if stop.is_cancelled() {
            stopping = true;
        }
        let mut wait = docker.wait_container(&spec.name, None);
        let waited = tokio::time::timeout(CALL_TIMEOUT, wait.next())
            .await
            .map_err(|_| {
                ExecError::Unreachable(format!(
                    "the engine did not report how container {} ended within {} s",
                    spec.name,
                    CALL_TIMEOUT.as_secs()
                ))
            })?;
        let code = match waited {
            Some(Ok(r)) => r.status_code,
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(docker_err(e)),
            None => -1,
        };
        for out in &spec.copy_out {
            let r = self.copy_out(&docker, &spec.name, out, &stop).await;
            if let Err(ExecError::Unreachable(e)) = &r {
                return Err(ExecError::Unreachable(e.clone()));
            }
            *out.report.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(r.map_err(|e| e.to_string()));
        }
        if stopping {
            return Ok(RunEnd::Stopped(code));
        }
        // Whether the kernel killed something in it for want of memory.
        let oom = timed(
            "inspect",
            CALL_TIMEOUT,
            docker.inspect_container(&spec.name, None),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|c| c.state)
        .and_then(|s| s.oom_killed)
        .unwrap_or(false);
        Ok(if oom {
            RunEnd::OutOfMemory(code)
        } else {
            RunEnd::Exited(code)
        })
    }
}

impl Executor for DockerExecutor {
    fn ensure_image<'a>(
        &'a self,
        image: &'a str,
        progress: &'a (dyn Fn(String) + Send + Sync),
    ) -> BoxFuture<'a, Result<(), ExecError>> {
        Box::pin(async move {
            let docker = self.docker().await?;
            match timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await? {
                Ok(_) => return Ok(()),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(docker_err(e)),
            }
            progress(format!("image {image} is not present; pulling it"));
            let (repo, tag) = split_image(image);
            let opts = CreateImageOptionsBuilder::new()
                .from_image(repo)
                .tag(tag)
                .build();
            let mut stream = docker.create_image(Some(opts), None, None);
            // A pull's stream has no deadline (a large image takes long); an engine that stops
            // answering its pings meanwhile ends it.
            let pulled = watched(&docker, "it pulled the image", None, async {
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(info) => {
                            if let Some(status) = info.status {
                                progress(status);
                            }
                        }
                        Err(e) => {
                            let message = match e {
                                BollardError::DockerResponseServerError { message, .. } => message,
                                BollardError::DockerStreamError { error } => error,
                                other => other.to_string(),
                            };
                            return Err(ExecError::ImagePull {
                                image: image.to_string(),
                                message,
                            });
                        }
                    }
                }
                Ok(())
            });
            pulled.await??;
            match timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await? {
                Ok(_) => Ok(()),
                Err(e) => Err(ExecError::ImagePull {
                    image: image.to_string(),
                    message: e.to_string(),
                }),
            }
        })
    }

    fn run<'a>(
        &'a self,
        spec: ContainerSpec,
        output: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> BoxFuture<'a, Result<RunEnd, ExecError>> {
        Box::pin(async move {
            let result = self.run_inner(&spec, output, stop).await;
            let removed = self.force_remove(&spec.name).await;
            match (result, removed) {
                (Ok(end), Ok(())) => Ok(end),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(e),
            }
        })
    }

    fn shares_files(&self) -> bool {
        !matches!(self.target, EngineTarget::Tls { .. })
    }

    fn version(&self) -> BoxFuture<'_, Result<String, ExecError>> {
        Box::pin(async move {
            let docker = self.docker().await?;
            let v = timed("version", CALL_TIMEOUT, docker.version())
                .await?
                .map_err(docker_err)?;
            Ok(v.version.unwrap_or_default())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), ExecError>> {
        Box::pin(async move {
            let docker = self.docker().await?;
            timed("ping", CALL_TIMEOUT, docker.ping())
                .await?
                .map(|_| ())
                .map_err(docker_err)
        })
    }

    fn remove_labelled<'a>(
        &'a self,
        labels: &'a [(&'a str, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<String>, ExecError>> {
        Box::pin(async move {
            let mut filters = HashMap::new();
            filters.insert(
                "label",
                labels.iter().map(|(l, v)| format!("{l}={v}")).collect(),
            );
            let opts = ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build();
            let docker = self.docker().await?;
            let list = timed("list", CALL_TIMEOUT, docker.list_containers(Some(opts)))
                .await?
                .map_err(docker_err)?;
            let mut removed = Vec::new();
            for c in list {
                let name = c
                    .names
                    .and_then(|n| n.first().cloned())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .or(c.id)
                    .unwrap_or_default();
                if name.is_empty() {
                    continue;
                }
                self.force_remove(&name).await?;
                removed.push(name);
            }
            Ok(removed)
        })
    }
}

/// How often a running build's engine is pinged, and how many missed pings end the build.
const WATCHDOG_EVERY: Duration = Duration::from_secs(5);
const WATCHDOG_MISSES: u32 = 3;

/// Longest an engine may go without sending a byte of a folder it is sending back.
pub const COPY_STALL: Duration = Duration::from_secs(30);
/// Longest a folder is still read back once the build is stopped (canceled, timed out): its
/// output is kept but neither read nor archived, so a slow engine does not hold the slot.
pub const COPY_AFTER_STOP: Duration = Duration::from_secs(30);

/// The engine's answer to `GET …/archive` as a byte stream that fails instead of waiting for
/// ever: with [`std::io::ErrorKind::TimedOut`] when the engine sends nothing for
/// [`COPY_STALL`] (stopped, cut off, hung), and with [`std::io::ErrorKind::Interrupted`]
/// [`COPY_AFTER_STOP`] after `stop` fires (at once if it had fired before).
fn guarded(
    answer: impl futures_util::Stream<Item = Result<Bytes, BollardError>> + Send + 'static,
    stop: CancellationToken,
    what: &str,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let what = what.to_string();
    let give_up: BoxFuture<'static, ()> = Box::pin(async move {
        stop.cancelled().await;
        tokio::time::sleep(COPY_AFTER_STOP).await;
    });
    let state = (Box::pin(answer), give_up, what, false);
    futures_util::stream::unfold(state, |(mut answer, mut give_up, what, done)| async move {
        if done {
            return None;
        }
        let item = tokio::select! {
            _ = &mut give_up => Some(Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                format!(
                    "the build was stopped and the engine had not sent {what} {} s later",
                    COPY_AFTER_STOP.as_secs()
                ),
            ))),
            r = tokio::time::timeout(COPY_STALL, answer.next()) => match r {
                Err(_) => Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the engine stopped sending {what} (nothing for {} s)",
                        COPY_STALL.as_secs()
                    ),
                ))),
                Ok(Some(r)) => Some(r.map_err(std::io::Error::other)),
                Ok(None) => None,
            },
        };
        let failed = matches!(item, Some(Err(_)));
        item.map(|i| (i, (answer, give_up, what, failed)))
    })
}

/// The request timeout of a call whose length is bounded otherwise (by pings and the stop).
const NO_DEADLINE: Duration = Duration::from_secs(366 * 86_400);

/// Runs `call` while the engine is pinged every [`WATCHDOG_EVERY`]: [`WATCHDOG_MISSES`]
/// missed pings in a row end it with [`ExecError::Unreachable`], naming `what` it was doing.
/// When `progress` (bytes the engine took) moved since the last ping, the engine counts as
/// answering whatever the ping did: a link full of the upload may delay pings past their time.
async fn watched<T>(
    docker: &Docker,
    what: &str,
    progress: Option<&std::sync::atomic::AtomicU64>,
    call: impl std::future::Future<Output = T>,
) -> Result<T, ExecError> {
    let moved = || progress.map(|p| p.load(std::sync::atomic::Ordering::Relaxed));
    let mut last = moved();
    tokio::pin!(call);
    let mut watchdog =
        tokio::time::interval_at(tokio::time::Instant::now() + WATCHDOG_EVERY, WATCHDOG_EVERY);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missed = 0u32;
    loop {
        tokio::select! {
            r = &mut call => return Ok(r),
            _ = watchdog.tick() => {
                let now = moved();
                let advanced = now != last;
                last = now;
                match tokio::time::timeout(WATCHDOG_EVERY, docker.ping()).await {
                    Ok(Ok(_)) => missed = 0,
                    _ if advanced => missed = 0,
                    _ => {
                        missed += 1;
                        if missed >= WATCHDOG_MISSES {
                            return Err(ExecError::Unreachable(format!(
                                "the engine stopped answering while {what} (no answer to \
                                 {WATCHDOG_MISSES} pings {} s apart)",
                                WATCHDOG_EVERY.as_secs()
                            )));
                        }
                    }
                }
            }
        }
    }
}

/// A stream over a channel's items.
fn tokio_stream_of<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// Whether a bridge network keeps its containers from reaching each other.
fn keeps_containers_apart(n: &bollard::models::NetworkInspect) -> bool {
    n.options
        .as_ref()
        .and_then(|o| o.get(ICC_OPTION))
        .is_some_and(|v| v == "false")
}

/// Whether builds may join the engine's default network: a bridge that keeps containers
/// apart, named `docker0` (a bridge given with `dockerd --bridge` may join other machines or
/// VMs) and without IPv6 (the engine keeps containers apart with `iptables`, and with
/// `ip6tables` only where that is switched on, so over IPv6 they could reach each other).
fn default_bridge_usable(n: &bollard::models::NetworkInspect) -> bool {
    let option = |k: &str| {
        n.options
            .as_ref()
            .and_then(|o| o.get(k))
            .map(String::as_str)
    };
    is_ipv4_bridge_apart(n)
        && option("com.docker.network.bridge.name") == Some("docker0")
        && option("com.docker.network.bridge.default_bridge") == Some("true")
}

/// A bridge network without IPv6 whose containers cannot reach each other: what every network
/// builds join by default is.
fn is_ipv4_bridge_apart(n: &bollard::models::NetworkInspect) -> bool {
    n.driver.as_deref() == Some("bridge")
        && n.enable_ipv6 != Some(true)
        && keeps_containers_apart(n)
}

/// Whether a build keeps a capability that lets it forge traffic on its bridge (raw sockets,
/// or another container's address on its own interface): such a build, which only the private
/// config can allow, never joins the default bridge, where other containers of the engine may
/// be.
fn can_forge_traffic(o: &DockerOptions) -> bool {
    o.privileged
        || o.cap_add.iter().any(|c| {
            let c = c.to_ascii_uppercase();
            let c = c.strip_prefix("CAP_").unwrap_or(&c);
            matches!(c, "NET_RAW" | "NET_ADMIN" | "ALL")
        })
}

/// Splits `repo[:tag][@digest]` into the repository and the tag (`latest` when none).
pub fn split_image(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, "latest"),
    }
}

/// A remote engine over mutual TLS that trusts the configured CA and nothing else: bollard's
/// own TLS client also trusts the system's public CAs, so a publicly signed certificate for the
/// engine's name would pass. The client presents the configured certificate and key.
fn connect_pinned_tls(
    addr: &str,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Docker, BollardError> {
    let config = tls_config(ca, cert, key).map_err(|m| BollardError::IOError {
        err: std::io::Error::other(m),
    })?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    // Each call is a small request and answer: with Nagle's algorithm on, the delayed ACK of
    // the other side added about 40 ms to every call.
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnector::from((http, config));
    let client = std::sync::Arc::new(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https),
    );
    let host = addr.replacen("tcp://", "", 1).replacen("https://", "", 1);
    Docker::connect_with_custom_transport(
        move |req: bollard::BollardRequest| {
            let client = client.clone();
            async move {
                client
                    .request(req)
                    .await
                    .map_err(|err| BollardError::HyperLegacyError { err })
            }
        },
        Some(format!("https://{host}")),
        CALL_TIMEOUT.as_secs() * 6,
        bollard::API_DEFAULT_VERSION,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_names() {
        assert_eq!(split_image("busybox"), ("busybox", "latest"));
        assert_eq!(split_image("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(split_image("reg:5000/x"), ("reg:5000/x", "latest"));
        assert_eq!(split_image("reg:5000/x:v2"), ("reg:5000/x", "v2"));
    }

    #[test]
    fn create_body_applies_limits_and_hardening() {
        let spec = ContainerSpec {
            name: "p1".into(),
            image: "img".into(),
            mounts: vec![BindMount {
                host: "/a".into(),
                container: "/b".into(),
                read_only: true,
            }],
            options: DockerOptions {
                memory: Some(1 << 20),
                pids_limit: Some(10),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = DockerExecutor::create_body(&spec, BUILD_NETWORK);
        let h = body.host_config.unwrap();
        assert_eq!(h.memory, Some(1 << 20));
        assert_eq!(h.pids_limit, Some(10));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(
            h.cap_drop,
            Some(vec!["MKNOD".to_string(), "NET_RAW".to_string()])
        );
        assert_eq!(h.network_mode.as_deref(), Some(BUILD_NETWORK));
        assert!(h
            .security_opt
            .unwrap()
            .contains(&"no-new-privileges:true".to_string()));
        let m = &h.mounts.unwrap()[0];
        assert_eq!(m.source.as_deref(), Some("/a"));
        assert_eq!(m.read_only, Some(true));
        // A capability the private config trusts back is not dropped.
        let mut trusted = spec.clone();
        trusted.options.cap_add = vec!["cap_net_raw".into()];
        let h = DockerExecutor::create_body(&trusted, BUILD_NETWORK)
            .host_config
            .unwrap();
        assert_eq!(h.cap_drop, Some(vec!["MKNOD".to_string()]));
    }

    /// Builds join the default bridge only when it is the engine's own `docker0`, keeps
    /// containers apart and has no IPv6 (which `iptables` alone does not filter).
    #[test]
    fn the_default_bridge_is_taken_only_when_it_keeps_containers_apart_over_ipv4_alone() {
        let bridge = |icc: &str, name: &str, ipv6: bool| bollard::models::NetworkInspect {
            name: Some("bridge".into()),
            driver: Some("bridge".into()),
            enable_ipv6: Some(ipv6),
            options: Some(
                [
                    (ICC_OPTION, icc),
                    ("com.docker.network.bridge.name", name),
                    ("com.docker.network.bridge.default_bridge", "true"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        };
        let taken = default_bridge_usable;
        assert!(taken(&bridge("false", "docker0", false)));
        assert!(!taken(&bridge("true", "docker0", false)));
        assert!(!taken(&bridge("false", "docker0", true)), "IPv6 on");
        assert!(
            !taken(&bridge("false", "br0", false)),
            "dockerd --bridge br0"
        );
        assert!(!taken(&bollard::models::NetworkInspect::default()));
        let mut not_bridge = bridge("false", "docker0", false);
        not_bridge.driver = Some("macvlan".into());
        assert!(!taken(&not_bridge));
        // A build that may forge traffic never joins it.
        let with = |caps: &[&str], privileged: bool| DockerOptions {
            cap_add: caps.iter().map(|c| c.to_string()).collect(),
            privileged,
            ..Default::default()
        };
        assert!(!can_forge_traffic(&with(&[], false)));
        assert!(!can_forge_traffic(&with(&["SYS_PTRACE"], false)));
        for caps in [&["net_raw"][..], &["CAP_NET_ADMIN"], &["all"]] {
            assert!(can_forge_traffic(&with(caps, false)), "{caps:?}");
        }
        assert!(can_forge_traffic(&with(&[], true)));
    }
}
