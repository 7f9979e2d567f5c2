//! The data directory layout (docs/README.md) and its file modes, in one place.
//!
//! The data directory is the host user's alone (0700): the database, configs, logs and
//! archives inside it are created 0600, and the start warns about anything it finds looser.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Writes `bytes` to `path` as a file only the host's user may read or write (0600), also
/// when the file existed with a looser mode.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// Creates a folder (and its missing parents) only the host's user may enter (0700).
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// A warning for `path` when other users may read, write or enter it.
fn loose(path: &Path) -> Option<String> {
    let mode = std::fs::symlink_metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} is mode {mode:03o}: other users of this machine can reach it; run `chmod go-rwx {}`",
            path.display(),
            path.display()
        )
    })
}

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// The last scan of `projects/`, shared by the clones (see [`crate::project::list`]).
    pub(crate) listing: Arc<Mutex<crate::project::Listing>>,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir {
            root: root.into(),
            listing: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the data directory (0700) and its `projects/` folder if they are missing.
    pub fn create(&self) -> io::Result<()> {
        create_private_dir(&self.root)?;
        create_private_dir(&self.projects())
    }

    /// What other users of the machine could reach: the data directory itself, the database
    /// and its journal files, the host's configuration and id, and each project's private
    /// config folder and files. One warning per path, with the fix.
    pub fn loose_modes(&self) -> Vec<String> {
        let mut paths = vec![
            self.root.clone(),
            self.web_conf(),
            self.db(),
            self.root.join("ams.db-wal"),
            self.root.join("ams.db-shm"),
            self.host_id_file(),
            self.secrets_key(),
        ];
        if let Ok(rd) = std::fs::read_dir(self.projects()) {
            for e in rd.flatten() {
                let config = ProjectDir { root: e.path() }.config();
                if let Ok(files) = std::fs::read_dir(&config) {
                    paths.extend(files.flatten().map(|f| f.path()));
                }
                paths.push(config);
            }
        }
        paths.iter().filter_map(|p| loose(p)).collect()
    }

    pub fn web_conf(&self) -> PathBuf {
        self.root.join("web_conf.json")
    }

    pub fn db(&self) -> PathBuf {
        self.root.join("ams.db")
    }

    pub fn projects(&self) -> PathBuf {
        self.root.join("projects")
    }

    /// The control socket of a running host.
    pub fn socket(&self) -> PathBuf {
        self.root.join("amsbuild.sock")
    }

    /// File holding this data directory's random id, used to label its containers.
    pub fn host_id_file(&self) -> PathBuf {
        self.root.join("host-id")
    }

    /// The key that seals the projects' secrets (see `secrets`), created 0600 on first use.
    pub fn secrets_key(&self) -> PathBuf {
        self.root.join("secrets.key")
    }

    pub fn project(&self, name: &str) -> ProjectDir {
        ProjectDir {
            root: self.projects().join(name),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProjectDir {
    pub root: PathBuf,
}

impl ProjectDir {
    pub fn master(&self) -> PathBuf {
        self.root.join("master")
    }
    pub fn master_source(&self) -> PathBuf {
        self.master().join("project_source")
    }
    pub fn master_build(&self) -> PathBuf {
        self.master().join("build")
    }
    pub fn config(&self) -> PathBuf {
        self.master().join("config")
    }
    pub fn builds(&self) -> PathBuf {
        self.root.join("builds")
    }
    pub fn build(&self, build_name: &str) -> BuildDir {
        BuildDir {
            root: self.builds().join(build_name),
            archive: self.builds().join(format!("{build_name}.7z")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BuildDir {
    pub root: PathBuf,
    pub archive: PathBuf,
}

impl BuildDir {
    pub fn source(&self) -> PathBuf {
        self.root.join("project_source")
    }
    pub fn output(&self) -> PathBuf {
        self.root.join("build")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("output.txt")
    }
    /// Generated stage scripts, mounted read-only into the container.
    pub fn ci(&self) -> PathBuf {
        self.root.join(".ams-ci")
    }
}
