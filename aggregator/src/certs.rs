//! Development certificates for the agent ↔ aggregator mTLS link (`logging-aggregator certs`,
//! and on first start when no `TLS_*` files are configured). Production uses any CA, e.g.
//! cert-manager.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Where the generated files are.
#[derive(Clone, Debug)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub agent: PathBuf,
    pub agent_key: PathBuf,
}

impl CertPaths {
    pub fn in_dir(dir: &Path) -> CertPaths {
        CertPaths {
            ca: dir.join("ca.pem"),
            server: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            agent: dir.join("agent.pem"),
            agent_key: dir.join("agent-key.pem"),
        }
    }

    fn all_exist(&self) -> bool {
        [
            &self.ca,
            &self.server,
            &self.server_key,
            &self.agent,
            &self.agent_key,
        ]
        .iter()
        .all(|p| p.exists())
    }
}

/// The names the server certificate is valid for: local use, and the Kubernetes Service.
pub const SERVER_NAMES: [&str; 5] = [
    "localhost",
    "127.0.0.1",
    "logging-aggregator",
    "logging-aggregator.logging",
    "logging-aggregator.logging.svc",
];

fn write_file(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Generates a CA, a server certificate for `server_names` and an agent client certificate
/// named `agent_name`, and writes them into `dir`.
pub fn generate(
    dir: &Path,
    server_names: &[String],
    agent_name: &str,
) -> anyhow::Result<CertPaths> {
    std::fs::create_dir_all(dir)?;
    let paths = CertPaths::in_dir(dir);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "logging-service development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut server_params = CertificateParams::new(server_names.to_vec())?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "logging-aggregator");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca)?;

    let mut agent_params = CertificateParams::new(Vec::<String>::new())?;
    agent_params
        .distinguished_name
        .push(DnType::CommonName, agent_name);
    agent_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let agent_key = KeyPair::generate()?;
    let agent = agent_params.signed_by(&agent_key, &ca)?;

    write_file(&paths.ca, &ca.pem(), false)?;
    write_file(&dir.join("ca-key.pem"), &ca_key_pem, true)?;
    write_file(&paths.server, &server.pem(), false)?;
    write_file(&paths.server_key, &server_key.serialize_pem(), true)?;
    write_file(&paths.agent, &agent.pem(), false)?;
    write_file(&paths.agent_key, &agent_key.serialize_pem(), true)?;
    Ok(paths)
}

/// The development certificates in `dir`, generated there on first use.
pub fn development(dir: &Path) -> anyhow::Result<(CertPaths, bool)> {
    let paths = CertPaths::in_dir(dir);
    if paths.all_exist() {
        return Ok((paths, false));
    }
    let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    Ok((generate(dir, &names, "logging-agent")?, true))
}

/// The subject common name of a DER certificate: the agent's identity.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_into_both_tls_configurations() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, created) = development(dir.path()).unwrap();
        assert!(created);
        let (_, created) = development(dir.path()).unwrap();
        assert!(!created, "kept across restarts");
        logging_common::tls::server_config(&paths.server, &paths.server_key, &paths.ca).unwrap();
        logging_common::tls::client_config(&paths.ca, &paths.agent, &paths.agent_key).unwrap();
        let agent = logging_common::tls::load_certs(&paths.agent).unwrap();
        assert_eq!(common_name(&agent[0]).as_deref(), Some("logging-agent"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&paths.agent_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
