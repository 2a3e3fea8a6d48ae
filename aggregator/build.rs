//! Marks the tests against real engines as ignored (reported as skipped, not passed) when
//! their engine's address is not set at build time: `TEST_LOKI_URL`, `TEST_ELASTICSEARCH_URL`;
//! and the tests that drive real client libraries when `TEST_PYTHON` (a Python with them
//! installed, as `.ci/run` makes) is not set — except under `CI`, where they run and fail
//! without it.

fn main() {
    println!("cargo::rerun-if-env-changed=TEST_PYTHON");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rustc-check-cfg=cfg(python_clients)");
    let set = |variable: &str| std::env::var_os(variable).is_some_and(|v| !v.is_empty());
    if set("TEST_PYTHON") || set("CI") {
        println!("cargo::rustc-cfg=python_clients");
    }
    for (variable, cfg) in [
        ("TEST_LOKI_URL", "real_loki"),
        ("TEST_ELASTICSEARCH_URL", "real_elasticsearch"),
    ] {
        println!("cargo::rerun-if-env-changed={variable}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if std::env::var_os(variable).is_some_and(|v| !v.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
