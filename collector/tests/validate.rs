use std::io::Write;
use std::process::{Command, Stdio};

fn validate(input: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodewatt-collector"))
        .arg("validate")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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

const GOOD: &str = r#"{"schema":1,"agent":"a","cluster":"c","node":"n1","ts_ms":1,"agent_start_ms":0,"seq":0,"interval_ms":1000,"sources":[]}"#;

#[test]
fn counts_valid_samples_per_node() {
    let (code, out, _) = validate(&format!("{GOOD}\n\n{GOOD}\n"));
    assert_eq!(code, Some(0));
    assert_eq!(out, "c/n1: 2 valid samples\n0 invalid lines\n");
}

#[test]
fn reports_each_bad_line_with_its_reason() {
    let newer = GOOD.replace(r#""schema":1"#, r#""schema":9"#);
    let (code, out, err) = validate(&format!("{GOOD}\nnot json\n{newer}\n\u{0}\u{ff}\n"));
    assert_eq!(code, Some(1));
    assert!(out.ends_with("3 invalid lines\n"), "{out}");
    assert!(err.contains("line 2: not a nodewatt sample"), "{err}");
    assert!(
        err.contains("line 3: unsupported schema version 9"),
        "{err}"
    );
    assert!(err.contains("line 4: "), "{err}");
}
