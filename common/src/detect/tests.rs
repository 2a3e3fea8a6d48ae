use super::*;
use crate::parse::parse;

/// One corpus line: the file it is in, the expected level, the entry.
struct Case {
    file: String,
    want: LogLevel,
    body: String,
}

fn corpus() -> Vec<Case> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/levels");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for (n, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (want, body) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("{file}:{}: expected `level<TAB>line`", n + 1));
            cases.push(Case {
                file: format!("{file}:{}", n + 1),
                want: LogLevel::parse(want)
                    .unwrap_or_else(|| panic!("{file}:{}: unknown level {want}", n + 1)),
                body: body.replace("\\n", "\n").replace("\\t", "\t"),
            });
        }
    }
    cases
}

#[test]
fn the_corpus_of_real_world_formats_is_read_with_high_recall_and_precision() {
    let cases = corpus();
    let (mut non_info, mut recalled, mut flagged, mut flagged_right) = (0, 0, 0, 0);
    let mut wrong = Vec::new();
    for case in &cases {
        let got = parse(&case.body).level.unwrap_or(LogLevel::Info);
        if case.want != LogLevel::Info {
            non_info += 1;
            recalled += usize::from(got == case.want);
        }
        if got != LogLevel::Info {
            flagged += 1;
            flagged_right += usize::from(got == case.want);
        }
        if got != case.want {
            wrong.push(format!(
                "{}: want {}, got {} ({:?}): {}",
                case.file,
                case.want,
                got,
                detecting_rule(&case.body),
                case.body
            ));
        }
    }
    let recall = recalled as f64 / non_info as f64;
    let precision = flagged_right as f64 / flagged as f64;
    let info = cases.len() - non_info;
    println!(
        "level corpus: {} lines ({non_info} not info, {info} info); recall {recall:.3}, precision {precision:.3}",
        cases.len()
    );
    for line in &wrong {
        println!("  {line}");
    }
    assert!(
        cases.len() >= 90 && non_info >= 60 && info >= 30,
        "corpus too small"
    );
    assert!(recall >= 0.97, "recall {recall:.3}:\n{}", wrong.join("\n"));
    assert!(
        precision >= 0.97,
        "precision {precision:.3}:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_rule_has_an_example_it_reads() {
    for rule in RULES {
        let example = rule
            .example
            .split("  |  ")
            .next()
            .unwrap()
            .replace("\\n", "\n")
            .replace("\\t", "\t");
        assert_eq!(detecting_rule(&example), Some(rule.name), "{example}");
    }
}

#[test]
fn error_words_in_the_message_do_not_make_an_error() {
    for line in [
        "0 errors",
        "error_count=0",
        "retrying after error",
        "GET /var/www/error.html 200",
        "the request had an error in it",
        "a path /srv/ERROR/x was created",
        "wrote \"ERROR\" into the template",
    ] {
        assert_eq!(detect_level(line), None, "{line}");
    }
}

#[test]
fn a_stated_level_wins_over_a_stack_trace_below_it() {
    let body = "2026-12-01 12:00:00,123 INFO  [main] c.e.Probe - expected failure\n\tat c.e.Probe.run(Probe.java:3)";
    assert_eq!(detect_level(body), Some(LogLevel::Info));
    let unstated = "something went wrong\n\tat c.e.Probe.run(Probe.java:3)";
    assert_eq!(detect_level(unstated), Some(LogLevel::Error));
}

mod properties {
    use super::super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn any_text_is_read_without_panicking(body in "\\PC{0,300}") {
            let _ = detect_level(&body);
        }

        #[test]
        fn any_bytes_near_the_head_limit_are_read_without_panicking(
            pad in 150usize..250,
            tail in "[\\[\\]:<>a-zA-Z0-9 éü\u{1F600}]{0,40}",
        ) {
            let body = format!("{}{tail}", "x ".repeat(pad / 2));
            let _ = detect_level(&body);
        }

        #[test]
        fn a_leading_shouted_level_is_read_after_any_timestamp(
            secs in 0i64..4_000_000_000,
            i in 0usize..5,
            rest in "[a-z ]{0,40}",
        ) {
            let levels = [("DEBUG", LogLevel::Debug), ("INFO", LogLevel::Info), ("WARN", LogLevel::Warning), ("ERROR", LogLevel::Error), ("FATAL", LogLevel::Critical)];
            let ts = crate::Timestamp::from_nanos(secs * 1_000_000_000).to_rfc3339();
            let body = format!("{ts} {} {rest}", levels[i].0);
            prop_assert_eq!(detect_level(&body), Some(levels[i].1));
        }
    }
}
