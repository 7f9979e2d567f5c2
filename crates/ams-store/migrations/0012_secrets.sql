-- Per-project secrets, sealed: `sealed` is the value encrypted and authenticated with
-- XChaCha20-Poly1305 under the key in the data directory's `secrets.key`, with `nonce` (random
-- per value) and the project and name as associated data, so the database never holds a value
-- in the clear and a row moved to another project or name does not open. `key_id` names the
-- key a value was sealed with (a hash of it), so a replaced key file is told apart from a
-- damaged row.
CREATE TABLE IF NOT EXISTS secrets (
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL,
    set_at REAL NOT NULL,
    set_by TEXT NOT NULL,
    PRIMARY KEY (project, name)
);
