//! Which files to tail: the `AGENT_PATHS` globs minus `AGENT_EXCLUDE`, never rotated
//! archives (`*.gz`) or temporary files (`*.tmp`). New files are noticed through inotify (one
//! watch per directory under each glob's fixed prefix, never one per file) and, as a
//! fallback, by rescanning the globs periodically.

use std::path::{Path, PathBuf};

use glob::Pattern;

pub struct Discovery {
    include: Vec<String>,
    exclude: Vec<Pattern>,
}

impl Discovery {
    pub fn new(include: &[String], exclude: &[String]) -> Discovery {
        Discovery {
            include: include.to_vec(),
            exclude: exclude
                .iter()
                .filter_map(|p| Pattern::new(p).ok())
                .collect(),
        }
    }

    /// Whether a path is one to tail, whatever found it.
    pub fn wanted(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let archive = name.ends_with(".gz") || name.ends_with(".tmp");
        !archive && !self.exclude.iter().any(|p| p.matches_path(path))
    }

    /// Every existing file the globs match now.
    pub fn scan(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for pattern in &self.include {
            let Ok(paths) = glob::glob(pattern) else {
                continue;
            };
            for path in paths.flatten() {
                // Follows symlinks (/var/log/containers points into /var/log/pods).
                if path.is_file() && self.wanted(&path) {
                    found.push(path);
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
}
