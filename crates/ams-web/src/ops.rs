//! The operations the JSON API and the pages both perform — trigger, cancel, delete output,
//! rebuild and replay — each with its access check inside, so the two doors can never disagree
//! on who may do what. The API turns an [`OpError`] into its JSON answer, the pages into a page.

use crate::api::ApiState;
use ams_core::access::{Action, Grant, Level};
use ams_core::names::{ProjectName, Trigger};
use ams_host::error::HostError;
use ams_host::host::BuildRequest;
use ams_store::BuildRecord;
use std::collections::BTreeMap;

/// Who asks: a signed-in user (a session or an API token) and their levels.
#[derive(Clone, Copy)]
pub struct Who<'a> {
    pub name: &'a str,
    pub grant: &'a Grant,
}

/// Why an operation was not done.
#[derive(Debug)]
pub enum OpError {
    /// No such project or build, or one the caller may not see (the same answer).
    NotFound,
    /// Seen but not allowed, with the reason.
    Forbidden(String),
    /// The request itself is wrong, with what to fix.
    Bad(String),
    /// The host refused (busy, shutting down, a finished build…).
    Host(HostError),
    Internal,
}

impl From<HostError> for OpError {
    fn from(e: HostError) -> Self {
        OpError::Host(e)
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::NotFound => f.write_str("not found"),
            OpError::Forbidden(m) | OpError::Bad(m) => f.write_str(m),
            OpError::Host(e) => write!(f, "{e}"),
            OpError::Internal => f.write_str("internal error"),
        }
    }
}

/// The caller may see `project` (else [`OpError::NotFound`]) and may operate on it: trigger,
/// cancel, rebuild, delete output (else [`OpError::Forbidden`] with the level it lacks).
pub fn may_operate(who: Who<'_>, project: &str) -> Result<(), OpError> {
    if !who.grant.may(Action::View, project) {
        return Err(OpError::NotFound);
    }
    if who.grant.may(Action::Operate, project) {
        Ok(())
    } else {
        Err(OpError::Forbidden(format!(
            "{} on `{project}` may not trigger, cancel or delete builds; ask an ADMIN of the \
             project for MODERATOR",
            who.grant.level_on(project).unwrap_or(Level::NoAuth).name()
        )))
    }
}

/// Queues a build of `project`.
pub async fn trigger(
    st: &ApiState,
    who: Who<'_>,
    project: &str,
    branch: Option<String>,
    commit: Option<String>,
    params: BTreeMap<String, String>,
    via: Trigger,
) -> Result<BuildRecord, OpError> {
    may_operate(who, project)?;
    let project = ProjectName::new(project).map_err(|_| OpError::NotFound)?;
    let req = BuildRequest {
        project,
        branch,
        commit,
        actor: who.name.to_string(),
        trigger: via,
        params,
    };
    Ok(st.host.build(req).await?)
}

/// A build the caller may see, by name (and project, when given: a name alone may be
/// ambiguous across projects).
pub async fn visible_build(
    st: &ApiState,
    who: Who<'_>,
    project: Option<&str>,
    name: &str,
) -> Result<BuildRecord, OpError> {
    st.host
        .resolve(project, name, |p| who.grant.may(Action::View, p))
        .await
        .map_err(|e| match e {
            ams_host::host::ResolveError::Ambiguous { .. } => OpError::Bad(format!(
                "{e}: name the project, as in api/projects/name/{{project}}/builds/{name}/…"
            )),
            ams_host::host::ResolveError::Store(_) => OpError::Internal,
        })?
        .ok_or(OpError::NotFound)
}

/// A build the caller may see and operate on.
pub async fn operable_build(
    st: &ApiState,
    who: Who<'_>,
    project: Option<&str>,
    name: &str,
) -> Result<BuildRecord, OpError> {
    let b = visible_build(st, who, project, name).await?;
    may_operate(who, &b.project)?;
    Ok(b)
}

/// Cancels a pending or running build; the build as it is then.
pub async fn cancel(
    st: &ApiState,
    who: Who<'_>,
    project: Option<&str>,
    name: &str,
) -> Result<BuildRecord, OpError> {
    let b = operable_build(st, who, project, name).await?;
    Ok(st.host.cancel(b.build_id(), who.name).await?)
}

/// Deletes a finished build's folder, log and archive; the build it was done to.
pub async fn delete_output(
    st: &ApiState,
    who: Who<'_>,
    project: Option<&str>,
    name: &str,
) -> Result<BuildRecord, OpError> {
    let b = operable_build(st, who, project, name).await?;
    st.host.delete_output(b.build_id(), who.name).await?;
    Ok(b)
}

/// Builds a finished build's commit again; the new build and the one it repeats.
pub async fn rebuild(
    st: &ApiState,
    who: Who<'_>,
    project: Option<&str>,
    name: &str,
    via: Trigger,
) -> Result<(BuildRecord, BuildRecord), OpError> {
    let b = operable_build(st, who, project, name).await?;
    let n = st.host.rebuild(&b, who.name, via).await?;
    Ok((n, b))
}

/// Replays a recorded webhook delivery (ADMIN and SERVER ADMIN of its project). With
/// `project`, the delivery must be that project's.
pub async fn replay(
    st: &ApiState,
    who: Who<'_>,
    project: Option<&str>,
    id: i64,
) -> Result<(String, serde_json::Value), OpError> {
    let (d, _, _) = st
        .host
        .store
        .delivery_payload(id)
        .await
        .map_err(|_| OpError::Internal)?
        .ok_or(OpError::NotFound)?;
    if project.is_some_and(|p| p != d.project) || !who.grant.may(Action::View, &d.project) {
        return Err(OpError::NotFound);
    }
    if !who.grant.may(Action::SeeDeliveries, &d.project) {
        return Err(OpError::Forbidden(
            "only ADMIN and SERVER ADMIN see deliveries and notifications".into(),
        ));
    }
    let v = ams_host::control::replay(&st.host, id, who.name)
        .await
        .map_err(OpError::Bad)?;
    Ok((d.project, v))
}
