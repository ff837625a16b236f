//! Secrets at rest: git tokens (`config.token`) are sealed (AES-256-GCM, `ring`) before the
//! conductor's store or a node's files hold them, with a key kept in a 0600 file beside them
//! (`secrets.key`: 32 random bytes). A stolen database or state file alone reveals no token.
//!
//! A sealed value is the text `sealed:v1:<base64url, no padding, of nonce || ciphertext+tag>`
//! with a fresh random 96-bit nonce per value and a fixed associated-data label. A value that
//! does not start with the prefix is plaintext written by an older version: [`SealKey::open`]
//! returns it as is, and the next write seals it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use data_encoding::BASE64URL_NOPAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;

/// File name of the key, in the conductor's storage folder and in a node's work dir.
pub const KEY_FILE: &str = "secrets.key";
/// What every sealed value starts with.
pub const PREFIX: &str = "sealed:v1:";
/// Length of a key file.
pub const KEY_LEN: usize = 32;
/// Associated data of every sealed value: a value sealed for another purpose does not open.
const LABEL: &[u8] = b"symphony secret v1";

/// Why a key could not be loaded, or a value sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read, created or fixed.
    #[error("secrets key {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold exactly [`KEY_LEN`] bytes.
    #[error("secrets key {}: {len} bytes, expected {KEY_LEN} (not a key file, or damaged)", path.display())]
    BadLength { path: PathBuf, len: usize },
    /// The system's random source failed.
    #[error("no randomness available for sealing")]
    Random,
    /// A sealed value is not valid base64 or is too short.
    #[error("sealed value is malformed")]
    Malformed,
    /// A sealed value does not open with this key: another key sealed it, or it was altered.
    #[error("sealed value does not open with the key {key} (sealed with another key, or altered)")]
    Unopenable {
        /// The key file (or "an in-memory key").
        key: String,
    },
}

/// The key that seals secrets. Cheap to clone; `Debug` shows only where it came from.
#[derive(Clone)]
pub struct SealKey {
    key: LessSafeKey,
    bytes: [u8; KEY_LEN],
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Two keys are equal when they seal alike (configuration comparisons only).
impl PartialEq for SealKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for SealKey {}

impl SealKey {
    /// Reads the key in `path`, or creates it (32 random bytes, 0600, written to a temporary
    /// file and linked into place, so a key is never half written and never replaced). An
    /// existing file readable by others is narrowed to 0600, with a warning; one of the wrong
    /// length is an error naming it (a key is never silently regenerated: tokens sealed with
    /// the old one would be lost).
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "secrets key readable by others; setting it to 0600");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
                Self::from_bytes(&bytes, Some(path.to_owned())).ok_or(SealError::BadLength {
                    path: path.to_owned(),
                    len: bytes.len(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| SealError::Random)?;
                create_new_private(path, &bytes).map_err(io)?;
                // Another process may have created it first: use whichever is on disk.
                Self::load_existing(path)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn load_existing(path: &Path) -> Result<Self, SealError> {
        let bytes = std::fs::read(path).map_err(|source| SealError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes, Some(path.to_owned())).ok_or(SealError::BadLength {
            path: path.to_owned(),
            len: bytes.len(),
        })
    }

    /// A fresh random key kept in memory only (tests, an in-memory store).
    pub fn generate() -> Result<Self, SealError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealError::Random)?;
        Self::from_bytes(&bytes, None).ok_or(SealError::Random)
    }

    fn from_bytes(bytes: &[u8], path: Option<PathBuf>) -> Option<Self> {
        let bytes: [u8; KEY_LEN] = bytes.try_into().ok()?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).ok()?);
        Some(Self { key, bytes, path })
    }

    /// The key file, if the key has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Where the key lives, for messages.
    pub fn describe(&self) -> String {
        self.path.as_ref().map_or_else(
            || "an in-memory key".to_owned(),
            |p| p.display().to_string(),
        )
    }

    /// `plaintext` sealed: `sealed:v1:...`, different every time.
    pub fn seal(&self, plaintext: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut in_out = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(LABEL),
                &mut in_out,
            )
            .map_err(|_| SealError::Random)?;
        let mut raw = Vec::with_capacity(NONCE_LEN + in_out.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&in_out);
        Ok(format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&raw)))
    }

    /// The plaintext of a sealed value; a value without the prefix (written before secrets
    /// were sealed) is returned as is.
    pub fn open(&self, value: &str) -> Result<String, SealError> {
        let Some(encoded) = value.strip_prefix(PREFIX) else {
            return Ok(value.to_owned());
        };
        let mut raw = BASE64URL_NOPAD
            .decode(encoded.as_bytes())
            .map_err(|_| SealError::Malformed)?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Malformed);
        }
        let nonce = Nonce::try_assume_unique_for_key(&raw[..NONCE_LEN])
            .map_err(|_| SealError::Malformed)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(LABEL), &mut raw[NONCE_LEN..])
            .map_err(|_| SealError::Unopenable {
                key: self.describe(),
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed)
    }

    /// Seals a JSON token in place: a plaintext string is sealed; null, a sealed string (kept as
    /// it is, even one this key cannot open) and other values are left alone.
    pub fn seal_value(&self, token: &mut Value) -> Result<(), SealError> {
        if let Value::String(s) = token
            && !is_sealed(s)
        {
            *s = self.seal(s)?;
        }
        Ok(())
    }

    /// Opens a JSON token in place. On an error the value is left sealed.
    pub fn open_value(&self, token: &mut Value) -> Result<(), SealError> {
        if let Value::String(s) = token
            && is_sealed(s)
        {
            *s = self.open(s)?;
        }
        Ok(())
    }

    /// Seals an optional token in place (as [`Self::seal_value`]).
    pub fn seal_option(&self, token: &mut Option<String>) -> Result<(), SealError> {
        if let Some(s) = token
            && !is_sealed(s)
        {
            *s = self.seal(s)?;
        }
        Ok(())
    }

    /// Opens an optional token in place. On an error the value is left sealed.
    pub fn open_option(&self, token: &mut Option<String>) -> Result<(), SealError> {
        if let Some(s) = token
            && is_sealed(s)
        {
            *s = self.open(s)?;
        }
        Ok(())
    }
}

/// Whether `value` is a sealed value (it may still not open).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX)
}

/// Creates `path` with `bytes`, 0600, only if it does not exist: a temporary file is written
/// and synced, then hard-linked into place (which fails if `path` exists: the caller then
/// reads what is there).
fn create_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    };
    let done = write();
    let _ = std::fs::remove_file(&tmp);
    done
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn seal_then_open_gives_the_plaintext_back() {
        let key = SealKey::generate().unwrap();
        let sealed = key.seal("ghp_s3cret").unwrap();
        assert!(sealed.starts_with(PREFIX), "{sealed}");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(key.open(&sealed).unwrap(), "ghp_s3cret");
        // A fresh nonce every time.
        assert_ne!(key.seal("ghp_s3cret").unwrap(), sealed);
        assert_eq!(key.open(&key.seal("").unwrap()).unwrap(), "");
        // Plaintext from before sealing is accepted as is.
        assert_eq!(key.open("old-plain").unwrap(), "old-plain");
    }

    #[test]
    fn an_altered_value_does_not_open() {
        let key = SealKey::generate().unwrap();
        let sealed = key.seal("ghp_s3cret").unwrap();
        let mut raw = BASE64URL_NOPAD
            .decode(&sealed.as_bytes()[PREFIX.len()..])
            .unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            let altered = format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&raw));
            assert!(
                matches!(key.open(&altered), Err(SealError::Unopenable { .. })),
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        assert!(matches!(
            key.open(&format!("{PREFIX}AAAA")),
            Err(SealError::Malformed)
        ));
        assert!(matches!(
            key.open(&format!("{PREFIX}not base64!")),
            Err(SealError::Malformed)
        ));
    }

    #[test]
    fn another_key_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = SealKey::load_or_create(&dir.path().join("a.key")).unwrap();
        let b = SealKey::generate().unwrap();
        let sealed = a.seal("ghp_s3cret").unwrap();
        let err = b.open(&sealed).unwrap_err();
        assert!(matches!(err, SealError::Unopenable { .. }));
        let err = SealKey::load_or_create(&dir.path().join("b.key"))
            .unwrap()
            .open(&sealed)
            .unwrap_err();
        assert!(err.to_string().contains("b.key"), "{err}");
        // The value is left sealed in place.
        let mut v = Value::String(sealed.clone());
        assert!(b.open_value(&mut v).is_err());
        assert_eq!(v, Value::String(sealed));
    }

    #[test]
    fn the_key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(KEY_FILE);
        let first = SealKey::load_or_create(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_LEN);
        let sealed = first.seal("t").unwrap();
        let again = SealKey::load_or_create(&path).unwrap();
        assert_eq!(again, first);
        assert_eq!(again.open(&sealed).unwrap(), "t");
        assert_eq!(again.path(), Some(path.as_path()));
        // Nothing but the key is left in the folder.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);
        // A key file others can read is narrowed, not replaced.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(SealKey::load_or_create(&path).unwrap(), first);
        assert_eq!(mode(&path), 0o600);
        // The key never shows in Debug.
        assert!(!format!("{first:?}").contains(&format!("{:?}", first.bytes)));
    }

    #[test]
    fn a_key_file_of_the_wrong_length_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, b"too short").unwrap();
        let err = SealKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, SealError::BadLength { len: 9, .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        // Not replaced.
        assert_eq!(std::fs::read(&path).unwrap(), b"too short");
    }

    #[test]
    fn json_and_option_tokens() {
        let key = SealKey::generate().unwrap();
        let mut v = Value::String("tok".into());
        key.seal_value(&mut v).unwrap();
        let sealed = v.clone();
        // Sealing twice keeps the first seal.
        key.seal_value(&mut v).unwrap();
        assert_eq!(v, sealed);
        key.open_value(&mut v).unwrap();
        assert_eq!(v, Value::String("tok".into()));
        let mut null = Value::Null;
        key.seal_value(&mut null).unwrap();
        assert_eq!(null, Value::Null);
        let mut o = Some("tok".to_owned());
        key.seal_option(&mut o).unwrap();
        assert!(o.as_deref().is_some_and(is_sealed));
        key.open_option(&mut o).unwrap();
        assert_eq!(o.as_deref(), Some("tok"));
        let mut none = None;
        key.seal_option(&mut none).unwrap();
        assert_eq!(none, None);
    }
}
