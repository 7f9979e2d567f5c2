//! Writes that fail on a full disk or a read-only database: each fails whole, says why,
//! and leaves its connection clean, so that every write acknowledged after it is stored.

use crate::conn::GROUP_MAX;
use crate::*;
use std::path::Path;

/// The time of the last file error is per process (a host has one database), and a
/// read-only error in one test would make another test's writer reopen its connection (and
/// drop its page limit): these tests take turns.
static ONE_AT_A_TIME: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(Default::default);

fn nb(project: &str) -> NewBuild {
    NewBuild {
        project: project.into(),
        hash: "h".repeat(40),
        trigger: "cli".into(),
        branch: None,
        commit: None,
        created_by: "alice".into(),
        created_at: 1000.0,
        retry_of: None,
        params: Default::default(),
    }
}

fn delivery(id: &str, body: usize) -> DeliveryBatchItem {
    DeliveryBatchItem {
        delivery: NewDelivery {
            delivery_id: Some(id.into()),
            project: "p".into(),
            webhook: "gh".into(),
            verdict: ams_core::webhooks::Verdict::Accepted,
            body: vec![b'x'; body],
            ..Default::default()
        },
        builds: vec![nb("p")],
    }
}

fn name(i: i64) -> std::result::Result<String, String> {
    Ok(format!("p_{i}"))
}

/// SQLite answers SQLITE_FULL, as on a full disk, once the database would grow past the
/// `max_page_count` of the connection at work: the writer's, the only one that writes. The
/// writer reopens its connection after an error about the file, and the new one starts
/// without the limit: limit again before each write that must meet it.
async fn limit_pages(s: &Store, pages: i64) {
    s.write_alone(move |c| Ok(c.execute_batch(&format!("PRAGMA max_page_count = {pages}"))?))
        .await
        .unwrap();
}

/// Holds the writer thread (a job that waits) until the returned sender sends or drops, so
/// that the writes sent meanwhile queue up and are taken as one group.
async fn hold_writer(s: &Store) -> std::sync::mpsc::Sender<()> {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel();
    let s = s.clone();
    tokio::spawn(async move {
        s.write_alone(move |_| {
            let _ = started.send(());
            let _ = gate.recv();
            Ok(())
        })
        .await
        .unwrap();
    });
    running.await.unwrap();
    release
}

/// Sends each write of `writes` (they queue behind a held writer), then lets the writer go:
/// the results, in order.
async fn in_one_group<T: Send + 'static>(
    s: &Store,
    writes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
) -> Vec<T> {
    let release = hold_writer(s).await;
    let tasks: Vec<_> = writes.into_iter().map(tokio::spawn).collect();
    // Each task sends its write when first polled; on this one thread they are all polled
    // before this task runs again.
    tokio::task::yield_now().await;
    drop(release);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The build indexes of project `p` as stored, oldest first, read after a reopen.
async fn stored_after_reopen(s: Store, db: &Path) -> Vec<i64> {
    s.close().await;
    let s = Store::open(db).await.unwrap();
    s.builds_of("p", 1000, 0)
        .await
        .unwrap()
        .iter()
        .rev()
        .map(|b| b.build_index)
        .collect()
}

#[tokio::test]
async fn writes_after_a_full_disk_are_stored_and_numbers_never_reused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    // One connection, so that every write below runs on the one that failed.
    let s = Store::open_with(&db, 1, false).await.unwrap();
    let mut acknowledged = vec![s.create_build(&nb("p"), name).await.unwrap().build_index];
    limit_pages(&s, 1).await;
    // SQLite rolls these transactions back itself (SQLITE_FULL in a one-row INSERT).
    let mut big = nb("p");
    big.hash = "h".repeat(256 * 1024);
    let e = s.create_build(&big, name).await.map(|_| ()).unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(
        e.to_string()
            .contains("the disk holding the data directory is full"),
        "{e}"
    );
    limit_pages(&s, 1).await;
    let e = s
        .accept_deliveries(vec![delivery("big", 256 * 1024)], |_, i| name(i))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    limit_pages(&s, 1 << 30).await;
    // A write refused for its own reason (its transaction rolled back by us), then good ones.
    let e = s.create_build(&nb("p"), |_| Err("no".into())).await;
    assert!(!e.unwrap_err().is_unavailable());
    for i in 0..3 {
        let out = s
            .accept_deliveries(vec![delivery(&format!("d{i}"), 10)], |_, i| name(i))
            .await
            .unwrap();
        let DeliveryOutcome::Accepted(b) = &out[0] else {
            panic!("delivery d{i} was not accepted")
        };
        acknowledged.push(b[0].build_index);
        acknowledged.push(s.create_build(&nb("p"), name).await.unwrap().build_index);
    }
    let stored = stored_after_reopen(s, &db).await;
    assert_eq!(stored, acknowledged, "acknowledged builds were lost");
}

#[tokio::test]
async fn a_read_only_database_refuses_writes_clearly_and_still_reads() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    let first = s.create_build(&nb("p"), name).await.unwrap();
    s.close().await;
    let ro = Store::open_with(&db, 1, true).await.unwrap();
    for _ in 0..2 {
        let e = ro
            .create_build(&nb("p"), name)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
        let e = ro
            .accept_deliveries(vec![delivery("d", 10)], |_, i| name(i))
            .await
            .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert_eq!(ro.build_by_id(first.id).await.unwrap(), Some(first.clone()));
    }
    let s = Store::open(&db).await.unwrap();
    let next = s.create_build(&nb("p"), name).await.unwrap();
    assert_eq!(next.build_index, 2);
    assert_eq!(stored_after_reopen(s, &db).await, vec![1, 2]);
}

/// Writes taken in one group each run in their own savepoint: one that fails (a name its
/// format refuses, a name taken) is rolled back alone, the others are stored, and the group
/// is one commit.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_write_in_a_group_leaves_the_others_stored() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    let commits = s.commits();
    let mut writes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>> =
        Vec::new();
    for i in 0..12 {
        let s = s.clone();
        writes.push(Box::pin(async move {
            let r = match i % 4 {
                // Refused by its name format: allocates nothing.
                1 => s.create_build(&nb("p"), |_| Err("bad name".into())).await,
                // A name taken already (the first build's): fails in SQL.
                3 => s.create_build(&nb("p"), |_| Ok("p_1".into())).await,
                _ => s.create_build(&nb("p"), name).await,
            };
            r.map(|b| b.build_index).map_err(|e| e.to_string())
        }));
    }
    let got = in_one_group(&s, writes).await;
    assert_eq!(
        s.commits() - commits,
        1,
        "one commit for the group: {got:?}"
    );
    let acknowledged: Vec<i64> = got.iter().filter_map(|r| r.clone().ok()).collect();
    assert_eq!(acknowledged, vec![1, 2, 3, 4, 5, 6], "{got:?}");
    assert!(got[1].as_ref().unwrap_err().contains("bad name"), "{got:?}");
    assert!(got[3].as_ref().unwrap_err().contains("UNIQUE"), "{got:?}");
    assert_eq!(stored_after_reopen(s, &db).await, acknowledged);
    const { assert!(GROUP_MAX >= 12) };
}

/// A full disk in the middle of a group ends SQLite's whole transaction: every write of the
/// group is then answered with the error, none is acknowledged and lost, and the writes
/// after it are stored.
#[tokio::test(flavor = "current_thread")]
async fn a_full_disk_in_a_group_fails_the_writes_it_took_with_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    s.create_build(&nb("p"), name).await.unwrap();
    limit_pages(&s, 1).await;
    let mut writes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>> =
        Vec::new();
    for i in 0..6 {
        let s = s.clone();
        writes.push(Box::pin(async move {
            let mut b = nb("p");
            if i == 3 {
                b.hash = "h".repeat(256 * 1024);
            }
            s.create_build(&b, name).await.map(|b| b.build_index)
        }));
    }
    let got = in_one_group(&s, writes).await;
    let e = got[3].as_ref().unwrap_err();
    assert!(e.is_unavailable() && e.to_string().contains("full"), "{e}");
    limit_pages(&s, 1 << 30).await;
    let mut acknowledged: Vec<i64> = vec![1];
    acknowledged.extend(got.iter().filter_map(|r| r.as_ref().ok().copied()));
    acknowledged.push(s.create_build(&nb("p"), name).await.unwrap().build_index);
    assert_eq!(stored_after_reopen(s, &db).await, acknowledged);
}

/// A connection left inside a transaction (here by a job that began one and never ended it)
/// is closed, never reused: what it held is rolled back, and the writes after it are
/// committed, each for real, on a fresh connection.
#[tokio::test]
async fn a_connection_left_in_a_transaction_is_never_reused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    s.create_build(&nb("p"), name).await.unwrap();
    s.write_alone(|c| {
        c.execute_batch(
            "BEGIN IMMEDIATE; UPDATE projects SET latest_build_index = 100 WHERE name = 'p'",
        )?;
        Ok(())
    })
    .await
    .unwrap();
    let next = s.create_build(&nb("p"), name).await.unwrap();
    assert_eq!(
        next.build_index, 2,
        "the abandoned transaction was rolled back"
    );
    // Another connection sees it committed: the write lock was not kept.
    let other = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = other
        .query_row("SELECT COUNT(*) FROM builds", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    other
        .execute_batch("BEGIN IMMEDIATE; COMMIT")
        .expect("the write lock is free");
    drop(other);
    assert_eq!(stored_after_reopen(s, &db).await, vec![1, 2]);
}

/// Many tasks writing at once through clones of one store: every acknowledged write is
/// stored, indexes are dense and never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_dense_indexes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ams.db");
    let s = Store::open(&db).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for _ in 0..25 {
                    mine.push(s.create_build(&nb("p"), name).await.unwrap().build_index);
                    s.builds_of("p", 5, 0).await.unwrap();
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    assert_eq!(stored_after_reopen(s, &db).await, all);
}
