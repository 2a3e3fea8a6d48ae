//! Which files to tail: the `AGENT_PATHS` globs minus `AGENT_EXCLUDE`, never rotated
//! archives (`*.gz`) or temporary files (`*.tmp`). New files are noticed through inotify (one
//! watch per directory under each glob's fixed prefix, never one per file) and, as a
//! fallback, by rescanning the globs periodically.
//!
//! The agent runs as root, so a path is followed only where it stays inside what the
//! operator configured: every symlink on the way is resolved, and the file it ends at must lie
//! under a glob's root (kubelet's `/var/log/containers` → `/var/log/pods` links, when both are
//! globbed) or under `AGENT_SYMLINK_ROOTS` (Docker's `/var/lib/docker/containers`, where
//! dockershim's pod logs point). A `0.log` replaced by a link to `/etc/shadow`, or a pod
//! directory linked elsewhere, is refused with a warning and
//! `logging_agent_paths_refused_total`. Only regular files are tailed: FIFOs, sockets and
//! devices are skipped. The check is made again on the opened descriptor, so a link swapped
//! between the check and the open is caught too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use glob::Pattern;
use parking_lot::Mutex;

pub struct Discovery {
    include: Vec<String>,
    exclude: Vec<Pattern>,
    /// Where resolved paths may end: the globs' roots and `AGENT_SYMLINK_ROOTS`, resolved.
    allowed: Vec<PathBuf>,
    /// Paths already refused, so each is warned about once, not at every rescan.
    refused: Mutex<HashSet<PathBuf>>,
}

/// Why a path is not tailed.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It resolves to a place outside the allowed roots.
    OutsideRoots(PathBuf),
    /// It is not a regular file (FIFO, socket, device, directory).
    NotAFile,
    /// It cannot be resolved (gone, or unreadable).
    Unresolvable,
}

impl Discovery {
    pub fn new(include: &[String], exclude: &[String], symlink_roots: &[PathBuf]) -> Discovery {
        let mut discovery = Discovery {
            include: include.to_vec(),
            exclude: exclude
                .iter()
                .filter_map(|p| Pattern::new(p).ok())
                .collect(),
            allowed: Vec::new(),
            refused: Mutex::new(HashSet::new()),
        };
        // A root that does not exist yet (no pods yet) is kept as written: nothing can
        // resolve into it until it exists, and then it resolves to itself.
        discovery.allowed = discovery
            .roots()
            .iter()
            .chain(symlink_roots)
            .map(|root| std::fs::canonicalize(root).unwrap_or_else(|_| root.clone()))
            .collect();
        discovery
    }

    /// The file `path` leads to, if it may be tailed.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, Refusal> {
        let resolved = std::fs::canonicalize(path).map_err(|_| Refusal::Unresolvable)?;
        self.admit(&resolved)?;
        Ok(resolved)
    }

    /// Whether the file behind an open descriptor may be tailed: what was checked by path is
    /// checked again on what was actually opened.
    pub fn admits_opened(&self, file: &std::fs::File) -> Result<(), Refusal> {
        use std::os::fd::AsRawFd;
        let link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        match std::fs::read_link(&link) {
            Ok(real) => self.admit(&real),
            // No /proc (not Linux): the path check has to do.
            Err(_) => match file.metadata() {
                Ok(m) if m.is_file() => Ok(()),
                _ => Err(Refusal::NotAFile),
            },
        }
    }

    fn admit(&self, resolved: &Path) -> Result<(), Refusal> {
        if !self.allowed.iter().any(|root| resolved.starts_with(root)) {
            return Err(Refusal::OutsideRoots(resolved.to_path_buf()));
        }
        match std::fs::metadata(resolved) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(Refusal::NotAFile),
            Err(_) => Err(Refusal::Unresolvable),
        }
    }

    /// Says, once per path, why it is not tailed.
    pub fn report(&self, path: &Path, refusal: &Refusal) {
        if let Refusal::OutsideRoots(target) = refusal
            && self.refused.lock().insert(path.to_path_buf())
        {
            metrics::counter!("logging_agent_paths_refused_total").increment(1);
            tracing::warn!(file = %path.display(), target = %target.display(),
                "not tailed: it leads outside AGENT_PATHS' roots and AGENT_SYMLINK_ROOTS");
        }
    }

    /// Whether a path is one to tail, whatever found it.
    pub fn wanted(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let archive = name.ends_with(".gz") || name.ends_with(".tmp");
        !archive && !self.exclude.iter().any(|p| p.matches_path(path))
    }

    /// Every existing regular file the globs match now and that resolves inside the allowed
    /// roots (see the module's doc), by the path that matched.
    pub fn scan(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for pattern in &self.include {
            let Ok(paths) = glob::glob(pattern) else {
                continue;
            };
            for path in paths.flatten() {
                if !self.wanted(&path) {
                    continue;
                }
                match self.resolve(&path) {
                    Ok(_) => found.push(path),
                    Err(refusal) => self.report(&path, &refusal),
                }
            }
        }
        found.sort();
        found.dedup();
        found
    }

    /// The directories to watch: each glob's longest prefix without wildcards.
    pub fn roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self
            .include
            .iter()
            .map(|pattern| {
                let mut root = PathBuf::new();
                for component in Path::new(pattern).components() {
                    let text = component.as_os_str().to_string_lossy();
                    if text.contains(['*', '?', '[']) {
                        break;
                    }
                    root.push(component);
                }
                if root.as_os_str().is_empty() || root == Path::new(pattern) {
                    // A pattern without wildcards names one file: watch its directory.
                    root.parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from("."))
                } else {
                    root
                }
            })
            .collect();
        roots.sort();
        roots.dedup();
        roots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_find_pod_logs_and_skip_archives_and_exclusions() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        for file in [
            "pods/ns_a-1_u1/app/0.log",
            "pods/ns_a-1_u1/app/0.log.20261127-060000",
            "pods/ns_a-1_u1/app/0.log.20261126-060000.gz",
            "pods/ns_b-1_u2/sidecar/1.log",
            "pods/kube-system_c-1_u3/x/0.log",
        ] {
            let path = base.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "x\n").unwrap();
        }
        let d = Discovery::new(
            &[format!("{}/pods/*/*/*.log", base.display())],
            &[format!("{}/pods/kube-system_*/*/*.log", base.display())],
            &[],
        );
        let found: Vec<String> = d
            .scan()
            .iter()
            .map(|p| p.strip_prefix(base).unwrap().display().to_string())
            .collect();
        assert_eq!(
            found,
            vec!["pods/ns_a-1_u1/app/0.log", "pods/ns_b-1_u2/sidecar/1.log"]
        );
        assert_eq!(d.roots(), vec![base.join("pods")]);
        assert!(!d.wanted(Path::new("/x/0.log.gz")));
    }

    #[test]
    fn symlinks_are_followed_only_into_the_configured_roots() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let pods = base.join("pods");
        let outside = base.join("etc");
        let docker = base.join("docker/abc");
        for d in [
            pods.join("ns_ok_u1/app"),
            pods.join("ns_evil_u2/app"),
            pods.join("ns_docker_u3/app"),
            pods.join("ns_fifo_u4/app"),
            outside.join("secrets"),
            docker.clone(),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(outside.join("shadow"), "root:x\n").unwrap();
        std::fs::write(outside.join("secrets/0.log"), "secret\n").unwrap();
        std::fs::write(docker.join("abc-json.log"), "{}\n").unwrap();
        std::fs::write(pods.join("ns_ok_u1/app/0.log"), "fine\n").unwrap();
        // Inside the same root: followed.
        symlink(
            pods.join("ns_ok_u1/app/0.log"),
            pods.join("ns_ok_u1/app/1.log"),
        )
        .unwrap();
        // A log replaced by a link out of the roots, and a whole pod directory linked out.
        symlink(outside.join("shadow"), pods.join("ns_evil_u2/app/0.log")).unwrap();
        symlink(outside.join("secrets"), pods.join("ns_linked_u5")).unwrap();
        // Docker's json-file logs, where dockershim links pod logs: allowed by setting.
        symlink(
            docker.join("abc-json.log"),
            pods.join("ns_docker_u3/app/0.log"),
        )
        .unwrap();
        // A FIFO is never tailed.
        let fifo = pods.join("ns_fifo_u4/app/0.log");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);

        let pattern = format!("{}/pods/*/*/*.log", base.display());
        let d = Discovery::new(std::slice::from_ref(&pattern), &[], &[base.join("docker")]);
        let found: Vec<String> = d
            .scan()
            .iter()
            .map(|p| p.strip_prefix(base).unwrap().display().to_string())
            .collect();
        assert_eq!(
            found,
            vec![
                "pods/ns_docker_u3/app/0.log",
                "pods/ns_ok_u1/app/0.log",
                "pods/ns_ok_u1/app/1.log",
            ]
        );
        assert!(matches!(
            d.resolve(&pods.join("ns_evil_u2/app/0.log")),
            Err(Refusal::OutsideRoots(_))
        ));
        assert_eq!(d.resolve(&fifo), Err(Refusal::NotAFile));
        // Without the Docker root, its links are refused too.
        let strict = Discovery::new(&[pattern], &[], &[]);
        assert!(matches!(
            strict.resolve(&pods.join("ns_docker_u3/app/0.log")),
            Err(Refusal::OutsideRoots(_))
        ));
        // The descriptor check sees through the path.
        let opened = std::fs::File::open(pods.join("ns_evil_u2/app/0.log")).unwrap();
        assert!(matches!(
            d.admits_opened(&opened),
            Err(Refusal::OutsideRoots(_))
        ));
        let opened = std::fs::File::open(pods.join("ns_ok_u1/app/1.log")).unwrap();
        assert_eq!(d.admits_opened(&opened), Ok(()));
    }
}
