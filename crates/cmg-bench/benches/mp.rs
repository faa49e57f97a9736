//! Management point throughput over real TLS on loopback (DESIGN §5, §9):
//! registrations per second with durable (grouped) commits, and policy requests per second,
//! on SQLite and — with `CMG_TEST_POSTGRES` — PostgreSQL.
//!
//! `cargo bench -p cmg-bench --bench mp`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cmg_store::testing::{TestStore, test_stores};
use cmg_testkit::{TestDevice, TestSite};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Device connections sending at once (each its own certificate and keep-alive connection).
const CONNECTIONS: usize = 64;

fn mp(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stores: Vec<TestStore> = rt.block_on(test_stores());
    for db in stores {
        let label = db.label;
        let site = rt.block_on(TestSite::start(db));
        let devices: Vec<Arc<TestDevice>> = (0..CONNECTIONS)
            .map(|n| Arc::new(site.device(&format!("bench-{n}"))))
            .collect();
        // Open every connection (one TLS handshake each) before measuring.
        let tokens: Vec<String> = rt.block_on(async {
            let mut tokens = Vec::with_capacity(devices.len());
            for device in &devices {
                tokens.push(device.register_ok(None).await.1);
            }
            tokens
        });
        let tokens = Arc::new(tokens);
        let counter = Arc::new(AtomicU64::new(0));

        let mut group = c.benchmark_group(format!("mp/{label}"));
        group.throughput(Throughput::Elements(1));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(10));
        group.bench_function("register", |b| {
            b.iter_custom(|iters| {
                let counter = Arc::clone(&counter);
                rt.block_on(spread(&devices, iters, move |device, _| {
                    let counter = Arc::clone(&counter);
                    async move {
                        // A new hardware ID each time: a new device row, durably committed.
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let fresh = device.with_hardware_id(&format!("reg-{n}"));
                        let (status, _) = fresh.register(None).await;
                        assert!(status.is_success());
                    }
                }))
            })
        });
        let tokens = Arc::clone(&tokens);
        group.bench_function("policy", |b| {
            b.iter_custom(|iters| {
                let tokens = Arc::clone(&tokens);
                rt.block_on(spread(&devices, iters, move |device, i| {
                    let token = tokens.get(i).cloned().unwrap_or_default();
                    async move {
                        let (status, _) = device.policy(Some(&token)).await;
                        assert!(status.is_success());
                    }
                }))
            })
        });
        group.finish();
        rt.block_on(site.shutdown());
    }
}

/// Runs `iters` requests spread over the device connections, all connections busy at once;
/// returns the wall time.
async fn spread<F, Fut>(devices: &[Arc<TestDevice>], iters: u64, request: F) -> Duration
where
    F: Fn(Arc<TestDevice>, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let per = iters / devices.len() as u64;
    let extra = iters % devices.len() as u64;
    let mut tasks = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let n = per + u64::from((i as u64) < extra);
        let (device, request) = (Arc::clone(device), request.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                request(Arc::clone(&device), i).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("request task");
    }
    start.elapsed()
}

criterion_group!(benches, mp);
criterion_main!(benches);
