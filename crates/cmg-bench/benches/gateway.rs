//! Gateway benchmark (DESIGN §4, §6): what the gateway + tunnel hop costs, over real TLS on
//! loopback with a SQLite site.
//!
//! 1. **Throughput**: 64 device connections, each registered once through the gateway with a
//!    bulk token, then authenticated requests (`GET …/SMS_MP/.sms_pol` with the client token)
//!    over keep-alive, all connections busy; the same devices (same certificates and tokens)
//!    calling the MP directly for comparison. A second pair uses the location request
//!    (`?MPLIST`), which the MP answers without a database write, to show the hop itself.
//!    Relayed paths run twice: with the connection point calling the MP over mutual TLS (a
//!    connection point on another host) and in process (`cmg up`). The connection point keeps
//!    its default tunnels per instance and does not log every URL (not verbose), as deployed.
//!    Besides the rate, each run reports the CPU time of the whole process per request, which
//!    other load on the machine moves far less than the rate.
//!    The load generator is lean (hyper's client connections over rustls, see [`Device`]): it
//!    shares the two cores with the roles it measures.
//! 2. **Added latency at a fixed offered rate**: an open-loop load generator (a pacer sends on
//!    a fixed schedule whatever the responses do, so a slow response never delays the next
//!    send) against the MP directly and through the gateway; latency is measured from each
//!    request's *intended* send time. The two paths run in alternating one-second slices, so
//!    that a slow phase of a shared VM falls on both alike. A slice that falls behind the
//!    schedule ends the pair, whose backlog would spoil the slices after it; the pair then runs
//!    again at a lower rate. Each path also reports the process's CPU time per request at that
//!    rate: how much of the two cores the offered rate takes on it.
//! 3. **Memory per idle TLS device connection**: the gateway runs in a child process (this
//!    binary re-executed with `CMG_BENCH_ROLE=gateway`); the parent opens N mutually
//!    authenticated TLS connections, sends one request on each, leaves them idle and reads the
//!    child's `VmRSS` before and after. Measured for HTTP/1.1 and HTTP/2 connections.
//! 4. **Instructions per request** (`CMG_BENCH_PARTS=instructions`, not run by default): the
//!    runs of part 1 send a fixed number of requests each (`CMG_BENCH_REQUESTS`, default 2000)
//!    on connections opened beforehand, and mark where each starts and ends for callgrind.
//!    `crates/cmg-bench/callgrind.sh` runs it under `valgrind --tool=callgrind` and prints the
//!    instructions per request of every path: unlike rates and CPU times, the same for the same
//!    code whatever else the machine (or its hypervisor) is doing, so two versions compare.
//!
//! `cargo bench -p cmg-bench --bench gateway`
//!
//! Environment (all optional): `CMG_BENCH_RATE` (offered requests/s, default 10000),
//! `CMG_BENCH_SECS` (measured seconds per latency run, default 5), `CMG_BENCH_WARMUP_SECS`
//! (default 1), `CMG_BENCH_FALLBACK_RATE` (default 2000; 0 = none), `CMG_BENCH_TPUT_SECS`
//! (measured seconds per throughput run, default 5), `CMG_BENCH_IDLE` (idle connections,
//! default 2000), `CMG_BENCH_IDLE_HOLD_SECS` (when to re-count the idle connections, default
//! 12), `CMG_BENCH_PARTS` (default `throughput,latency,idle`), `CMG_BENCH_PATHS` (throughput and
//! instruction runs whose label contains it, e.g. `gateway+tunnel, policy`; default all),
//! `CMG_BENCH_DEVICES` (devices, each with its own connections; default 64),
//! `CMG_BENCH_REQUESTS` (requests per instruction run, default 2000).
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
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

/// Devices, each with its own certificate and keep-alive connection, sending at once;
/// `CMG_BENCH_DEVICES` changes it (fewer make the set-up quicker under valgrind).
fn devices() -> usize {
    env_num("CMG_BENCH_DEVICES", 64).clamp(1, 1024) as usize
}
/// HTTP/1.1 connections per device in the latency runs. An HTTP/1.1 connection carries one
/// request at a time, so a client opens a new connection (a full handshake) whenever a request is
/// due while its last one is in flight; at 10,000/s over 64 connections that is every few
/// requests, and the handshakes, not the relay, would be measured. Over 512 connections it is rare.
const H1_LATENCY_CLIENTS_PER_DEVICE: usize = 8;
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

/// cmg's allocator (as the `cmg` binary installs it), counting live heap bytes in the gateway child (where the idle-memory
/// part asks for them) so that live data and allocator overhead can be told apart.
struct Counting;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call is passed on unchanged to cmg's allocator; only a counter is added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the inner allocator's.
        unsafe { cmg_alloc::Allocator.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { cmg_alloc::Allocator.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { cmg_alloc::Allocator.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    cmg_alloc::tune();
    cmg_log::init_stderr_diagnostics();
    if std::env::var("CMG_BENCH_ROLE").as_deref() == Ok("gateway") {
        gateway_child();
        return;
    }
    // `cargo test --benches` runs bench targets without `--bench`: nothing to test here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gateway bench: skipped (run it with `cargo bench -p cmg-bench --bench gateway`)");
        return;
    }
    let parts = Parts::from_env();
    println!(
        "gateway bench: {} CPU(s), load average at start: {}, wake-up round trip between \
         CPUs 0 and 1: {:.1} µs (on one CPU it takes a few; a machine that takes far more than \
         20 µs is slow to wake a task on another core, and every rate below suffers)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        wake_round_trip_us()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if parts.throughput || parts.latency || parts.instructions {
        relay(&rt, &parts);
    }
    if parts.idle {
        let n = env_num("CMG_BENCH_IDLE", 2000).clamp(1, 8000) as usize;
        let hold = Duration::from_secs(env_num("CMG_BENCH_IDLE_HOLD_SECS", 12).min(120));
        for proto in [Proto::Http1, Proto::Http2] {
            idle_memory(&rt, n, hold, proto);
        }
    }
    println!("gateway bench: load average at end: {}", loadavg());
}

/// The parts of the bench to run (`CMG_BENCH_PARTS`, comma-separated; default
/// `throughput,latency,idle`; `instructions` only when named).
struct Parts {
    throughput: bool,
    latency: bool,
    idle: bool,
    instructions: bool,
}

impl Parts {
    fn from_env() -> Parts {
        let parts = std::env::var("CMG_BENCH_PARTS")
            .unwrap_or_else(|_| "throughput,latency,idle".to_owned());
        let known = ["throughput", "latency", "idle", "instructions"];
        if let Some(unknown) = parts.split(',').map(str::trim).find(|p| !known.contains(p)) {
            panic!("CMG_BENCH_PARTS: unknown part '{unknown}'; the parts are {known:?}");
        }
        let wants = |part: &str| parts.split(',').any(|p| p.trim() == part);
        Parts {
            throughput: wants("throughput"),
            latency: wants("latency"),
            idle: wants("idle"),
            instructions: wants("instructions"),
        }
    }
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

/// Mean time for one byte to go to a thread on the other CPU and back over a pair of sockets,
/// each thread blocking in `read` in between: what waking a task on another core costs here.
/// The two threads are pinned to CPUs 0 and 1, so that the scheduler cannot put them on one.
/// On some VMs it is ten times what it is on others, and it moves every figure of this bench.
fn wake_round_trip_us() -> f64 {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    const ROUND_TRIPS: u32 = 2000;
    let Ok((mut here, mut there)) = UnixStream::pair() else {
        return f64::NAN;
    };
    let echo = std::thread::spawn(move || {
        pin_to_cpu(1);
        let mut byte = [0u8];
        while there.read_exact(&mut byte).is_ok() && there.write_all(&byte).is_ok() {}
    });
    let pinned = std::thread::spawn(move || {
        pin_to_cpu(0);
        let started = Instant::now();
        let mut byte = [0u8];
        let mut done = 0;
        while done < ROUND_TRIPS
            && here.write_all(&byte).is_ok()
            && here.read_exact(&mut byte).is_ok()
        {
            done += 1;
        }
        started.elapsed().as_secs_f64() * 1e6 / f64::from(done.max(1))
    });
    let mean = pinned.join().unwrap_or(f64::NAN);
    let _ = echo.join();
    mean
}

/// Keeps the calling thread on `cpu` (best effort: on one CPU, or if refused, it stays free).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: `set` is a plain bit set that lives across the call; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
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

/// One device's connections as the load generator holds them: hyper's client over rustls,
/// opened when needed and reused, as an HTTPS client's pool does. The generator shares the
/// machine's two cores with the roles it measures, so per request it does HTTP and TLS and
/// nothing else: no URL parsing, redirect policy or per-request timer (reqwest, used before,
/// took about a tenth of a relayed request's CPU for those).
struct Device {
    addr: SocketAddr,
    name: rustls::pki_types::ServerName<'static>,
    /// `host:port` as the requests name it (`Host`, or the HTTP/2 authority).
    authority: String,
    tls: Arc<rustls::ClientConfig>,
    proto: Proto,
    /// Connections ready for a request; an HTTP/2 one is shared, an HTTP/1.1 one is taken.
    idle: Mutex<Vec<Sender>>,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// A TLS connection to `addr` speaking `proto`, driven by a task of its own.
async fn connect(
    addr: SocketAddr,
    name: rustls::pki_types::ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    proto: Proto,
) -> Result<(Sender, tokio::task::JoinHandle<()>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let io = TokioIo::new(tls);
    Ok(match proto {
        Proto::Http1 => {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1: {e}"))?;
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            (Sender::Http1(sender), task)
        }
        Proto::Http2 => {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2: {e}"))?;
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            (Sender::Http2(sender), task)
        }
    })
}

impl Device {
    fn new(device: &TestDevice, proto: Proto) -> Arc<Device> {
        let (host, addr, root) = device.endpoint();
        let tls = cmg_pki::tls::client_config(
            device.credential.cert_pem(),
            device.credential.key_pem(),
            &[root],
            &[proto.alpn()],
        )
        .expect("device TLS configuration");
        let authority = match addr.port() {
            443 => host.clone(),
            port => format!("{host}:{port}"),
        };
        Arc::new(Device {
            addr,
            name: rustls::pki_types::ServerName::try_from(host).expect("server name"),
            authority,
            tls,
            proto,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A connection ready for a request: an idle one, or a new one.
    async fn take(&self) -> Result<Sender, String> {
        loop {
            let reused = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.retain(|s| !s.is_closed());
                match idle.last() {
                    Some(Sender::Http2(shared)) => Some(Sender::Http2(shared.clone())),
                    Some(Sender::Http1(_)) => idle.pop(),
                    None => None,
                }
            };
            let Some(sender) = reused else {
                let (sender, _task) = connect(
                    self.addr,
                    self.name.clone(),
                    Arc::clone(&self.tls),
                    self.proto,
                )
                .await?;
                if let Sender::Http2(shared) = &sender {
                    self.put(Sender::Http2(shared.clone()));
                }
                return Ok(sender);
            };
            // An HTTP/1.1 connection becomes ready once its task has seen the last answer end.
            if let Sender::Http1(mut one) = sender {
                if one.ready().await.is_ok() {
                    return Ok(Sender::Http1(one));
                }
                continue;
            }
            return Ok(sender);
        }
    }

    fn put(&self, sender: Sender) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sender);
    }

    /// Closes the idle connections (each closes once its task sees its handle dropped).
    fn close_idle(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// One device's request: its connections, the request URI (origin form for HTTP/1.1, with the
/// authority for HTTP/2) and its token.
struct Target {
    device: Arc<Device>,
    uri: hyper::Uri,
    host: HeaderValue,
    auth: HeaderValue,
}

impl Target {
    fn new(device: &Arc<Device>, path_and_query: &str, auth: &HeaderValue) -> Arc<Target> {
        let uri = match device.proto {
            Proto::Http1 => path_and_query.parse(),
            Proto::Http2 => format!("https://{}{path_and_query}", device.authority).parse(),
        }
        .expect("request URI");
        Arc::new(Target {
            device: Arc::clone(device),
            uri,
            host: HeaderValue::from_str(&device.authority).expect("host header"),
            auth: auth.clone(),
        })
    }

    /// Sends the request and reads the whole answer: its status and HTTP version.
    async fn request(&self) -> Result<(hyper::StatusCode, hyper::Version), String> {
        let mut request = hyper::Request::get(self.uri.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        match self.device.take().await? {
            Sender::Http1(mut sender) => {
                request.headers_mut().insert(HOST, self.host.clone());
                let response = read(sender.send_request(request).await).await;
                if response.is_ok() {
                    self.device.put(Sender::Http1(sender));
                }
                response
            }
            Sender::Http2(mut sender) => read(sender.send_request(request).await).await,
        }
    }
}

async fn read(
    response: hyper::Result<hyper::Response<hyper::body::Incoming>>,
) -> Result<(hyper::StatusCode, hyper::Version), String> {
    let response = response.map_err(|e| format!("request: {e}"))?;
    let (status, version) = (response.status(), response.version());
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok((status, version))
}

type Targets = Arc<Vec<Arc<Target>>>;

/// Closes the idle connections of `targets` (at the end of each run and of the set-up).
fn close_idle(targets: &Targets) {
    for target in targets.iter() {
        target.device.close_idle();
    }
}

/// Waits until this process's file descriptors stop changing (at most 15 s): the connections
/// of the run before, closed by [`close_idle`], must be gone before the next run, or hundreds
/// of them closing inside it would be measured as its latency.
fn settle() {
    let started = Instant::now();
    let mut last = open_fds(std::process::id());
    let mut steady = 0;
    while steady < 4 && started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(250));
        let now = open_fds(std::process::id());
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
    }
}

/// One request on every target at once, so that each has a live connection.
async fn prime(targets: &Targets) {
    let sent: Vec<_> = targets
        .iter()
        .map(|target| {
            let target = Arc::clone(target);
            tokio::spawn(async move { send(&target).await })
        })
        .collect();
    for answer in sent {
        let _ = answer.await;
    }
}

/// Sends the request and reads the whole answer; `true` on a 2xx.
async fn send(target: &Target) -> bool {
    target
        .request()
        .await
        .is_ok_and(|(status, _)| status.is_success())
}

struct Setup {
    site: TestSite,
    cmg: TestCmg,
    gateway_policy: Targets,
    direct_policy: Targets,
    gateway_location: Targets,
    direct_location: Targets,
    /// Policy again, the devices speaking HTTP/1.1 (as Configuration Manager clients do); the
    /// others negotiate HTTP/2. One connection per device, then [`H1_LATENCY_CLIENTS_PER_DEVICE`]
    /// per device for the latency runs.
    gateway_policy_h1: Targets,
    direct_policy_h1: Targets,
    gateway_policy_h1_many: Targets,
    direct_policy_h1_many: Targets,
}

/// Site + MP + connection point + one gateway; 64 devices registered through the gateway.
async fn setup() -> Setup {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    // As deployed: the gateway writes CMGService.log every minute (the test kit's 1 s is for
    // tests), and the connection point reports traffic every 5 minutes (see `use_connector`).
    let cmg = site
        .cmg_with_gateways(
            1,
            |_| {},
            |g| {
                g.stats_interval_secs = cmg_gateway::DEFAULT_STATS_INTERVAL_SECS;
                // The HTTP/2 device paths need it; the HTTP/1.1 ones offer only HTTP/1.1.
                g.device_http2 = true;
            },
        )
        .await;
    let admin = site.admin().await;
    let bulk = admin
        .new_bulk_token(Default::default())
        .await
        .expect("bulk token");
    let mut gateway_policy = Vec::new();
    let mut direct_policy = Vec::new();
    let mut gateway_location = Vec::new();
    let mut direct_location = Vec::new();
    let mut gateway_policy_h1_many = Vec::new();
    let mut direct_policy_h1_many = Vec::new();
    for n in 0..devices() {
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
            // Policy and location share the device's HTTP/2 connection.
            let prefix = device.base_path();
            let conns = Device::new(device, Proto::Http2);
            policy.push(Target::new(
                &conns,
                &format!("{prefix}{}", mp::POLICY),
                &auth,
            ));
            location.push(Target::new(
                &conns,
                &format!("{prefix}{}?MPLIST", mp::LOCATION),
                &auth,
            ));
        }
        for (device, policy) in [
            (&via_gateway, &mut gateway_policy_h1_many),
            (&direct, &mut direct_policy_h1_many),
        ] {
            let path = format!("{}{}", device.base_path(), mp::POLICY);
            for _ in 0..H1_LATENCY_CLIENTS_PER_DEVICE {
                policy.push(Target::new(
                    &Device::new(device, Proto::Http1),
                    &path,
                    &auth,
                ));
            }
        }
    }
    // One client of each device for the throughput runs.
    let first_of_each = |many: &[Arc<Target>]| -> Targets {
        Arc::new(
            many.iter()
                .step_by(H1_LATENCY_CLIENTS_PER_DEVICE)
                .cloned()
                .collect(),
        )
    };
    let setup = Setup {
        site,
        cmg,
        gateway_policy: Arc::new(gateway_policy),
        direct_policy: Arc::new(direct_policy),
        gateway_location: Arc::new(gateway_location),
        direct_location: Arc::new(direct_location),
        gateway_policy_h1: first_of_each(&gateway_policy_h1_many),
        direct_policy_h1: first_of_each(&direct_policy_h1_many),
        gateway_policy_h1_many: Arc::new(gateway_policy_h1_many),
        direct_policy_h1_many: Arc::new(direct_policy_h1_many),
    };
    // Every connection answers before anything is measured; say which HTTP version it speaks.
    for (label, targets) in [
        ("gateway policy", &setup.gateway_policy),
        ("direct policy", &setup.direct_policy),
        ("gateway location", &setup.gateway_location),
        ("direct location", &setup.direct_location),
        (
            "gateway policy, HTTP/1.1 devices",
            &setup.gateway_policy_h1_many,
        ),
        (
            "direct policy, HTTP/1.1 devices",
            &setup.direct_policy_h1_many,
        ),
    ] {
        let mut version = None;
        for target in targets.iter() {
            let (status, spoken) = target.request().await.expect("request");
            version = Some(spoken);
            assert!(status.is_success(), "{label}: {status}");
        }
        close_idle(targets);
        println!(
            "setup: {label}: {} connections answer 200 ({:?})",
            targets.len(),
            version.expect("at least one connection")
        );
    }
    setup
}

/// How the connection point reaches the MP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MpHop {
    /// Over mutual TLS, as from a connection point on another host (`cmg connector run`).
    Tls,
    /// A call into the MP of the same process, as `cmg up` runs them.
    InProcess,
}

impl MpHop {
    fn label(self) -> &'static str {
        match self {
            MpHop::Tls => "MP over TLS",
            MpHop::InProcess => "MP in process",
        }
    }
}

/// Replaces the connection point by one that reaches the MP as `hop` says, configured as
/// deployed: not verbose (not every relayed URL is logged), traffic reported every 5 minutes.
async fn use_connector(setup: &mut Setup, hop: MpHop) {
    let options = &mut setup.cmg.connector_options;
    options.verbose = false;
    options.report_interval = cmg_connector::REPORT_INTERVAL;
    // `CMG_BENCH_TUNNELS=N`: tunnels per gateway instance (`connector run --tunnels N`).
    options.tunnels_per_instance =
        env_num("CMG_BENCH_TUNNELS", options.tunnels_per_instance as u64).clamp(1, 16) as usize;
    options.in_process = match hop {
        MpHop::Tls => Vec::new(),
        MpHop::InProcess => vec![setup.site.in_process_mp()],
    };
    setup.cmg.start_connector().await;
    setup.cmg.stop_connector().await;
}

/// The closed-loop runs of part 1, each a label and its targets, in order: for each way the
/// connection point reaches the MP, the direct paths (once) and the relayed ones. `f` gets the
/// label, the targets and whether they are relayed; the connection point is switched between.
/// `CMG_BENCH_PATHS=gateway` (any part of a label) keeps only the matching runs, for a profiler
/// attached to one path.
fn each_closed_loop_run(
    rt: &tokio::runtime::Runtime,
    setup: &mut Setup,
    mut f: impl FnMut(&str, &Targets, bool),
) {
    let only = std::env::var("CMG_BENCH_PATHS").unwrap_or_default();
    for hop in [MpHop::Tls, MpHop::InProcess] {
        rt.block_on(use_connector(setup, hop));
        for (path, targets) in [
            ("direct MP, policy", &setup.direct_policy),
            ("gateway+tunnel, policy", &setup.gateway_policy),
            ("direct MP, location", &setup.direct_location),
            ("gateway+tunnel, location", &setup.gateway_location),
            ("direct MP, policy, HTTP/1.1", &setup.direct_policy_h1),
            ("gateway+tunnel, policy, HTTP/1.1", &setup.gateway_policy_h1),
        ] {
            let relayed = path.starts_with("gateway");
            // The direct runs do not depend on the connection point: measured once.
            if !relayed && hop == MpHop::InProcess {
                continue;
            }
            let label = if relayed {
                format!("{path}, {}", hop.label())
            } else {
                path.to_owned()
            };
            if label.contains(only.as_str()) {
                f(&label, targets, relayed);
            }
        }
    }
}

fn relay(rt: &tokio::runtime::Runtime, parts: &Parts) {
    let mut setup = rt.block_on(setup());
    let connections = setup.direct_policy.len();
    if parts.throughput {
        let warm = Duration::from_secs(1);
        let secs = Duration::from_secs(env_num("CMG_BENCH_TPUT_SECS", 5).clamp(1, 120));
        println!(
            "\n== 1. Throughput: {connections} keep-alive device connections, all busy \
             (closed loop), {}s warm-up + {}s measured ==",
            warm.as_secs(),
            secs.as_secs()
        );
        let mut rates = Vec::new();
        each_closed_loop_run(rt, &mut setup, |label, targets, relayed| {
            let run = rt.block_on(closed_loop(Arc::clone(targets), warm, secs));
            println!(
                "throughput  {label:<46} {:>7.0} requests/s  {:>6.1} µs CPU/request  ({} \
                 ok, {} failed in {}s)",
                run.rate,
                run.cpu_us_per_request,
                run.ok,
                run.failed,
                secs.as_secs()
            );
            println!(
                "{}",
                json!({"bench": "gateway", "part": "throughput", "path": label,
                       "connections": connections, "requests_per_sec": run.rate.round(),
                       "cpu_us_per_request": (run.cpu_us_per_request * 10.0).round() / 10.0,
                       "ok": run.ok, "failed": run.failed, "secs": secs.as_secs()})
            );
            if relayed {
                rates.push((label.to_owned(), run.rate));
            }
        });
        for (label, rate) in rates {
            println!("throughput  goal ≥ 20000 relayed requests/s: {label}: {rate:.0}");
        }
    }
    if parts.instructions {
        let requests = env_num("CMG_BENCH_REQUESTS", 2000).clamp(1, 10_000_000);
        println!(
            "\n== 4. Instructions: {requests} requests per path over {connections} keep-alive \
             connections (closed loop); under `valgrind --tool=callgrind` each run is dumped \
             alone (see callgrind.sh) =="
        );
        each_closed_loop_run(rt, &mut setup, |label, targets, _| {
            // Connections are opened first, so handshakes are not counted as requests.
            rt.block_on(prime(targets));
            callgrind::zero_stats();
            let failed = rt.block_on(counted_loop(targets, requests));
            callgrind::dump_stats_at(&format!("{label} | {requests} requests"));
            close_idle(targets);
            println!("instructions  {label:<46} {requests} requests sent, {failed} failed");
        });
    }
    if parts.latency {
        let rate = env_num("CMG_BENCH_RATE", 10_000).clamp(1, 200_000);
        let fallback = env_num("CMG_BENCH_FALLBACK_RATE", 2_000).min(200_000);
        let secs = env_num("CMG_BENCH_SECS", 5).clamp(1, 120);
        let warm = env_num("CMG_BENCH_WARMUP_SECS", 1).min(60);
        rt.block_on(use_connector(&mut setup, MpHop::InProcess));
        println!(
            "\n== 2. Added latency, open loop (fixed send schedule, latency from the intended \
             send time), policy with token, {connections} HTTP/2 or {} HTTP/1.1 connections, \
             {warm}s warm-up, then {secs} measured seconds of each path in alternating 1 s \
             slices; relayed with the {} (as `cmg up`) ==",
            setup.gateway_policy_h1_many.len(),
            MpHop::InProcess.label()
        );
        for pair in [
            (&setup.direct_policy, &setup.gateway_policy, "HTTP/2"),
            (
                &setup.direct_policy_h1_many,
                &setup.gateway_policy_h1_many,
                "HTTP/1.1",
            ),
        ] {
            let sustained = latency_pair(rt, pair, rate, warm, secs);
            if !sustained && fallback > 0 && fallback < rate {
                println!(
                    "latency     {rate}/s was not sustained on this machine; again at {fallback}/s"
                );
                latency_pair(rt, pair, fallback, warm, secs);
            }
        }
    }
    rt.block_on(async {
        setup.cmg.shutdown().await;
        setup.site.shutdown().await;
    });
}

/// Every target busy with one request at a time until the end; requests/s completed in the
/// measured window, with the counts of successes and failures in it.
async fn closed_loop(targets: Targets, warm: Duration, measure: Duration) -> Closed {
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
    let (ok0, failed0, t0, cpu0) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        Instant::now(),
        process_cpu(),
    );
    tokio::time::sleep_until(end).await;
    let (ok1, failed1, elapsed, cpu1) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        t0.elapsed(),
        process_cpu(),
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
    close_idle(&targets);
    let ok = ok1 - ok0;
    Closed {
        rate: ok as f64 / elapsed.as_secs_f64(),
        ok,
        failed: failed1 - failed0,
        cpu_us_per_request: (cpu1 - cpu0).as_secs_f64() * 1e6 / ok.max(1) as f64,
    }
}

/// Exactly `requests` requests, every target busy with one at a time until they are all sent;
/// returns how many failed.
async fn counted_loop(targets: &Targets, requests: u64) -> u64 {
    let issued = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = targets
        .iter()
        .map(|target| {
            let (target, issued, failed) =
                (Arc::clone(target), Arc::clone(&issued), Arc::clone(&failed));
            tokio::spawn(async move {
                while issued.fetch_add(1, Ordering::Relaxed) < requests {
                    if !send(&target).await {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    failed.load(Ordering::Relaxed)
}

/// Callgrind's client requests (as `valgrind/callgrind.h` issues them): a sequence that does
/// nothing on a real processor and that valgrind recognises. They let one valgrind run count the
/// instructions of each measured run apart from the set-up and from the other runs.
mod callgrind {
    /// `VG_USERREQ_TOOL_BASE('C','T')`, then the order of callgrind's requests.
    const BASE: u64 = (b'C' as u64) << 24 | (b'T' as u64) << 16;
    const ZERO_STATS: u64 = BASE + 1;
    const DUMP_STATS_AT: u64 = BASE + 3;

    /// Sets every thread's counts to zero.
    pub fn zero_stats() {
        request(ZERO_STATS, 0);
    }

    /// Writes the counts since the last zero to a new dump file, described by `label`.
    pub fn dump_stats_at(label: &str) {
        let label = std::ffi::CString::new(label.replace('\0', " ")).unwrap_or_default();
        request(DUMP_STATS_AT, label.as_ptr() as u64);
    }

    #[cfg(target_arch = "x86_64")]
    fn request(code: u64, arg: u64) {
        let args: [u64; 6] = [code, arg, 0, 0, 0, 0];
        // SAFETY: the four rotations of rdi add up to 128 bits (rdi is unchanged) and rbx is
        // exchanged with itself: no register or memory changes outside valgrind. Under valgrind,
        // the request reads `args` (alive across the asm) and the string `arg` may point to, and
        // writes its answer to rdx.
        unsafe {
            std::arch::asm!(
                "rol rdi, 3",
                "rol rdi, 13",
                "rol rdi, 61",
                "rol rdi, 51",
                "xchg rbx, rbx",
                in("rax") args.as_ptr(),
                inout("rdx") 0u64 => _,
                inout("rdi") 0u64 => _,
                options(nostack),
            );
        }
    }

    /// Elsewhere the instruction counts are not available: `callgrind.sh` says so.
    #[cfg(not(target_arch = "x86_64"))]
    fn request(_code: u64, _arg: u64) {}
}

/// What a closed-loop run measured.
struct Closed {
    rate: f64,
    ok: u64,
    failed: u64,
    /// CPU time of the whole process (load generator and every role) per successful request:
    /// unlike the rate, barely moved by other work on the machine.
    cpu_us_per_request: f64,
}

/// User + system CPU time this process has used (from `/proc/self/stat`, in clock ticks of
/// 10 ms: the measured windows are seconds long).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the file; the first field after the name is 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
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
    /// Summed over the slices (see [`Slice::fds_gained`]).
    fds_gained: i64,
    /// CPU time of the whole process (load generator included) per request sent: how near the
    /// offered rate is to what the two cores can do on this path.
    cpu_per_request: Duration,
}

/// One stretch of the fixed schedule: the requests due after its warm-up.
struct Slice {
    measured: Vec<Sample>,
    /// Requests due after the warm-up.
    expected: usize,
    /// Seconds from the first measured request's due time to the last answer.
    span: f64,
    /// File descriptors this process gained during the slice: new device connections (both
    /// ends, as the gateway runs here too) opened because every one of a device's was busy.
    fds_gained: i64,
    /// CPU time of the whole process from the first request due to the last answer, warm-up
    /// included, and the requests sent in that time.
    cpu: Duration,
    sent: u64,
}

/// Sends `rate` requests/s for `warm + measure` on a fixed schedule, round-robin over the
/// targets, never waiting for answers, then waits for every answer; keeps the requests due
/// after the warm-up. Connections stay open for the next slice.
fn open_loop_slice(
    rt: &tokio::runtime::Runtime,
    targets: &Targets,
    rate: u64,
    warm: Duration,
    measure: Duration,
) -> Slice {
    let count = |d: Duration| (u128::from(rate) * d.as_micros() / 1_000_000) as u64;
    let warm_count = count(warm);
    let total = warm_count + count(measure);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let handle = rt.handle().clone();
    let fds_before = open_fds(std::process::id());
    let cpu_before = process_cpu();
    let start = Instant::now() + Duration::from_millis(20);
    let due_at = |i: u64| {
        start + Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(rate)) as u64)
    };
    // The pacer is this (non-runtime) thread: it sleeps until each request is due and hands it
    // to the runtime; when it is behind, it sends at once to catch up with the schedule.
    for i in 0..total {
        let due = due_at(i);
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
    let cpu = process_cpu().saturating_sub(cpu_before);
    let mut measured = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    measured.retain(|s| s.index >= warm_count);
    // `CMG_BENCH_SAMPLES=FILE`: every measured request as `due_ms,latency_ms,ok` (appended),
    // to see when the slow ones happen.
    if let Ok(path) = std::env::var("CMG_BENCH_SAMPLES") {
        use std::io::Write as _;
        let mut out = String::new();
        for s in &measured {
            out.push_str(&format!(
                "{:.3},{:.3},{}\n",
                ms(s.due - start),
                ms(s.done - s.due),
                s.ok
            ));
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            // The schedule's start on the system's monotonic clock (`Instant`'s debug form), to
            // line the samples up with `perf sched record -k mono`.
            let _ = writeln!(file, "# run {rate}/s, start {start:?}");
            let _ = file.write_all(out.as_bytes());
        }
    }
    let first_due = due_at(warm_count);
    let last_done = measured.iter().map(|s| s.done).max().unwrap_or(first_due);
    Slice {
        expected: (total - warm_count) as usize,
        span: last_done.saturating_duration_since(first_due).as_secs_f64(),
        fds_gained: open_fds(std::process::id()) as i64 - fds_before as i64,
        cpu,
        sent: total,
        measured,
    }
}

impl Slice {
    /// Whether every request of the slice succeeded and the answers kept up with the schedule.
    fn held(&self, rate: u64) -> bool {
        let ok = self.measured.iter().filter(|s| s.ok).count();
        ok == self.expected && self.span > 0.0 && ok as f64 / self.span >= 0.95 * rate as f64
    }
}

impl OpenLoop {
    /// The statistics of a path's slices taken together.
    fn from_slices(slices: &[Slice], rate: u64) -> OpenLoop {
        let ok_samples = || slices.iter().flat_map(|s| &s.measured).filter(|s| s.ok);
        let expected: usize = slices.iter().map(|s| s.expected).sum();
        let ok = ok_samples().count();
        let failed = expected - ok;
        let span: f64 = slices.iter().map(|s| s.span).sum();
        let achieved = if span > 0.0 { ok as f64 / span } else { 0.0 };
        OpenLoop {
            ok,
            failed,
            achieved,
            intended: percentiles(ok_samples().map(|s| s.done - s.due).collect()),
            service: percentiles(ok_samples().map(|s| s.done - s.sent).collect()),
            start_lag: percentiles(
                ok_samples()
                    .map(|s| s.sent.saturating_duration_since(s.due))
                    .collect(),
            ),
            sustained: failed == 0 && achieved >= 0.95 * rate as f64,
            fds_gained: slices.iter().map(|s| s.fds_gained).sum(),
            cpu_per_request: slices.iter().map(|s| s.cpu).sum::<Duration>()
                / slices
                    .iter()
                    .map(|s| s.sent)
                    .sum::<u64>()
                    .clamp(1, u64::from(u32::MAX)) as u32,
        }
    }
}

/// Warm-up of every slice but a path's first: its connections are still open from the last one.
const SLICE_WARM_UP: Duration = Duration::from_millis(250);

/// Direct and through the gateway at the same offered rate, in alternating slices of one
/// measured second (`secs` of each in all, the order swapped every round): a slow phase of a
/// shared machine, which lasts seconds, then falls on both paths alike rather than on one of two
/// long runs. Prints both and the difference; returns whether both sustained the rate.
fn latency_pair(
    rt: &tokio::runtime::Runtime,
    (direct, gateway, devices): (&Targets, &Targets, &str),
    rate: u64,
    warm: u64,
    secs: u64,
) -> bool {
    let paths = [
        (format!("direct MP, {devices}"), direct),
        (format!("gateway+tunnel, {devices}"), gateway),
    ];
    // The connections of the run before (closed at its end) gone, and every connection of both
    // paths up, before the schedule starts.
    settle();
    for (_, targets) in &paths {
        rt.block_on(prime(targets));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut slices: [Vec<Slice>; 2] = Default::default();
    'rounds: for round in 0..secs {
        let warm_up = if round == 0 {
            Duration::from_secs(warm)
        } else {
            SLICE_WARM_UP
        };
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let slice = open_loop_slice(rt, paths[i].1, rate, warm_up, Duration::from_secs(1));
            let held = slice.held(rate);
            slices[i].push(slice);
            // A slice that fell behind leaves a backlog (and the connections its devices opened
            // meanwhile) that would spoil the slices after it, of either path.
            if !held {
                break 'rounds;
            }
        }
    }
    for (_, targets) in &paths {
        close_idle(targets);
    }
    let mut runs = Vec::new();
    for ((label, _), slices) in paths.iter().zip(&slices) {
        let run = OpenLoop::from_slices(slices, rate);
        if slices.is_empty() {
            println!(
                "latency     {label:<24} offered {rate:>6}/s not measured: the other path fell \
                 behind first"
            );
            runs.push(run);
            continue;
        }
        let i = run.intended;
        println!(
            "latency     {label:<24} offered {rate:>6}/s achieved {:>7.0}/s{}  ok {} failed {}  \
             p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  \
             (from task start: p50 {:.3} ms p99 {:.3} ms; task start lag p99 {:.3} ms; \
             file descriptors gained {}; {:.0} µs CPU/request)",
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
            run.fds_gained,
            run.cpu_per_request.as_secs_f64() * 1e6,
        );
        println!(
            "{}",
            json!({"bench": "gateway", "part": "latency", "path": label,
                   "offered_per_sec": rate, "achieved_per_sec": run.achieved.round(),
                   "sustained": run.sustained, "ok": run.ok, "failed": run.failed,
                   "secs": secs, "p50_ms": ms(i.p50), "p90_ms": ms(i.p90),
                   "p99_ms": ms(i.p99), "max_ms": ms(i.max),
                   "service_p50_ms": ms(run.service.p50), "service_p99_ms": ms(run.service.p99),
                   "start_lag_p99_ms": ms(run.start_lag.p99),
                   "cpu_us_per_request": run.cpu_per_request.as_micros()})
        );
        runs.push(run);
    }
    let (direct, gateway) = (&runs[0], &runs[1]);
    let added_p50 = ms(gateway.intended.p50) - ms(direct.intended.p50);
    let added_p99 = ms(gateway.intended.p99) - ms(direct.intended.p99);
    println!(
        "latency     added by gateway+tunnel at {rate}/s offered, {devices}: \
         p50 {added_p50:+.3} ms, p99 {added_p99:+.3} ms (goal: p99 added ≤ 1 ms at 10000/s)"
    );
    println!(
        "{}",
        json!({"bench": "gateway", "part": "latency_added", "devices": devices,
               "offered_per_sec": rate,
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
        // Both protocols are measured; the client's ALPN picks.
        device_http2: true,
    };
    write("ca.crt", ca.credential().cert_pem());
    // Counted from before the gateway starts, so frees of its allocations balance.
    COUNTING.store(true, Ordering::Relaxed);
    // Each line on standard input asks for the live heap bytes; its closing (the parent ending,
    // whatever the way) stops the child.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        for _ in std::io::stdin().lines().map_while(Result::ok) {
            println!("HEAP {}", LIVE_BYTES.load(Ordering::Relaxed));
            let _ = std::io::stdout().flush();
        }
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
    _sender: Sender,
    task: tokio::task::JoinHandle<()>,
}

async fn open_idle(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    proto: Proto,
) -> Result<Conn, String> {
    let name = rustls::pki_types::ServerName::try_from(FQDN).expect("server name");
    let (sender, task) = connect(addr, name, config, proto).await?;
    let answer = match sender {
        Sender::Http1(mut sender) => {
            let request = hyper::Request::get(METADATA)
                .header(HOST, FQDN)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let answer = read(sender.send_request(request).await).await;
            (Sender::Http1(sender), answer)
        }
        Sender::Http2(mut sender) => {
            let request = hyper::Request::get(format!("https://{FQDN}{METADATA}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            let answer = read(sender.send_request(request).await).await;
            (Sender::Http2(sender), answer)
        }
    };
    let (sender, answer) = answer;
    let (status, _) = answer?;
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
    let mut probe = HeapProbe {
        stdin: child.stdin.take().expect("child stdin"),
        lines: line_rx,
    };
    let result = rt.block_on(measure_idle(
        pid,
        &mut probe,
        addr,
        dir.path(),
        n,
        hold,
        proto,
    ));
    child.stdin = Some(probe.stdin);
    stop_child(child);
    if let Err(e) = result {
        println!("idle        {}: failed: {e}", proto.label());
    }
}

/// Asks the gateway child for its live heap bytes.
struct HeapProbe {
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl HeapProbe {
    /// Live heap bytes in the child (a blocking round trip of a few microseconds).
    fn live_bytes(&mut self) -> i64 {
        let _ = writeln!(self.stdin, "heap");
        let _ = self.stdin.flush();
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .ok()
            .and_then(|line| line.strip_prefix("HEAP ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

async fn measure_idle(
    pid: u32,
    probe: &mut HeapProbe,
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
    let heap_before = probe.live_bytes();
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
    let heap_after = probe.live_bytes();
    let heap_per_conn = (heap_after - heap_before) as f64 / 1024.0 / n as f64;
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
         ({per_conn_anon:.1} KiB RssAnon; live heap {heap_per_conn:.1} KiB); goal ≤ 16 KiB",
        proto.label()
    );
    println!(
        "{}",
        json!({"bench": "gateway", "part": "idle_memory", "protocol": proto.label(),
               "connections": n, "rss_before_kib": rss_before, "rss_after_kib": rss_after,
               "kib_per_connection": (per_conn * 10.0).round() / 10.0,
               "anon_kib_per_connection": (per_conn_anon * 10.0).round() / 10.0,
               "heap_kib_per_connection": (heap_per_conn * 10.0).round() / 10.0,
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
