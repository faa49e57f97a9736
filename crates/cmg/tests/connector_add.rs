//! `cmg admin connector add|list|remove` and `cmg connector run --data DIR` with the real binary
//! (issue 4): the directory written for a connection point on another host (its files and
//! modes, none of the site's private keys), the SQLite refusal, listing and removal, the errors,
//! and a connection point run from that directory that stops when it is removed.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cmg_testkit::files::{listing, mode};
use common::{BIN, cmg, cmg_ok, read_log, wait_until};
use serde_json::Value;

/// Runs `cmg ARGS` in `dir`, which must fail; returns its stderr.
fn cmg_err(dir: &Path, args: &[&str]) -> String {
    let out = cmg(dir, args);
    assert!(
        !out.status.success(),
        "cmg {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The arguments of `cmg --data site admin connector add --name NAME --out OUT --same-host`.
fn add_args<'a>(name: &'a str, out: &'a str) -> [&'a str; 10] {
    [
        "--data",
        "site",
        "admin",
        "connector",
        "add",
        "--name",
        name,
        "--out",
        out,
        "--same-host",
    ]
}

/// Adds connection point `name` with its directory at `out`; returns the output.
fn add_ok(dir: &Path, name: &str, out: &str) -> String {
    cmg_ok(dir, &add_args(name, out))
}

/// Adding connection point `name` at `out` fails; returns stderr.
fn add_err(dir: &Path, name: &str, out: &str) -> String {
    cmg_err(dir, &add_args(name, out))
}

/// `cmg admin connector list --json` of the site in `site/`.
fn list(dir: &Path) -> Vec<Value> {
    let out = cmg_ok(
        dir,
        &["--data", "site", "admin", "connector", "list", "--json"],
    );
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn thumbprint_of(cert: &Path) -> String {
    let pem = std::fs::read_to_string(cert).unwrap();
    cmg_pki::thumbprint_sha256(&cmg_pki::pem_to_der(&pem, "certificate").unwrap())
}

#[test]
fn connector_add_writes_a_directory_without_site_keys_and_list_and_remove_manage_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cmg_ok(
        dir,
        &["--data", "site", "site", "init", "--site-code", "ABC"],
    );

    // Help on the command and each flag.
    let help = cmg_ok(dir, &["admin", "connector", "--help"]);
    for line in ["add", "list", "remove", "another site-side host"] {
        assert!(help.contains(line), "{help}");
    }
    let help = cmg_ok(dir, &["admin", "connector", "add", "--help"]);
    for text in [
        "--name",
        "--out",
        "--same-host",
        "0600",
        "cmg connector run --data DIR",
        "embedded SQLite",
    ] {
        assert!(help.contains(text), "{text}: {help}");
    }

    // The embedded SQLite database cannot be shared with another host: refused, nothing made.
    let err = cmg_err(
        dir,
        &[
            "--data",
            "site",
            "admin",
            "connector",
            "add",
            "--name",
            "cp2",
            "--out",
            "cp2",
        ],
    );
    assert!(
        err.contains("SQLite") && err.contains("PostgreSQL") && err.contains("--same-host"),
        "{err}"
    );
    assert!(!dir.join("cp2").exists());
    assert_eq!(list(dir).len(), 1, "only the site server's own");

    let out = add_ok(dir, "cp2", "cp2");
    assert!(out.contains("Connection point cp2 added"), "{out}");
    assert!(out.contains("cmg connector run --data cp2"), "{out}");
    assert!(
        !out.contains("sqlite://"),
        "the database URL may hold a password: {out}"
    );

    // Exactly these files; modes 0700/0600; the only private key is the new one.
    let cp2 = dir.join("cp2");
    assert_eq!(
        listing(&cp2),
        [
            "logs/",
            "pki/",
            "pki/connection-point.crt",
            "pki/connection-point.key",
            "pki/site-root.crt",
            "site.toml",
        ]
    );
    assert_eq!(mode(&cp2), 0o700);
    assert_eq!(mode(&cp2.join("pki")), 0o700);
    assert_eq!(mode(&cp2.join("logs")), 0o700);
    assert_eq!(mode(&cp2.join("pki/connection-point.key")), 0o600);
    assert_eq!(mode(&cp2.join("site.toml")), 0o600);
    let site_keys: Vec<String> = std::fs::read_dir(dir.join("site/pki"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(
        site_keys.len(),
        4,
        "root, token signing, MP, connection point"
    );
    for file in listing(&cp2).iter().filter(|f| !f.ends_with('/')) {
        let text = std::fs::read_to_string(cp2.join(file)).unwrap();
        assert_eq!(
            text.contains("PRIVATE KEY"),
            file == "pki/connection-point.key",
            "{file}"
        );
        assert!(
            !site_keys.iter().any(|k| text.contains(k.trim())),
            "{file} holds a key of the site"
        );
    }
    assert_eq!(
        std::fs::read_to_string(cp2.join("pki/site-root.crt")).unwrap(),
        std::fs::read_to_string(dir.join("site/pki/site-root.crt")).unwrap()
    );
    let site_toml = std::fs::read_to_string(cp2.join("site.toml")).unwrap();
    let db_line = std::fs::read_to_string(dir.join("site/site.toml"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("db "))
        .unwrap()
        .to_owned();
    assert!(
        site_toml.contains(&db_line),
        "the same database: {site_toml}"
    );
    assert!(
        site_toml.contains("connection_point = \"cp2\""),
        "{site_toml}"
    );

    // Listed beside the site server's own, with the certificate written.
    let rows = list(dir);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["name"], Value::Null);
    assert_eq!(
        rows[0]["thumbprint_sha256"],
        thumbprint_of(&dir.join("site/pki/connection-point.crt"))
    );
    assert_eq!(rows[1]["name"], "cp2");
    assert_eq!(
        rows[1]["thumbprint_sha256"],
        thumbprint_of(&cp2.join("pki/connection-point.crt"))
    );
    assert_eq!(rows[1]["status"], "Active");
    let table = cmg_ok(dir, &["--data", "site", "admin", "connector", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("(site server)") && table.contains("cp2 "),
        "{table}"
    );
    assert!(
        table.contains("VALID UNTIL") && table.contains("Active"),
        "{table}"
    );

    // Errors: a name taken (in another case), a bad name, a directory in use, an unknown name.
    let err = add_err(dir, "CP2", "cp3");
    assert!(
        err.contains("already exists") && err.contains("cmg admin connector remove CP2"),
        "{err}"
    );
    assert!(!dir.join("cp3").exists());
    let err = add_err(dir, "cp 3", "cp3");
    assert!(err.contains("not a valid connection point name"), "{err}");
    let err = add_err(dir, "cp3", "cp2");
    assert!(err.contains("not empty"), "{err}");
    let err = cmg_err(
        dir,
        &["--data", "site", "admin", "connector", "remove", "nope"],
    );
    assert!(
        err.contains("no connection point named nope") && err.contains("connector list"),
        "{err}"
    );
    assert_eq!(list(dir).len(), 2, "nothing changed by the failures");

    // The directory is for `cmg connector run` only: site and admin commands refuse it, and say
    // where to run them. The connector opens it (and finds no CMG yet).
    let err = cmg_err(dir, &["--data", "cp2", "bulk-token", "new"]);
    assert!(err.contains("connection point's directory"), "{err}");
    let err = cmg_err(dir, &["--data", "cp2", "admin", "connector", "list"]);
    assert!(err.contains("on the site server"), "{err}");
    let err = cmg_err(dir, &["--data", "cp2", "connector", "run"]);
    assert!(err.contains("the site has no CMG"), "{err}");

    // Removal, in any case; audited.
    let out = cmg_ok(
        dir,
        &["--data", "site", "admin", "connector", "remove", "Cp2"],
    );
    assert!(out.contains("Connection point cp2 removed"), "{out}");
    assert_eq!(list(dir).len(), 1);
    let err = cmg_err(
        dir,
        &["--data", "site", "admin", "connector", "remove", "cp2"],
    );
    assert!(err.contains("no connection point named cp2"), "{err}");
    let audit = cmg_ok(
        dir,
        &["--data", "site", "admin", "audit", "--json", "--limit", "5"],
    );
    let audit: Vec<Value> = serde_json::from_str(&audit).unwrap();
    let actions: Vec<&str> = audit
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        &actions[..2],
        ["connection_point.remove", "connection_point.add"]
    );
    let provider = read_log(&dir.join("site/logs/SMSProv.log"));
    assert!(
        provider.contains("added connection point cp2")
            && provider.contains("removed connection point cp2"),
        "{provider}"
    );
}

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_connection_point_runs_from_its_directory_and_stops_when_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cmg_ok(
        dir,
        &["--data", "site", "site", "init", "--site-code", "ABC"],
    );
    // A CMG whose tunnels are on this machine (nothing needs to listen for this test).
    let ca = cmg_pki::SiteAuthority::generate("DEV").unwrap();
    let server = ca
        .issue(
            "DEV",
            &cmg_pki::Role::ManagementPoint {
                hostnames: vec!["granitefalls.contoso.com".into()],
            },
            cmg_pki::KeyAlgorithm::EcdsaP256,
        )
        .unwrap();
    let chain = format!("{}{}", server.cert_pem(), ca.credential().cert_pem());
    std::fs::write(dir.join("server.crt"), chain).unwrap();
    std::fs::write(dir.join("server.key"), server.key_pem()).unwrap();
    cmg_ok(
        dir,
        &[
            "--data",
            "site",
            "admin",
            "cmg",
            "create",
            "--name",
            "GraniteFalls",
            "--fqdn",
            "granitefalls.contoso.com",
            "--server-cert",
            "server.crt",
            "--server-key",
            "server.key",
            "--tunnel-host",
            "127.0.0.1",
        ],
    );
    add_ok(dir, "cp2", "cp2");

    let (out, err) = (dir.join("run.out"), dir.join("run.err"));
    let child = Command::new(BIN)
        .current_dir(dir)
        .args(["--data", "cp2", "connector", "run"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    wait_until(
        "the connection point to be ready",
        Duration::from_secs(30),
        || {
            if let Some(status) = running.0.try_wait().unwrap() {
                panic!("exited with {status}: {}", read_log(&err));
            }
            read_log(&out).lines().any(|l| l == "ready").then_some(())
        },
    );
    assert!(
        read_log(&out).contains("Connection point cp2 for CMG GraniteFalls"),
        "{}",
        read_log(&out)
    );
    let log = dir.join("cp2/logs/SMS_Cloud_ProxyConnector.log");
    wait_until(
        "its log in its own directory",
        Duration::from_secs(10),
        || log.exists().then_some(()),
    );

    // Removed on the site server: it closes its tunnels and exits with the reason.
    cmg_ok(
        dir,
        &["--data", "site", "admin", "connector", "remove", "cp2"],
    );
    let status = wait_until(
        "the removed connection point to exit",
        Duration::from_secs(20),
        || running.0.try_wait().unwrap(),
    );
    assert!(!status.success());
    let stderr = read_log(&err);
    assert!(
        stderr.contains("this connection point was removed from the site")
            && stderr.contains("cmg admin connector add"),
        "{stderr}"
    );
    assert!(
        read_log(&log).contains("no longer trusts"),
        "{}",
        read_log(&log)
    );

    // Started again, it is refused at once with what to do.
    let err = cmg_err(dir, &["--data", "cp2", "connector", "run"]);
    assert!(
        err.contains("does not trust this connection point's certificate")
            && err.contains("cmg admin connector add"),
        "{err}"
    );
}
