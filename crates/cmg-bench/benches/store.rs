//! Durable device registrations per second through the grouped-commit writer (DESIGN §9), on
//! SQLite (a temporary file) and, when CMG_TEST_POSTGRES is set, PostgreSQL.
//!
//! `1 concurrent` is one registration at a time: one commit, so one fsync, per device.
//! `1000 concurrent` is a registration wave: the writer groups the queued rows into few commits.

use std::time::Instant;

use cmg_store::testing::test_stores;
use cmg_store::{DeviceRecord, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use uuid::Uuid;

fn device() -> DeviceRecord {
    let id = Uuid::new_v4();
    DeviceRecord {
        client_id: format!("GUID:{}", id.to_string().to_uppercase()),
        hardware_id: format!("hw-{}", id.simple()),
        cert_thumbprint: format!("{}{}", id.simple(), id.simple()),
        hostname: "DESKTOP-1234567".to_owned(),
        os: "Microsoft Windows NT Workstation 10.0".to_owned(),
        agent_version: "5.00.9128.1000".to_owned(),
        registered_via: "BulkRegistration".to_owned(),
        bulk_token_id: Some(Uuid::new_v4()),
        approved: true,
        blocked: false,
        registered_at: 1_700_000_000,
        last_seen_at: None,
        last_seen_via: None,
    }
}

/// Registers `size` devices concurrently; returns when every one is committed.
async fn wave(store: &Store, size: usize) {
    let mut tasks = JoinSet::new();
    for _ in 0..size {
        let store = store.clone();
        tasks.spawn(async move { store.insert_device(device()).await });
    }
    for result in tasks.join_all().await {
        if let Err(e) = result {
            panic!("insert failed: {e}");
        }
    }
}

fn device_inserts(c: &mut Criterion) {
    let runtime = match Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => panic!("no Tokio runtime: {e}"),
    };
    let stores = runtime.block_on(test_stores());
    let mut group = c.benchmark_group("store/insert_device");
    // Each sample is many fsyncs; ten samples keep a run within minutes.
    group.sample_size(10);
    for t in &stores {
        for concurrency in [1, 1000] {
            let commits_before = t.store.commit_batches();
            let mut rows = 0u64;
            group.throughput(Throughput::Elements(concurrency as u64));
            group.bench_function(
                BenchmarkId::new(t.label, format!("{concurrency} concurrent")),
                |b| {
                    b.iter_custom(|iters| {
                        rows += iters * concurrency as u64;
                        runtime.block_on(async {
                            let start = Instant::now();
                            for _ in 0..iters {
                                wave(&t.store, concurrency).await;
                            }
                            start.elapsed()
                        })
                    })
                },
            );
            let commits = t.store.commit_batches() - commits_before;
            if rows == 0 {
                continue; // filtered out on the command line
            }
            println!(
                "{} {concurrency} concurrent: {rows} rows in {commits} commits ({:.1} rows per commit)",
                t.label,
                rows as f64 / commits.max(1) as f64
            );
        }
    }
    group.finish();
    runtime.block_on(async {
        for t in &stores {
            t.store.close().await;
        }
    });
}

criterion_group!(benches, device_inserts);
criterion_main!(benches);
