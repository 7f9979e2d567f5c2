//! The six access levels of the described system and what each may do.

use serde::{Deserialize, Serialize};

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
}

/// A user's rights: a level and the projects it is assigned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub level: Level,
    pub projects: Vec<String>,
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
}

impl Grant {
    /// Whether the user may log in to the web interface or use the API at all.
    pub fn can_log_in(&self) -> bool {
        !matches!(self.level, Level::NoAuth | Level::Webhook)
    }

    fn assigned(&self, project: &str) -> bool {
        self.level == Level::ServerAdmin || self.projects.iter().any(|p| p == project)
    }

    /// Whether the user may do `action` on `project`.
    pub fn may(&self, action: Action, project: &str) -> bool {
        if !self.can_log_in() || !self.assigned(project) {
            return false;
        }
        match action {
            Action::View => self.level >= Level::User,
            Action::Operate => self.level >= Level::Moderator,
            Action::ManageUsers | Action::SeeDeliveries => self.level >= Level::Admin,
        }
    }

    /// Creating projects and managing every user is the server admin's alone.
    pub fn is_server_admin(&self) -> bool {
        self.level == Level::ServerAdmin
    }

    /// Whether this user has a user management page at all.
    pub fn manages_users(&self) -> bool {
        self.can_log_in() && self.level >= Level::Admin
    }

    /// The projects whose membership this user manages (every project for SERVER ADMIN, which
    /// the caller supplies as `all`).
    pub fn managed_projects(&self, all: &[String]) -> Vec<String> {
        match self.level {
            Level::ServerAdmin => all.to_vec(),
            Level::Admin => self
                .projects
                .iter()
                .filter(|p| all.contains(p))
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether this user may see and change `target`: SERVER ADMIN anyone; ADMIN the users below
    /// its level that share one of its projects.
    pub fn may_manage(&self, target: &Grant) -> bool {
        match self.level {
            Level::ServerAdmin => true,
            Level::Admin => {
                target.level < Level::Admin
                    && target.projects.iter().any(|p| self.projects.contains(p))
            }
            _ => false,
        }
    }

    /// Whether this user may give `level` with `projects`: SERVER ADMIN anything; ADMIN levels
    /// below its own and only its own projects.
    pub fn may_grant(&self, level: Level, projects: &[String]) -> Result<(), String> {
        match self.level {
            Level::ServerAdmin => Ok(()),
            Level::Admin => {
                if level >= Level::Admin {
                    return Err(format!(
                        "an ADMIN may give MODERATOR at most, not {}",
                        level.name()
                    ));
                }
                match projects.iter().find(|p| !self.projects.contains(p)) {
                    Some(p) => Err(format!("you do not manage project `{p}`")),
                    None => Ok(()),
                }
            }
            _ => Err("only ADMIN and SERVER ADMIN manage users".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(level: Level) -> Grant {
        Grant {
            level,
            projects: vec!["mine".into()],
        }
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
            let other = level == Level::ServerAdmin;
            assert_eq!(u.may(View, "other"), other, "{level:?} other project");
        }
        assert!(!g(Level::Webhook).can_log_in());
        assert!(g(Level::ServerAdmin).is_server_admin());
        assert!(!g(Level::Admin).is_server_admin());
    }

    #[test]
    fn admins_manage_only_users_below_them_on_their_own_projects() {
        let admin = g(Level::Admin);
        let all = vec!["mine".to_string(), "other".to_string()];
        assert_eq!(admin.managed_projects(&all), vec!["mine".to_string()]);
        assert_eq!(g(Level::ServerAdmin).managed_projects(&all), all);
        assert!(g(Level::Moderator).managed_projects(&all).is_empty());
        let on = |level, p: &str| Grant {
            level,
            projects: vec![p.to_string()],
        };
        assert!(admin.may_manage(&on(Level::Moderator, "mine")));
        assert!(!admin.may_manage(&on(Level::Moderator, "other")));
        assert!(
            !admin.may_manage(&on(Level::Admin, "mine")),
            "peers are not managed"
        );
        assert!(!admin.may_manage(&on(Level::ServerAdmin, "mine")));
        assert!(g(Level::ServerAdmin).may_manage(&on(Level::Admin, "other")));
        assert!(!g(Level::Moderator).may_manage(&on(Level::User, "mine")));
        assert!(admin.may_grant(Level::Moderator, &["mine".into()]).is_ok());
        assert!(admin.may_grant(Level::Admin, &["mine".into()]).is_err());
        assert!(admin.may_grant(Level::User, &["other".into()]).is_err());
        assert!(g(Level::ServerAdmin)
            .may_grant(Level::ServerAdmin, &[])
            .is_ok());
        assert!(g(Level::Moderator).may_grant(Level::User, &[]).is_err());
        assert!(admin.manages_users() && !g(Level::Moderator).manages_users());
    }

    #[test]
    fn levels_round_trip() {
        for n in 0..=5u8 {
            assert_eq!(u8::from(Level::try_from(n).unwrap()), n);
        }
        assert!(Level::try_from(6).is_err());
    }
}
