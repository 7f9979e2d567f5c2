//! The data directory layout of FORMATS.md, in one place.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
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
