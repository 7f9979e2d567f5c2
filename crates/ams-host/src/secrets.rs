//! Per-project secrets held by the host, never in a repository: set, listed (names only) and
//! removed by the operator (`amsbuild secret`) and by the project's ADMINs (web, API), opened
//! only for a build that may receive them and for masking.
//!
//! Values are sealed with XChaCha20-Poly1305 (a random 24-byte nonce per value; the project and
//! name as associated data) under a 32-byte key in the data directory's `secrets.key`, created
//! 0600 on first use. The database holds only sealed values. A missing key while secrets are
//! stored, a replaced key or a damaged row is an error that says so, never an empty value.
//! Nothing here logs a value, and no function returns one except [`open_for_build`] (to the
//! worker, which gives them to the container's environment and to its masker) and
//! [`project_masker`].

use crate::error::HostError;
use crate::paths::DataDir;
use ams_core::mask::Masker;
use ams_core::secrets as rules;
use ams_store::{SealedSecret, SecretInfo, SecretLimits, Store};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::Arc;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
/// The tag each sealed value carries beyond the value.
const TAG_LEN: usize = 16;

/// The project limits, as the store checks them when a secret is written.
const LIMITS: SecretLimits = SecretLimits {
    max_count: rules::MAX_PER_PROJECT,
    max_bytes: rules::MAX_PROJECT_BYTES,
    overhead: TAG_LEN,
};

/// The key that seals every secret of a data directory. Its bytes are never shown.
struct Key([u8; KEY_LEN]);

impl Key {
    /// A short public name of the key (a hash), stored beside each sealed value.
    fn id(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"ams-build secrets key id\0");
        h.update(self.0);
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }
}

fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Reads the key file; `None` when there is none. A link, a file of another size or one that
/// cannot be read is an error naming the file.
fn read_key(data: &DataDir) -> Result<Option<Key>, String> {
    let path = data.secrets_key();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut bytes = Vec::with_capacity(KEY_LEN + 1);
    (&mut f)
        .take(KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
        format!(
            "{} is damaged ({} bytes; a key is {KEY_LEN}); restore it from a backup",
            path.display(),
            bytes.len()
        )
    })?;
    Ok(Some(Key(key)))
}

/// The message for a key file that is missing while secrets are stored.
fn missing_key(data: &DataDir, stored: i64) -> String {
    format!(
        "{} is missing, but the database holds {stored} secret(s) sealed with it: restore the \
         key file from a backup of the data directory, or remove the secrets (amsbuild secret \
         rm PROJECT NAME) and set them again",
        data.secrets_key().display()
    )
}

/// Creates the key file (0600, whole or not at all): written under a temporary name, then
/// linked into place, so that two processes creating it at once agree on one key.
fn create_key(data: &DataDir) -> Result<Key, String> {
    let path = data.secrets_key();
    let tmp = data
        .root()
        .join(format!(".secrets.key.{}", crate::worker::random_hex(8)));
    let key = Key(random());
    let made = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&key.0)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match made {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(data.root()) {
                let _ = dir.sync_all();
            }
            tracing::info!("created the secrets key {}", path.display());
            Ok(key)
        }
        // Another process made it first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(data)?
            .ok_or_else(|| format!("cannot read {} after it was created", path.display())),
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

/// The key for reading stored secrets.
async fn key_to_open(data: &DataDir, store: &Store) -> Result<Key, HostError> {
    match read_key(data).map_err(HostError::Unavailable)? {
        Some(k) => Ok(k),
        None => {
            let stored = store.secret_count().await?;
            Err(HostError::Unavailable(missing_key(data, stored)))
        }
    }
}

/// The key for sealing a new value: created on first use, unless secrets are stored already
/// (then the key was lost, and a new one would silently orphan them).
async fn key_to_seal(data: &DataDir, store: &Store) -> Result<Key, HostError> {
    if let Some(k) = read_key(data).map_err(HostError::Unavailable)? {
        return Ok(k);
    }
    let stored = store.secret_count().await?;
    if stored > 0 {
        return Err(HostError::Unavailable(missing_key(data, stored)));
    }
    create_key(data).map_err(HostError::Unavailable)
}

fn check_project(data: &DataDir, project: &str) -> Result<(), HostError> {
    if crate::project::exists(data, project) {
        Ok(())
    } else {
        Err(HostError::NotFound(format!("no project named `{project}`")))
    }
}

/// Sets (or replaces) a secret of a project. `by` is who set it, as listed later.
pub async fn set(
    data: &DataDir,
    store: &Store,
    project: &str,
    name: &str,
    value: &str,
    by: &str,
) -> Result<(), HostError> {
    check_project(data, project)?;
    rules::validate_name(name).map_err(HostError::Invalid)?;
    rules::validate_value(value)
        .map_err(|e| HostError::Invalid(format!("secret {name} was not set: {e}")))?;
    let key = key_to_seal(data, store).await?;
    let nonce: [u8; NONCE_LEN] = random();
    let ad = rules::associated_data(project, name);
    let sealed = key
        .cipher()
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: value.as_bytes(),
                aad: &ad,
            },
        )
        .map_err(|_| HostError::Internal("sealing a secret failed".into()))?;
    let row = SealedSecret {
        project: project.to_string(),
        name: name.to_string(),
        key_id: key.id(),
        nonce: nonce.to_vec(),
        sealed,
        set_at: crate::timefmt::now(),
        set_by: by.to_string(),
    };
    store.put_secret(&row, LIMITS).await.map_err(|e| match e {
        ams_store::StoreError::Invalid(m) => HostError::Invalid(m),
        e => HostError::store(e),
    })
}

/// A project's secrets: names, when and by whom they were set. Never values.
pub async fn list(
    data: &DataDir,
    store: &Store,
    project: &str,
) -> Result<Vec<SecretInfo>, HostError> {
    check_project(data, project)?;
    Ok(store.secrets_of(project).await?)
}

/// Removes a secret; `NotFound` when the project has none of that name.
pub async fn remove(
    data: &DataDir,
    store: &Store,
    project: &str,
    name: &str,
) -> Result<(), HostError> {
    check_project(data, project)?;
    rules::validate_name(name).map_err(HostError::Invalid)?;
    if store.remove_secret(project, name).await? {
        Ok(())
    } else {
        Err(HostError::NotFound(format!(
            "project `{project}` has no secret named {name}"
        )))
    }
}

/// Opens one sealed value, or says why it cannot be opened.
fn open(key: &Key, s: &SealedSecret, data: &DataDir) -> Result<String, String> {
    let what = format!("secret {} of project {}", s.name, s.project);
    if s.key_id != key.id() {
        return Err(format!(
            "{what} was sealed with another key than {} holds (the key file was replaced); \
             restore the key it was set with, or set the secret again",
            data.secrets_key().display()
        ));
    }
    let nonce: [u8; NONCE_LEN] = s
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| format!("{what} is damaged in the database; set it again"))?;
    let ad = rules::associated_data(&s.project, &s.name);
    let plain = key
        .cipher()
        .decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &s.sealed,
                aad: &ad,
            },
        )
        .map_err(|_| {
            format!("{what} does not open (damaged or moved in the database); set it again")
        })?;
    String::from_utf8(plain).map_err(|_| format!("{what} is damaged in the database; set it again"))
}

/// The error for a secret pipeline.json asks for that the project does not have.
pub fn unknown(project: &str, name: &str) -> String {
    format!(
        "pipeline.json: field `secrets`: project {project} has no secret named {name}; set it \
         with `amsbuild secret set {project} {name}` (the value on standard input) or on the \
         project's admin page, or remove it from `secrets`"
    )
}

/// The values of the secrets `names` of a project, in that order, for a build. A name the
/// project does not have is an error that names it and says how to set it.
pub async fn open_for_build(
    data: &DataDir,
    store: &Store,
    project: &str,
    names: &[String],
) -> Result<Vec<(String, String)>, String> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let stored = store
        .sealed_secrets(project)
        .await
        .map_err(|e| format!("cannot read the project's secrets: {e}"))?;
    let mut wanted = Vec::new();
    for n in names {
        match stored.iter().find(|s| &s.name == n) {
            Some(s) => wanted.push(s),
            None => return Err(unknown(project, n)),
        }
    }
    let key = key_to_open(data, store).await.map_err(|e| e.to_string())?;
    wanted
        .into_iter()
        .map(|s| Ok((s.name.clone(), open(&key, s, data)?)))
        .collect()
}

/// A masker of every secret of a project (for text about its builds that leaves the host,
/// such as notifications); `None` when it has none.
pub async fn project_masker(
    data: &DataDir,
    store: &Store,
    project: &str,
) -> Result<Option<Arc<Masker>>, String> {
    let stored = store
        .sealed_secrets(project)
        .await
        .map_err(|e| format!("cannot read the project's secrets: {e}"))?;
    if stored.is_empty() {
        return Ok(None);
    }
    let key = key_to_open(data, store).await.map_err(|e| e.to_string())?;
    let values = stored
        .iter()
        .map(|s| open(&key, s, data))
        .collect::<Result<Vec<_>, _>>()?;
    masker(values).await
}

/// Builds a masker off the async threads (a large value takes a moment).
pub async fn masker(values: Vec<String>) -> Result<Option<Arc<Masker>>, String> {
    if values.is_empty() {
        return Ok(None);
    }
    tokio::task::spawn_blocking(move || Masker::new(&values))
        .await
        .map_err(|e| format!("cannot build the secret masker: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn setup() -> (tempfile::TempDir, DataDir, Store) {
        let t = tempfile::tempdir().unwrap();
        let data = DataDir::new(t.path().join("data"));
        data.create().unwrap();
        crate::project::init(&data, "p").unwrap();
        crate::project::init(&data, "q").unwrap();
        let store = Store::open(&data.db()).await.unwrap();
        (t, data, store)
    }

    #[tokio::test]
    async fn values_are_sealed_bound_to_project_and_name_and_opened_only_with_the_key() {
        let (_t, data, store) = setup().await;
        let value = "hunter2-but-longer";
        set(&data, &store, "p", "TOKEN", value, "alice")
            .await
            .unwrap();
        set(&data, &store, "p", "OTHER", "another value", "bob")
            .await
            .unwrap();
        let mode = std::fs::metadata(data.secrets_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let got = open_for_build(&data, &store, "p", &["TOKEN".into()])
            .await
            .unwrap();
        assert_eq!(got, vec![("TOKEN".to_string(), value.to_string())]);
        // A nonce per value: the same value sealed twice differs.
        set(&data, &store, "q", "TOKEN", value, "alice")
            .await
            .unwrap();
        let (a, b) = (
            store.sealed_secrets("p").await.unwrap(),
            store.sealed_secrets("q").await.unwrap(),
        );
        let pa = a.iter().find(|s| s.name == "TOKEN").unwrap();
        assert_ne!(pa.nonce, b[0].nonce);
        assert_ne!(pa.sealed, b[0].sealed);
        assert!(!pa
            .sealed
            .windows(value.len())
            .any(|w| w == value.as_bytes()));
        // A sealed value moved to another name or project does not open.
        let mut moved = pa.clone();
        moved.name = "OTHER".into();
        store.put_secret(&moved, LIMITS).await.unwrap();
        let e = open_for_build(&data, &store, "p", &["OTHER".into()])
            .await
            .unwrap_err();
        assert!(e.contains("does not open"), "{e}");
        // Unknown names are named with the fix.
        let e = open_for_build(&data, &store, "p", &["NOPE".into()])
            .await
            .unwrap_err();
        assert!(
            e.contains("no secret named NOPE") && e.contains("amsbuild secret set p NOPE"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_missing_or_replaced_key_is_an_error_never_an_empty_value() {
        let (_t, data, store) = setup().await;
        set(&data, &store, "p", "TOKEN", "a value of length", "alice")
            .await
            .unwrap();
        let key = std::fs::read(data.secrets_key()).unwrap();
        std::fs::remove_file(data.secrets_key()).unwrap();
        let e = open_for_build(&data, &store, "p", &["TOKEN".into()])
            .await
            .unwrap_err();
        assert!(
            e.contains("secrets.key is missing") && e.contains("1 secret"),
            "{e}"
        );
        // Setting another secret does not make a new key that would orphan the stored ones.
        let e = set(&data, &store, "p", "NEW", "another value", "alice")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is missing"), "{e}");
        assert!(!data.secrets_key().exists());
        // Another key: said so.
        std::fs::write(data.secrets_key(), [7u8; KEY_LEN]).unwrap();
        let e = open_for_build(&data, &store, "p", &["TOKEN".into()])
            .await
            .unwrap_err();
        assert!(e.contains("another key"), "{e}");
        std::fs::write(data.secrets_key(), &key[..10]).unwrap();
        let e = open_for_build(&data, &store, "p", &["TOKEN".into()])
            .await
            .unwrap_err();
        assert!(e.contains("damaged"), "{e}");
        std::fs::write(data.secrets_key(), &key).unwrap();
        assert!(open_for_build(&data, &store, "p", &["TOKEN".into()])
            .await
            .is_ok());
        // Without secrets, no key is needed.
        remove(&data, &store, "p", "TOKEN").await.unwrap();
        std::fs::remove_file(data.secrets_key()).unwrap();
        assert!(project_masker(&data, &store, "p").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn names_values_and_projects_are_checked() {
        let (_t, data, store) = setup().await;
        let e = set(&data, &store, "p", "TOKEN", "short", "a")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("too short to mask"), "{e}");
        assert_eq!(e.http_status(), 400);
        let e = set(&data, &store, "p", "bad-name", "long enough value", "a")
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 400);
        let e = set(&data, &store, "nope", "TOKEN", "long enough value", "a")
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 404);
        assert!(
            !data.secrets_key().exists(),
            "no key is made for a refused value"
        );
        let e = remove(&data, &store, "p", "TOKEN").await.unwrap_err();
        assert_eq!(e.http_status(), 404);
    }
}
