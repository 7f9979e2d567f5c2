//! Passwords (argon2id with OWASP's parameters: m = 19 MiB, t = 2, p = 1), random secrets, and
//! token hashing. A password or token is never stored in the clear.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use sha2::Digest;

/// Hashes a password with argon2id and a random salt, in PHC string form.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Checks a password against a stored hash (constant time inside argon2).
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordVerifier::<str>::verify_password(&Argon2::default(), password.as_bytes(), hash).is_ok()
}

/// A random secret of `bytes` bytes, URL-safe.
pub fn random_secret(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A printable random password for new accounts.
pub fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut r = rand::rng();
    (0..20)
        .map(|_| CHARS[r.random_range(0..CHARS.len())] as char)
        .collect()
}

/// How tokens and session ids are kept: SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Minimum password length accepted for new passwords.
pub const MIN_PASSWORD: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&h, "correct horse battery"));
        assert!(!verify_password(&h, "correct horse battery!"));
        assert!(!verify_password("not a hash", "x"));
        assert_ne!(
            hash_password("same").unwrap(),
            hash_password("same").unwrap()
        );
    }

    #[test]
    fn secrets_are_random_and_long() {
        assert_eq!(random_secret(32).len(), 64);
        assert_ne!(random_secret(32), random_secret(32));
        assert_eq!(random_password().len(), 20);
        assert_eq!(token_hash("abc").len(), 64);
    }
}
