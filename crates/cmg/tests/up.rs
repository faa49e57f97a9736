//! The new user's journey with real processes of the `cmg` binary (issue: the client and
//! `cmg up`): `cmg up` prints an install command; run as printed it registers a device through
//! the gateway; admin commands against the same data directory take effect in the running roles;
//! SIGTERM stops every role cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn cmg(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cmg"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn contains(dir: &Path, needle: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if let Some(found) = contains(&path, needle) {
                return Some(found);
            }
        } else if std::fs::read(&path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            return Some(path);
        }
    }
    None
}

#[test]
fn the_printed_install_command_registers_a_device_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_cmg"))
        .current_dir(dir.path())
        .args([
            "up",
            "--gateway-port",
            "0",
            "--mp-port",
            "0",
            "--tunnel-port",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line == "ready";
        printed.push(line);
        if done {
            break;
        }
    }
    assert_eq!(
        printed.last().map(String::as_str),
        Some("ready"),
        "{printed:?}"
    );
    let install = printed
        .iter()
        .find(|l| l.starts_with("cmg client install "))
        .expect("install line")
        .clone();
    let args: Vec<&str> = install.split_whitespace().skip(1).collect();
    assert!(args.contains(&"CCMALWAYSINF=1"));
    let token = args
        .iter()
        .find_map(|a| a.strip_prefix("/regtoken:"))
        .unwrap()
        .to_owned();
    let mp_url = args
        .iter()
        .find_map(|a| a.strip_prefix("/mp:"))
        .unwrap()
        .to_owned();
    let guid = printed
        .iter()
        .find_map(|l| {
            l.strip_prefix("Bulk registration token ")
                .and_then(|r| r.split(' ').next())
        })
        .unwrap()
        .to_owned();

    // Run exactly as printed, from the same directory.
    let out = cmg(dir.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = dir.path().join("cmg-client");
    let location = std::fs::read_to_string(state.join("logs/ClientLocation.log")).unwrap();
    assert!(location.contains(&format!(
        "Rotating internet management point, new management point [1] is: {mp_url} (0) with capabilities: <Capabilities SchemaVersion =\"1.0\"><Property Name=\"SSL\" Version=\"1\" /></Capabilities>"
    )));
    let status = cmg(dir.path(), &["client", "status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["connection_type"], "Always Internet");
    assert!(status["token_expires"].as_i64().unwrap() > 0);
    assert_eq!(contains(&state, &token), None, "the bulk token was kept");
    assert_eq!(contains(&state, token.rsplit('.').next().unwrap()), None);

    // A tampered token: refused by the gateway, named in the error, nothing left installed.
    let mut tampered_token = token.clone().into_bytes();
    let at = tampered_token.iter().position(|b| *b == b'.').unwrap() + 5;
    tampered_token[at] = if tampered_token[at] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered_token = String::from_utf8(tampered_token).unwrap();
    let tampered: Vec<String> = args
        .iter()
        .map(|a| match *a {
            "./cmg-client" => "./cmg-client-t".to_owned(),
            a if a.starts_with("/regtoken:") => format!("/regtoken:{tampered_token}"),
            a => a.to_owned(),
        })
        .collect();
    let out = cmg(
        dir.path(),
        &tampered.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CMGService_Invalid_Token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_installed_nothing(&dir.path().join("cmg-client-t"));

    // An admin command against the same data directory reaches the running roles.
    let block = cmg(dir.path(), &["bulk-token", "block", &guid]);
    assert!(block.status.success());
    let blocked_at = Instant::now();
    let second: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == "./cmg-client" {
                "./cmg-client-2".to_owned()
            } else {
                a.to_string()
            }
        })
        .collect();
    loop {
        let second: Vec<&str> = second.iter().map(String::as_str).collect();
        let out = cmg(dir.path(), &second);
        if !out.status.success() {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Blocked"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        assert!(
            blocked_at.elapsed() < Duration::from_secs(5),
            "the block did not reach the running roles"
        );
        cmg(
            dir.path(),
            &["client", "uninstall", "--state-dir", "./cmg-client-2"],
        );
    }

    // SIGTERM (as Ctrl-C) stops every role cleanly.
    assert!(
        Command::new("kill")
            .args(["-TERM", &up.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = up.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "cmg up did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A failed install leaves its logs (to say why) and nothing else: no key, certificate, token or
/// state.
fn assert_installed_nothing(state: &Path) {
    let Ok(entries) = std::fs::read_dir(state) else {
        return;
    };
    let left: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "logs")
        .collect();
    assert!(
        left.is_empty(),
        "a failed install left {left:?} in {}",
        state.display()
    );
}
