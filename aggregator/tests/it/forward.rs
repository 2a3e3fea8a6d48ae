//! The Fluent forward protocol on `FORWARD_PORT`: Python's `fluent-logger` (Message mode,
//! EventTime), and by hand Forward, PackedForward and CompressedPackedForward with chunk
//! acknowledgements, a re-sent chunk stored once, and the `shared_key` handshake.

use std::time::Duration;

use rmpv::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Db, TestApp, run_python, stored_entries};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

/// An EventTime: seconds and nanoseconds.
fn event_time(nanos: i64) -> Value {
    let mut bytes = ((nanos / 1_000_000_000) as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&((nanos % 1_000_000_000) as u32).to_be_bytes());
    Value::Ext(0, bytes)
}

fn record(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// Reads one MessagePack value from the connection.
async fn read_value(tcp: &mut TcpStream) -> Value {
    let mut buffer = Vec::new();
    loop {
        if let Ok(value) = rmpv::decode::read_value(&mut &buffer[..]) {
            return value;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "the server closed the connection");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn ack_of(value: &Value) -> String {
    match value {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| k.as_str() == Some("ack"))
            .and_then(|(_, v)| v.as_str())
            .unwrap()
            .to_string(),
        other => panic!("not an ack: {other}"),
    }
}

#[tokio::test]
async fn every_mode_is_stored_once_and_chunks_are_acknowledged_when_durable() {
    let port = free_port();
    let app = TestApp::start_with(Db::Sqlite, |c| c.forward_port = port).await;
    let now = logging_common::Timestamp::now().as_nanos();
    let kubernetes = record(&[
        ("namespace_name", Value::from("shop")),
        ("pod_name", Value::from("web-1")),
        ("container_name", Value::from("web")),
    ]);
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();

    // Forward mode, as Fluent Bit's forward output sends (with a chunk to acknowledge).
    let forward = Value::Array(vec![
        Value::from("kube.web"),
        Value::Array(vec![
            Value::Array(vec![
                event_time(now),
                record(&[
                    (
                        "log",
                        Value::from(
                            r#"{"level":"error","msg":"payment declined","order_id":4711}"#,
                        ),
                    ),
                    ("stream", Value::from("stdout")),
                    ("kubernetes", kubernetes.clone()),
                ]),
            ]),
            Value::Array(vec![
                Value::from(now / 1_000_000_000),
                Value::from("not a map"),
            ]),
        ]),
        record(&[("chunk", Value::from("chunk-1")), ("size", Value::from(2))]),
    ]);
    tcp.write_all(&encode(&forward)).await.unwrap();
    assert_eq!(ack_of(&read_value(&mut tcp).await), "chunk-1");
    // The same chunk again (its ack lost): acknowledged, stored once.
    tcp.write_all(&encode(&forward)).await.unwrap();
    assert_eq!(ack_of(&read_value(&mut tcp).await), "chunk-1");

    // PackedForward, gzip-compressed, with two entries.
    let mut packed = Vec::new();
    for (i, message) in ["cache miss", "user login"].iter().enumerate() {
        packed.extend(encode(&Value::Array(vec![
            event_time(now + i as i64 + 1),
            record(&[
                ("message", Value::from(*message)),
                ("level", Value::from("warn")),
            ]),
        ])));
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &packed).unwrap();
    let compressed = Value::Array(vec![
        Value::from("app.api"),
        Value::Binary(gz.finish().unwrap()),
        record(&[
            ("chunk", Value::from("chunk-2")),
            ("compressed", Value::from("gzip")),
        ]),
    ]);
    tcp.write_all(&encode(&compressed)).await.unwrap();
    assert_eq!(ack_of(&read_value(&mut tcp).await), "chunk-2");

    let entries = stored_entries(&app, 3).await;
    assert_eq!(entries.len(), 3, "{entries:#?}");
    let declined = entries
        .iter()
        .find(|e| e["message"] == "payment declined")
        .unwrap();
    assert_eq!(declined["level"], "error");
    assert_eq!(declined["service"], "web");
    assert_eq!(declined["context"]["order_id"], 4711);
    assert_eq!(declined["context"]["tag"], "kube.web");
    assert_eq!(declined["context"]["kubernetes"]["namespace"], "shop");
    let login = entries
        .iter()
        .find(|e| e["message"] == "user login")
        .unwrap();
    assert_eq!(
        (login["service"].as_str(), login["level"].as_str()),
        (Some("app.api"), Some("warning"))
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("logging_aggregator_forward_refused_total 2"),
        "{metrics}"
    );

    // A message sent a few bytes at a time (as a slow or hostile client may) is read whole
    // and acknowledged once.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let dripped = encode(&Value::Array(vec![
        Value::from("slow.app"),
        Value::from(now / 1_000_000_000),
        record(&[("message", Value::from("sent in pieces"))]),
        record(&[("chunk", Value::from("chunk-3"))]),
    ]));
    for piece in dripped.chunks(7) {
        slow.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(ack_of(&read_value(&mut slow).await), "chunk-3");
    stored_entries(&app, 4).await;

    // Nested past the bound: refused by the decoder (no deep recursion), the connection
    // closed, the listener still serving.
    let mut deep = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut nested = vec![0x91u8; 100_000];
    nested.push(0xc0);
    deep.write_all(&nested).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), deep.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

    // Not MessagePack: the connection is closed, the listener keeps serving.
    let mut bad = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    bad.write_all(&[0xc1, 0xc1, 0xc1]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), bad.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_shared_key_is_required_when_set() {
    let port = free_port();
    let key = "s3cret-key";
    let app = TestApp::start_with(Db::Sqlite, |c| {
        c.forward_port = port;
        c.forward_shared_key = Some(key.into());
    })
    .await;
    for (shared_key, accepted) in [("wrong", false), (key, true)] {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let helo = read_value(&mut tcp).await;
        let Value::Array(helo) = helo else {
            panic!("HELO")
        };
        assert_eq!(helo[0].as_str(), Some("HELO"));
        let nonce = match &helo[1] {
            Value::Map(pairs) => match &pairs
                .iter()
                .find(|(k, _)| k.as_str() == Some("nonce"))
                .unwrap()
                .1
            {
                Value::Binary(b) => b.clone(),
                other => other.as_str().unwrap().as_bytes().to_vec(),
            },
            other => panic!("HELO options: {other}"),
        };
        let salt = "salt-1";
        let digest = logging_aggregator::forward::sha512_hex(&[
            salt.as_bytes(),
            b"client-host",
            &nonce,
            shared_key.as_bytes(),
        ]);
        let ping = Value::Array(vec![
            Value::from("PING"),
            Value::from("client-host"),
            Value::from(salt),
            Value::from(digest),
            Value::from(""),
            Value::from(""),
        ]);
        tcp.write_all(&encode(&ping)).await.unwrap();
        let Value::Array(pong) = read_value(&mut tcp).await else {
            panic!("PONG")
        };
        assert_eq!(pong[0].as_str(), Some("PONG"));
        assert_eq!(pong[1].as_bool(), Some(accepted));
        if accepted {
            let expected = logging_aggregator::forward::sha512_hex(&[
                salt.as_bytes(),
                pong[3].as_str().unwrap().as_bytes(),
                &nonce,
                key.as_bytes(),
            ]);
            assert_eq!(pong[4].as_str(), Some(expected.as_str()));
            let message = Value::Array(vec![
                Value::from("secure.app"),
                Value::from(logging_common::Timestamp::now().as_nanos() / 1_000_000_000),
                record(&[("message", Value::from("after the handshake"))]),
                record(&[("chunk", Value::from("c"))]),
            ]);
            tcp.write_all(&encode(&message)).await.unwrap();
            assert_eq!(ack_of(&read_value(&mut tcp).await), "c");
        }
    }
    let entries = stored_entries(&app, 1).await;
    assert_eq!(entries[0]["message"], "after the handshake");
    app.stop().await;
}

/// Python's `fluent-logger` (PyPI, installed by `.ci/run`): Message mode with EventTime,
/// the same event emitted twice (as after a lost answer) stored once.
#[tokio::test]
#[cfg_attr(not(python_clients), ignore = "TEST_PYTHON is not set")]
async fn pythons_fluent_logger_ships_events_stored_once() {
    let port = free_port();
    let app = TestApp::start_with(Db::Sqlite, |c| c.forward_port = port).await;
    let script = r#"
import sys, time
from fluent import sender, event
logger = sender.FluentSender("shop", host="127.0.0.1", port=int(sys.argv[1]), nanosecond_precision=True)
at = time.time()
for _ in range(2):
    if not logger.emit_with_time("payments", at, {"level": "error", "message": "card declined", "order": 4711}):
        raise SystemExit(str(logger.last_error))
if not logger.emit("cart", {"log": "cart viewed", "user": "alice"}):
    raise SystemExit(str(logger.last_error))
logger.close()
"#;
    run_python(script, &[&port.to_string()]).await;
    stored_entries(&app, 2).await;
    // A duplicate would be searchable by now (the refresh interval is 50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entries = stored_entries(&app, 2).await;
    assert_eq!(entries.len(), 2, "{entries:#?}");
    let declined = entries
        .iter()
        .find(|e| e["message"] == "card declined")
        .unwrap();
    assert_eq!(
        (declined["service"].as_str(), declined["level"].as_str()),
        (Some("shop.payments"), Some("error"))
    );
    assert_eq!(declined["context"]["order"], 4711);
    let viewed = entries
        .iter()
        .find(|e| e["message"] == "cart viewed")
        .unwrap();
    assert_eq!(viewed["context"]["user"], "alice");
    app.stop().await;
}
