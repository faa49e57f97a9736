//! What the management point and the admin service build on — device conflicts and merges,
//! re-registration, blocking and approval, client settings, management points, CMG definitions
//! and idempotent status messages — on every backend: each test loops over `test_stores()`
//! (SQLite always, PostgreSQL when CMG_TEST_POSTGRES is set).

use cmg_store::testing::test_stores;
use cmg_store::{
    CertPurpose, CertStatus, CertificateRecord, CmgRecord, DeviceConflict, DeviceRecord, MpRecord,
    StatusMessageRecord, StatusRow, Store, StoreError,
};
use tokio::task::JoinSet;
use uuid::Uuid;

fn client_id() -> String {
    format!("GUID:{}", Uuid::new_v4().to_string().to_uppercase())
}

fn device(n: usize) -> DeviceRecord {
    DeviceRecord {
        client_id: client_id(),
        hardware_id: format!("hw-{n}"),
        cert_thumbprint: format!("thumb-{n}"),
        hostname: format!("pc-{n}"),
        os: "Windows 11".to_owned(),
        agent_version: "5.0.0".to_owned(),
        registered_via: "InternalNetwork".to_owned(),
        bulk_token_id: None,
        approved: false,
        blocked: false,
        registered_at: 1_700_000_000 + i64::try_from(n).unwrap_or(0),
        last_seen_at: None,
        last_seen_via: None,
    }
}

/// A re-install of `existing`'s machine: same hardware ID, a new record and certificate.
fn reinstall(existing: &DeviceRecord, n: usize) -> DeviceRecord {
    DeviceRecord {
        hardware_id: existing.hardware_id.clone(),
        hostname: format!("{}-new", existing.hostname),
        os: "Windows 11 24H2".to_owned(),
        agent_version: "5.1.0".to_owned(),
        registered_via: "BulkRegistration".to_owned(),
        bulk_token_id: Some(Uuid::new_v4()),
        last_seen_at: Some(1_700_500_000),
        last_seen_via: Some("CMG".to_owned()),
        ..device(n)
    }
}

/// The newest audit entry as (actor, action, target, detail).
async fn last_audit(s: &Store) -> (String, String, String, String) {
    let e = s.audit_log(1).await.unwrap().remove(0);
    (e.actor, e.action, e.target, e.detail)
}

/// (actor, action, target) of the newest `n` audit entries, newest first.
async fn audits(s: &Store, n: u32) -> Vec<(String, String, String)> {
    s.audit_log(n)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.actor, e.action, e.target))
        .collect()
}

fn entries(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected
        .iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

/// Inserts every device concurrently, each with its conflict (the existing record's client ID)
/// if any; the results in the same order.
async fn insert_concurrently(
    store: &Store,
    devices: Vec<(DeviceRecord, Option<String>)>,
) -> Vec<Result<(), StoreError>> {
    let mut tasks = JoinSet::new();
    for (i, (d, existing)) in devices.into_iter().enumerate() {
        let store = store.clone();
        tasks.spawn(async move {
            let result = match existing {
                Some(existing) => store.insert_conflicting_device(d, &existing).await,
                None => store.insert_device(d).await,
            };
            (i, result)
        });
    }
    let mut results: Vec<_> = tasks.join_all().await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// (new, existing) client IDs of the unresolved conflicts, sorted.
async fn open_conflicts(s: &Store) -> Vec<(String, String)> {
    let mut pairs: Vec<_> = s
        .device_conflicts(false)
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!((c.resolved_at, c.resolution), (None, None));
            (c.new_client_id, c.existing_client_id)
        })
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test]
async fn a_conflicting_registration_is_merged_into_the_existing_record() {
    for t in test_stores().await {
        let s = &t.store;
        let existing = device(1);
        s.insert_device(existing.clone()).await.unwrap();
        let other = device(2);
        s.insert_device(other.clone()).await.unwrap();

        let before = cmg_now();
        let new = reinstall(&existing, 3);
        s.insert_conflicting_device(new.clone(), &existing.client_id)
            .await
            .unwrap();
        // A second re-install, detected against the first one.
        let newer = reinstall(&new, 4);
        s.insert_conflicting_device(newer.clone(), &new.client_id)
            .await
            .unwrap();
        assert_eq!(s.device(&new.client_id).await.unwrap().as_ref(), Some(&new));
        let conflicts = s.device_conflicts(false).await.unwrap();
        assert_eq!(conflicts.len(), 2, "{}: {conflicts:?}", t.label);
        let detected_at = conflicts[0].detected_at;
        assert!(
            (before..=cmg_now()).contains(&detected_at),
            "{}: {conflicts:?}",
            t.label
        );
        let conflict = |new: &DeviceRecord, existing: &DeviceRecord, detected_at| DeviceConflict {
            new_client_id: new.client_id.clone(),
            existing_client_id: existing.client_id.clone(),
            detected_at,
            resolved_at: None,
            resolution: None,
        };
        // Oldest first; within one second, by client ID.
        let mut expected = vec![
            conflict(&new, &existing, detected_at),
            conflict(&newer, &new, conflicts[1].detected_at),
        ];
        expected.sort_by(|a, b| {
            (a.detected_at, &a.new_client_id).cmp(&(b.detected_at, &b.new_client_id))
        });
        assert_eq!(conflicts, expected, "{}", t.label);
        assert_eq!(
            s.device_conflicts(true).await.unwrap(),
            conflicts,
            "{}",
            t.label
        );
        // Registrations are not admin changes.
        assert!(s.audit_log(10).await.unwrap().is_empty(), "{}", t.label);

        let v0 = s.change_version().await.unwrap();
        let merged = s
            .merge_device_conflict(&new.client_id, "alice")
            .await
            .unwrap();
        let expected = DeviceRecord {
            cert_thumbprint: new.cert_thumbprint.clone(),
            hostname: new.hostname.clone(),
            os: new.os.clone(),
            agent_version: new.agent_version.clone(),
            last_seen_at: new.last_seen_at,
            last_seen_via: new.last_seen_via.clone(),
            ..existing.clone()
        };
        assert_eq!(merged, expected, "{}", t.label);
        assert_eq!(
            s.device(&existing.client_id).await.unwrap().as_ref(),
            Some(&expected),
            "{}",
            t.label
        );
        assert_eq!(s.device(&new.client_id).await.unwrap(), None, "{}", t.label);
        assert_eq!(
            s.device(&other.client_id).await.unwrap().as_ref(),
            Some(&other),
            "{}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 1, "{}", t.label);
        let (actor, action, target, detail) = last_audit(s).await;
        assert_eq!(
            (actor.as_str(), action.as_str(), target.as_str()),
            ("alice", "device.merge", existing.client_id.as_str()),
            "{}",
            t.label
        );
        assert!(detail.contains(&new.client_id), "{}: {detail}", t.label);

        // The merged conflict is kept, resolved; the one against the deleted record now names
        // the surviving record.
        let all = s.device_conflicts(true).await.unwrap();
        assert_eq!(all.len(), 2, "{}: {all:?}", t.label);
        let resolved = all
            .iter()
            .find(|c| c.new_client_id == new.client_id)
            .unwrap();
        assert_eq!(
            resolved.existing_client_id, existing.client_id,
            "{}",
            t.label
        );
        assert_eq!(
            resolved.resolution.as_deref(),
            Some("merged"),
            "{}",
            t.label
        );
        assert!(
            resolved.resolved_at.is_some_and(|at| at >= before),
            "{}: {all:?}",
            t.label
        );
        assert_eq!(
            open_conflicts(s).await,
            vec![(newer.client_id.clone(), existing.client_id.clone())],
            "{}",
            t.label
        );

        // Merging again, or a record without a conflict, finds nothing and changes nothing.
        for id in [&new.client_id, &other.client_id, &client_id()] {
            let err = s.merge_device_conflict(id, "alice").await.unwrap_err();
            assert!(
                matches!(&err, StoreError::NotFound { id: found, .. } if found == id),
                "{}: {err}",
                t.label
            );
        }
        assert_eq!(s.change_version().await.unwrap(), v0 + 1, "{}", t.label);

        let merged = s
            .merge_device_conflict(&newer.client_id, "bob")
            .await
            .unwrap();
        assert_eq!(merged.client_id, existing.client_id, "{}", t.label);
        assert_eq!(merged.cert_thumbprint, newer.cert_thumbprint, "{}", t.label);
        assert!(open_conflicts(s).await.is_empty(), "{}", t.label);
        assert_eq!(s.devices().await.unwrap().len(), 2, "{}", t.label);

        // A conflict with a record that does not exist is refused, and nothing is stored.
        let orphan = device(5);
        let missing = client_id();
        let err = s
            .insert_conflicting_device(orphan.clone(), &missing)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if *id == missing),
            "{}: {err}",
            t.label
        );
        assert_eq!(
            s.device(&orphan.client_id).await.unwrap(),
            None,
            "{}",
            t.label
        );
        assert_eq!(
            s.device_conflicts(true).await.unwrap().len(),
            2,
            "{}",
            t.label
        );
    }
}

/// The store's clock, for bounds on the times it records.
fn cmg_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_registrations_share_batches_with_plain_ones() {
    for t in test_stores().await {
        let s = &t.store;
        let existing: Vec<_> = (0..20).map(device).collect();
        for d in &existing {
            s.insert_device(d.clone()).await.unwrap();
        }

        // All valid: grouped into few commits, every conflict row with its device row.
        let mut wave: Vec<_> = (100..300).map(|n| (device(n), None)).collect();
        let mut expected = Vec::new();
        for (i, e) in existing[..10].iter().enumerate() {
            let new = reinstall(e, 1000 + i);
            expected.push((new.client_id.clone(), e.client_id.clone()));
            wave.insert(i * 20, (new, Some(e.client_id.clone())));
        }
        let rows = wave.len();
        let before = s.commit_batches();
        for r in insert_concurrently(s, wave.clone()).await {
            r.unwrap();
        }
        let commits = s.commit_batches() - before;
        assert!(
            (1..u64::try_from(rows).unwrap()).contains(&commits),
            "{}: {rows} rows took {commits} commits",
            t.label
        );
        expected.sort();
        assert_eq!(open_conflicts(s).await, expected, "{}", t.label);
        for (d, _) in &wave {
            assert_eq!(s.device(&d.client_id).await.unwrap().as_ref(), Some(d));
        }

        // Bad rows among them fail only their callers; the retried good rows keep their
        // conflicts, the refused ones leave no trace.
        let mut wave: Vec<_> = (300..350).map(|n| (device(n), None)).collect();
        for (i, e) in existing[10..].iter().enumerate() {
            let new = reinstall(e, 2000 + i);
            expected.push((new.client_id.clone(), e.client_id.clone()));
            wave.insert(i * 5, (new, Some(e.client_id.clone())));
        }
        let missing = client_id();
        let orphan = device(3000);
        wave.push((orphan.clone(), Some(missing.clone())));
        let taken = DeviceRecord {
            hostname: "impostor".to_owned(),
            ..existing[0].clone()
        };
        wave.push((taken, Some(existing[1].client_id.clone())));
        let results = insert_concurrently(s, wave.clone()).await;
        let n = wave.len();
        for r in &results[..n - 2] {
            assert!(r.is_ok(), "{}: {r:?}", t.label);
        }
        assert!(
            matches!(&results[n - 2], Err(StoreError::NotFound { id, .. }) if *id == missing),
            "{}: {:?}",
            t.label,
            results[n - 2]
        );
        assert!(
            matches!(&results[n - 1], Err(StoreError::DeviceExists(id)) if *id == existing[0].client_id),
            "{}: {:?}",
            t.label,
            results[n - 1]
        );
        expected.sort();
        assert_eq!(open_conflicts(s).await, expected, "{}", t.label);
        assert_eq!(
            s.device(&orphan.client_id).await.unwrap(),
            None,
            "{}",
            t.label
        );
        assert_eq!(
            s.device(&existing[0].client_id).await.unwrap().as_ref(),
            Some(&existing[0]),
            "{}",
            t.label
        );
        assert_eq!(
            s.devices().await.unwrap().len(),
            20 + 210 + 60,
            "{}",
            t.label
        );
    }
}

#[tokio::test]
async fn re_registration_is_audited_only_when_it_takes_the_certificate_over() {
    for t in test_stores().await {
        let s = &t.store;
        let d = device(1);
        s.insert_device(d.clone()).await.unwrap();
        let v0 = s.change_version().await.unwrap();

        // Same certificate: routine.
        let same = s
            .update_device_registration(
                &d.client_id,
                &d.cert_thumbprint,
                "pc-renamed",
                "Windows 11 24H2",
                "5.1.0",
                "InternalNetwork",
                None,
                "MP",
            )
            .await
            .unwrap();
        let expected = DeviceRecord {
            hostname: "pc-renamed".to_owned(),
            os: "Windows 11 24H2".to_owned(),
            agent_version: "5.1.0".to_owned(),
            ..d.clone()
        };
        assert_eq!(same, expected, "{}", t.label);
        assert_eq!(
            s.device(&d.client_id).await.unwrap().as_ref(),
            Some(&expected)
        );
        assert_eq!(s.change_version().await.unwrap(), v0, "{}", t.label);
        assert!(s.audit_log(10).await.unwrap().is_empty(), "{}", t.label);

        // A new certificate takes the record over: tokens bound to the old one must stop working.
        let token = Uuid::new_v4();
        let taken = s
            .update_device_registration(
                &d.client_id,
                "thumb-new",
                "pc-renamed",
                "Windows 11 24H2",
                "5.1.0",
                "BulkRegistration",
                Some(token),
                "MP",
            )
            .await
            .unwrap();
        let expected = DeviceRecord {
            cert_thumbprint: "thumb-new".to_owned(),
            registered_via: "BulkRegistration".to_owned(),
            bulk_token_id: Some(token),
            ..expected
        };
        assert_eq!(taken, expected, "{}", t.label);
        assert_eq!(
            s.device(&d.client_id).await.unwrap().as_ref(),
            Some(&expected)
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 1, "{}", t.label);
        let (actor, action, target, detail) = last_audit(s).await;
        assert_eq!(
            (actor.as_str(), action.as_str(), target.as_str()),
            ("MP", "device.certificate_takeover", d.client_id.as_str()),
            "{}",
            t.label
        );
        assert!(
            detail.contains(&d.cert_thumbprint) && detail.contains("thumb-new"),
            "{}: {detail}",
            t.label
        );
        assert_eq!(s.audit_log(10).await.unwrap().len(), 1, "{}", t.label);

        let missing = client_id();
        let err = s
            .update_device_registration(&missing, "t", "h", "o", "a", "PKI", None, "MP")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if *id == missing),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 1, "{}", t.label);
    }
}

#[tokio::test]
async fn devices_are_blocked_unblocked_and_approved_with_audit() {
    for t in test_stores().await {
        let s = &t.store;
        let devices: Vec<_> = (0..4).map(device).collect();
        for d in &devices {
            s.insert_device(d.clone()).await.unwrap();
        }
        let [a, b, c, _] = &devices[..] else {
            unreachable!()
        };
        assert!(s.blocked_devices().await.unwrap().is_empty(), "{}", t.label);
        let v0 = s.change_version().await.unwrap();

        // Blocked out of registration order, listed in it.
        let blocked = s
            .set_device_blocked(&c.client_id, true, "alice")
            .await
            .unwrap();
        assert_eq!(
            blocked,
            DeviceRecord {
                blocked: true,
                ..c.clone()
            },
            "{}",
            t.label
        );
        s.set_device_blocked(&a.client_id, true, "alice")
            .await
            .unwrap();
        assert_eq!(
            s.blocked_devices().await.unwrap(),
            vec![a.client_id.clone(), c.client_id.clone()],
            "{}",
            t.label
        );
        let unblocked = s
            .set_device_blocked(&c.client_id, false, "bob")
            .await
            .unwrap();
        assert_eq!(unblocked, *c, "{}", t.label);
        assert_eq!(
            s.blocked_devices().await.unwrap(),
            vec![a.client_id.clone()],
            "{}",
            t.label
        );
        let approved = s.approve_device(&b.client_id, "bob").await.unwrap();
        assert_eq!(
            approved,
            DeviceRecord {
                approved: true,
                ..b.clone()
            },
            "{}",
            t.label
        );
        assert_eq!(s.device(&b.client_id).await.unwrap(), Some(approved));
        assert_eq!(s.change_version().await.unwrap(), v0 + 4, "{}", t.label);
        assert_eq!(
            audits(s, 10).await,
            entries(&[
                ("bob", "device.approve", &b.client_id),
                ("bob", "device.unblock", &c.client_id),
                ("alice", "device.block", &a.client_id),
                ("alice", "device.block", &c.client_id),
            ]),
            "{}",
            t.label
        );

        let missing = client_id();
        let err = s
            .set_device_blocked(&missing, true, "alice")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if *id == missing),
            "{}: {err}",
            t.label
        );
        let err = s.approve_device(&missing, "alice").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if *id == missing),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 4, "{}", t.label);
        assert_eq!(s.audit_log(10).await.unwrap().len(), 4, "{}", t.label);
    }
}

#[tokio::test]
async fn when_a_device_was_last_seen_only_moves_forward() {
    for t in test_stores().await {
        let s = &t.store;
        let d = device(1);
        s.insert_device(d.clone()).await.unwrap();
        let seen = async |s: &Store| {
            let d = s.device(&d.client_id).await.unwrap().unwrap();
            (d.last_seen_at, d.last_seen_via)
        };
        s.record_device_seen(&d.client_id, 1_700_000_100, "CMG")
            .await
            .unwrap();
        assert_eq!(
            seen(s).await,
            (Some(1_700_000_100), Some("CMG".to_owned())),
            "{}",
            t.label
        );
        s.record_device_seen(&d.client_id, 1_700_000_050, "Intranet")
            .await
            .unwrap();
        assert_eq!(
            seen(s).await,
            (Some(1_700_000_100), Some("CMG".to_owned())),
            "{}: an older sighting must not win",
            t.label
        );
        s.record_device_seen(&d.client_id, 1_700_000_200, "Intranet")
            .await
            .unwrap();
        assert_eq!(
            seen(s).await,
            (Some(1_700_000_200), Some("Intranet".to_owned())),
            "{}",
            t.label
        );
        assert!(s.audit_log(10).await.unwrap().is_empty(), "{}", t.label);
        let err = s
            .record_device_seen("GUID:NOPE", 1_700_000_300, "CMG")
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { .. }),
            "{}: {err}",
            t.label
        );
    }
}

#[tokio::test]
async fn client_settings_are_upserted_with_audit() {
    for t in test_stores().await {
        let s = &t.store;
        assert!(s.settings().await.unwrap().is_empty(), "{}", t.label);
        let v0 = s.change_version().await.unwrap();
        s.set_setting("PolicyPollMinutes", "60", "alice")
            .await
            .unwrap();
        s.set_setting("EnableCmg", "true", "alice").await.unwrap();
        s.set_setting("PolicyPollMinutes", "15", "bob")
            .await
            .unwrap();
        assert_eq!(
            s.settings().await.unwrap(),
            vec![
                ("EnableCmg".to_owned(), "true".to_owned()),
                ("PolicyPollMinutes".to_owned(), "15".to_owned()),
            ],
            "{}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 3, "{}", t.label);
        assert_eq!(
            last_audit(s).await,
            (
                "bob".to_owned(),
                "settings.set".to_owned(),
                "PolicyPollMinutes".to_owned(),
                "15".to_owned()
            ),
            "{}",
            t.label
        );
        assert_eq!(
            audits(s, 10).await,
            entries(&[
                ("bob", "settings.set", "PolicyPollMinutes"),
                ("alice", "settings.set", "EnableCmg"),
                ("alice", "settings.set", "PolicyPollMinutes"),
            ]),
            "{}",
            t.label
        );

        // Another process sees the change.
        let other = t.open_again().await;
        assert_eq!(other.settings().await.unwrap(), s.settings().await.unwrap());
        other.close().await;
    }
}

#[tokio::test]
async fn management_points_are_added_and_changed_with_audit() {
    for t in test_stores().await {
        let s = &t.store;
        let mp = |role_id: i64, name: &str| MpRecord {
            role_id,
            name: name.to_owned(),
            url: format!("https://{name}.contoso.com"),
            allow_cmg_traffic: false,
            created_at: 1_700_000_000,
        };
        let second = mp(72_186_325_152_220_500, "mp2");
        let first = mp(72_186_325_152_220_499, "mp1");
        let v0 = s.change_version().await.unwrap();
        s.add_management_point(&second, "alice").await.unwrap();
        s.add_management_point(&first, "alice").await.unwrap();
        assert_eq!(
            s.management_points().await.unwrap(),
            vec![first.clone(), second.clone()],
            "{}: by role ID",
            t.label
        );

        let err = s
            .add_management_point(&mp(second.role_id, "mp3"), "alice")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists { id, .. } if *id == second.role_id.to_string()),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 2, "{}", t.label);

        let changed = s
            .set_management_point(second.role_id, None, Some(true), "bob")
            .await
            .unwrap();
        let mut expected = MpRecord {
            allow_cmg_traffic: true,
            ..second.clone()
        };
        assert_eq!(changed, expected, "{}", t.label);
        let changed = s
            .set_management_point(
                second.role_id,
                Some("https://mp2.corp.contoso.com"),
                None,
                "bob",
            )
            .await
            .unwrap();
        expected.url = "https://mp2.corp.contoso.com".to_owned();
        assert_eq!(changed, expected, "{}", t.label);
        assert_eq!(
            s.management_points().await.unwrap(),
            vec![first.clone(), expected.clone()],
            "{}",
            t.label
        );

        let err = s
            .set_management_point(1, Some("https://nowhere"), Some(true), "bob")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if id == "1"),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 4, "{}", t.label);
        let role = second.role_id.to_string();
        assert_eq!(
            audits(s, 10).await,
            entries(&[
                ("bob", "mp.set", &role),
                ("bob", "mp.set", &role),
                ("alice", "mp.add", &first.role_id.to_string()),
                ("alice", "mp.add", &role),
            ]),
            "{}",
            t.label
        );
    }
}

fn connection_point_cert(n: u8) -> CertificateRecord {
    CertificateRecord {
        thumbprint_sha256: format!("cp-sha256-{n}"),
        thumbprint_sha1: format!("cp-sha1-{n}"),
        purpose: CertPurpose::ConnectionPoint,
        subject: "CN=ABC SMS Connection Point".to_owned(),
        not_before: 1_700_000_000,
        not_after: 1_800_000_000,
        status: CertStatus::Active,
        key_alg: "ECDSA_P256".to_owned(),
        cert_der: vec![n; 8],
        created_at: 1_700_000_000 + i64::from(n),
        retire_after: None,
    }
}

#[tokio::test]
async fn connection_points_are_added_with_their_certificate_and_removed_with_audit() {
    for t in test_stores().await {
        let s = &t.store;
        let v0 = s.change_version().await.unwrap();
        let added = s
            .add_connection_point("CP-Dublin", &connection_point_cert(1), "alice")
            .await
            .unwrap();
        assert_eq!(added.name, "CP-Dublin");
        assert_eq!(added.thumbprint_sha256, "cp-sha256-1");
        assert_eq!(added.created_by, "alice");
        s.add_connection_point("cp-oslo", &connection_point_cert(2), "alice")
            .await
            .unwrap();
        assert_eq!(
            s.connection_points()
                .await
                .unwrap()
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["CP-Dublin", "cp-oslo"],
            "{}",
            t.label
        );
        // The certificate is recorded as every other connection point certificate is.
        let certs = s.certificates().await.unwrap();
        assert!(
            certs.iter().any(|c| c.thumbprint_sha256 == "cp-sha256-1"
                && c.purpose == CertPurpose::ConnectionPoint
                && c.status == CertStatus::Active),
            "{}",
            t.label
        );

        // A name taken in another case: refused, and its certificate is not recorded either.
        let err = s
            .add_connection_point("cp-DUBLIN", &connection_point_cert(3), "alice")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists { what: "connection point", id } if id == "cp-DUBLIN"),
            "{}: {err}",
            t.label
        );
        assert!(
            !s.certificates()
                .await
                .unwrap()
                .iter()
                .any(|c| c.thumbprint_sha256 == "cp-sha256-3"),
            "{}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 2, "{}", t.label);

        let removed = s.remove_connection_point("cp-dublin", "bob").await.unwrap();
        assert_eq!(removed, added, "{}", t.label);
        assert_eq!(s.connection_points().await.unwrap().len(), 1, "{}", t.label);
        let cert = s
            .certificates()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.thumbprint_sha256 == "cp-sha256-1")
            .unwrap();
        assert_eq!(cert.status, CertStatus::Retired, "{}", t.label);
        let err = s
            .remove_connection_point("CP-Dublin", "bob")
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::NotFound {
                    what: "connection point",
                    ..
                }
            ),
            "{}: {err}",
            t.label
        );
        // The name is free again, for a new certificate.
        s.add_connection_point("CP-Dublin", &connection_point_cert(4), "carol")
            .await
            .unwrap();
        assert_eq!(s.change_version().await.unwrap(), v0 + 4, "{}", t.label);
        assert_eq!(
            audits(s, 4).await,
            entries(&[
                ("carol", "connection_point.add", "CP-Dublin"),
                ("bob", "connection_point.remove", "CP-Dublin"),
                ("alice", "connection_point.add", "cp-oslo"),
                ("alice", "connection_point.add", "CP-Dublin"),
            ]),
            "{}",
            t.label
        );
    }
}

#[tokio::test]
async fn cmgs_are_created_modified_and_deleted_with_audit() {
    for t in test_stores().await {
        let s = &t.store;
        let cmg = |name: &str, instances: i32| CmgRecord {
            name: name.to_owned(),
            fqdn: format!("{name}.cloudapp.example"),
            instances,
            definition: format!(r#"{{"name":"{name}","region":"westeurope"}}"#),
            created_at: 1_700_000_000,
            updated_at: 1_700_000_000,
        };
        let v0 = s.change_version().await.unwrap();
        let west = cmg("west", 1);
        let east = cmg("east", 2);
        s.put_cmg(&west, "alice").await.unwrap();
        s.put_cmg(&east, "alice").await.unwrap();
        assert_eq!(
            s.cmgs().await.unwrap(),
            vec![east.clone(), west.clone()],
            "{}",
            t.label
        );

        // Modifying keeps when it was created.
        let modified = CmgRecord {
            fqdn: "west2.cloudapp.example".to_owned(),
            instances: 16,
            definition: r#"{"name":"west","region":"northeurope"}"#.to_owned(),
            created_at: 1_800_000_000,
            updated_at: 1_700_000_500,
            ..west.clone()
        };
        s.put_cmg(&modified, "bob").await.unwrap();
        let expected = CmgRecord {
            created_at: west.created_at,
            ..modified
        };
        assert_eq!(
            s.cmgs().await.unwrap(),
            vec![east.clone(), expected],
            "{}",
            t.label
        );

        s.delete_cmg("east", "bob").await.unwrap();
        assert_eq!(s.cmgs().await.unwrap().len(), 1, "{}", t.label);
        let err = s.delete_cmg("east", "bob").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if id == "east"),
            "{}: {err}",
            t.label
        );
        assert_eq!(s.change_version().await.unwrap(), v0 + 4, "{}", t.label);
        assert_eq!(
            audits(s, 10).await,
            entries(&[
                ("bob", "cmg.delete", "east"),
                ("bob", "cmg.modify", "west"),
                ("alice", "cmg.create", "east"),
                ("alice", "cmg.create", "west"),
            ]),
            "{}",
            t.label
        );
    }
}

fn status(id: &str, sent_at: i64) -> StatusRow {
    StatusRow {
        message_id: id.to_owned(),
        kind: "Heartbeat".to_owned(),
        sent_at,
        body: format!(r#"{{"id":"{id}"}}"#),
    }
}

#[tokio::test]
async fn a_status_batch_sent_twice_is_stored_once() {
    for t in test_stores().await {
        let s = &t.store;
        let a = device(1);
        let b = device(2);
        s.insert_device(a.clone()).await.unwrap();
        s.insert_device(b.clone()).await.unwrap();
        let v0 = s.change_version().await.unwrap();

        // Not in alphabetical order: the listing keeps the order of arrival.
        let batch = [status("m-c", 10), status("m-a", 11), status("m-b", 12)];
        let first = 1_700_000_100;
        assert_eq!(
            s.store_status_messages(&a.client_id, &batch, first, "CMG")
                .await
                .unwrap(),
            (3, 0),
            "{}",
            t.label
        );
        let stored: Vec<_> = batch
            .iter()
            .map(|m| StatusMessageRecord {
                message: m.clone(),
                received_at: first,
            })
            .collect();
        assert_eq!(
            s.status_messages(&a.client_id).await.unwrap(),
            stored,
            "{}",
            t.label
        );
        let seen = s.device(&a.client_id).await.unwrap().unwrap();
        assert_eq!(
            (seen.last_seen_at, seen.last_seen_via.as_deref()),
            (Some(first), Some("CMG")),
            "{}",
            t.label
        );

        // The retry: all duplicates, nothing stored twice, but the device was seen again.
        let retry = first + 60;
        assert_eq!(
            s.store_status_messages(&a.client_id, &batch, retry, "Intranet")
                .await
                .unwrap(),
            (0, 3),
            "{}",
            t.label
        );
        assert_eq!(
            s.status_messages(&a.client_id).await.unwrap(),
            stored,
            "{}",
            t.label
        );
        let seen = s.device(&a.client_id).await.unwrap().unwrap();
        assert_eq!(
            (seen.last_seen_at, seen.last_seen_via.as_deref()),
            (Some(retry), Some("Intranet")),
            "{}",
            t.label
        );

        // Partly new, with a message repeated within the batch.
        let later = retry + 60;
        let mixed = [status("m-a", 11), status("m-d", 13), status("m-d", 13)];
        assert_eq!(
            s.store_status_messages(&a.client_id, &mixed, later, "CMG")
                .await
                .unwrap(),
            (1, 2),
            "{}",
            t.label
        );
        let mut expected = stored.clone();
        expected.push(StatusMessageRecord {
            message: status("m-d", 13),
            received_at: later,
        });
        assert_eq!(
            s.status_messages(&a.client_id).await.unwrap(),
            expected,
            "{}",
            t.label
        );

        // Message IDs are per client.
        assert_eq!(
            s.store_status_messages(&b.client_id, &batch, later, "CMG")
                .await
                .unwrap(),
            (3, 0),
            "{}",
            t.label
        );
        assert_eq!(s.status_messages(&b.client_id).await.unwrap().len(), 3);
        assert_eq!(
            s.status_messages(&a.client_id).await.unwrap(),
            expected,
            "{}",
            t.label
        );

        // An unknown client stores nothing.
        let missing = client_id();
        let err = s
            .store_status_messages(&missing, &batch, later, "CMG")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if *id == missing),
            "{}: {err}",
            t.label
        );
        assert!(s.status_messages(&missing).await.unwrap().is_empty());

        // Routine traffic, not an admin change.
        assert_eq!(s.change_version().await.unwrap(), v0, "{}", t.label);
        assert!(s.audit_log(10).await.unwrap().is_empty(), "{}", t.label);
    }
}

#[tokio::test]
async fn traffic_reports_add_up_per_endpoint_and_period() {
    for t in test_stores().await {
        let s = &t.store;
        let row = |connector: &str, endpoint: &str, period: i64, requests: i64, out: i64| {
            cmg_store::TrafficRow {
                cmg: "GraniteFalls".into(),
                connector: connector.into(),
                endpoint: endpoint.into(),
                period_start: period,
                requests,
                bytes_in: requests * 10,
                bytes_out: out,
            }
        };
        s.record_traffic(&[
            row("cp1", "/CCM_STS", 1_000, 2, 200),
            row("cp1", "/SMS_MP/.sms_pol", 1_000, 1, 50),
        ])
        .await
        .unwrap();
        // The same period again (a retried report) and another connection point add up.
        s.record_traffic(&[
            row("cp1", "/CCM_STS", 1_000, 1, 100),
            row("cp2", "/CCM_STS", 1_300, 4, 400),
        ])
        .await
        .unwrap();
        s.record_traffic(&[row("cp1", "/CCM_STS", 10, 100, 100_000)])
            .await
            .unwrap();
        let totals = s.traffic_since("GraniteFalls", 1_000).await.unwrap();
        assert_eq!(totals.len(), 2, "{}", t.label);
        assert_eq!(
            (
                totals[0].endpoint.as_str(),
                totals[0].requests,
                totals[0].bytes_out
            ),
            ("/CCM_STS", 7, 700),
            "{}",
            t.label
        );
        assert_eq!(
            (totals[1].requests, totals[1].bytes_in, totals[1].bytes_out),
            (1, 10, 50)
        );
        assert!(s.traffic_since("Other", 0).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn sightings_are_recorded_in_groups_and_unknown_devices_are_skipped() {
    for t in test_stores().await {
        let s = &t.store;
        let (a, b) = (device(1), device(2));
        s.insert_device(a.clone()).await.unwrap();
        s.insert_device(b.clone()).await.unwrap();
        s.record_devices_seen(&[
            (a.client_id.clone(), 1_800_000_000, "CMG X".into()),
            ("GUID:GONE".into(), 1_800_000_000, "CMG X".into()),
            (b.client_id.clone(), 1_800_000_001, "Intranet".into()),
        ])
        .await
        .unwrap();
        let a = s.device(&a.client_id).await.unwrap().unwrap();
        let b = s.device(&b.client_id).await.unwrap().unwrap();
        assert_eq!(
            (a.last_seen_at, a.last_seen_via.as_deref()),
            (Some(1_800_000_000), Some("CMG X")),
            "{}",
            t.label
        );
        assert_eq!(
            (b.last_seen_at, b.last_seen_via.as_deref()),
            (Some(1_800_000_001), Some("Intranet"))
        );
    }
}
