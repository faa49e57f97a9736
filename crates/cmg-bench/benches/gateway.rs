//! Gateway benchmark (DESIGN §4, §6): what the gateway + tunnel hop costs, over real TLS on
//! loopback with a SQLite site.
//!
//! 1. **Throughput**: 64 device connections, each registered once through the gateway with a
//!    bulk token, then authenticated requests (`GET …/SMS_MP/.sms_pol` with the client token)
//!    over keep-alive, all connections busy; the same devices (same certificates and tokens)
//!    calling the MP directly for comparison. A second pair uses the location request
//!    (`?MPLIST`), which the MP answers without a database write, to show the hop itself.
//! 2. **Added latency at a fixed offered rate**: an open-loop load generator (a pacer sends on
//!    a fixed schedule whatever the responses do, so a slow response never delays the next
//!    send) against the MP directly and through the gateway; latency is measured from each
//!    request's *intended* send time. Falls back to a lower rate as well when the first rate is
//!    not sustained.
//! 3. **Memory per idle TLS device connection**: the gateway runs in a child process (this
//!    binary re-executed with `CMG_BENCH_ROLE=gateway`); the parent opens N mutually
//!    authenticated TLS connections, sends one request on each, leaves them idle and reads the
//!    child's `VmRSS` before and after. Measured for HTTP/1.1 and HTTP/2 connections.
//!
//! `cargo bench -p cmg-bench --bench gateway`
//!
//! Environment (all optional): `CMG_BENCH_RATE` (offered requests/s, default 10000),
//! `CMG_BENCH_SECS` (measured seconds per latency run, default 5), `CMG_BENCH_WARMUP_SECS`
//! (default 1), `CMG_BENCH_FALLBACK_RATE` (default 2000; 0 = none), `CMG_BENCH_TPUT_SECS`
//! (measured seconds per throughput run, default 5), `CMG_BENCH_IDLE` (idle connections,
//! default 2000), `CMG_BENCH_IDLE_HOLD_SECS` (when to re-count the idle connections, default
//! 12), `CMG_BENCH_PARTS` (default `throughput,latency,idle`).
//!
//! Results are printed as labelled lines and as JSON lines (`{"bench":"gateway",…}`).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
use cmg_proto::mp;
use cmg_testkit::{TestCmg, TestDevice, TestSite};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::json;

/// Device connections sending at once (each its own certificate and keep-alive connection).
const CONNECTIONS: usize = 64;
/// The CMG's public name in the idle-connection child.
const FQDN: &str = "granitefalls.cmg.test";
/// Answered by the gateway itself, before any settings or tunnel.
const METADATA: &str = "/CCM_Proxy_MutualAuth/ServiceMetadata";
/// Connections opened (and kept) before the memory baseline is taken.
const IDLE_WARM: usize = 16;
/// TLS handshakes in flight at once while opening idle connections.
const IDLE_PARALLEL: usize = 64;
/// Distinct client certificates the idle connections present.
const IDLE_CERTS: usize = 8;

fn main() {
    if std::env::var("CMG_BENCH_ROLE").as_deref() == Ok("gateway") {
        gateway_child();
        return;
    }
    // `cargo test --benches` runs bench targets without `--bench`: nothing to test here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gateway bench: skipped (run it with `cargo bench -p cmg-bench --bench gateway`)");
        return;
    }
    let parts =
        std::env::var("CMG_BENCH_PARTS").unwrap_or_else(|_| "throughput,latency,idle".to_owned());
    let wants = |part: &str| parts.split(',').any(|p| p.trim() == part);
    println!(
        "gateway bench: {} CPU(s), load average at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if wants("throughput") || wants("latency") {
        relay(&rt, wants("throughput"), wants("latency"));
    }
    if wants("idle") {
        let n = env_num("CMG_BENCH_IDLE", 2000).clamp(1, 8000) as usize;
        let hold = Duration::from_secs(env_num("CMG_BENCH_IDLE_HOLD_SECS", 12).min(120));
        for proto in [Proto::Http1, Proto::Http2] {
            idle_memory(&rt, n, hold, proto);
        }
    }
    println!("gateway bench: load average at end: {}", loadavg());
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not '{v}'")),
        Err(_) => default,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Parts 1 and 2: relayed requests.

/// One device's request: its HTTPS client (one keep-alive connection), URL and token.
struct Target {
    client: reqwest::Client,
    url: String,
    auth: HeaderValue,
}

type Targets = Arc<Vec<Arc<Target>>>;

/// Sends the request and reads the whole answer; `true` on a 2xx.
async fn send(target: &Target) -> bool {
    let Ok(response) = target
        .client
        .get(&target.url)
        .header(AUTHORIZATION, target.auth.clone())
        .send()
        .await
    else {
        return false;
    };
    let ok = response.status().is_success();
    response.bytes().await.is_ok() && ok
}

struct Setup {
    site: TestSite,
    cmg: TestCmg,
    gateway_policy: Targets,
    direct_policy: Targets,
    gateway_location: Targets,
    direct_location: Targets,
}

/// Site + MP + connection point + one gateway; 64 devices registered through the gateway.
async fn setup() -> Setup {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let admin = site.admin().await;
    let bulk = admin
        .new_bulk_token(Default::default())
        .await
        .expect("bulk token");
    let mut gateway_policy = Vec::new();
    let mut direct_policy = Vec::new();
    let mut gateway_location = Vec::new();
    let mut direct_location = Vec::new();
    for n in 0..CONNECTIONS {
        let hardware_id = format!("gw-bench-{n}");
        let via_gateway = cmg.device(0, &hardware_id);
        let (_, token) = via_gateway.register_ok(Some(bulk.token.expose())).await;
        // The same device (certificate, token) on the intranet, talking to the MP directly.
        let direct = TestDevice::with_credential(
            site.root_pem(),
            &site.mp_url(),
            &hardware_id,
            via_gateway.credential.clone(),
        );
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).expect("token header");
        for (device, policy, location) in [
            (&via_gateway, &mut gateway_policy, &mut gateway_location),
            (&direct, &mut direct_policy, &mut direct_location),
        ] {
            policy.push(Arc::new(Target {
                client: device.client().clone(),
                url: format!("{}{}", device.base, mp::POLICY),
                auth: auth.clone(),
            }));
            location.push(Arc::new(Target {
                client: device.client().clone(),
                url: format!("{}{}?MPLIST", device.base, mp::LOCATION),
                auth: auth.clone(),
            }));
        }
    }
    let setup = Setup {
        site,
        cmg,
        gateway_policy: Arc::new(gateway_policy),
        direct_policy: Arc::new(direct_policy),
        gateway_location: Arc::new(gateway_location),
        direct_location: Arc::new(direct_location),
    };
    // Every connection answers before anything is measured; say which HTTP version it speaks.
    for (label, targets) in [
        ("gateway policy", &setup.gateway_policy),
        ("direct policy", &setup.direct_policy),
        ("gateway location", &setup.gateway_location),
        ("direct location", &setup.direct_location),
    ] {
        let mut version = None;
        for target in targets.iter() {
            let response = target
                .client
                .get(&target.url)
                .header(AUTHORIZATION, target.auth.clone())
                .send()
                .await
                .expect("request");
            let status = response.status();
            version = Some(response.version());
            let body = response.text().await.unwrap_or_default();
            assert!(status.is_success(), "{label}: {status} {body}");
        }
        println!(
            "setup: {label}: {} connections answer 200 ({:?})",
            targets.len(),
            version.expect("at least one connection")
        );
    }
    setup
}

fn relay(rt: &tokio::runtime::Runtime, throughput: bool, latency: bool) {
    let setup = rt.block_on(setup());
    if throughput {
        let warm = Duration::from_secs(1);
        let secs = Duration::from_secs(env_num("CMG_BENCH_TPUT_SECS", 5).clamp(1, 120));
        println!(
            "\n== 1. Throughput: {CONNECTIONS} keep-alive device connections, all busy \
             (closed loop), {}s warm-up + {}s measured ==",
            warm.as_secs(),
            secs.as_secs()
        );
        let mut results = Vec::new();
        for (label, targets) in [
            ("direct MP, policy", &setup.direct_policy),
            ("gateway+tunnel, policy", &setup.gateway_policy),
            ("direct MP, location", &setup.direct_location),
            ("gateway+tunnel, location", &setup.gateway_location),
        ] {
            let (rate, ok, errors) = rt.block_on(closed_loop(Arc::clone(targets), warm, secs));
            println!(
                "throughput  {label:<26} {rate:>9.0} requests/s  ({ok} ok, {errors} failed in {}s)",
                secs.as_secs()
            );
            println!(
                "{}",
                json!({"bench": "gateway", "part": "throughput", "path": label,
                       "connections": CONNECTIONS, "requests_per_sec": rate.round(),
                       "ok": ok, "failed": errors, "secs": secs.as_secs()})
            );
            results.push(rate);
        }
        println!(
            "throughput  gateway/direct ratio: policy {:.2}, location {:.2}; goal ≥ 20000 \
             relayed requests/s (policy: {:.0}, location: {:.0})",
            results[1] / results[0],
            results[3] / results[2],
            results[1],
            results[3]
        );
    }
    if latency {
        let rate = env_num("CMG_BENCH_RATE", 10_000).clamp(1, 200_000);
        let fallback = env_num("CMG_BENCH_FALLBACK_RATE", 2_000).min(200_000);
        let secs = env_num("CMG_BENCH_SECS", 5).clamp(1, 120);
        let warm = env_num("CMG_BENCH_WARMUP_SECS", 1).min(60);
        println!(
            "\n== 2. Added latency, open loop (fixed send schedule, latency from the intended \
             send time), policy with token, {CONNECTIONS} connections, {warm}s warm-up + {secs}s \
             measured =="
        );
        let sustained = latency_pair(rt, &setup, rate, warm, secs);
        if !sustained && fallback > 0 && fallback < rate {
            println!(
                "latency     {rate}/s was not sustained on this machine; again at {fallback}/s"
            );
            latency_pair(rt, &setup, fallback, warm, secs);
        }
    }
    rt.block_on(async {
        setup.cmg.shutdown().await;
        setup.site.shutdown().await;
    });
}

/// Every target busy with one request at a time until the end; requests/s completed in the
/// measured window, with the counts of successes and failures in it.
async fn closed_loop(targets: Targets, warm: Duration, measure: Duration) -> (f64, u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = tokio::time::Instant::now() + warm + measure;
    let mut tasks = Vec::with_capacity(targets.len());
    for target in targets.iter() {
        let (target, ok, failed) = (Arc::clone(target), Arc::clone(&ok), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < end {
                if send(&target).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(warm).await;
    let (ok0, failed0, t0) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep_until(end).await;
    let (ok1, failed1, elapsed) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(35), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    (
        (ok1 - ok0) as f64 / elapsed.as_secs_f64(),
        ok1 - ok0,
        failed1 - failed0,
    )
}

/// One request of an open-loop run.
struct Sample {
    index: u64,
    due: Instant,
    sent: Instant,
    done: Instant,
    ok: bool,
}

#[derive(Clone, Copy)]
struct Percentiles {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    v.sort_unstable();
    let at = |p: f64| {
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

struct OpenLoop {
    ok: usize,
    failed: usize,
    achieved: f64,
    /// From the intended send time (no coordinated omission).
    intended: Percentiles,
    /// From the moment the request task started.
    service: Percentiles,
    /// How late the request tasks started compared with the schedule.
    start_lag: Percentiles,
    sustained: bool,
}

/// Sends `rate` requests/s for `warm + secs` seconds on a fixed schedule, round-robin over the
/// targets, never waiting for answers; statistics over the requests due after the warm-up.
fn open_loop(
    rt: &tokio::runtime::Runtime,
    targets: &Targets,
    rate: u64,
    warm: u64,
    secs: u64,
) -> OpenLoop {
    let total = rate * (warm + secs);
    let warm_count = rate * warm;
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let handle = rt.handle().clone();
    let start = Instant::now() + Duration::from_millis(20);
    // The pacer is this (non-runtime) thread: it sleeps until each request is due and hands it
    // to the runtime; when it is behind, it sends at once to catch up with the schedule.
    for i in 0..total {
        let due =
            start + Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(rate)) as u64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let target = Arc::clone(&targets[(i % targets.len() as u64) as usize]);
        let samples = Arc::clone(&samples);
        handle.spawn(async move {
            let sent = Instant::now();
            let ok = send(&target).await;
            let done = Instant::now();
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Sample {
                    index: i,
                    due,
                    sent,
                    done,
                    ok,
                });
        });
    }
    // Wait for the answers (each request times out after 30 s on its own).
    let deadline = Instant::now() + Duration::from_secs(40);
    while samples.lock().unwrap_or_else(|p| p.into_inner()).len() < total as usize
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let measured: Vec<&Sample> = samples.iter().filter(|s| s.index >= warm_count).collect();
    let expected = (total - warm_count) as usize;
    let ok = measured.iter().filter(|s| s.ok).count();
    let failed = expected - ok;
    let first_due = start
        + Duration::from_nanos((u128::from(warm_count) * 1_000_000_000 / u128::from(rate)) as u64);
    let last_done = measured.iter().map(|s| s.done).max().unwrap_or(first_due);
    let span = last_done.saturating_duration_since(first_due).as_secs_f64();
    let achieved = if span > 0.0 { ok as f64 / span } else { 0.0 };
    let ok_samples = || measured.iter().filter(|s| s.ok);
    let intended = percentiles(ok_samples().map(|s| s.done - s.due).collect());
    let service = percentiles(ok_samples().map(|s| s.done - s.sent).collect());
    let start_lag = percentiles(
        ok_samples()
            .map(|s| s.sent.saturating_duration_since(s.due))
            .collect(),
    );
    OpenLoop {
        ok,
        failed,
        achieved,
        intended,
        service,
        start_lag,
        sustained: failed == 0 && achieved >= 0.95 * rate as f64,
    }
}

/// Direct, then through the gateway, at the same offered rate; prints both and the difference.
/// Returns whether both runs sustained the rate.
fn latency_pair(
    rt: &tokio::runtime::Runtime,
    setup: &Setup,
    rate: u64,
    warm: u64,
    secs: u64,
) -> bool {
    let mut runs = Vec::new();
    for (label, targets) in [
        ("direct MP", &setup.direct_policy),
        ("gateway+tunnel", &setup.gateway_policy),
    ] {
        std::thread::sleep(Duration::from_millis(500));
        let run = open_loop(rt, targets, rate, warm, secs);
        let i = run.intended;
        println!(
            "latency     {label:<15} offered {rate:>6}/s achieved {:>7.0}/s{}  ok {} failed {}  \
             p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  \
             (from task start: p50 {:.3} ms p99 {:.3} ms; task start lag p99 {:.3} ms)",
            run.achieved,
            if run.sustained {
                ""
            } else {
                " (NOT sustained)"
            },
            run.ok,
            run.failed,
            ms(i.p50),
            ms(i.p90),
            ms(i.p99),
            ms(i.max),
            ms(run.service.p50),
            ms(run.service.p99),
            ms(run.start_lag.p99),
        );
        println!(
            "{}",
            json!({"bench": "gateway", "part": "latency", "path": label,
                   "offered_per_sec": rate, "achieved_per_sec": run.achieved.round(),
                   "sustained": run.sustained, "ok": run.ok, "failed": run.failed,
                   "secs": secs, "p50_ms": ms(i.p50), "p90_ms": ms(i.p90),
                   "p99_ms": ms(i.p99), "max_ms": ms(i.max),
                   "service_p50_ms": ms(run.service.p50), "service_p99_ms": ms(run.service.p99),
                   "start_lag_p99_ms": ms(run.start_lag.p99)})
        );
        runs.push(run);
    }
    let (direct, gateway) = (&runs[0], &runs[1]);
    let added_p50 = ms(gateway.intended.p50) - ms(direct.intended.p50);
    let added_p99 = ms(gateway.intended.p99) - ms(direct.intended.p99);
    println!(
        "latency     added by gateway+tunnel at {rate}/s offered: p50 {added_p50:+.3} ms, \
         p99 {added_p99:+.3} ms (goal: p99 added ≤ 1 ms at 10000/s)"
    );
    println!(
        "{}",
        json!({"bench": "gateway", "part": "latency_added", "offered_per_sec": rate,
               "added_p50_ms": added_p50, "added_p99_ms": added_p99,
               "sustained": direct.sustained && gateway.sustained})
    );
    direct.sustained && gateway.sustained
}

// ---------------------------------------------------------------------------------------------
// Part 3: memory per idle TLS device connection, gateway in a child process.

/// The child: a gateway with a development server certificate and no connection point, on
/// loopback; prints its device address and runs until its standard input closes.
fn gateway_child() {
    let dir = PathBuf::from(std::env::var("CMG_BENCH_DIR").expect("CMG_BENCH_DIR"));
    let ca = SiteAuthority::generate("DEV").expect("dev CA");
    let server = ca
        .issue(
            "DEV",
            &Role::ManagementPoint {
                hostnames: vec![FQDN.to_owned()],
            },
            KeyAlgorithm::EcdsaP256,
        )
        .expect("server certificate");
    let site_root = SiteAuthority::generate("TST").expect("site root");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let chain = format!("{}{}", server.cert_pem(), ca.credential().cert_pem());
    let config = cmg_gateway::GatewayConfig {
        name: "GraniteFalls".into(),
        fqdn: FQDN.into(),
        instance: 1,
        listen: "127.0.0.1:0".parse().expect("addr"),
        tunnel_listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        server_cert: write("server.crt", &chain),
        server_key: write("server.key", server.key_pem()),
        site_root: write("site-root.crt", site_root.credential().cert_pem()),
        log_dir: dir.join("logs"),
        stats_interval_secs: 60,
        crl_files: Vec::new(),
        crl_refresh_secs: 3600,
    };
    write("ca.crt", ca.credential().cert_pem());
    // Standard input closing (the parent ending, whatever the way) stops the child.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = closed_tx.send(());
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let gateway = cmg_gateway::Gateway::start(config).await.expect("gateway");
        println!("GATEWAY_ADDR {}", gateway.device_addr());
        std::io::stdout().flush().expect("stdout");
        let _ = tokio::time::timeout(Duration::from_secs(900), closed_rx).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), gateway.shutdown()).await;
    });
    std::process::exit(0);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        }
    }

    fn alpn(self) -> &'static [u8] {
        match self {
            Proto::Http1 => b"http/1.1",
            Proto::Http2 => b"h2",
        }
    }
}

/// An open device connection: the request handle and the task driving the connection.
struct Conn {
    _sender: Box<dyn std::any::Any + Send>,
    task: tokio::task::JoinHandle<()>,
}

async fn open_idle(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    proto: Proto,
) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(FQDN).expect("server name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let io = TokioIo::new(tls);
    let (sender, task, response): (Box<dyn std::any::Any + Send>, _, _) = match proto {
        Proto::Http1 => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1: {e}"))?;
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            let request = hyper::Request::get(METADATA)
                .header(hyper::header::HOST, FQDN)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await;
            (Box::new(sender), task, response)
        }
        Proto::Http2 => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2: {e}"))?;
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            let request = hyper::Request::get(format!("https://{FQDN}{METADATA}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await;
            (Box::new(sender), task, response)
        }
    };
    let response = response.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        task.abort();
        return Err(format!("ServiceMetadata answered {status}"));
    }
    Ok(Conn {
        _sender: sender,
        task,
    })
}

/// Opens `count` connections, `IDLE_PARALLEL` handshakes at a time, round-robin over the
/// client configurations; stops at the first failure.
async fn open_many(
    addr: SocketAddr,
    configs: &[Arc<rustls::ClientConfig>],
    proto: Proto,
    count: usize,
    into: &mut Vec<Conn>,
) -> Result<(), String> {
    let mut opened = 0;
    while opened < count {
        let batch = IDLE_PARALLEL.min(count - opened);
        let mut tasks = Vec::with_capacity(batch);
        for k in 0..batch {
            let config = Arc::clone(&configs[(opened + k) % configs.len()]);
            tasks.push(tokio::spawn(tokio::time::timeout(
                Duration::from_secs(15),
                open_idle(addr, config, proto),
            )));
        }
        for task in tasks {
            match task.await {
                Ok(Ok(Ok(conn))) => into.push(conn),
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => return Err("opening a connection took over 15 s".into()),
                Err(e) => return Err(format!("open task: {e}")),
            }
        }
        opened += batch;
    }
    Ok(())
}

/// `VmRSS` and `RssAnon` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Ends the child: its standard input closes, then a kill if it has not left within 10 s.
fn stop_child(mut child: std::process::Child) {
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn idle_memory(rt: &tokio::runtime::Runtime, n: usize, hold: Duration, proto: Proto) {
    println!(
        "\n== 3. Memory per idle TLS device connection ({}, gateway in its own process) ==",
        proto.label()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("current exe"))
        .env("CMG_BENCH_ROLE", "gateway")
        .env("CMG_BENCH_DIR", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("gateway child");
    let pid = child.id();
    let stdout = child.stdout.take().expect("child stdout");
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr: Option<SocketAddr> = line_rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .and_then(|line| line.strip_prefix("GATEWAY_ADDR ")?.trim().parse().ok());
    let Some(addr) = addr else {
        println!("idle        the gateway child did not report its address within 30 s");
        stop_child(child);
        return;
    };
    let result = rt.block_on(measure_idle(pid, addr, dir.path(), n, hold, proto));
    stop_child(child);
    if let Err(e) = result {
        println!("idle        {}: failed: {e}", proto.label());
    }
}

async fn measure_idle(
    pid: u32,
    addr: SocketAddr,
    dir: &Path,
    n: usize,
    hold: Duration,
    proto: Proto,
) -> Result<(), String> {
    let ca = std::fs::read_to_string(dir.join("ca.crt")).map_err(|e| format!("CA: {e}"))?;
    let configs: Vec<Arc<rustls::ClientConfig>> = (0..IDLE_CERTS)
        .map(|k| {
            let device = cmg_pki::self_signed_device(&format!("idle-{k}"), KeyAlgorithm::EcdsaP256)
                .expect("device certificate");
            let config = cmg_pki::tls::client_config(
                device.cert_pem(),
                device.key_pem(),
                &[&ca],
                &[proto.alpn()],
            )
            .expect("client TLS config");
            // A full handshake with the client certificate on every connection, as devices do.
            let mut config = (*config).clone();
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        })
        .collect();
    let mut conns = Vec::with_capacity(n + IDLE_WARM);
    open_many(addr, &configs, proto, IDLE_WARM, &mut conns).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before, anon_before) = rss_kib(pid);
    let fds_before = open_fds(pid);
    let opening = Instant::now();
    let opened = open_many(addr, &configs, proto, n, &mut conns).await;
    let open_time = opening.elapsed();
    opened?;
    // Settle, but measure well before the 10 s header-read timeout could close idle HTTP/1.1
    // connections (it runs from the end of the last request on each connection).
    let settle = Duration::from_secs(2);
    tokio::time::sleep(settle).await;
    let (rss_after, anon_after) = rss_kib(pid);
    let fds_after = open_fds(pid);
    let per_conn = (rss_after as f64 - rss_before as f64) / n as f64;
    let per_conn_anon = (anon_after as f64 - anon_before as f64) / n as f64;
    println!(
        "idle        {}: {n} connections opened in {:.1} s ({} client certificates), child \
         VmRSS {rss_before} KiB -> {rss_after} KiB, open fds {fds_before} -> {fds_after} \
         (+{}), measured {:.1} s after the first of them was opened",
        proto.label(),
        open_time.as_secs_f64(),
        IDLE_CERTS,
        fds_after.saturating_sub(fds_before),
        (open_time + settle).as_secs_f64(),
    );
    println!(
        "idle        {}: {per_conn:.1} KiB VmRSS per idle TLS device connection \
         ({per_conn_anon:.1} KiB RssAnon); goal ≤ 16 KiB",
        proto.label()
    );
    println!(
        "{}",
        json!({"bench": "gateway", "part": "idle_memory", "protocol": proto.label(),
               "connections": n, "rss_before_kib": rss_before, "rss_after_kib": rss_after,
               "kib_per_connection": (per_conn * 10.0).round() / 10.0,
               "anon_kib_per_connection": (per_conn_anon * 10.0).round() / 10.0,
               "fds_added": fds_after.saturating_sub(fds_before)})
    );
    // Are they still open later on? (Counted from the child's open file descriptors.)
    let later = opening + hold;
    tokio::time::sleep_until(later.into()).await;
    let fds_later = open_fds(pid);
    let (rss_later, _) = rss_kib(pid);
    println!(
        "idle        {}: {} s after opening began: open fds {fds_later} (+{} over the \
         baseline), VmRSS {rss_later} KiB",
        proto.label(),
        hold.as_secs(),
        fds_later.saturating_sub(fds_before),
    );
    println!(
        "{}",
        json!({"bench": "gateway", "part": "idle_hold", "protocol": proto.label(),
               "connections": n, "secs": hold.as_secs(),
               "fds_added": fds_later.saturating_sub(fds_before), "rss_kib": rss_later})
    );
    for conn in conns {
        conn.task.abort();
    }
    Ok(())
}
