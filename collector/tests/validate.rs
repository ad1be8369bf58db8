use nodewatt_common::now_ms;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn spawn() -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_nodewatt-collector"))
        .arg("validate")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn validate(input: &str) -> (Option<i32>, String, String) {
    let mut child = spawn();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A minimal sample of node `node` at `ts_ms`.
fn sample_at(node: &str, ts_ms: u64) -> String {
    format!(
        r#"{{"schema":1,"agent":"a","cluster":"c","node":"{node}","ts_ms":{ts_ms},"agent_start_ms":{},"seq":0,"interval_ms":1000,"sources":[]}}"#,
        now_ms() - 60_000
    )
}

/// A minimal sample taken just now.
fn good(node: &str) -> String {
    let now = now_ms();
    sample_at(node, now - now % 1000)
}

#[test]
fn counts_valid_samples_per_node() {
    let g = good("n1");
    let (code, out, _) = validate(&format!("{g}\n\n{g}\n"));
    assert_eq!(code, Some(0));
    assert_eq!(out, "c/n1: 2 valid samples\n0 invalid lines\n");
}

#[test]
fn runs_serves_checks_and_counts_each_reason() {
    let g = good("n1");
    let newer = g.replace(r#""schema":1"#, r#""schema":9"#);
    let old = sample_at("n1", 1);
    let name = g.replace(r#""node":"n1""#, r#""node":"n1' OR 1=1""#);
    let (code, out, err) = validate(&format!(
        "{g}\nnot json\n{newer}\n\u{0}\u{ff}\n{old}\n{name}\n"
    ));
    assert_eq!(code, Some(1));
    assert!(out.starts_with("c/n1: 1 valid samples\n"), "{out}");
    for line in [
        "rejected json: 2\n",
        "rejected schema: 1\n",
        "rejected timestamp: 1\n",
        "rejected name: 1\n",
    ] {
        assert!(out.contains(line), "{line}{out}");
    }
    assert!(out.ends_with("5 invalid lines\n"), "{out}");
    assert!(err.contains("line 2: json: not a nodewatt sample"), "{err}");
    assert!(
        err.contains("line 3: schema: unsupported schema version 9"),
        "{err}"
    );
    assert!(err.contains("line 5: timestamp: ts_ms = 1"), "{err}");
    assert!(err.contains("line 6: name: "), "{err}");
}

#[test]
fn ctrl_c_prints_the_counts_so_far() {
    let mut child = spawn();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}\nnot json", good("n7")).unwrap();
    stdin.flush().unwrap();
    // Wait until both lines were read (the bad one is reported on stderr).
    let mut stderr = child.stderr.take().unwrap();
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&said).contains("line 2:") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&said));
        said.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(100));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("c/n7: 1 valid samples\n"), "{text}");
    assert!(text.contains("rejected json: 1\n"), "{text}");
    drop(stdin);
}
