//! The real `cmg` binary: site init and the bulk registration token tool (DESIGN §3.1, §8).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use serde_json::Value;

struct Site {
    _dir: tempfile::TempDir,
    data: PathBuf,
    /// Everything the commands printed on stderr (where diagnostics and logs go).
    stderr: std::cell::RefCell<String>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("cmg-data");
        Site {
            _dir: dir,
            data,
            stderr: Default::default(),
        }
    }

    fn initialised(extra: &[&str]) -> Site {
        let site = Site::new();
        let mut args = vec!["site", "init", "--site-code", "ABC"];
        args.extend_from_slice(extra);
        let out = site.run(&args);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        site
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_cmg"))
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .env("CMG_LOG", "trace")
            .output()
            .unwrap();
        self.stderr
            .borrow_mut()
            .push_str(&String::from_utf8_lossy(&out.stderr));
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `new` in the given form; returns (GUID line, validity line, token line).
    fn new_token(&self, args: &[&str]) -> (String, String, String) {
        let out = self.ok(args);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.len(),
            3,
            "new prints exactly GUID, validity, token: {out}"
        );
        (lines[0].into(), lines[1].into(), lines[2].into())
    }

    fn list(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.ok(&["bulk-token", "list", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn bulk_tokens(&self) -> Vec<Value> {
        self.list()
            .into_iter()
            .filter(|i| i["type"] == "Bulk Registration Token")
            .collect()
    }

    fn audit(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.ok(&["admin", "audit", "--json", "--limit", "1000"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[test]
fn new_with_defaults_prints_guid_expiry_and_token_and_list_shows_that_guid() {
    let site = Site::initialised(&[]);
    let (guid, validity, token) = site.new_token(&["bulk-token", "new"]);
    let c = claims(&token);
    assert_eq!(c["UniqueId"], guid);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["nbf"].as_i64().unwrap(),
        259_200
    );
    assert_eq!(c["Type"], "BulkRegistration");
    assert!(
        validity.starts_with("Token is valid until ") && validity.ends_with(" UTC."),
        "{validity}"
    );
    let tokens = site.bulk_tokens();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["id"], guid);
    assert_eq!(tokens[0]["status"], "Active");
}

#[test]
fn documented_tool_syntax_works() {
    let site = Site::initialised(&[]);
    let (guid, _, token) = site.new_token(&["bulk-token", "/new"]);
    let c = claims(&token);
    assert_eq!(c["UniqueId"], guid);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["nbf"].as_i64().unwrap(),
        259_200
    );
    let (_, _, token) = site.new_token(&["bulk-token", "/new", "/lifetime", "10080"]);
    let c = claims(&token);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["nbf"].as_i64().unwrap(),
        10080 * 60
    );
    let (_, _, token) = site.new_token(&["bulk-token", "/lifetime", "1", "/NEW"]);
    let c = claims(&token);
    assert_eq!(c["exp"].as_i64().unwrap() - c["nbf"].as_i64().unwrap(), 60);
    let help = site.ok(&["bulk-token", "/?"]);
    assert!(
        help.contains("/new") && help.contains("list") && help.contains("block"),
        "{help}"
    );
    assert_eq!(site.bulk_tokens().len(), 3);
}

#[test]
fn bad_lifetimes_are_refused_with_the_range_and_nothing_is_recorded() {
    let site = Site::initialised(&[]);
    let audit_before = site.audit().len();
    for bad in ["0", "10081", "-5", "abc", "1.5", ""] {
        for args in [
            vec!["bulk-token", "new", "--lifetime", bad],
            vec!["bulk-token", "/new", "/lifetime", bad],
        ] {
            let out = site.run(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} was accepted");
            assert!(stderr.contains("from 1 to 10080"), "{args:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{args:?} printed a token");
        }
    }
    assert!(site.bulk_tokens().is_empty());
    assert_eq!(site.audit().len(), audit_before);
}

#[test]
fn block_and_unblock_change_status_and_are_audited() {
    let site = Site::initialised(&[]);
    let (guid, _, _) = site.new_token(&["bulk-token", "new"]);
    let out = site.ok(&["bulk-token", "block", &guid]);
    assert!(out.contains("blocked"));
    assert_eq!(site.bulk_tokens()[0]["status"], "Blocked");
    site.ok(&["bulk-token", "unblock", &guid]);
    assert_eq!(site.bulk_tokens()[0]["status"], "Active");
    let audit = site.audit();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .filter(|e| e["target"] == guid.as_str())
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    let actor = actions.first().map(|a| a.1).unwrap_or_default();
    assert!(!actor.is_empty());
    // Newest first.
    assert_eq!(
        actions.iter().map(|a| a.0).collect::<Vec<_>>(),
        [
            "bulk_token.unblock",
            "bulk_token.block",
            "bulk_token.create"
        ]
    );

    for (args, expect) in [
        (
            vec![
                "bulk-token",
                "block",
                "00000000-0000-4000-8000-000000000000",
            ],
            "no bulk",
        ),
        (vec!["bulk-token", "block", "not-a-guid"], "not a GUID"),
    ] {
        let out = site.run(&args);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "{args:?}"
        );
    }
}

#[test]
fn the_token_is_never_written_anywhere() {
    let site = Site::initialised(&[]);
    let mut tokens = Vec::new();
    for args in [
        &["bulk-token", "new"][..],
        &["bulk-token", "/new", "/lifetime", "60"],
    ] {
        let (guid, _, token) = site.new_token(args);
        site.ok(&["bulk-token", "block", &guid]);
        site.ok(&["bulk-token", "list"]);
        tokens.push(token);
    }
    site.ok(&["admin", "audit"]);
    let mut files = Vec::new();
    collect_files(&site.data, &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("site.db")),
        "the database was searched"
    );
    for token in &tokens {
        let signature = token.rsplit('.').next().unwrap();
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            for needle in [token.as_str(), signature] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{} holds the token",
                    file.display()
                );
            }
        }
        assert!(
            !site.stderr.borrow().contains(signature),
            "a log line holds the token"
        );
    }
    assert!(
        !site.stderr.borrow().is_empty(),
        "trace logging produced output to search"
    );
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn site_init_refuses_bad_site_codes_and_creates_nothing() {
    for bad in ["AB", "ABCD", "A-C", "", "A C"] {
        let site = Site::new();
        let out = site.run(&["site", "init", "--site-code", bad]);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("three letters or digits"));
        assert!(!site.data.exists(), "{bad:?} left files behind");
    }
}

#[test]
fn site_init_refuses_to_overwrite_a_site() {
    let site = Site::initialised(&[]);
    let config = std::fs::read(site.data.join("site.toml")).unwrap();
    let jwks = site.ok(&["site", "jwks"]);
    let out = site.run(&["site", "init", "--site-code", "XYZ"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(site.data.join("site.toml")).unwrap(), config);
    assert_eq!(site.ok(&["site", "jwks"]), jwks);
}

#[cfg(unix)]
#[test]
fn key_files_and_site_config_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::initialised(&["--token-key", "rsa-2048"]);
    let mut files = Vec::new();
    collect_files(&site.data, &mut files);
    let keys: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "key"))
        .collect();
    assert_eq!(
        keys.len(),
        4,
        "site root, token signing, MP and connection point keys"
    );
    for f in keys.into_iter().chain([&site.data.join("site.toml")]) {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
}

/// The JWKS that `cmg site jwks` prints verifies the tokens it mints with an independent
/// implementation (the jsonwebtoken crate), for ES256 and RS256 sites and across key rotation.
#[test]
fn jwks_verifies_minted_tokens_across_rotation() {
    for (flag, alg) in [
        ("ecdsa-p256", jsonwebtoken::Algorithm::ES256),
        ("rsa-2048", jsonwebtoken::Algorithm::RS256),
    ] {
        let site = Site::initialised(&["--token-key", flag]);
        let (_, _, old_token) = site.new_token(&["bulk-token", "new"]);
        verify_with_jwks(&site, &old_token, alg);
        site.ok(&["site", "token-key", "rotate"]);
        let (_, _, new_token) = site.new_token(&["bulk-token", "new"]);
        verify_with_jwks(&site, &new_token, jsonwebtoken::Algorithm::ES256);
        verify_with_jwks(&site, &old_token, alg);
        let old_kid = kid(&old_token);
        assert_ne!(old_kid, kid(&new_token));
        let signing: Vec<Value> = site
            .list()
            .into_iter()
            .filter(|i| i["type"] == "Token Signing")
            .collect();
        assert_eq!(signing.len(), 2);
        // The new signer cannot be retired; the old one can, and then stops verifying.
        assert!(
            !site
                .run(&["site", "token-key", "retire", &kid(&new_token)])
                .status
                .success()
        );
        site.ok(&["site", "token-key", "retire", &old_kid]);
        let jwks: Value = serde_json::from_str(&site.ok(&["site", "jwks"])).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert_ne!(jwks["keys"][0]["kid"], old_kid.as_str());
    }
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn verify_with_jwks(site: &Site, token: &str, alg: jsonwebtoken::Algorithm) {
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&site.ok(&["site", "jwks"])).unwrap();
    let jwk = jwks
        .find(&kid(token))
        .expect("the token's key is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.set_audience(&["urn:sccm:service"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation).unwrap();
    assert_eq!(data.claims["Type"], "BulkRegistration");
}

/// The same tool against a PostgreSQL site database, when the suite has one.
#[tokio::test]
async fn the_tool_works_on_a_postgres_site() {
    let Some(server) = std::env::var(cmg_store::testing::POSTGRES_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    else {
        return; // SQLite is covered above; .ci/run sets CMG_TEST_POSTGRES.
    };
    let db = cmg_store::testing::postgres_store(&server).await;
    let site = Site::initialised(&["--db", db.url()]);
    assert!(
        !site.data.join("site.db").exists(),
        "the embedded database was not used"
    );
    let (guid, _, _) = site.new_token(&["bulk-token", "/new", "/lifetime", "120"]);
    site.ok(&["bulk-token", "block", &guid]);
    assert_eq!(site.bulk_tokens()[0]["status"], "Blocked");
    let record = db
        .store
        .bulk_token(guid.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(record.blocked);
    assert_eq!(record.valid_until - record.valid_from, 7200);
}

#[test]
fn a_site_made_with_a_relative_data_dir_works_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let init = Command::new(env!("CARGO_BIN_EXE_cmg"))
        .current_dir(dir.path())
        .args(["--data", "cmg-data", "site", "init", "--site-code", "ABC"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let data = dir.path().join("cmg-data");
    let out = Command::new(env!("CARGO_BIN_EXE_cmg"))
        .current_dir(elsewhere.path())
        .arg("--data")
        .arg(&data)
        .args(["bulk-token", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a site made from another directory must open: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
