//! The webhook delivery log, and recording a batch of deliveries with their builds.

use crate::builds::{self, BuildRecord, NewBuild};
use crate::conn::Store;
use crate::error::Result;
use ams_core::webhooks::Verdict;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// A webhook delivery as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: i64,
    /// The sender's id (`X-GitHub-Delivery`, `X-Request-UUID`, `X-Request-Id`).
    pub delivery_id: Option<String>,
    pub project: String,
    pub webhook: String,
    pub received_at: f64,
    pub sender: String,
    pub event: String,
    /// accepted, ignored, ping, refused or duplicate.
    pub verdict: String,
    pub reason: Option<String>,
    /// Names of the builds it queued.
    pub builds: Vec<String>,
    /// Size of the body kept for replay (0: none, or dropped with age).
    #[serde(default)]
    pub body_bytes: i64,
}

impl Delivery {
    /// The columns every query of deliveries selects: the row without its headers and body,
    /// and the body's size.
    const COLUMNS: &str = "id, delivery_id, project, webhook, received_at, sender, event, \
                           verdict, reason, builds, coalesce(length(body), 0) AS body_bytes";

    fn from_row(r: &Row) -> rusqlite::Result<Delivery> {
        let builds: String = r.get("builds")?;
        Ok(Delivery {
            id: r.get("id")?,
            delivery_id: r.get("delivery_id")?,
            project: r.get("project")?,
            webhook: r.get("webhook")?,
            received_at: r.get("received_at")?,
            sender: r.get("sender")?,
            event: r.get("event")?,
            verdict: r.get("verdict")?,
            reason: r.get("reason")?,
            builds: serde_json::from_str(&builds).unwrap_or_default(),
            body_bytes: r.get("body_bytes")?,
        })
    }
}

/// A delivery to record; `headers` (JSON) and `body` are kept for replay.
#[derive(Debug, Clone, Default)]
pub struct NewDelivery {
    pub delivery_id: Option<String>,
    pub project: String,
    pub webhook: String,
    pub received_at: f64,
    pub sender: String,
    pub event: String,
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub builds: Vec<String>,
    pub headers: String,
    pub body: Vec<u8>,
}

impl NewDelivery {
    /// The body as stored: only a verdict that keeps one (`Verdict::keeps_body`) stores it,
    /// and an empty body is no body.
    fn kept_body(&self) -> Option<&[u8]> {
        (self.verdict.keeps_body() && !self.body.is_empty()).then_some(self.body.as_slice())
    }
}

/// One delivery of a batch and the builds it asks for.
#[derive(Debug, Clone)]
pub struct DeliveryBatchItem {
    pub delivery: NewDelivery,
    pub builds: Vec<NewBuild>,
}

/// What became of one delivery of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Recorded as accepted; these builds are pending.
    Accepted(Vec<BuildRecord>),
    /// The same delivery id was accepted before (or earlier in the batch): recorded, nothing built.
    Duplicate,
    /// Recorded with the verdict it came with (refused, ignored…); nothing built.
    Recorded,
}

/// Inserts a delivery in the caller's transaction; its id.
fn insert(c: &Connection, d: &NewDelivery) -> Result<i64> {
    Ok(c.prepare_cached(
        "INSERT INTO deliveries (delivery_id, project, webhook, received_at, sender, event, \
         verdict, reason, builds, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         RETURNING id",
    )?
    .query_row(
        params![
            d.delivery_id,
            d.project,
            d.webhook,
            d.received_at,
            d.sender,
            d.event,
            d.verdict.as_str(),
            d.reason,
            serde_json::to_string(&d.builds).unwrap_or_else(|_| "[]".into()),
            d.headers,
            d.kept_body()
        ],
        |r| r.get(0),
    )?)
}

/// Whether a delivery with this id was already accepted for the project.
fn accepted_before(c: &Connection, project: &str, delivery_id: &str) -> Result<bool> {
    Ok(c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM deliveries WHERE project = ? AND delivery_id = ? \
         AND verdict = 'accepted')",
    )?
    .query_row([project, delivery_id], |r| r.get(0))?)
}

/// Records a batch in the caller's transaction (see [`Store::accept_deliveries`]).
fn accept(
    c: &Connection,
    items: Vec<DeliveryBatchItem>,
    name_of: &mut impl FnMut(&NewBuild, i64) -> std::result::Result<String, String>,
) -> Result<Vec<DeliveryOutcome>> {
    // Duplicates: ids accepted before (through the (project, delivery_id) index), then
    // repeats inside the batch.
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut outcomes = Vec::with_capacity(items.len());
    let mut deliveries: Vec<NewDelivery> = Vec::with_capacity(items.len());
    let mut wanted: Vec<(usize, NewBuild)> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let mut d = item.delivery;
        if d.verdict == Verdict::Accepted {
            if let Some(id) = &d.delivery_id {
                let key = (d.project.clone(), id.clone());
                if seen.contains(&key) || accepted_before(c, &d.project, id)? {
                    d.verdict = Verdict::Duplicate;
                    d.reason = Some("this delivery id was accepted before".into());
                    d.body.clear();
                    outcomes.push(DeliveryOutcome::Duplicate);
                    deliveries.push(d);
                    continue;
                }
                seen.insert(key);
            }
            outcomes.push(DeliveryOutcome::Accepted(Vec::new()));
            wanted.extend(item.builds.into_iter().map(|b| (i, b)));
        } else {
            outcomes.push(DeliveryOutcome::Recorded);
        }
        deliveries.push(d);
    }

    // Each build as `create_build` makes it; a name its format refuses is the delivery's
    // reason, and allocates nothing.
    for (i, b) in wanted {
        match builds::create(c, &b, |index| name_of(&b, index))? {
            Ok(rec) => {
                deliveries[i].builds.push(rec.name.clone());
                if let DeliveryOutcome::Accepted(list) = &mut outcomes[i] {
                    list.push(rec);
                }
            }
            Err(e) => deliveries[i].reason = Some(e),
        }
    }
    for d in &deliveries {
        insert(c, d)?;
    }
    Ok(outcomes)
}

/// A project's newest deliveries: bound to the project and the count.
pub(crate) fn deliveries_of_sql() -> String {
    format!(
        "SELECT {} FROM deliveries WHERE project = ? ORDER BY id DESC LIMIT ?",
        Delivery::COLUMNS
    )
}

impl Store {
    /// Records a batch of webhook deliveries and creates their builds, all in one transaction
    /// (group commit): duplicates by delivery id are detected against the database and within
    /// the batch, build indexes are allocated per project, and `name_of(build, index)` names
    /// each build.
    pub async fn accept_deliveries(
        &self,
        items: Vec<DeliveryBatchItem>,
        mut name_of: impl FnMut(&NewBuild, i64) -> std::result::Result<String, String> + Send + 'static,
    ) -> Result<Vec<DeliveryOutcome>> {
        let _touch = self.touch();
        self.write(move |c| accept(c, items, &mut name_of)).await
    }

    /// Whether a delivery with this id was already accepted for the project.
    pub async fn delivery_accepted(&self, project: &str, delivery_id: &str) -> Result<bool> {
        let (project, delivery_id) = (project.to_owned(), delivery_id.to_owned());
        self.read(move |c| accepted_before(c, &project, &delivery_id))
            .await
    }

    pub async fn record_delivery(&self, d: &NewDelivery) -> Result<i64> {
        let d = d.clone();
        self.write(move |c| insert(c, &d)).await
    }

    /// A recorded delivery with the headers (JSON) and body kept for replay.
    pub async fn delivery_payload(&self, id: i64) -> Result<Option<(Delivery, String, Vec<u8>)>> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {}, headers, body FROM deliveries WHERE id = ?",
                Delivery::COLUMNS
            );
            Ok(c.prepare_cached(&sql)?
                .query_row([id], |r| {
                    let body: Option<Vec<u8>> = r.get("body")?;
                    Ok((
                        Delivery::from_row(r)?,
                        r.get("headers")?,
                        body.unwrap_or_default(),
                    ))
                })
                .optional()?)
        })
        .await
    }

    /// A project's deliveries, newest first.
    pub async fn deliveries_of(&self, project: &str, limit: i64) -> Result<Vec<Delivery>> {
        let project = project.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(&deliveries_of_sql())?;
            let rows = st.query_map(params![project, limit], Delivery::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Drops the bodies of deliveries received before `before` (seconds since the epoch), a
    /// thousand rows a write so that no other write waits long behind it. Returns how many.
    pub async fn drop_delivery_bodies(&self, before: f64) -> Result<u64> {
        let mut dropped = 0;
        loop {
            let n = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "UPDATE deliveries SET body = NULL WHERE id IN (SELECT id FROM \
                         deliveries INDEXED BY deliveries_with_body WHERE body IS NOT NULL \
                         AND received_at < ? LIMIT 1000)",
                    )?
                    .execute([before])? as u64)
                })
                .await?;
            dropped += n;
            if n < 1000 {
                return Ok(dropped);
            }
        }
    }
}
