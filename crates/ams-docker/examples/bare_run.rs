//! The plain Engine API sequence of a one-command container through bollard alone, as the
//! baseline of `scripts/bench.py` section (a): create, start, wait, remove. Prints the seconds
//! each run took, one per line, measured inside (no process start counted).
//! `bare_run IMAGE RUNS [NETWORK]`
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptions,
};
use futures_util::StreamExt;
use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (Some(image), Some(runs)) = (a.get(1), a.get(2).and_then(|r| r.parse::<u32>().ok())) else {
        eprintln!("usage: bare_run IMAGE RUNS [NETWORK]");
        std::process::exit(2);
    };
    let docker = bollard::Docker::connect_with_defaults().expect("the engine");
    for i in 0..runs {
        let name = format!("ams-bare-{}-{i}", std::process::id());
        let t = Instant::now();
        let body = bollard::models::ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["sh".into(), "-c".into(), "true".into()]),
            host_config: Some(bollard::models::HostConfig {
                network_mode: a.get(3).cloned(),
                ..Default::default()
            }),
            ..Default::default()
        };
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
