//! Access control: bearer tokens, each with one role.
//!
//! - `reader` may read (GET);
//! - `writer` may send logs and audit events (POST), and nothing else, so a service's token
//!   cannot read other services' logs;
//! - `admin` may do everything, including deletes.
//!
//! Tokens come from `API_TOKENS` (`role:token,…`). With none configured, an admin token is
//! generated on first start into `DATA_DIR/admin-token` (mode 0600) and its path printed.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Role> {
        match text {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may perform an action that needs `required`.
    pub fn allows(self, required: Permission) -> bool {
        match required {
            Permission::Read => matches!(self, Role::Reader | Role::Admin),
            Permission::Write => matches!(self, Role::Writer | Role::Admin),
            Permission::Admin => self == Role::Admin,
        }
    }
}

/// What an endpoint needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Read,
    Write,
    Admin,
}

/// Who made a request: the role of its token and a stable, non-secret name for the token.
#[derive(Clone, Debug, Serialize)]
pub struct Caller {
    pub role: Role,
    /// 12 hex digits of a keyed hash of the token: identifies it in the audit trail without
    /// revealing it. The key is the installation's (in the database), so someone who reads
    /// the audit trail cannot test guesses of a token against it, as they could against a
    /// plain hash.
    pub token_id: String,
}

impl Caller {
    /// The caller when access control is off.
    pub fn anonymous() -> Caller {
        Caller {
            role: Role::Admin,
            token_id: "anonymous".into(),
        }
    }
}

/// The configured tokens, looked up by their SHA-256 so a lookup does not compare secrets
/// byte by byte.
#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    by_digest: HashMap<[u8; 32], (Role, String)>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token's name in the audit trail: 12 hex digits of SHA-256(key ‖ 0 ‖ token).
fn token_id(key: &str, token: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(key.as_bytes());
    hasher.update([0]);
    hasher.update(token.as_bytes());
    hasher.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TokenTable {
    /// Checks `role:token,role:token` (at start-up, before anything is opened).
    pub fn check(spec: &str) -> Result<(), String> {
        TokenTable::parse(spec, "").map(|_| ())
    }

    /// Parses `role:token,role:token`; tokens are named with `id_key` (see [`Caller`]).
    pub fn parse(spec: &str, id_key: &str) -> Result<TokenTable, String> {
        let mut table = TokenTable::default();
        for (i, item) in spec.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            let Some((role, token)) = item.split_once(':') else {
                return Err(format!("item {} is not role:token", i + 1));
            };
            let role = Role::parse(role.trim()).ok_or_else(|| {
                format!(
                    "item {}: unknown role {:?}; expected reader, writer or admin",
                    i + 1,
                    role.trim()
                )
            })?;
            let token = token.trim();
            if token.len() < 8 {
                return Err(format!(
                    "item {}: tokens must be at least 8 characters",
                    i + 1
                ));
            }
            table
                .by_digest
                .insert(digest(token), (role, token_id(id_key, token)));
        }
        if table.by_digest.is_empty() {
            return Err("no tokens given".into());
        }
        Ok(table)
    }

    pub fn caller(&self, token: &str) -> Option<Caller> {
        self.by_digest
            .get(&digest(token))
            .map(|(role, token_id)| Caller {
                role: *role,
                token_id: token_id.clone(),
            })
    }
}

/// Reads the generated admin token from the data directory, creating it on first start.
/// Returns the token and whether it was just created.
pub fn load_or_create_admin_token(data_dir: &Path) -> std::io::Result<(String, bool)> {
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 8 => return Ok((text.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path)?;
    file.write_all(token.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_specs_parse_into_roles_and_bad_ones_say_why() {
        let t =
            TokenTable::parse("reader:r-token-1, writer:w-token-1,admin:a-token-1", "k").unwrap();
        assert_eq!(t.caller("r-token-1").unwrap().role, Role::Reader);
        assert_eq!(t.caller("a-token-1").unwrap().role, Role::Admin);
        assert!(t.caller("nope-nope").is_none());
        assert_eq!(t.caller("w-token-1").unwrap().token_id.len(), 12);
        // The id is keyed: another installation names the same token differently, and
        // neither is the token's plain hash.
        let other = TokenTable::parse("writer:w-token-1", "other key").unwrap();
        assert_ne!(
            other.caller("w-token-1").unwrap().token_id,
            t.caller("w-token-1").unwrap().token_id
        );
        let plain: String = digest("w-token-1")[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_ne!(t.caller("w-token-1").unwrap().token_id, plain);
        assert!(
            TokenTable::parse("root:abcdefgh", "k")
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(
            TokenTable::parse("reader", "k")
                .unwrap_err()
                .contains("not role:token")
        );
        assert!(
            TokenTable::parse("reader:short", "k")
                .unwrap_err()
                .contains("at least 8")
        );
        assert!(TokenTable::parse(" , ", "k").is_err());
    }

    #[test]
    fn roles_allow_exactly_their_permissions() {
        assert!(Role::Reader.allows(Permission::Read));
        assert!(!Role::Reader.allows(Permission::Write));
        assert!(Role::Writer.allows(Permission::Write));
        assert!(!Role::Writer.allows(Permission::Read));
        assert!(!Role::Writer.allows(Permission::Admin));
        assert!(Role::Admin.allows(Permission::Read));
        assert!(Role::Admin.allows(Permission::Write));
        assert!(Role::Admin.allows(Permission::Admin));
    }

    #[test]
    fn the_generated_admin_token_is_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create_admin_token(dir.path()).unwrap();
        assert!(created);
        let (b, created) = load_or_create_admin_token(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("admin-token"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
