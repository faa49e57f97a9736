//! The admin service on both store backends: changes reach a running site within seconds.

use std::time::Duration;

use cmg_site::{
    AdminService, BulkTokenLifetime, DataDir, InitOptions, InventoryKind, ItemStatus, KeyAlgorithm,
    Site, init_site, unix_now, watch_state,
};
use cmg_store::testing::{TestStore, test_stores};

async fn site_on(db: &TestStore, dir: &tempfile::TempDir) -> DataDir {
    let data = DataDir::new(dir.path().join("data"));
    init_site(InitOptions {
        data: data.clone(),
        site_code: "P01".parse().unwrap(),
        token_key: KeyAlgorithm::EcdsaP256,
        db: Some(db.url().to_owned()),
        actor: "test-admin".into(),
    })
    .await
    .unwrap();
    data
}

#[tokio::test]
async fn a_block_made_by_another_process_reaches_the_running_site_within_seconds() {
    for db in test_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let data = site_on(&db, &dir).await;
        // The running site and the admin CLI each open the site on their own.
        let running = std::sync::Arc::new(Site::open(data.clone()).await.unwrap());
        let cli = AdminService::open(data, "alice").await.unwrap();
        let created = cli
            .new_bulk_token(BulkTokenLifetime::DEFAULT)
            .await
            .unwrap();
        let guid = created.record.id.to_string();

        let (mut rx, task) = watch_state(running.clone(), Duration::from_millis(200))
            .await
            .unwrap();
        assert!(!rx.borrow().revocations.bulk_tokens.contains(&guid));
        let verifier = running.verifier(unix_now()).await.unwrap();
        let token = created.token.expose();
        verifier
            .verify_bulk(token, unix_now(), &rx.borrow().revocations)
            .expect("valid before the block");

        cli.block_bulk_token(&guid).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| s.revocations.bulk_tokens.contains(&guid)),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: block not seen within 5 s", db.label))
        .unwrap();
        let refused = verifier.verify_bulk(token, unix_now(), &rx.borrow().revocations);
        assert!(
            matches!(refused, Err(cmg_token::Refusal::BulkTokenBlocked(_))),
            "{}",
            db.label
        );

        cli.unblock_bulk_token(&format!("{{{}}}", guid.to_uppercase()))
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| !s.revocations.bulk_tokens.contains(&guid)),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: unblock not seen within 5 s", db.label))
        .unwrap();
        verifier
            .verify_bulk(token, unix_now(), &rx.borrow().revocations)
            .expect("valid again");
        drop(rx);
        task.abort();
    }
}

#[tokio::test]
async fn inventory_reports_expired_blocked_and_active_tokens_and_certificates() {
    for db in test_stores().await {
        let dir = tempfile::tempdir().unwrap();
        let admin = AdminService::open(site_on(&db, &dir).await, "bob")
            .await
            .unwrap();
        let short = admin.new_bulk_token("1".parse().unwrap()).await.unwrap();
        let blocked = admin
            .new_bulk_token(BulkTokenLifetime::DEFAULT)
            .await
            .unwrap();
        admin
            .block_bulk_token(&blocked.record.id.to_string())
            .await
            .unwrap();
        let later = unix_now() + 61;
        let items = admin.inventory(later).await.unwrap();
        let status = |id: String| items.iter().find(|i| i.id == id).map(|i| i.status);
        assert_eq!(
            status(short.record.id.to_string()),
            Some(ItemStatus::Expired),
            "{}",
            db.label
        );
        assert_eq!(
            status(blocked.record.id.to_string()),
            Some(ItemStatus::Blocked),
            "{}",
            db.label
        );
        let kinds: Vec<InventoryKind> = items.iter().map(|i| i.kind).collect();
        let mut sorted = kinds.clone();
        sorted.sort();
        assert_eq!(kinds, sorted, "sorted by type");
        for kind in [
            InventoryKind::SiteIssuingRoot,
            InventoryKind::TokenSigning,
            InventoryKind::ManagementPoint,
            InventoryKind::ConnectionPoint,
        ] {
            let cert = items.iter().find(|i| i.kind == kind).unwrap();
            assert_eq!(cert.status, ItemStatus::Active, "{kind}");
        }
        assert!(
            items
                .iter()
                .all(|i| i.kind != InventoryKind::BulkRegistrationToken || i.detail == "bob")
        );
    }
}

#[tokio::test]
async fn a_database_that_already_holds_a_site_is_refused_and_no_files_are_left() {
    for db in test_stores().await {
        let first = tempfile::tempdir().unwrap();
        site_on(&db, &first).await;
        let second = tempfile::tempdir().unwrap();
        let data = DataDir::new(second.path().join("data"));
        let err = init_site(InitOptions {
            data: data.clone(),
            site_code: "ZZZ".parse().unwrap(),
            token_key: KeyAlgorithm::EcdsaP256,
            db: Some(db.url().to_owned()),
            actor: "test".into(),
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("already holds a site"),
            "{}: {err}",
            db.label
        );
        assert!(!data.config_file().exists());
        let leftovers: Vec<_> = std::fs::read_dir(data.pki_dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{}: key files left behind", db.label);
    }
}

#[tokio::test]
async fn the_mp_certificate_follows_the_mp_url_host() {
    let db = cmg_store::testing::sqlite_store().await;
    let dir = tempfile::tempdir().unwrap();
    let data = site_on(&db, &dir).await;
    let admin = AdminService::open(data.clone(), "alice").await.unwrap();
    let mp = admin.management_points().await.unwrap().remove(0);
    admin
        .set_management_point(mp.role_id, Some("https://mp1.contoso.test:8443"), None)
        .await
        .unwrap();
    let names = |data: &DataDir| {
        let pem = std::fs::read_to_string(data.pki_dir().join("mp.crt")).unwrap();
        cmg_pki::dns_names(&cmg_pki::pem_to_der(&pem, "mp").unwrap()).unwrap()
    };
    assert!(!names(&data).contains(&"mp1.contoso.test".to_owned()));
    let server = cmg_site::SiteServer::start(
        data.clone(),
        cmg_site::SiteRunOptions::new("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    assert!(names(&data).contains(&"mp1.contoso.test".to_owned()));
    server.shutdown().await;
}
