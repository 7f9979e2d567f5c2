//! Build statuses and the rule that derives a finished build's status from its stages.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a build is in its life. The first two are live; the rest are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Waiting in the queue for a slot.
    Pending,
    /// Holding a slot: preparing, running stages or cleaning up.
    Running,
    /// Every stage passed.
    Pass,
    /// Every stage failed, or the build failed before its stages.
    Fail,
    /// Some stages passed and some failed.
    Warn,
    /// Canceled by a user.
    Cancel,
    /// Not run, for example superseded by a newer build of the same branch.
    Skip,
    /// A fake build (`"dummy-build": true`) that ran no container.
    Dummy,
    /// Ended by a failure outside the project's control: the Docker engine unreachable or
    /// failing, the image missing, the host's disk full, the host restarted mid-build.
    Error,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 9] = [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Pass,
        BuildStatus::Fail,
        BuildStatus::Warn,
        BuildStatus::Cancel,
        BuildStatus::Skip,
        BuildStatus::Dummy,
        BuildStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "pending",
            BuildStatus::Running => "running",
            BuildStatus::Pass => "pass",
            BuildStatus::Fail => "fail",
            BuildStatus::Warn => "warn",
            BuildStatus::Cancel => "cancel",
            BuildStatus::Skip => "skip",
            BuildStatus::Dummy => "dummy",
            BuildStatus::Error => "error",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, BuildStatus::Pending | BuildStatus::Running)
    }

    /// The status of a build whose stages all ran, from each stage's pass/fail.
    /// No stage at all cannot happen (validation refuses an empty pipeline) and counts as FAIL.
    pub fn from_stage_results(passed: &[bool]) -> BuildStatus {
        let ok = passed.iter().filter(|p| **p).count();
        if passed.is_empty() || ok == 0 {
            BuildStatus::Fail
        } else if ok == passed.len() {
            BuildStatus::Pass
        } else {
            BuildStatus::Warn
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().to_ascii_uppercase())
    }
}

impl FromStr for BuildStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        BuildStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == lower)
            .ok_or_else(|| format!("unknown build status `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_rules() {
        assert_eq!(
            BuildStatus::from_stage_results(&[true, true]),
            BuildStatus::Pass
        );
        assert_eq!(
            BuildStatus::from_stage_results(&[false, false]),
            BuildStatus::Fail
        );
        assert_eq!(
            BuildStatus::from_stage_results(&[true, false]),
            BuildStatus::Warn
        );
        assert_eq!(
            BuildStatus::from_stage_results(&[false, true]),
            BuildStatus::Warn
        );
        assert_eq!(BuildStatus::from_stage_results(&[]), BuildStatus::Fail);
    }

    #[test]
    fn round_trips_text() {
        for s in BuildStatus::ALL {
            assert_eq!(s.as_str().parse::<BuildStatus>().unwrap(), s);
            assert_eq!(s.to_string().parse::<BuildStatus>().unwrap(), s);
        }
        assert!("bogus".parse::<BuildStatus>().is_err());
        assert!(!BuildStatus::Running.is_final());
        assert!(BuildStatus::Skip.is_final());
    }
}
