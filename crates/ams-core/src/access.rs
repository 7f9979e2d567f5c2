//! The six access levels of the described system and what each may do, project by project.
//!
//! A user holds a level on each project it is assigned to; SERVER ADMIN is a server-wide flag
//! above every project. Who may do what ([`Grant::may`]) and who may change whose levels
//! ([`Grant::may_manage`], [`Grant::may_change`], [`Grant::edit`]) is decided here and nowhere
//! else. The rule of the second: an ADMIN changes only its own projects' entries, never an
//! ADMIN's or a SERVER ADMIN's, and gives MODERATOR at most.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Level {
    NoAuth = 0,
    User = 1,
    Webhook = 2,
    Moderator = 3,
    Admin = 4,
    ServerAdmin = 5,
}

impl From<Level> for u8 {
    fn from(l: Level) -> u8 {
        l as u8
    }
}

impl TryFrom<u8> for Level {
    type Error = String;
    fn try_from(n: u8) -> Result<Level, String> {
        Ok(match n {
            0 => Level::NoAuth,
            1 => Level::User,
            2 => Level::Webhook,
            3 => Level::Moderator,
            4 => Level::Admin,
            5 => Level::ServerAdmin,
            _ => return Err(format!("access level {n} does not exist; use 0 to 5")),
        })
    }
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::NoAuth => "NO AUTH",
            Level::User => "USER",
            Level::Webhook => "WEBHOOK",
            Level::Moderator => "MODERATOR",
            Level::Admin => "ADMIN",
            Level::ServerAdmin => "SERVER ADMIN",
        }
    }

    /// Whether this level opens the web interface and the API (NO AUTH and WEBHOOK do not).
    pub fn logs_in(self) -> bool {
        !matches!(self, Level::NoAuth | Level::Webhook)
    }

    /// The levels a project entry can hold: SERVER ADMIN is server-wide, never per project.
    pub const PER_PROJECT: [Level; 5] = [
        Level::NoAuth,
        Level::User,
        Level::Webhook,
        Level::Moderator,
        Level::Admin,
    ];
}

/// A user's rights: SERVER ADMIN (every project, every user), or a level on each assigned
/// project. A SERVER ADMIN holds no project entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub server_admin: bool,
    pub projects: BTreeMap<String, Level>,
}

/// Something a user may ask to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// See a project, its builds, logs and archives.
    View,
    /// Trigger, cancel, delete output.
    Operate,
    /// Add users to the project and remove them from it.
    ManageUsers,
    /// See the project's webhook deliveries and notifications, replay deliveries.
    SeeDeliveries,
    /// Set, list (names only) and remove the project's secrets. No action shows a value.
    ManageSecrets,
}

/// What a manager asks for a user ([`Grant::edit`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// The level to set on each project named, or `None` to take the user off it. Naming a
    /// project the manager may not change refuses the whole change.
    pub projects: BTreeMap<String, Option<Level>>,
    /// Take the user off the projects the manager may change but did not name (a list of
    /// ticked boxes); otherwise those stay as they are.
    pub drop_unnamed: bool,
    /// Make or unmake a SERVER ADMIN (SERVER ADMIN only); `None` leaves it.
    pub server_admin: Option<bool>,
}

impl Grant {
    /// The SERVER ADMIN grant.
    pub fn server_admin() -> Grant {
        Grant {
            server_admin: true,
            projects: BTreeMap::new(),
        }
    }

    /// The described system's shape (users.json): one level for every listed project.
    /// SERVER ADMIN is server-wide, so its list is dropped; an unknown level counts as NO AUTH.
    pub fn uniform(level: u8, projects: &[String]) -> Grant {
        match Level::try_from(level) {
            Ok(Level::ServerAdmin) => Grant::server_admin(),
            l => Grant {
                server_admin: false,
                projects: projects
                    .iter()
                    .map(|p| (p.clone(), *l.as_ref().unwrap_or(&Level::NoAuth)))
                    .collect(),
            },
        }
    }

    /// Reads the stored form: the `level` column and the `projects` JSON, which is either an
    /// object of per-project levels, or the described system's list of project names that all
    /// take `level`. Anything else reads as no rights: a broken row never opens a door.
    pub fn from_stored(level: i64, projects: &str) -> Grant {
        let level = u8::try_from(level).unwrap_or(0);
        if level == u8::from(Level::ServerAdmin) {
            return Grant::server_admin();
        }
        match serde_json::from_str::<serde_json::Value>(projects) {
            Ok(serde_json::Value::Array(list)) => {
                let names: Vec<String> = list
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                Grant::uniform(level, &names)
            }
            Ok(serde_json::Value::Object(map)) => Grant {
                server_admin: false,
                projects: map
                    .into_iter()
                    .map(|(p, v)| {
                        let l = v
                            .as_u64()
                            .and_then(|n| u8::try_from(n).ok())
                            .and_then(|n| Level::try_from(n).ok())
                            .filter(|l| *l != Level::ServerAdmin)
                            .unwrap_or(Level::NoAuth);
                        (p, l)
                    })
                    .collect(),
            },
            _ => Grant::default(),
        }
    }

    /// The stored form: the `level` column (5 for SERVER ADMIN, else 0) and the per-project
    /// levels as a JSON object.
    pub fn to_stored(&self) -> (u8, String) {
        if self.server_admin {
            return (Level::ServerAdmin.into(), "{}".into());
        }
        let map: serde_json::Map<String, serde_json::Value> = self
            .projects
            .iter()
            .map(|(p, l)| (p.clone(), u8::from(*l).into()))
            .collect();
        (0, serde_json::Value::Object(map).to_string())
    }

    /// The user's level on `project`, if any (SERVER ADMIN on every project).
    pub fn level_on(&self, project: &str) -> Option<Level> {
        if self.server_admin {
            return Some(Level::ServerAdmin);
        }
        self.projects.get(project).copied()
    }

    /// The highest level held anywhere (NO AUTH without projects).
    pub fn top(&self) -> Level {
        if self.server_admin {
            return Level::ServerAdmin;
        }
        self.projects
            .values()
            .copied()
            .max()
            .unwrap_or(Level::NoAuth)
    }

    /// "SERVER ADMIN", "MODERATOR on app, USER on lib" or "no projects".
    pub fn describe(&self) -> String {
        if self.server_admin {
            return Level::ServerAdmin.name().into();
        }
        if self.projects.is_empty() {
            return "no projects".into();
        }
        self.projects
            .iter()
            .map(|(p, l)| format!("{} on {p}", l.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the user may log in to the web interface or use the API at all: a SERVER ADMIN,
    /// or a level that logs in on some project.
    pub fn can_log_in(&self) -> bool {
        self.server_admin || self.projects.values().any(|l| l.logs_in())
    }

    /// Whether the user may do `action` on `project`.
    pub fn may(&self, action: Action, project: &str) -> bool {
        let Some(level) = self.level_on(project) else {
            return false;
        };
        if !level.logs_in() {
            return false;
        }
        match action {
            Action::View => true,
            Action::Operate => level >= Level::Moderator,
            Action::ManageUsers | Action::SeeDeliveries | Action::ManageSecrets => {
                level >= Level::Admin
            }
        }
    }

    /// Creating projects and managing every user is the server admin's alone.
    pub fn is_server_admin(&self) -> bool {
        self.server_admin
    }

    /// Whether this user has a user management page at all.
    pub fn manages_users(&self) -> bool {
        self.server_admin || self.projects.values().any(|l| *l == Level::Admin)
    }

    /// The projects among `all` whose membership this user manages.
    pub fn managed_projects(&self, all: &[String]) -> Vec<String> {
        all.iter()
            .filter(|p| self.may(Action::ManageUsers, p))
            .cloned()
            .collect()
    }

    /// The highest level this user may give on a project it manages.
    pub fn max_grantable(&self) -> Option<Level> {
        if self.server_admin {
            Some(Level::Admin)
        } else if self.manages_users() {
            Some(Level::Moderator)
        } else {
            None
        }
    }

    /// Whether this user may change `target`'s entry on `project` (add, change or remove it):
    /// SERVER ADMIN always; an ADMIN of `project` when `target` is no SERVER ADMIN and is not
    /// ADMIN there.
    pub fn may_change(&self, target: &Grant, project: &str) -> bool {
        if self.server_admin {
            return true;
        }
        self.may(Action::ManageUsers, project)
            && !target.server_admin
            && target
                .projects
                .get(project)
                .is_none_or(|l| *l < Level::Admin)
    }

    /// Whether this user may see and change `target` at all: SERVER ADMIN anyone; ADMIN the
    /// users with an entry it may change, i.e. below ADMIN on one of its projects.
    pub fn may_manage(&self, target: &Grant) -> bool {
        self.server_admin
            || (self.manages_users() && target.projects.keys().any(|p| self.may_change(target, p)))
    }

    /// The grant `target` ends with when this user asks for `change`; `all` are the projects
    /// that exist. Entries this user may not change are kept as they are; asking to change one
    /// refuses the whole change.
    pub fn edit(&self, target: &Grant, change: &Change, all: &[String]) -> Result<Grant, String> {
        let Some(max) = self.max_grantable() else {
            return Err("only ADMIN and SERVER ADMIN manage users".into());
        };
        if change
            .server_admin
            .is_some_and(|sa| sa != target.server_admin)
            && !self.server_admin
        {
            return Err("only a SERVER ADMIN makes or unmakes a SERVER ADMIN".into());
        }
        for (p, l) in &change.projects {
            // Taking a user off a project that no longer exists is fine.
            if l.is_some() && !all.contains(p) {
                return Err(format!("there is no project `{p}`"));
            }
            if !self.may_change(target, p) {
                return Err(if self.may(Action::ManageUsers, p) {
                    format!("only a SERVER ADMIN changes an ADMIN of `{p}`")
                } else {
                    format!("you do not administer project `{p}`; ask one of its ADMINs")
                });
            }
            if let Some(l) = l.filter(|l| *l > max) {
                return Err(if l == Level::ServerAdmin {
                    "SERVER ADMIN is not a project level; make the user SERVER ADMIN instead".into()
                } else {
                    format!(
                        "an ADMIN may give MODERATOR at most, not {}; ask a SERVER ADMIN",
                        l.name()
                    )
                });
            }
        }
        let mut out = target.clone();
        if change.drop_unnamed {
            out.projects
                .retain(|p, _| !self.may_change(target, p) || change.projects.contains_key(p));
        }
        for (p, l) in &change.projects {
            match l {
                Some(l) => out.projects.insert(p.clone(), *l),
                None => out.projects.remove(p),
            };
        }
        out.server_admin = change.server_admin.unwrap_or(target.server_admin);
        if out.server_admin {
            out.projects.clear();
        }
        Ok(out)
    }

    /// The grant of a new user made by this user: as [`Grant::edit`] of no rights, and an
    /// ADMIN's new user must be on one of its projects (no one else would see it).
    pub fn create(&self, change: &Change, all: &[String]) -> Result<Grant, String> {
        let g = self.edit(&Grant::default(), change, all)?;
        if !self.server_admin && g.projects.is_empty() {
            return Err("choose a level on at least one of your projects for the new user".into());
        }
        Ok(g)
    }

    /// Whether this user may remove `target` altogether: SERVER ADMIN anyone; an ADMIN only a
    /// user whose every entry it may change.
    pub fn may_remove(&self, target: &Grant) -> Result<(), String> {
        if self.server_admin {
            return Ok(());
        }
        if !self.may_manage(target) {
            return Err("you do not manage this user".into());
        }
        match target.projects.keys().find(|p| !self.may_change(target, p)) {
            Some(p) => Err(format!(
                "the user also works on `{p}`, which you do not manage; take them off your \
                 projects instead"
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(level: Level) -> Grant {
        Grant::uniform(level.into(), &["mine".into()])
    }

    fn on(entries: &[(&str, Level)]) -> Grant {
        Grant {
            server_admin: false,
            projects: entries.iter().map(|(p, l)| (p.to_string(), *l)).collect(),
        }
    }

    /// The ticked-boxes shape: the named projects, off the others this manager may change.
    fn change(entries: &[(&str, Level)]) -> Change {
        Change {
            projects: entries
                .iter()
                .map(|(p, l)| (p.to_string(), Some(*l)))
                .collect(),
            drop_unnamed: true,
            server_admin: None,
        }
    }

    /// The per-project shape: only the named projects, `None` to take the user off.
    fn only(entries: &[(&str, Option<Level>)]) -> Change {
        Change {
            projects: entries.iter().map(|(p, l)| (p.to_string(), *l)).collect(),
            drop_unnamed: false,
            server_admin: None,
        }
    }

    fn all() -> Vec<String> {
        vec!["mine".into(), "other".into(), "third".into()]
    }

    #[test]
    fn the_matrix() {
        use Action::*;
        let table = [
            (Level::NoAuth, [false, false, false]),
            (Level::User, [true, false, false]),
            (Level::Webhook, [false, false, false]),
            (Level::Moderator, [true, true, false]),
            (Level::Admin, [true, true, true]),
            (Level::ServerAdmin, [true, true, true]),
        ];
        for (level, [view, operate, manage]) in table {
            let u = g(level);
            assert_eq!(u.may(View, "mine"), view, "{level:?} view");
            assert_eq!(u.may(Operate, "mine"), operate, "{level:?} operate");
            assert_eq!(u.may(ManageUsers, "mine"), manage, "{level:?} manage");
            assert_eq!(u.may(SeeDeliveries, "mine"), manage, "{level:?} deliveries");
            assert_eq!(u.may(ManageSecrets, "mine"), manage, "{level:?} secrets");
            let other = level == Level::ServerAdmin;
            assert_eq!(
                u.may(ManageSecrets, "other"),
                other,
                "{level:?} other's secrets"
            );
            let other = level == Level::ServerAdmin;
            assert_eq!(u.may(View, "other"), other, "{level:?} other project");
        }
        assert!(!g(Level::Webhook).can_log_in());
        assert!(!g(Level::NoAuth).can_log_in());
        assert!(!Grant::default().can_log_in(), "no projects, no login");
        assert!(g(Level::ServerAdmin).is_server_admin());
        assert!(!g(Level::Admin).is_server_admin());
    }

    #[test]
    fn levels_are_per_project() {
        use Action::*;
        let u = on(&[("mine", Level::Admin), ("other", Level::User)]);
        assert!(u.may(ManageUsers, "mine") && u.may(Operate, "mine"));
        assert!(u.may(View, "other"));
        assert!(!u.may(Operate, "other") && !u.may(ManageUsers, "other"));
        assert!(!u.may(View, "third"));
        assert_eq!(u.managed_projects(&all()), vec!["mine".to_string()]);
        assert_eq!(u.top(), Level::Admin);
        assert_eq!(u.describe(), "ADMIN on mine, USER on other");
        // A WEBHOOK entry opens nothing, but a USER entry elsewhere still logs in.
        let w = on(&[("mine", Level::Webhook), ("other", Level::User)]);
        assert!(w.can_log_in() && !w.may(View, "mine") && w.may(View, "other"));
    }

    #[test]
    fn the_stored_form_reads_both_shapes_and_round_trips() {
        // The described system's users.json shape: one level, a list of projects.
        let legacy = Grant::from_stored(3, r#"["mine","other"]"#);
        assert_eq!(
            legacy,
            on(&[("mine", Level::Moderator), ("other", Level::Moderator)])
        );
        assert_eq!(Grant::from_stored(5, r#"["mine"]"#), Grant::server_admin());
        assert_eq!(Grant::from_stored(5, "{}"), Grant::server_admin());
        let mixed = on(&[("mine", Level::Admin), ("other", Level::User)]);
        let (level, json) = mixed.to_stored();
        assert_eq!((level, json.as_str()), (0, r#"{"mine":4,"other":1}"#));
        assert_eq!(Grant::from_stored(level.into(), &json), mixed);
        assert_eq!(Grant::server_admin().to_stored(), (5, "{}".to_string()));
        // Broken or hostile rows give no rights.
        for (l, p) in [
            (3, "not json"),
            (3, "42"),
            (9, r#"["mine"]"#),
            (-1, r#"["mine"]"#),
            (0, r#"{"mine":5}"#),
            (0, r#"{"mine":"4"}"#),
            (0, r#"{"mine":400}"#),
        ] {
            let got = Grant::from_stored(l, p);
            assert!(!got.may(Action::View, "mine"), "{l} {p}: {got:?}");
            assert!(!got.server_admin);
        }
    }

    #[test]
    fn admins_manage_only_users_below_them_on_their_own_projects() {
        let admin = g(Level::Admin);
        assert_eq!(admin.managed_projects(&all()), vec!["mine".to_string()]);
        assert_eq!(g(Level::ServerAdmin).managed_projects(&all()), all());
        assert!(g(Level::Moderator).managed_projects(&all()).is_empty());
        assert!(admin.may_manage(&on(&[("mine", Level::Moderator)])));
        assert!(!admin.may_manage(&on(&[("other", Level::Moderator)])));
        assert!(
            !admin.may_manage(&on(&[("mine", Level::Admin)])),
            "peers are not managed"
        );
        assert!(!admin.may_manage(&Grant::server_admin()));
        assert!(g(Level::ServerAdmin).may_manage(&on(&[("other", Level::Admin)])));
        assert!(!g(Level::Moderator).may_manage(&on(&[("mine", Level::User)])));
        // An ADMIN elsewhere is still managed where it is below ADMIN, on that entry only.
        let mixed = on(&[("mine", Level::User), ("other", Level::Admin)]);
        assert!(admin.may_manage(&mixed));
        assert!(admin.may_change(&mixed, "mine") && !admin.may_change(&mixed, "other"));
        assert_eq!(admin.max_grantable(), Some(Level::Moderator));
        assert_eq!(g(Level::ServerAdmin).max_grantable(), Some(Level::Admin));
        assert_eq!(g(Level::Moderator).max_grantable(), None);
        assert!(admin.manages_users() && !g(Level::Moderator).manages_users());
    }

    /// The attack: an ADMIN of `mine` edits a user it shares with `other`.
    #[test]
    fn an_admin_never_changes_what_anyone_may_do_on_a_project_it_does_not_administer() {
        let admin = g(Level::Admin);
        let shared = on(&[("mine", Level::User), ("other", Level::User)]);
        // Raising the user on `other`, locking them out of it, or removing them: refused.
        for (ask, why) in [
            (
                change(&[("mine", Level::User), ("other", Level::Moderator)]),
                "MODERATOR on other",
            ),
            (
                change(&[("mine", Level::User), ("other", Level::NoAuth)]),
                "NO AUTH on other",
            ),
            (change(&[("other", Level::User)]), "other alone"),
        ] {
            let e = admin.edit(&shared, &ask, &all()).unwrap_err();
            assert!(
                e.contains("do not administer project `other`"),
                "{why}: {e}"
            );
        }
        for ask in [
            only(&[("other", Some(Level::Moderator))]),
            only(&[("other", None)]),
            only(&[("mine", Some(Level::Moderator)), ("other", None)]),
        ] {
            let e = admin.edit(&shared, &ask, &all()).unwrap_err();
            assert!(
                e.contains("do not administer project `other`"),
                "{ask:?}: {e}"
            );
        }
        assert!(admin.may_remove(&shared).is_err());
        // The per-project shape changes only what it names.
        let triple = on(&[
            ("mine", Level::User),
            ("other", Level::User),
            ("third", Level::User),
        ]);
        let admin13 = on(&[("mine", Level::Admin), ("third", Level::Admin)]);
        assert_eq!(
            admin13
                .edit(&triple, &only(&[("mine", Some(Level::Moderator))]), &all())
                .unwrap(),
            on(&[
                ("mine", Level::Moderator),
                ("other", Level::User),
                ("third", Level::User)
            ])
        );
        assert_eq!(
            admin13
                .edit(&triple, &only(&[("third", None)]), &all())
                .unwrap(),
            on(&[("mine", Level::User), ("other", Level::User)])
        );
        // What it may do: change `mine`, up to MODERATOR; `other` stays exactly as it was.
        let raised = admin
            .edit(&shared, &change(&[("mine", Level::Moderator)]), &all())
            .unwrap();
        assert_eq!(
            raised,
            on(&[("mine", Level::Moderator), ("other", Level::User)])
        );
        let dropped = admin.edit(&shared, &change(&[]), &all()).unwrap();
        assert_eq!(dropped, on(&[("other", Level::User)]));
        assert!(admin
            .edit(&shared, &change(&[("mine", Level::Admin)]), &all())
            .unwrap_err()
            .contains("MODERATOR at most"));
        // An ADMIN entry of a peer on its own project is out of reach, even through a shared
        // project where the peer is below ADMIN.
        let peer = on(&[("mine", Level::Admin), ("third", Level::User)]);
        let admin2 = on(&[("mine", Level::Admin), ("third", Level::Admin)]);
        let kept = admin2
            .edit(&peer, &change(&[("third", Level::Moderator)]), &all())
            .unwrap();
        assert_eq!(
            kept,
            on(&[("mine", Level::Admin), ("third", Level::Moderator)])
        );
        assert!(admin2
            .edit(&peer, &change(&[("mine", Level::User)]), &all())
            .unwrap_err()
            .contains("only a SERVER ADMIN changes an ADMIN"));
        // SERVER ADMIN is the SERVER ADMIN's to give.
        let promote = Change {
            server_admin: Some(true),
            ..Change::default()
        };
        assert!(admin.edit(&shared, &promote, &all()).is_err());
        let root = Grant::server_admin();
        assert_eq!(
            root.edit(&shared, &promote, &all()).unwrap(),
            Grant::server_admin()
        );
        // Unknown projects and a per-project SERVER ADMIN are refused.
        assert!(root
            .edit(&shared, &change(&[("ghost", Level::User)]), &all())
            .is_err());
        assert!(root
            .edit(&shared, &change(&[("mine", Level::ServerAdmin)]), &all())
            .is_err());
        // A SERVER ADMIN's form covers every project.
        assert_eq!(
            root.edit(&shared, &change(&[("other", Level::Admin)]), &all())
                .unwrap(),
            on(&[("other", Level::Admin)])
        );
        // Lower levels change nothing.
        assert!(g(Level::Moderator)
            .edit(&shared, &change(&[("mine", Level::User)]), &all())
            .is_err());
    }

    #[test]
    fn new_users_and_removal() {
        let admin = g(Level::Admin);
        assert_eq!(
            admin
                .create(&change(&[("mine", Level::User)]), &all())
                .unwrap(),
            on(&[("mine", Level::User)])
        );
        assert!(admin.create(&change(&[]), &all()).is_err(), "no project");
        assert!(admin
            .create(&change(&[("other", Level::User)]), &all())
            .is_err());
        assert!(Grant::server_admin().create(&change(&[]), &all()).is_ok());
        assert!(admin.may_remove(&on(&[("mine", Level::User)])).is_ok());
        assert!(admin.may_remove(&on(&[("mine", Level::Admin)])).is_err());
        assert!(admin.may_remove(&Grant::server_admin()).is_err());
        assert!(Grant::server_admin()
            .may_remove(&on(&[("other", Level::Admin)]))
            .is_ok());
    }

    #[test]
    fn levels_round_trip() {
        for n in 0..=5u8 {
            assert_eq!(u8::from(Level::try_from(n).unwrap()), n);
        }
        assert!(Level::try_from(6).is_err());
    }
}
