//! Multiline joining: the lines of a Java, Python, Go or Node stack trace become one entry.
//!
//! A message is held until the next line of its stream shows whether it continues it (or
//! until the stream has been quiet for a moment). A line continues the held message when it
//! is indented (`\tat …`, `    at …`, `  File "…"`), is a Java `Caused by:` / `... 3 more`, is
//! the closing `ValueError: …` line of a Python traceback, or belongs to a Go panic's
//! goroutine dump. JSON lines are whole by construction and never joined.

/// What the joiner remembers about the message it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TraceState {
    /// Inside a Python traceback: the next unindented line is its closing exception line.
    python: bool,
    /// Inside a Go panic or goroutine dump.
    go: bool,
}

impl TraceState {
    /// The state after a message starts with `first`.
    pub fn start(first: &[u8]) -> TraceState {
        TraceState {
            python: first.starts_with(b"Traceback (most recent call last):"),
            go: first.starts_with(b"panic: ")
                || first.starts_with(b"fatal error: ")
                || is_goroutine_header(first),
        }
    }
}

fn is_goroutine_header(line: &[u8]) -> bool {
    line.starts_with(b"goroutine ") && line.ends_with(b"]:")
}

/// Whether `line` continues the held message, updating `state`.
pub fn continues(state: &mut TraceState, line: &[u8]) -> bool {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return true;
    }
    if line.starts_with(b"Caused by: ") || line.starts_with(b"... ") {
        return true;
    }
    if state.python {
        // `ValueError: bad value` closes the traceback; a chained one may follow.
        state.python = false;
        if line.starts_with(b"During handling of the above exception")
            || line.starts_with(b"The above exception was the direct cause")
        {
            state.python = true;
        }
        return true;
    }
    if line.starts_with(b"Traceback (most recent call last):") {
        return false;
    }
    if state.go {
        if line.is_empty() || is_goroutine_header(line) || line.starts_with(b"created by ") {
            return true;
        }
        // `main.main()`, `net/http.(*conn).serve(0xc000…)`: a frame's function line.
        if line.ends_with(b")") && line.contains(&b'(') && !line.contains(&b' ') {
            return true;
        }
        state.go = false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `lines` into the entries the joiner makes.
    fn join(lines: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut state = TraceState::default();
        for line in lines {
            if !out.is_empty() && continues(&mut state, line.as_bytes()) {
                let last = out.last_mut().unwrap();
                last.push('\n');
                last.push_str(line);
            } else {
                state = TraceState::start(line.as_bytes());
                out.push(line.to_string());
            }
        }
        out
    }

    #[test]
    fn a_java_exception_with_its_causes_is_one_entry() {
        let out = join(&[
            "2026-11-27 10:00:00 ERROR [main] c.e.Shop - checkout failed",
            "java.lang.IllegalStateException: cart is empty",
            "\tat com.example.Shop.checkout(Shop.java:42)",
            "\tat com.example.Api.handle(Api.java:7)",
            "Caused by: java.io.IOException: timeout",
            "\tat com.example.Db.query(Db.java:99)",
            "\t... 2 more",
            "2026-11-27 10:00:01 INFO [main] c.e.Shop - next request",
        ]);
        assert_eq!(out.len(), 3);
        assert!(
            out[1].starts_with("java.lang.IllegalStateException") && out[1].ends_with("... 2 more")
        );
    }

    #[test]
    fn a_python_traceback_ends_with_its_exception_line() {
        let out = join(&[
            "Traceback (most recent call last):",
            "  File \"app.py\", line 3, in <module>",
            "    main()",
            "ZeroDivisionError: division by zero",
            "INFO next line",
        ]);
        assert_eq!(out.len(), 2);
        assert!(out[0].ends_with("ZeroDivisionError: division by zero"));
        assert_eq!(out[1], "INFO next line");
    }

    #[test]
    fn a_go_panic_and_a_node_stack_are_one_entry_each() {
        let out = join(&[
            "panic: runtime error: index out of range [5] with length 3",
            "",
            "goroutine 1 [running]:",
            "main.main()",
            "\t/app/main.go:8 +0x1d",
            "exit status 2",
            "TypeError: Cannot read properties of undefined (reading 'id')",
            "    at handler (/app/server.js:10:15)",
            "    at Layer.handle (/app/node_modules/express/lib/router/layer.js:95:5)",
            "listening on 3000",
        ]);
        assert_eq!(out.len(), 4, "{out:#?}");
        assert!(out[0].ends_with("+0x1d"));
        assert_eq!(out[1], "exit status 2");
        assert!(out[2].ends_with("layer.js:95:5)"));
    }
}
