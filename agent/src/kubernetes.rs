//! Kubernetes metadata from where kubelet writes a container's log:
//! `/var/log/pods/<namespace>_<pod>_<pod uid>/<container>/<restart count>.log`, and the
//! workload a pod belongs to, from its name.

use std::path::Path;

use serde::Serialize;

/// What the path says about a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub restart_count: u32,
}

/// Reads a kubelet pod log path, if `path` is one.
pub fn pod_info(path: &Path) -> Option<PodInfo> {
    let file = path.file_name()?.to_str()?;
    let restart_count = file.strip_suffix(".log")?.parse().ok()?;
    let container_dir = path.parent()?;
    let container = container_dir.file_name()?.to_str()?.to_string();
    let pod_dir = container_dir.parent()?.file_name()?.to_str()?;
    // The namespace and the pod name cannot contain "_"; the uid is last.
    let mut parts = pod_dir.splitn(3, '_');
    let namespace = parts.next()?.to_string();
    let pod = parts.next()?.to_string();
    let pod_uid = parts.next()?.to_string();
    if namespace.is_empty() || pod.is_empty() || pod_uid.is_empty() {
        return None;
    }
    Some(PodInfo {
        namespace,
        pod,
        pod_uid,
        container,
        restart_count,
    })
}

/// Characters of the random suffixes Kubernetes generates (no vowels, no 0/1/3).
fn is_generated(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
}

/// The workload name: the pod name without its ReplicaSet or StatefulSet suffix
/// (`web-7d4b9c5f6-x2k9p` → `web`, `worker-0` → `worker`, `node-exporter-7xk2p` →
/// `node-exporter`).
pub fn workload_name(pod: &str) -> &str {
    let Some((head, last)) = pod.rsplit_once('-') else {
        return pod;
    };
    if last.bytes().all(|b| b.is_ascii_digit()) && !head.is_empty() {
        return head;
    }
    if last.len() == 5 && is_generated(last) && !head.is_empty() {
        if let Some((base, hash)) = head.rsplit_once('-')
            && (6..=10).contains(&hash.len())
            && is_generated(hash)
            && !base.is_empty()
        {
            return base;
        }
        return head;
    }
    pod
}

/// A service name for a file that is not a kubelet pod log: its directory, or its name.
pub fn service_from_path(path: &Path) -> String {
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if !parent.is_empty() && !matches!(parent, "log" | "logs" | "tmp") {
        return parent.to_string();
    }
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("unknown")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_paths_give_pod_metadata() {
        let info = pod_info(Path::new(
            "/var/log/pods/shop_web-7d4b9c5f6-x2k9p_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6/nginx/3.log",
        ))
        .unwrap();
        assert_eq!(info.namespace, "shop");
        assert_eq!(info.pod, "web-7d4b9c5f6-x2k9p");
        assert_eq!(info.pod_uid, "0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6");
        assert_eq!(info.container, "nginx");
        assert_eq!(info.restart_count, 3);
        assert!(pod_info(Path::new("/var/log/nginx/access.log")).is_none());
        assert!(pod_info(Path::new("/var/log/pods/x_y_z/c/0.log.20261127-060000")).is_none());
    }

    #[test]
    fn workload_names_drop_generated_suffixes() {
        for (pod, want) in [
            ("web-7d4b9c5f6-x2k9p", "web"),
            ("checkout-api-5f9c8d7b6c-qwz4t", "checkout-api"),
            ("worker-0", "worker"),
            ("kafka-12", "kafka"),
            ("node-exporter-7xk2p", "node-exporter"),
            ("standalone", "standalone"),
            ("my-app", "my-app"),
            ("backup-28894560-fjv2q", "backup-28894560"),
        ] {
            assert_eq!(workload_name(pod), want, "{pod}");
        }
    }

    #[test]
    fn other_files_are_named_by_their_directory() {
        assert_eq!(
            service_from_path(Path::new("/var/log/nginx/access.log")),
            "nginx"
        );
        assert_eq!(service_from_path(Path::new("/var/log/syslog")), "syslog");
    }
}
