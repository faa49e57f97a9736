//! The new user's journey with real processes of the `cmg` binary (issue: the client and
//! `cmg up`): `cmg up` prints an install command; run as printed it registers a device through
//! the gateway; admin commands against the same data directory take effect in the running roles;
//! SIGTERM stops every role cleanly.

mod common;

use std::time::{Duration, Instant};

use common::{Up, assert_installed_nothing, cmg, contains};
use serde_json::Value;

#[test]
fn the_printed_install_command_registers_a_device_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start_as_documented(dir.path());
    assert_eq!(
        up.printed.last().map(String::as_str),
        Some("ready"),
        "{:?}",
        up.printed
    );
    let args: Vec<&str> = up.install.iter().map(String::as_str).collect();
    assert!(args.contains(&"CCMALWAYSINF=1"));
    let (token, mp_url, guid) = (up.token.clone(), up.cmg_url.clone(), up.guid.clone());

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
    assert_eq!(status["network"], "Currently Internet");
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
    let status = up.stop();
    assert!(status.success(), "{status}");
}
