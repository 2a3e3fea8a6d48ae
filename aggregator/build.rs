//! Marks the tests against real engines as ignored (reported as skipped, not passed) when
//! their engine's address is not set at build time: `TEST_LOKI_URL`, `TEST_ELASTICSEARCH_URL`.

fn main() {
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
