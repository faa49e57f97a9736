//! Store behaviour on every backend: each test loops over `test_stores()` (SQLite always,
//! PostgreSQL when CMG_TEST_POSTGRES is set).

use std::time::Duration;

use cmg_store::testing::test_stores;
use cmg_store::{
    Backend, BulkTokenRecord, CertPurpose, CertStatus, CertificateRecord, DeviceRecord, SiteRecord,
    Store, StoreError,
};
use tokio::task::JoinSet;
use uuid::Uuid;

fn site(code: &str) -> SiteRecord {
    SiteRecord {
        site_code: code.to_owned(),
        hierarchy_id: Uuid::new_v4(),
        created_at: 1_700_000_000,
        token_key_alg: "ES256".to_owned(),
    }
}

fn cert(n: u8, purpose: CertPurpose) -> CertificateRecord {
    CertificateRecord {
        thumbprint_sha256: format!("sha256-{n}"),
        thumbprint_sha1: format!("sha1-{n}"),
        purpose,
        subject: format!("CN=cert {n}"),
        not_before: 1_700_000_000 + i64::from(n),
        not_after: 1_800_000_000,
        status: CertStatus::Active,
        key_alg: "ECDSA_P256".to_owned(),
        // Every byte value, NUL included, must survive the round trip.
        cert_der: (0..=255u8).chain([0, n]).collect(),
        created_at: 1_700_000_000 + i64::from(n),
        retire_after: None,
    }
}

fn bulk_token(created_at: i64) -> BulkTokenRecord {
    BulkTokenRecord {
        id: Uuid::new_v4(),
        valid_from: created_at,
        valid_until: created_at + 4320 * 60,
        created_at,
        created_by: "CONTOSO\\admin".to_owned(),
        blocked: false,
    }
}

fn device(n: usize) -> DeviceRecord {
    DeviceRecord {
        client_id: format!("GUID:{}", Uuid::new_v4().to_string().to_uppercase()),
        hardware_id: format!("hw-{}", n % 7),
        cert_thumbprint: format!("thumb-{n}"),
        hostname: format!("pc-{n}"),
        os: "Windows 11".to_owned(),
        agent_version: "5.0.0".to_owned(),
        registered_via: "BulkRegistration".to_owned(),
        bulk_token_id: n.is_multiple_of(2).then(Uuid::new_v4),
        approved: !n.is_multiple_of(3),
        blocked: n.is_multiple_of(5),
        registered_at: 1_700_000_000 + i64::try_from(n).unwrap_or(0),
        last_seen_at: (n % 2 == 1).then_some(1_700_100_000),
        last_seen_via: (n % 2 == 1).then(|| "CMG".to_owned()),
    }
}

/// Inserts every device concurrently; the results in the same order.
async fn insert_concurrently(
    store: &Store,
    devices: Vec<DeviceRecord>,
) -> Vec<Result<(), StoreError>> {
    let mut tasks = JoinSet::new();
    for (i, d) in devices.into_iter().enumerate() {
        let store = store.clone();
        tasks.spawn(async move { (i, store.insert_device(d).await) });
    }
    let mut results: Vec<_> = tasks.join_all().await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[tokio::test]
async fn backends_are_the_ones_asked_for() {
    let stores = test_stores().await;
    assert_eq!(stores[0].store.backend(), Backend::Sqlite);
    if std::env::var("CMG_TEST_POSTGRES").is_ok_and(|v| !v.is_empty()) {
        assert_eq!(stores.len(), 2);
        assert_eq!(stores[1].store.backend(), Backend::Postgres);
    }
}

#[tokio::test]
async fn migrations_are_idempotent() {
    for t in test_stores().await {
        let token = bulk_token(1_700_000_000);
        t.store.init_site(&site("ABC"), &[], "admin").await.unwrap();
        t.store.record_bulk_token(&token).await.unwrap();
        let version = t.store.change_version().await.unwrap();
        t.store.close().await;

        // Opening again re-runs the migration step: nothing is re-applied, nothing is lost —
        // also with two handles open at once.
        let again = t.open_again().await;
        let third = t.open_again().await;
        for s in [&again, &third] {
            assert_eq!(
                s.site().await.unwrap().unwrap().site_code,
                "ABC",
                "{}",
                t.label
            );
            assert_eq!(
                s.bulk_tokens().await.unwrap(),
                vec![token.clone()],
                "{}",
                t.label
            );
            assert_eq!(s.change_version().await.unwrap(), version, "{}", t.label);
        }
    }
}

#[tokio::test]
async fn a_second_site_init_is_refused_and_changes_nothing() {
    for t in test_stores().await {
        let s = &t.store;
        assert_eq!(s.site().await.unwrap(), None, "{}", t.label);
        let first = site("ABC");
        let certs = [
            cert(1, CertPurpose::SiteIssuingRoot),
            cert(2, CertPurpose::TokenSigning),
        ];
        s.init_site(&first, &certs, "setup").await.unwrap();
        let snapshot = (
            s.site().await.unwrap(),
            s.certificates().await.unwrap(),
            s.audit_log(100).await.unwrap(),
            s.change_version().await.unwrap(),
        );
        assert_eq!(snapshot.0.as_ref(), Some(&first), "{}", t.label);

        let err = s
            .init_site(
                &site("XYZ"),
                &[cert(3, CertPurpose::ManagementPoint)],
                "intruder",
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::SiteExists), "{}: {err}", t.label);
        let after = (
            s.site().await.unwrap(),
            s.certificates().await.unwrap(),
            s.audit_log(100).await.unwrap(),
            s.change_version().await.unwrap(),
        );
        assert_eq!(after, snapshot, "{}", t.label);
    }
}

#[tokio::test]
async fn certificates_round_trip_and_changes_are_audited() {
    for t in test_stores().await {
        let s = &t.store;
        let v0 = s.change_version().await.unwrap();
        let mut certs = vec![
            cert(1, CertPurpose::SiteIssuingRoot),
            cert(2, CertPurpose::TokenSigning),
            cert(3, CertPurpose::ManagementPoint),
        ];
        s.init_site(&site("ABC"), &certs, "setup").await.unwrap();
        assert_eq!(s.certificates().await.unwrap(), certs, "{}", t.label);

        let mut rotated = cert(4, CertPurpose::TokenSigning);
        rotated.retire_after = Some(1_900_000_000);
        s.add_certificate(&rotated, "alice").await.unwrap();
        s.set_certificate_retire_after("sha256-2", Some(1_750_000_000), "alice")
            .await
            .unwrap();
        s.set_certificate_status("sha256-2", CertStatus::Retired, "bob")
            .await
            .unwrap();
        s.set_certificate_retire_after("sha256-4", None, "bob")
            .await
            .unwrap();
        certs[1].retire_after = Some(1_750_000_000);
        certs[1].status = CertStatus::Retired;
        rotated.retire_after = None;
        certs.push(rotated.clone());
        assert_eq!(s.certificates().await.unwrap(), certs, "{}", t.label);
        assert_eq!(s.change_version().await.unwrap(), v0 + 5, "{}", t.label);

        let log: Vec<_> = s
            .audit_log(100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.actor, e.action, e.target))
            .collect();
        let expected = [
            ("bob", "certificate.retire_after", "sha256-4"),
            ("bob", "certificate.status", "sha256-2"),
            ("alice", "certificate.retire_after", "sha256-2"),
            ("alice", "certificate.add", "sha256-4"),
            ("setup", "site.init", "ABC"),
        ]
        .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
        assert_eq!(log, expected, "{}", t.label);
        assert_eq!(s.audit_log(2).await.unwrap().len(), 2, "{}", t.label);

        // Refused changes leave no trace.
        let err = s.add_certificate(&rotated, "alice").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists { id, .. } if id == "sha256-4"),
            "{}: {err}",
            t.label
        );
        let err = s
            .set_certificate_status("sha256-nope", CertStatus::Retired, "bob")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if id == "sha256-nope"),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 5, "{}", t.label);
        assert_eq!(s.certificates().await.unwrap(), certs, "{}", t.label);
    }
}

#[tokio::test]
async fn bulk_tokens_are_recorded_blocked_and_unblocked_with_audit() {
    for t in test_stores().await {
        let s = &t.store;
        let first = bulk_token(1_700_000_200);
        let mut second = bulk_token(1_700_000_100);
        second.blocked = true;
        s.record_bulk_token(&first).await.unwrap();
        s.record_bulk_token(&second).await.unwrap();
        assert_eq!(
            s.bulk_tokens().await.unwrap(),
            vec![second.clone(), first.clone()],
            "{}: oldest first",
            t.label
        );
        assert_eq!(s.bulk_token(first.id).await.unwrap().as_ref(), Some(&first));
        assert_eq!(s.bulk_token(Uuid::new_v4()).await.unwrap(), None);
        assert_eq!(s.blocked_bulk_tokens().await.unwrap(), vec![second.id]);
        let created = s.audit_log(1).await.unwrap().remove(0);
        assert_eq!(
            (created.actor.as_str(), created.action.as_str()),
            ("CONTOSO\\admin", "bulk_token.create"),
            "{}",
            t.label
        );
        assert_eq!(created.target, second.id.to_string());

        let v0 = s.change_version().await.unwrap();
        let blocked = s
            .set_bulk_token_blocked(first.id, true, "alice")
            .await
            .unwrap();
        assert_eq!(
            blocked,
            BulkTokenRecord {
                blocked: true,
                ..first.clone()
            },
            "{}",
            t.label
        );
        assert_eq!(s.bulk_token(first.id).await.unwrap(), Some(blocked));
        assert_eq!(
            s.blocked_bulk_tokens().await.unwrap(),
            vec![second.id, first.id],
            "{}",
            t.label
        );
        let v1 = s.change_version().await.unwrap();
        assert!(v1 > v0, "{}: block must bump the change version", t.label);
        let entry = s.audit_log(1).await.unwrap().remove(0);
        assert_eq!(
            (
                entry.actor.as_str(),
                entry.action.as_str(),
                entry.target.as_str()
            ),
            ("alice", "bulk_token.block", first.id.to_string().as_str()),
            "{}",
            t.label
        );

        let unblocked = s
            .set_bulk_token_blocked(first.id, false, "bob")
            .await
            .unwrap();
        assert_eq!(unblocked, first, "{}", t.label);
        assert_eq!(s.blocked_bulk_tokens().await.unwrap(), vec![second.id]);
        assert!(s.change_version().await.unwrap() > v1, "{}", t.label);
        let entry = s.audit_log(1).await.unwrap().remove(0);
        assert_eq!(
            (
                entry.actor.as_str(),
                entry.action.as_str(),
                entry.target.as_str()
            ),
            ("bob", "bulk_token.unblock", first.id.to_string().as_str()),
            "{}",
            t.label
        );
        assert_eq!(s.audit_log(100).await.unwrap().len(), 4, "{}", t.label);
    }
}

#[tokio::test]
async fn blocking_an_unknown_bulk_token_is_not_found() {
    for t in test_stores().await {
        let s = &t.store;
        let v0 = s.change_version().await.unwrap();
        let id = Uuid::new_v4();
        let err = s
            .set_bulk_token_blocked(id, true, "alice")
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { .. }),
            "{}: {err}",
            t.label
        );
        assert!(
            err.to_string().contains(&id.to_string()),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0, "{}", t.label);
        assert!(s.audit_log(10).await.unwrap().is_empty(), "{}", t.label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_a_second_handle_are_seen() {
    for t in test_stores().await {
        // The running site and the CLI: two stores on one database.
        let site = &t.store;
        if let Some(path) = t.url().strip_prefix("sqlite://") {
            // WAL is what lets the CLI write while the site reads.
            let wal = format!("{path}-wal");
            assert!(
                std::path::Path::new(&wal).exists(),
                "{wal} missing: not in WAL mode"
            );
        }
        let cli = t.open_again().await;
        let v0 = site.change_version().await.unwrap();
        let token = bulk_token(1_700_000_000);
        cli.record_bulk_token(&token).await.unwrap();
        let v1 = site.change_version().await.unwrap();
        assert!(v1 > v0, "{}", t.label);
        assert_eq!(
            site.bulk_token(token.id).await.unwrap().as_ref(),
            Some(&token)
        );
        cli.set_bulk_token_blocked(token.id, true, "cli")
            .await
            .unwrap();
        assert!(site.change_version().await.unwrap() > v1, "{}", t.label);
        assert_eq!(site.blocked_bulk_tokens().await.unwrap(), vec![token.id]);

        // Both write at once: the busy timeout serialises them, nobody fails.
        let (a, b) = tokio::join!(
            insert_concurrently(site, (0..200).map(device).collect()),
            insert_concurrently(&cli, (200..400).map(device).collect()),
        );
        for r in a.into_iter().chain(b) {
            r.unwrap();
        }
        assert_eq!(site.devices().await.unwrap().len(), 400, "{}", t.label);
        cli.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_device_inserts_are_grouped_into_few_commits() {
    for t in test_stores().await {
        let s = &t.store;
        let mut devices: Vec<_> = (0..500).map(device).collect();
        let before = s.commit_batches();
        for r in insert_concurrently(s, devices.clone()).await {
            r.unwrap();
        }
        let commits = s.commit_batches() - before;
        assert!(
            (1..500).contains(&commits),
            "{}: 500 rows took {commits} commits",
            t.label
        );
        let mut stored = s.devices().await.unwrap();
        stored.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        devices.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        assert_eq!(stored, devices, "{}", t.label);
    }
}

#[tokio::test]
async fn a_duplicate_client_id_fails_only_its_caller() {
    for t in test_stores().await {
        let s = &t.store;
        let existing = device(1000);
        s.insert_device(existing.clone()).await.unwrap();

        let fresh: Vec<_> = (0..100).map(device).collect();
        let twice = device(2000);
        let mut batch = fresh.clone();
        batch.push(DeviceRecord {
            hostname: "impostor".to_owned(),
            ..existing.clone()
        });
        batch.push(twice.clone());
        batch.push(DeviceRecord {
            hostname: "twin".to_owned(),
            ..twice.clone()
        });
        let results = insert_concurrently(s, batch).await;

        for r in &results[..100] {
            assert!(r.is_ok(), "{}: {r:?}", t.label);
        }
        assert!(
            matches!(&results[100], Err(StoreError::DeviceExists(id)) if *id == existing.client_id),
            "{}: {:?}",
            t.label,
            results[100]
        );
        // Of two callers with one new ID, exactly one wins.
        let twins = &results[101..];
        assert_eq!(
            twins.iter().filter(|r| r.is_ok()).count(),
            1,
            "{}: {twins:?}",
            t.label
        );
        assert!(
            twins
                .iter()
                .any(|r| matches!(r, Err(StoreError::DeviceExists(id)) if *id == twice.client_id)),
            "{}: {twins:?}",
            t.label
        );
        assert_eq!(s.devices().await.unwrap().len(), 102, "{}", t.label);
        assert_eq!(s.device(&existing.client_id).await.unwrap(), Some(existing));
    }
}

#[tokio::test]
async fn devices_are_found_by_client_id_and_hardware_id() {
    for t in test_stores().await {
        let s = &t.store;
        let devices: Vec<_> = (0..14).map(device).collect();
        for r in insert_concurrently(s, devices.clone()).await {
            r.unwrap();
        }
        // device(n) has hardware ID hw-(n % 7): 3 and 10 share one.
        assert_eq!(
            s.devices_by_hardware_id("hw-3").await.unwrap(),
            vec![devices[3].clone(), devices[10].clone()],
            "{}",
            t.label
        );
        assert!(s.devices_by_hardware_id("hw-x").await.unwrap().is_empty());
        assert_eq!(
            s.device(&devices[5].client_id).await.unwrap().as_ref(),
            Some(&devices[5])
        );
        assert_eq!(s.device("GUID:NOPE").await.unwrap(), None);
        assert_eq!(
            s.devices().await.unwrap(),
            devices,
            "{}: registration order",
            t.label
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_answers_every_pending_caller() {
    for t in test_stores().await {
        let devices: Vec<_> = (0..300).map(device).collect();
        let inserts = tokio::spawn({
            let store = t.store.clone();
            let devices = devices.clone();
            async move { insert_concurrently(&store, devices).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        t.store.close().await;
        let results = tokio::time::timeout(Duration::from_secs(30), inserts)
            .await
            .expect("a caller hangs after close")
            .unwrap();
        let err = t.store.insert_device(device(999)).await.unwrap_err();
        assert!(matches!(err, StoreError::Closed), "{}: {err}", t.label);

        // Every caller told "Ok" has its row durable; every other was told "closed".
        let again = t.open_again().await;
        for (d, r) in devices.iter().zip(&results) {
            match r {
                Ok(()) => assert_eq!(again.device(&d.client_id).await.unwrap().as_ref(), Some(d)),
                Err(e) => assert!(matches!(e, StoreError::Closed), "{}: {e}", t.label),
            }
        }
    }
}

#[tokio::test]
async fn open_errors_name_the_database_but_never_its_password() {
    let err = Store::open("postgres://cmg:hunter2@127.0.0.1:1/site")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Open { .. }), "{text}");
    assert!(text.contains("cmg:***@127.0.0.1:1/site"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let err = Store::open("mysql://cmg:hunter2@db/site")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("site.db");
    let err = Store::open(&format!("sqlite://{}", missing.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}
