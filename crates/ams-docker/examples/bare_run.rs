//! The plain Engine API sequence of a one-command container through bollard alone, as the
//! baseline of `scripts/bench.py` section (a): create, start, wait, remove. Prints the seconds
//! each run took, one per line, measured inside (no process start counted).
//! `bare_run IMAGE RUNS [NETWORK] [--as-build]`: with `--as-build`, the container has what a
//! build's has (three bind mounts, the memory, CPU and process limits, no `CAP_MKNOD` or
//! `CAP_NET_RAW`, `no-new-privileges`, no engine log, labels), so only the host's own work
//! is left over.
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptions,
};
use futures_util::StreamExt;
use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (Some(image), Some(runs)) = (a.get(1), a.get(2).and_then(|r| r.parse::<u32>().ok())) else {
        eprintln!("usage: bare_run IMAGE RUNS [NETWORK] [--as-build]");
        std::process::exit(2);
    };
    let as_build = a.get(4).map(String::as_str) == Some("--as-build");
    let dirs = tempfile::tempdir().expect("a temporary folder");
    let dir = |n: &str| {
        let d = dirs.path().join(n);
        std::fs::create_dir_all(&d).expect("a folder");
        d.to_string_lossy().to_string()
    };
    let (src, out, ci) = (dir("src"), dir("out"), dir("ci"));
    let docker = bollard::Docker::connect_with_defaults().expect("the engine");
    for i in 0..runs {
        let name = format!("ams-bare-{}-{i}", std::process::id());
        let t = Instant::now();
        let mut body = bollard::models::ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["sh".into(), "-c".into(), "true".into()]),
            host_config: Some(bollard::models::HostConfig {
                network_mode: a.get(3).cloned(),
                ..Default::default()
            }),
            ..Default::default()
        };
        if as_build {
            let bind = |source: &str, target: &str, read_only: bool| bollard::models::Mount {
                target: Some(target.into()),
                source: Some(source.into()),
                typ: Some(bollard::models::MountType::BIND),
                read_only: Some(read_only),
                ..Default::default()
            };
            body.env = Some(vec!["CI=true".into()]);
            body.working_dir = Some("/root/project".into());
            body.labels = Some([("io.ams-build.bare".to_string(), "1".to_string())].into());
            body.stop_timeout = Some(10);
            body.host_config = Some(bollard::models::HostConfig {
                network_mode: a.get(3).cloned(),
                memory: Some(2 << 30),
                memory_swap: Some(2 << 30),
                nano_cpus: Some(2_000_000_000),
                pids_limit: Some(4096),
                log_config: Some(bollard::models::HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                }),
                mounts: Some(vec![
                    bind(&src, "/root/project", false),
                    bind(&out, "/root/project/Builds", false),
                    bind(&ci, "/.ams-ci", true),
                ]),
                cap_drop: Some(vec!["MKNOD".into(), "NET_RAW".into()]),
                privileged: Some(false),
                readonly_rootfs: Some(false),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                ..Default::default()
            });
        }
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        docker
            .create_container(Some(opts), body)
            .await
            .expect("create");
        docker.start_container(&name, None).await.expect("start");
        let mut wait = docker.wait_container(&name, None::<WaitContainerOptions>);
        while let Some(r) = wait.next().await {
            r.expect("wait");
        }
        let rm = RemoveContainerOptionsBuilder::new().force(true).build();
        docker
            .remove_container(&name, Some(rm))
            .await
            .expect("remove");
        println!("{:.6}", t.elapsed().as_secs_f64());
    }
}
