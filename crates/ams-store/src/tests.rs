//! The store's behaviour through its public methods: builds and their indexes, retention,
//! deliveries, users, sessions, tokens, messages, secrets, migrations and backups.

use crate::*;
use ams_core::access::Grant;
use ams_core::status::BuildStatus;

fn nb(project: &str) -> NewBuild {
    NewBuild {
        project: project.into(),
        hash: "h".repeat(40),
        trigger: "cli".into(),
        branch: Some("main".into()),
        commit: None,
        created_by: "alice".into(),
        created_at: 1000.0,
        retry_of: None,
        params: Default::default(),
    }
}

fn user(name: &str) -> User {
    User {
        name: name.into(),
        password_hash: "x".into(),
        grant: Grant::uniform(4, &["p".into()]),
        created_at: 1.0,
        password_changed_at: 1.0,
    }
}

/// An accepted delivery with a body of `body` bytes.
fn delivery(i: usize, body: usize) -> NewDelivery {
    NewDelivery {
        delivery_id: Some(format!("d{i}")),
        project: "p".into(),
        webhook: "gh".into(),
        received_at: 1.0,
        sender: "s".into(),
        event: "push".into(),
        verdict: ams_core::webhooks::Verdict::Accepted,
        reason: None,
        builds: vec![],
        headers: "{}".into(),
        body: vec![b'x'; body],
    }
}

#[tokio::test]
async fn secrets_are_listed_by_name_and_kept_within_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let limits = SecretLimits {
        max_count: 2,
        max_bytes: 40,
        overhead: 16,
    };
    let sealed = |name: &str, len: usize| SealedSecret {
        project: "p".into(),
        name: name.into(),
        key_id: "k".into(),
        nonce: vec![1; 24],
        sealed: vec![7; len + 16],
        set_at: 5.0,
        set_by: "alice".into(),
    };
    s.put_secret(&sealed("A", 10), limits).await.unwrap();
    s.put_secret(&sealed("B", 30), limits).await.unwrap();
    // Replacing counts the new value, not the old one.
    s.put_secret(&sealed("B", 30), limits).await.unwrap();
    let e = s.put_secret(&sealed("C", 1), limits).await.unwrap_err();
    assert!(e.to_string().contains("holds 2 secrets"), "{e}");
    let e = s.put_secret(&sealed("B", 31), limits).await.unwrap_err();
    assert!(e.to_string().contains("41 bytes"), "{e}");
    let list = s.secrets_of("p").await.unwrap();
    assert_eq!(
        list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["A", "B"]
    );
    assert_eq!(list[0].set_by, "alice");
    assert!(s.secrets_of("q").await.unwrap().is_empty());
    assert_eq!(s.sealed_secrets("p").await.unwrap()[1], sealed("B", 30));
    assert_eq!(s.secret_count().await.unwrap(), 2);
    assert!(s.remove_secret("p", "A").await.unwrap());
    assert!(!s.remove_secret("p", "A").await.unwrap());
    assert_eq!(s.secret_count().await.unwrap(), 1);
}

#[tokio::test]
async fn attempts_follow_the_retry_chain_and_survive_in_lists() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let name = |i: i64| Ok(format!("p_{i}"));
    let first = s.create_build(&nb("p"), name).await.unwrap();
    let second = s
        .create_build(
            &NewBuild {
                retry_of: Some(first.id),
                ..nb("p")
            },
            name,
        )
        .await
        .unwrap();
    let third = s
        .create_build(
            &NewBuild {
                retry_of: Some(second.id),
                ..nb("p")
            },
            name,
        )
        .await
        .unwrap();
    assert_eq!(s.attempts(first.id).await.unwrap(), 1);
    assert_eq!(s.attempts(second.id).await.unwrap(), 2);
    assert_eq!(s.attempts(third.id).await.unwrap(), 3);
    assert_eq!(third.retry_of, Some(second.id));
    let listed = s.builds_of("p", 10, 0).await.unwrap();
    assert_eq!(
        listed[0].retry_of,
        Some(second.id),
        "the JSON list path keeps it"
    );
    assert_eq!(listed[2].retry_of, None);
}

#[tokio::test]
async fn build_names_are_unique_per_project_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    // Project `1` names its builds `{project}{build_index}`; project `b` uses `b…`, but a
    // name format may produce anything: another project's name never blocks a build.
    let a = s.create_build(&nb("a"), |_| Ok("11".into())).await.unwrap();
    let b = s.create_build(&nb("b"), |_| Ok("11".into())).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(s.build_by_name("a", "11").await.unwrap().unwrap().id, a.id);
    assert_eq!(s.build_by_name("b", "11").await.unwrap().unwrap().id, b.id);
    let both: Vec<i64> = s
        .builds_named("11")
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(both, vec![a.id, b.id]);
    // Within one project a name is still unique.
    assert!(s.create_build(&nb("a"), |_| Ok("11".into())).await.is_err());
    let latest = s.latest_builds().await.unwrap();
    assert_eq!(latest["a"].0, a.id);
    assert_eq!(latest["b"].0, b.id);
}

#[tokio::test]
async fn the_latest_final_build_skips_live_ones_and_follows_the_branch() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let make = |branch: &str| {
        let mut b = nb("p");
        b.branch = Some(branch.into());
        b
    };
    let end = |status| Finish {
        status: Some(status),
        finished_at: 2000.0,
        ..Default::default()
    };
    assert!(s
        .latest_final_build("p", None, false)
        .await
        .unwrap()
        .is_none());
    let main_pass = s
        .create_build(&make("main"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    s.finish(main_pass.id, &end(BuildStatus::Pass))
        .await
        .unwrap();
    let dev_fail = s
        .create_build(&make("dev"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    s.finish(dev_fail.id, &end(BuildStatus::Fail))
        .await
        .unwrap();
    // Newer but still pending or running: not what a badge shows.
    let pending = s
        .create_build(&make("main"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let running = s
        .create_build(&make("dev"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    s.mark_running(running.id, 1500.0).await.unwrap();
    let id = |b: Option<BuildRecord>| b.map(|b| b.id);
    assert_eq!(
        id(s.latest_final_build("p", None, false).await.unwrap()),
        Some(dev_fail.id)
    );
    assert_eq!(
        id(s.latest_final_build("p", Some("main"), false)
            .await
            .unwrap()),
        Some(main_pass.id)
    );
    assert_eq!(
        id(s.latest_final_build("p", Some("dev"), false).await.unwrap()),
        Some(dev_fail.id)
    );
    assert_eq!(
        id(s.latest_final_build("p", Some("nope"), false)
            .await
            .unwrap()),
        None
    );
    assert_eq!(
        id(s.latest_final_build("q", None, false).await.unwrap()),
        None
    );
    s.finish(pending.id, &end(BuildStatus::Warn)).await.unwrap();
    assert_eq!(
        id(s.latest_final_build("p", Some("main"), false)
            .await
            .unwrap()),
        Some(pending.id)
    );
}

#[tokio::test]
async fn builds_of_web_and_api_users_leave_a_message_however_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    s.create_user(&user("alice")).await.unwrap();
    let mut web = nb("p");
    web.trigger = "web".into();
    let a = s
        .create_build(&web, |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let b = s
        .create_build(&web, |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let cli = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let mut stranger = web.clone();
    stranger.created_by = "nobody".into();
    let d = s
        .create_build(&stranger, |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let fin = Finish {
        status: Some(BuildStatus::Fail),
        reason: Some("stage `s` failed".into()),
        finished_at: 5.0,
        ..Default::default()
    };
    s.finish(a.id, &fin).await.unwrap();
    s.skip_builds(&[(b.id, "superseded".into())], 6.0)
        .await
        .unwrap();
    s.finish(cli.id, &fin).await.unwrap();
    s.finish(d.id, &fin).await.unwrap();
    let m = s.messages_of("alice", 10).await.unwrap();
    let texts: Vec<_> = m.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "Build p_2 ended SKIP: superseded",
            "Build p_1 ended FAIL: stage `s` failed"
        ],
        "CLI builds and unknown users leave nothing"
    );
    assert_eq!(m[1].kind, "fail");
    assert_eq!(m[1].build.as_deref(), Some("p_1"));
    // Kept bounded, newest kept.
    for i in 0..(MESSAGES_KEPT + 10) {
        s.add_message("alice", "ok", &format!("m{i}"), None, None, 7.0)
            .await
            .unwrap();
    }
    let m = s.messages_of("alice", 1000).await.unwrap();
    assert_eq!(m.len() as i64, MESSAGES_KEPT);
    assert_eq!(m[0].text, format!("m{}", MESSAGES_KEPT + 9));
    // Messages to unknown users are dropped; removing a user removes theirs.
    s.add_message("ghost", "ok", "x", None, None, 7.0)
        .await
        .unwrap();
    assert!(s.messages_of("ghost", 10).await.unwrap().is_empty());
    assert_eq!(
        s.clear_messages("alice").await.unwrap() as i64,
        MESSAGES_KEPT
    );
    s.add_message("alice", "ok", "again", None, None, 8.0)
        .await
        .unwrap();
    assert!(s.remove_user("alice").await.unwrap());
    assert!(s.messages_of("alice", 10).await.unwrap().is_empty());
}

/// The retention rule: the newest N final builds are kept, older final ones and those
/// finished before the limit are listed, pending and running builds never (nor do they
/// count towards N), and builds whose output is already deleted are not listed again.
#[tokio::test]
async fn retention_lists_only_final_builds_beyond_the_newest_or_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let new = |p: &'static str| {
        let s = s.clone();
        async move {
            s.create_build(&nb(p), move |i| Ok(format!("{p}_{i}")))
                .await
                .unwrap()
                .id
        }
    };
    let done = |at: f64| Finish {
        status: Some(BuildStatus::Pass),
        finished_at: at,
        ..Default::default()
    };
    let b1 = new("p").await;
    s.finish(b1, &done(100.0)).await.unwrap();
    let b2 = new("p").await;
    s.finish(b2, &done(200.0)).await.unwrap();
    s.mark_output_deleted(b2, 300.0).await.unwrap();
    let b3 = new("p").await;
    s.mark_running(b3, 150.0).await.unwrap();
    let b4 = new("p").await;
    s.finish(b4, &done(1000.0)).await.unwrap();
    let b5 = new("p").await; // pending
    let b6 = new("p").await;
    s.finish(b6, &done(1100.0)).await.unwrap();
    let q1 = new("q").await;
    s.finish(q1, &done(1.0)).await.unwrap();

    let listed = |keep: Option<u32>, before: Option<f64>| {
        let s = s.clone();
        async move {
            s.retention_candidates("p", keep, before)
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.build.id, e.beyond_keep, e.too_old))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(None, None).await, vec![]);
    // keep 2: b6 and b4 are the newest final builds, although b5 (pending) is newer than
    // b4; b2 counts but is deleted already; b3 and b5 are never listed.
    assert_eq!(listed(Some(2), None).await, vec![(b1, true, false)]);
    assert_eq!(
        listed(Some(1), None).await,
        vec![(b1, true, false), (b4, true, false)]
    );
    assert_eq!(listed(Some(10), None).await, vec![]);
    // Finished before 500: b1 only (b2 is deleted already, b3 is running).
    assert_eq!(listed(None, Some(500.0)).await, vec![(b1, false, true)]);
    assert_eq!(
        listed(None, Some(1050.0)).await,
        vec![(b1, false, true), (b4, false, true)]
    );
    assert_eq!(listed(Some(3), Some(150.0)).await, vec![(b1, true, true)]);
    // Even keeping none and taking every age, the live builds are never listed.
    let all: Vec<i64> = listed(Some(0), Some(f64::MAX))
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(all, vec![b1, b4, b6]);
    assert!(!all.contains(&b3) && !all.contains(&b5) && !all.contains(&q1));

    // Marking skips live builds and builds already marked.
    assert_eq!(
        s.mark_outputs_deleted(&[b1, b2, b3, b5], 400.0)
            .await
            .unwrap(),
        1
    );
    for (id, deleted) in [(b1, Some(400.0)), (b2, Some(300.0)), (b3, None), (b5, None)] {
        let b = s.build_by_id(id).await.unwrap().unwrap();
        assert_eq!(b.output_deleted_at, deleted, "build {id}");
    }
    assert_eq!(listed(Some(1), None).await, vec![(b4, true, false)]);
}

/// A backup is a complete, checked copy, mode 0600, taken while another connection
/// writes; it never replaces a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_a_checked_private_copy_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    for _ in 0..20 {
        s.create_build(&nb("p"), |i| Ok(format!("p_{i}")))
            .await
            .unwrap();
    }
    // A writer keeps going during the copies.
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                s.create_build(&nb("p"), |i| Ok(format!("p_{i}")))
                    .await
                    .unwrap();
            }
        })
    };
    let mut counts = Vec::new();
    for n in 0..3 {
        let dest = dir.path().join(format!("copy{n}.db"));
        let info = backup(&db, &dest).await.unwrap();
        assert!(info.builds >= 20, "{info:?}");
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Each copy is one snapshot: the project's counter matches its builds.
        let c = Store::open(&dest).await.unwrap();
        let builds = c.builds_of("p", 10_000, 0).await.unwrap();
        assert_eq!(builds.len() as i64, info.builds);
        let latest = c.project_info("p").await.unwrap().unwrap();
        assert_eq!(latest.latest_build_index, info.builds);
        c.close().await;
        counts.push(info.builds);
    }
    writer.await.unwrap();
    let dest = dir.path().join("copy0.db");
    let before = std::fs::read(&dest).unwrap();
    let e = backup(&db, &dest).await.unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        before,
        "the file was left as it was"
    );
    let e = backup(&dir.path().join("none.db"), &dir.path().join("x.db"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no database there"), "{e}");
    assert!(!dir.path().join("x.db").exists());
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
}

#[tokio::test]
async fn builds_get_increasing_indexes_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    let a = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let b = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let c = s
        .create_build(&nb("q"), |i| Ok(format!("q_{i}")))
        .await
        .unwrap();
    assert_eq!((a.build_index, b.build_index, c.build_index), (1, 2, 1));
    assert_eq!(a.status, BuildStatus::Pending);
    s.mark_running(a.id, 1001.0).await.unwrap();
    let stages = vec![StageResult {
        name: "s".into(),
        exit_code: Some(0),
        passed: true,
        started_at: 1001.0,
        duration_secs: 0.5,
    }];
    let done = Finish {
        status: Some(BuildStatus::Pass),
        finished_at: 1002.0,
        stages: stages.clone(),
        ..Default::default()
    };
    assert!(s.finish(a.id, &done).await.unwrap());
    assert!(
        !s.finish(a.id, &done).await.unwrap(),
        "a final build is not finished twice"
    );
    s.close().await;

    let s = Store::open(&db).await.unwrap();
    let a2 = s.build_by_name("p", "p_1").await.unwrap().unwrap();
    assert_eq!(a2.status, BuildStatus::Pass);
    assert_eq!(a2.stages, stages);
    let live: Vec<_> = s
        .unfinished()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(live, vec!["p_2", "q_1"]);
    let info = s.project_info("p").await.unwrap().unwrap();
    assert_eq!(info.latest_build_index, 2);
    assert_eq!(info.latest_build_key.as_deref(), Some("p_2"));
    assert_eq!(info.last_complete_time, Some(1002.0));
    assert_eq!(s.builds_of("p", 10, 0).await.unwrap()[0].name, "p_2");
}

/// Pings, ignored deliveries and duplicates keep no body, through either write path; the
/// others keep theirs until `drop_delivery_bodies` passes their time.
#[tokio::test]
async fn delivery_bodies_are_kept_only_where_replay_needs_them_and_only_so_long() {
    use ams_core::webhooks::Verdict;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let d = |id: &str, verdict: Verdict, at: f64| NewDelivery {
        delivery_id: Some(id.into()),
        project: "p".into(),
        webhook: "w".into(),
        received_at: at,
        verdict,
        body: format!("{{\"id\": \"{id}\"}}").into_bytes(),
        ..Default::default()
    };
    let batch = [
        d("old", Verdict::Accepted, 100.0),
        d("ping", Verdict::Ping, 100.0),
        d("ignored", Verdict::Ignored, 100.0),
        d("new", Verdict::Accepted, 300.0),
        d("old", Verdict::Accepted, 300.0),
    ];
    s.accept_deliveries(
        batch
            .into_iter()
            .map(|delivery| DeliveryBatchItem {
                delivery,
                builds: vec![],
            })
            .collect(),
        |_, i| Ok(format!("p_{i}")),
    )
    .await
    .unwrap();
    s.record_delivery(&d("refused", Verdict::Refused, 100.0))
        .await
        .unwrap();
    s.record_delivery(&d("ping2", Verdict::Ping, 300.0))
        .await
        .unwrap();
    let kept = |s: &Store| {
        let s = s.clone();
        async move {
            let mut v: Vec<(String, String, i64)> = s
                .deliveries_of("p", 10)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.delivery_id.unwrap(), d.verdict, d.body_bytes))
                .collect();
            v.reverse();
            v
        }
    };
    let with = |id: &str, v: &str, n: i64| (id.to_string(), v.to_string(), n);
    assert_eq!(
        kept(&s).await,
        vec![
            with("old", "accepted", 13),
            with("ping", "ping", 0),
            with("ignored", "ignored", 0),
            with("new", "accepted", 13),
            with("old", "duplicate", 0),
            with("refused", "refused", 17),
            with("ping2", "ping", 0),
        ]
    );
    assert_eq!(s.drop_delivery_bodies(200.0).await.unwrap(), 2);
    assert_eq!(s.drop_delivery_bodies(200.0).await.unwrap(), 0);
    let after = kept(&s).await;
    assert_eq!(after[0], with("old", "accepted", 0));
    assert_eq!(after[3], with("new", "accepted", 13));
    assert_eq!(after[5], with("refused", "refused", 0));
    let (_, _, body) = s.delivery_payload(1).await.unwrap().unwrap();
    assert!(body.is_empty());
    // The log is checkpointed on demand (all of it when it holds more than the limit).
    s.checkpoint(0).await.unwrap();
    assert_eq!(s.checkpoint(0).await.unwrap(), 0, "the log was truncated");
}

#[tokio::test]
async fn a_delivery_batch_is_deduplicated_and_indexed_in_one_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    s.create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let item = |id: &str, n: usize| DeliveryBatchItem {
        delivery: NewDelivery {
            delivery_id: Some(id.into()),
            project: "p".into(),
            webhook: "w".into(),
            verdict: ams_core::webhooks::Verdict::Accepted,
            ..Default::default()
        },
        builds: vec![nb("p"); n],
    };
    let out = s
        .accept_deliveries(vec![item("a", 1), item("b", 2), item("a", 1)], |_, i| {
            Ok(format!("p_{i}"))
        })
        .await
        .unwrap();
    let names = |o: &DeliveryOutcome| match o {
        DeliveryOutcome::Accepted(b) => b.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
        _ => vec![],
    };
    assert_eq!(names(&out[0]), vec!["p_2"]);
    assert_eq!(names(&out[1]), vec!["p_3", "p_4"]);
    assert_eq!(out[2], DeliveryOutcome::Duplicate);
    let again = s
        .accept_deliveries(vec![item("b", 1)], |_, i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    assert_eq!(again[0], DeliveryOutcome::Duplicate);
    assert_eq!(
        s.project_info("p")
            .await
            .unwrap()
            .unwrap()
            .latest_build_index,
        4
    );
    let d = s.deliveries_of("p", 10).await.unwrap();
    assert_eq!(d.len(), 4);
    assert_eq!(d[3].builds, vec!["p_2".to_string()]);
    s.skip_builds(&[(3, "superseded".into())], 5.0)
        .await
        .unwrap();
    let b = s.build_by_name("p", "p_3").await.unwrap().unwrap();
    assert_eq!(b.status, BuildStatus::Skip);
    assert_eq!(b.reason.as_deref(), Some("superseded"));
}

#[tokio::test]
async fn sessions_end_when_idle_or_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let u = User {
        name: "u".into(),
        password_hash: "h".into(),
        grant: Grant::uniform(3, &[]),
        created_at: 0.0,
        password_changed_at: 0.0,
    };
    s.create_user(&u).await.unwrap();
    assert!(s.create_session("a", "u", "c", 1000.0, "h").await.unwrap());
    // Checked against a password that is no longer the user's: nothing is made.
    assert!(!s
        .create_session("x", "u", "c", 1000.0, "old")
        .await
        .unwrap());
    assert!(s
        .create_token("u", "t", "tx", 1000.0, Some("old"))
        .await
        .unwrap()
        .is_none());
    // Used within the idle limit: alive, and the use counts.
    assert!(s
        .session("a", 1050.0, 100.0, 500.0)
        .await
        .unwrap()
        .is_some());
    assert!(s
        .session("a", 1140.0, 100.0, 500.0)
        .await
        .unwrap()
        .is_some());
    // Idle too long: gone, for good.
    assert!(s
        .session("a", 1241.0, 100.0, 500.0)
        .await
        .unwrap()
        .is_none());
    assert!(s.session("a", 1242.0, 1e9, 1e9).await.unwrap().is_none());
    // Used all the time, but past the absolute limit: gone.
    s.create_session("b", "u", "c", 1000.0, "h").await.unwrap();
    for t in [1090.0, 1180.0, 1270.0, 1360.0, 1450.0] {
        assert!(s.session("b", t, 100.0, 500.0).await.unwrap().is_some());
    }
    assert!(s
        .session("b", 1501.0, 100.0, 500.0)
        .await
        .unwrap()
        .is_none());
    // A password change ends every session of the user and revokes its tokens.
    s.create_session("c", "u", "c", 1000.0, "h").await.unwrap();
    s.create_token("u", "ci", "th", 1000.0, Some("h"))
        .await
        .unwrap()
        .unwrap();
    assert!(s.token_user("th", 1000.5).await.unwrap().is_some());
    s.set_password("u", "h2", 1001.0).await.unwrap();
    assert!(s
        .session("c", 1002.0, 100.0, 500.0)
        .await
        .unwrap()
        .is_none());
    assert!(s.token_user("th", 1002.0).await.unwrap().is_none());
    assert!(s.tokens_of("u").await.unwrap().is_empty());
}

/// A database of schema 6 with users in the described system's shape (one level, a list
/// of projects) is converted by migration 0007 to per-project levels.
#[tokio::test]
async fn migration_7_gives_each_listed_project_the_old_level() {
    use ams_core::access::Level;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ams.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        for sql in &crate::conn::MIGRATIONS[..6] {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch("PRAGMA user_version = 6").unwrap();
        for (name, level, projects) in [
            ("mod", 3, r#"["app","lib"]"#),
            ("hook", 2, r#"["app"]"#),
            ("root", 5, r#"["app"]"#),
            ("lonely", 1, "[]"),
            ("broken", 4, "not json"),
        ] {
            c.execute(
                "INSERT INTO users (name, password_hash, level, projects, created_at, \
                 password_changed_at) VALUES (?, 'h', ?, ?, 0, 0)",
                rusqlite::params![name, level, projects],
            )
            .unwrap();
        }
    }
    let s = Store::open(&path).await.unwrap();
    let grant = |name: &'static str| {
        let s = &s;
        async move { s.user(name).await.unwrap().unwrap().grant }
    };
    assert_eq!(
        grant("mod").await.projects,
        [
            ("app".to_string(), Level::Moderator),
            ("lib".to_string(), Level::Moderator)
        ]
        .into()
    );
    assert_eq!(
        grant("hook").await.projects,
        [("app".to_string(), Level::Webhook)].into()
    );
    assert_eq!(grant("root").await, Grant::server_admin());
    assert_eq!(grant("lonely").await, Grant::default());
    assert!(!grant("broken").await.can_log_in());
    // The rows themselves are in the new shape.
    let raw: (i64, String) = s
        .read(|c| {
            Ok(c.query_row(
                "SELECT level, projects FROM users WHERE name = 'mod'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(raw, (0, r#"{"app":3,"lib":3}"#.to_string()));
    // A row still in the old shape (written by another tool) reads the old way.
    s.write(|c| {
        c.execute(
            "UPDATE users SET level = 1, projects = '[\"lib\"]' WHERE name = 'lonely'",
            [],
        )?;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        grant("lonely").await.projects,
        [("lib".to_string(), Level::User)].into()
    );
}

/// Grant changes are compare-and-set: a change computed from a stale read is recomputed.
#[tokio::test]
async fn grant_changes_never_undo_a_concurrent_change() {
    use ams_core::access::Level;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let mut u = user("u");
    u.grant = Grant::uniform(1, &["a".into(), "b".into()]);
    s.create_user(&u).await.unwrap();
    // The first attempt's read goes stale: another manager raises `b` in between.
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let got = s
        .update_grant("u", |g| {
            if tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let s = s.clone();
                std::thread::scope(|t| {
                    t.spawn(|| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap()
                            .block_on(s.update_grant("u", |g| {
                                let mut g = g.clone();
                                g.projects.insert("b".into(), Level::Moderator);
                                Ok(g)
                            }))
                            .unwrap();
                    });
                });
            }
            let mut g = g.clone();
            g.projects.insert("a".into(), Level::Moderator);
            Ok(g)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tries.into_inner(), 2, "recomputed once");
    assert_eq!(got, Grant::uniform(3, &["a".into(), "b".into()]));
    assert_eq!(s.user("u").await.unwrap().unwrap().grant, got);
    // A refusal changes nothing; an unknown user is None.
    assert!(matches!(
        s.update_grant("u", |_| Err("no".into())).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(s
        .update_grant("ghost", |g| Ok(g.clone()))
        .await
        .unwrap()
        .is_none());
    assert!(s.remove_user_if("u", |_| Err("no".into())).await.is_err());
    assert!(s.user("u").await.unwrap().is_some());
    assert!(s.remove_user_if("u", |_| Ok(())).await.unwrap());
    assert!(!s.remove_user("u").await.unwrap());
}

#[tokio::test]
async fn a_failed_naming_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    assert!(s
        .create_build(&nb("p"), |_| Err("bad".into()))
        .await
        .is_err());
    let a = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    assert_eq!(a.build_index, 1);
}

/// Cached statements are compiled once per connection, not on every use. SQLite compiled a
/// statement with `LIMIT ?`, or `project = ?` before an `ORDER BY`, again whenever a value was
/// bound anew, and the statement cache clears the bindings each time: every page of builds was
/// parsed and planned anew.
#[tokio::test]
async fn cached_statements_are_not_compiled_again_on_each_use() {
    use rusqlite::types::ToSql;
    use rusqlite::StatementStatus;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ams.db");
    let s = Store::open(&path).await.unwrap();
    s.create_build(&nb("p"), |i| Ok(format!("p_b{i}")))
        .await
        .unwrap();
    s.close().await;
    let c = crate::conn::open(&path, false, true).unwrap().conn;
    let filtered =
        crate::builds::filtered_sql(&[("status".to_string(), "pending".to_string())]).unwrap();
    let plain = crate::builds::filtered_sql(&[]).unwrap();
    let deliveries = crate::deliveries::deliveries_of_sql();
    // Each statement with the arguments before its count, and whether an offset follows.
    let cases: [(&str, Vec<&dyn ToSql>, bool); 6] = [
        (&plain, vec![&"p"], true),
        (&filtered, vec![&"p", &"pending", &"pending"], true),
        (crate::builds::LATEST_PER_BRANCH, vec![&"p"], false),
        (&deliveries, vec![&"p"], false),
        (crate::messages::MESSAGES_OF, vec![&"alice"], false),
        (crate::notifications::NOTIFICATIONS_OF, vec![&"p"], false),
    ];
    for (sql, before, offset) in &cases {
        for count in [1i64, 2, 3] {
            let mut args = before.clone();
            args.push(&count);
            if *offset {
                args.push(&count);
            }
            let mut st = c.prepare_cached(sql).unwrap();
            let mut rows = st.query(args.as_slice()).unwrap();
            while rows.next().unwrap().is_some() {}
        }
        let st = c.prepare_cached(sql).unwrap();
        assert_eq!(st.get_status(StatementStatus::RePrepare), 0, "{sql}");
    }
}

/// The write-ahead log is copied back into the database by the checkpointer beside the
/// writer, long before the writer's own threshold (10,000 pages): the database file grows
/// while the writes go on, and the log's pages are all copied back soon after they stop.
#[tokio::test]
async fn the_write_ahead_log_is_checkpointed_beside_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ams.db");
    let s = Store::open(&path).await.unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    // About 400 pages of bodies, far below the writer's own threshold.
    for i in 0..200 {
        s.record_delivery(&delivery(i, 6000)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = std::fs::metadata(&path).unwrap().len();
        // Each 6,000-byte body takes two pages of the database once copied back.
        if now >= before + 200 * 6000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file is still {now} bytes (from {before}): no checkpoint ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.close().await;
}

/// A read that panics on the calling thread is that read's error, as on a blocking thread,
/// and the next read works; only the writer keeps temporary data in memory (a reader's large
/// sort may still spill to a file).
#[tokio::test]
async fn a_panicking_quick_read_is_an_error_and_readers_sort_as_usual() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    // A first read leaves an idle connection, so the next one runs on this thread.
    s.ping().await.unwrap();
    let r: Result<()> = s.read_now(|_| panic!("hostile row")).await;
    assert!(r.is_err());
    let t: i64 = s
        .read_now(|c| Ok(c.query_row("PRAGMA temp_store", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(t, 0, "readers use the default temporary store");
    let t: i64 = s
        .write_alone(|c| Ok(c.query_row("PRAGMA temp_store", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(t, 2, "the writer keeps its savepoint journals in memory");
    s.close().await;
}

/// The bundled SQLite is built as .cargo/config.toml says: no SQL can load a library into the
/// host, and the unused extensions are left out.
#[tokio::test]
async fn sqlite_is_built_without_extension_loading_or_unused_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let opts: Vec<String> = s
        .read(|c| {
            let mut st = c.prepare("PRAGMA compile_options")?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
        .unwrap();
    assert!(opts.iter().any(|o| o == "OMIT_LOAD_EXTENSION"), "{opts:?}");
    for gone in ["ENABLE_FTS5", "ENABLE_FTS3", "ENABLE_RTREE", "ENABLE_STAT4"] {
        assert!(!opts.iter().any(|o| o == gone), "{gone} in {opts:?}");
    }
    s.close().await;
}

/// A log that a long reader kept from restarting grows past 64 MiB; once the reader is gone,
/// the checkpointer copies it back whole and truncates the file, without the upkeep.
#[tokio::test]
async fn a_log_grown_past_its_limit_is_truncated_by_the_checkpointer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ams.db");
    let s = Store::open(&path).await.unwrap();
    let delivery = |i: usize| delivery(i, 1 << 20);
    s.record_delivery(&delivery(0)).await.unwrap();
    // A reader in the middle of a read holds its snapshot: no checkpoint gets past it.
    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))
        .unwrap();
    for i in 1..=70 {
        s.record_delivery(&delivery(i)).await.unwrap();
    }
    assert!(
        s.wal_bytes() > 64 << 20,
        "the log is {} bytes",
        s.wal_bytes()
    );
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    s.record_delivery(&delivery(71)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.wal_bytes() > 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log is still {} bytes",
            s.wal_bytes()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.close().await;
}

/// Under steady writes the checkpointer's copy never catches up with the log, so the log only
/// started over when SQLite's own checkpoint, at 10,000 pages (40 MB), did the whole job inside
/// a COMMIT. The writer now finishes the checkpointer's copy after a commit once the log has
/// passed a threshold (4,096 pages with a run every 100 ms; here 256 pages every 20 ms, so that
/// a fast disk cannot fill 40 MB before the checkpointer asks), and the log starts over long
/// before SQLite's own. Without the writer's part the log reaches 41 MB first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_under_steady_writes_starts_over_before_sqlites_own_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ams.db");
    let tune = crate::conn::Checkpoints {
        every: std::time::Duration::from_millis(20),
        restart_frames: 256,
    };
    let s = Store::open_tuned(&path, 4, false, tune).await.unwrap();
    // The log's header counts its restarts ("checkpoint sequence", bytes 12 to 15); a restart
    // shows there once the next page is written.
    let wal = dir.path().join("ams.db-wal");
    let restarts = || {
        use std::io::Read;
        let mut b = [0u8; 16];
        std::fs::File::open(&wal)
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        u32::from_be_bytes([b[12], b[13], b[14], b[15]])
    };
    s.record_delivery(&delivery(0, 160_000)).await.unwrap();
    let before = restarts();
    // Four writers that never pause keep the writer thread busy, so no checkpoint of the
    // checkpointer's can find the log still between two commits and copy it whole by itself.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 1 + w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    s.record_delivery(&delivery(i, 160_000)).await.unwrap();
                    i += 4;
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let started_over = loop {
        if restarts() != before {
            // SQLite's own restart comes with a file of 10,000 pages or more (it is only cut
            // back past 64 MiB): a smaller file means the restart came before it.
            break s.wal_bytes() < 10_000 * 4096;
        }
        // SQLite's own checkpoint restarts the log at 10,000 pages: too late.
        if s.wal_bytes() >= 10_000 * 4096 || std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        started_over,
        "the log grew to {} bytes without starting over",
        s.wal_bytes()
    );
    s.close().await;
}

/// A write queued for later (`write_queued`) is done, and the generation that the response
/// caches key on rises with its commit, even when nobody awaits it (a host shutting down
/// drops the future).
#[tokio::test]
async fn a_queued_write_commits_and_raises_the_generation_unawaited() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let b = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let before = s.generation();
    drop(s.skip_builds(&[(b.id, "superseded".into())], 5.0));
    // Any later write is answered after the dropped one's commit.
    s.write(|_| Ok(())).await.unwrap();
    assert!(s.generation() > before);
    assert_eq!(
        s.build_by_id(b.id).await.unwrap().unwrap().status,
        BuildStatus::Skip
    );
    s.close().await;
}

#[tokio::test]
async fn a_page_read_in_place_holds_what_its_records_hold() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ams.db")).await.unwrap();
    let mut plain = nb("p");
    plain.branch = None;
    plain.created_by = "bob \"quoted\"\n".into();
    s.create_build(&plain, |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let b = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    s.mark_running(b.id, 1001.0).await.unwrap();
    let report = ams_core::junit::TestReport {
        totals: ams_core::junit::TestTotals {
            tests: 3,
            passed: 2,
            failed: 1,
            errors: 0,
            skipped: 0,
            time_secs: 0.5,
            files: 1,
        },
        ..Default::default()
    };
    let fin = Finish {
        status: Some(BuildStatus::Fail),
        reason: Some("stage `s` failed".into()),
        finished_at: 1002.5,
        git_hash: Some("g".repeat(40)),
        commit_message: Some("message ü".into()),
        stages: vec![StageResult {
            name: "s".into(),
            exit_code: Some(1),
            passed: false,
            started_at: 1001.5,
            duration_secs: 1.0,
        }],
        archive_name: Some("p_2.7z".into()),
        archive_hash: Some("ab".into()),
        archive_hash_kind: Some("SHA1".into()),
        tests: Some(report),
    };
    s.finish(b.id, &fin).await.unwrap();
    s.mark_output_deleted(b.id, 1003.0).await.unwrap();
    let records = s.builds_where("p", &[], 10, 0).await.unwrap();
    assert_eq!(records.len(), 2);
    let done = &records[0];
    assert_eq!(done.stages, fin.stages);
    assert_eq!(done.tests.map(|t| t.tests), Some(3));
    assert_eq!(done.commit_message.as_deref(), Some("message ü"));
    assert_eq!(done.output_deleted_at, Some(1003.0));
    assert_eq!(records[1].created_by, "bob \"quoted\"\n");
    // The rows as SQLite holds them agree, field by field, with the records made from them
    // and borrowed back (`RawBuild::to_record` and `BuildRecord::row` map the same fields).
    let expect = records.clone();
    let (seen, differ) = s
        .builds_where_fold("p", &[], 10, 0, (0, Vec::new()), move |(i, differ), raw| {
            let r = &expect[*i];
            if raw.row != r.row() || raw.stages() != r.stages || raw.tests() != r.tests {
                differ.push(format!("{:?} against {:?}", raw.row, r.row()));
            }
            *i += 1;
        })
        .await
        .unwrap();
    assert_eq!(seen, 2);
    assert!(differ.is_empty(), "{differ:?}");
    // A filter and an offset cut the same page both ways.
    let failed = s
        .builds_where_fold("p", &[("status", "fail")], 10, 0, 0, |n, _| *n += 1)
        .await
        .unwrap();
    assert_eq!(failed, 1);
    let past = s
        .builds_where_fold("p", &[], 10, 2, 0, |n, _| *n += 1)
        .await
        .unwrap();
    assert_eq!(past, 0);
}

#[tokio::test]
async fn a_build_row_of_the_wrong_type_names_its_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ams.db");
    let s = Store::open(&path).await.unwrap();
    let b = s
        .create_build(&nb("p"), |i| Ok(format!("p_{i}")))
        .await
        .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    for (value, says) in [
        ("x'ff00'", "name: reason"),
        ("CAST(x'ff00' AS TEXT)", "column `reason`"),
    ] {
        raw.execute(
            &format!("UPDATE builds SET reason = {value} WHERE id = ?"),
            [b.id],
        )
        .unwrap();
        let e = s.builds_where("p", &[], 10, 0).await.unwrap_err();
        assert!(e.to_string().contains(says), "{value}: {e}");
    }
}
