//! Schedules of pipeline-config.json through a real host: slots missed while the host was down
//! run once at start, and a schedule seen for the first time waits for its next slot.

use crate::harness::*;
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A daily slot twelve hours from when the test starts (chosen once), so that no slot passes
/// while it runs.
fn hour() -> i64 {
    static HOUR: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *HOUR.get_or_init(|| (now().rem_euclid(86_400) / 3600 + 12) % 24)
}

fn cron() -> String {
    format!("0 {} * * *", hour())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn slot(h: &TestHost, project: &str) -> Option<i64> {
    let db = h.data.join("ams.db");
    let project = project.to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let s = ams_store::Store::open(&db).await.unwrap();
            let v = s.schedule_slot(&project, &cron(), "").await.unwrap();
            s.close().await;
            v
        })
}

fn builds(h: &TestHost, project: &str) -> Vec<serde_json::Value> {
    h.req(json!({"cmd": "builds", "project": project, "limit": 100}))["builds"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn missed_slots_run_once_at_start_and_a_new_schedule_waits() {
    let mut h = TestHost::new();
    for p in ["nightly", "fresh"] {
        h.project(
            p,
            &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
        );
        std::fs::write(
            h.data
                .join(format!("projects/{p}/master/config/pipeline-config.json")),
            json!({"schedules": [{"cron": cron()}]}).to_string(),
        )
        .unwrap();
    }
    // `nightly` last fired three days ago: the host was down for three of its slots.
    let db = h.data.join("ams.db");
    let three_days_ago = now() - 3 * 86_400;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = ams_store::Store::open(&db).await.unwrap();
        s.set_schedule_slot("nightly", &cron(), "", three_days_ago)
            .await
            .unwrap();
        s.close().await;
    });
    h.start();
    let t = now();
    let midnight = t - t.rem_euclid(86_400);
    let slot_today = midnight + hour() * 3600;
    let latest = if slot_today <= t {
        slot_today
    } else {
        slot_today - 86_400
    };
    wait_for(
        "the missed slots to be spent",
        Duration::from_secs(30),
        || (slot(&h, "nightly") == Some(latest)).then_some(()),
    );
    let first_seen = wait_for(
        "the new schedule to be seen",
        Duration::from_secs(30),
        || slot(&h, "fresh"),
    );
    assert!(first_seen >= t - 5, "a new schedule starts from now");
    let list = builds(&h, "nightly");
    assert_eq!(list.len(), 1, "three missed slots, one build: {list:?}");
    assert_eq!(list[0]["trigger"], "schedule");
    assert_eq!(list[0]["created_by"], "schedule");
    assert!(builds(&h, "fresh").is_empty(), "nothing for the past");
    h.wait_status(
        "nightly",
        list[0]["name"].as_str().unwrap(),
        Duration::from_secs(30),
    );
}
