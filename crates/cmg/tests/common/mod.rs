//! Helpers of the tests that run the real `cmg` binary: one working directory per test, `cmg up`
//! as a child process with the addresses it printed, `cmg client run`, the site's database read
//! through the library, polling with deadlines, and a TCP forwarder the test can cut.
//!
//! Every process started here is killed when its handle is dropped, so a failing test leaves
//! nothing running.

#![allow(dead_code)]

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cmg");

/// The data directory `cmg up` uses in the working directory (its default, `./cmg-data`).
pub const DATA: &str = "cmg-data";

/// Runs `cmg ARGS` in `dir`.
pub fn cmg(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `cmg ARGS` in `dir`, which must succeed; returns its stdout.
pub fn cmg_ok(dir: &Path, args: &[&str]) -> String {
    let out = cmg(dir, args);
    assert!(
        out.status.success(),
        "cmg {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cmg client status --json` of the client in `state` (relative to `dir`).
pub fn client_status(dir: &Path, state: &str) -> Value {
    let out = cmg_ok(dir, &["client", "status", "--json", "--state-dir", state]);
    serde_json::from_str(&out).unwrap()
}

/// `cmg admin device show ID`.
pub fn device(dir: &Path, client_id: &str) -> Value {
    serde_json::from_str(&cmg_ok(dir, &["admin", "device", "show", client_id])).unwrap()
}

/// A log file's text; empty while it does not exist.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A client log: `<state>/logs/<name>.log`.
pub fn client_log(dir: &Path, state: &str, name: &str) -> String {
    read_log(&dir.join(state).join("logs").join(format!("{name}.log")))
}

/// A site log: `<data>/logs/<name>.log`.
pub fn site_log(dir: &Path, name: &str) -> String {
    read_log(&dir.join(DATA).join("logs").join(format!("{name}.log")))
}

/// Polls `probe` every 100 ms until it gives a value; fails the test after `limit`, saying what
/// it waited for.
pub fn wait_until<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first file under `dir` that contains `needle`.
pub fn contains(dir: &Path, needle: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if let Some(found) = contains(&path, needle) {
                return Some(found);
            }
        } else if std::fs::read(&path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            return Some(path);
        }
    }
    None
}

/// A failed install leaves its logs (to say why) and nothing else: no key, certificate, token or
/// state.
pub fn assert_installed_nothing(state: &Path) {
    let Ok(entries) = std::fs::read_dir(state) else {
        return;
    };
    let left: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "logs")
        .collect();
    assert!(
        left.is_empty(),
        "a failed install left {left:?} in {}",
        state.display()
    );
}

/// Sends SIGTERM (as Ctrl-C or a service manager would) and waits up to 30 s for the exit.
pub fn terminate(child: &mut Child) -> ExitStatus {
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_until(
        "the process to stop after SIGTERM",
        Duration::from_secs(30),
        || child.try_wait().unwrap(),
    )
}

/// Runs an async block of the site library (reading the site's database beside the running
/// roles, as the admin CLI does) to completion.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Opens the site of `cmg up` in `dir` through the library.
pub async fn open_site(dir: &Path) -> cmg_site::Site {
    cmg_site::Site::open(cmg_site::DataDir::new(dir.join(DATA)))
        .await
        .unwrap()
}

/// The status messages the site stored for `client_id`, in order of arrival: (kind, ID).
pub fn stored_messages(dir: &Path, client_id: &str) -> Vec<(String, String)> {
    block_on(async {
        let site = open_site(dir).await;
        let rows = site.store().status_messages(client_id).await.unwrap();
        site.close().await;
        rows.into_iter()
            .map(|r| (r.message.kind, r.message.message_id))
            .collect()
    })
}

/// `cmg up` running in a working directory, with what it printed.
pub struct Up {
    dir: PathBuf,
    /// `--data`, absolute, or none (`./cmg-data` in the working directory).
    data: Option<PathBuf>,
    child: Option<Child>,
    starts: u32,
    pub printed: Vec<String>,
    pub mp_port: u16,
    pub gateway_port: u16,
    pub tunnel_port: u16,
    /// The management point's role ID.
    pub role_id: String,
    /// `https://localhost:PORT/CCM_Proxy_MutualAuth/<role ID>`: the MP through the gateway.
    pub cmg_url: String,
    /// The install command it printed, without the leading `cmg`.
    pub install: Vec<String>,
    /// The bulk registration token in that command, and its GUID.
    pub token: String,
    pub guid: String,
}

impl Up {
    /// `cmg up --data DIR/cmg-data --gateway-port 0 --mp-port 0 --tunnel-port 0` in `dir`;
    /// returns once it printed `ready`. The data directory is given as an absolute path, so that
    /// the site's database path recorded in `site.toml` does not depend on the working directory
    /// (the test process opens it too).
    pub fn start(dir: &Path) -> Up {
        Up::start_with(dir, Some(dir.join(DATA)))
    }

    /// `cmg up` as a new user runs it: no `--data` (the default `./cmg-data`).
    pub fn start_as_documented(dir: &Path) -> Up {
        Up::start_with(dir, None)
    }

    fn start_with(dir: &Path, data: Option<PathBuf>) -> Up {
        let mut up = Up {
            dir: dir.to_path_buf(),
            data,
            child: None,
            starts: 0,
            printed: Vec::new(),
            mp_port: 0,
            gateway_port: 0,
            tunnel_port: 0,
            role_id: String::new(),
            cmg_url: String::new(),
            install: Vec::new(),
            token: String::new(),
            guid: String::new(),
        };
        up.spawn();
        up
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let out = self.dir.join(format!("up-{}.out", self.starts));
        let err = self.dir.join(format!("up-{}.err", self.starts));
        let mut command = Command::new(BIN);
        if let Some(data) = &self.data {
            command.arg("--data").arg(data);
        }
        let mut child = command
            .current_dir(&self.dir)
            .args([
                "up",
                "--gateway-port",
                &self.gateway_port.to_string(),
                "--mp-port",
                &self.mp_port.to_string(),
                "--tunnel-port",
                &self.tunnel_port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let printed = wait_until("`cmg up` to print ready", Duration::from_secs(60), || {
            let text = read_log(&out);
            if text.lines().any(|l| l == "ready") {
                return Some(text.lines().map(str::to_owned).collect::<Vec<_>>());
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "cmg up exited with {status} before ready:\n{text}\n{}",
                    read_log(&err)
                );
            }
            None
        });
        self.child = Some(child);
        self.parse(printed);
    }

    fn parse(&mut self, printed: Vec<String>) {
        let port_after = |line: &str, marker: &str| -> u16 {
            let rest = &line[line.find(marker).unwrap() + marker.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        };
        for line in &printed {
            if let Some(rest) = line.strip_prefix("Management point ") {
                self.role_id = rest.split(':').next().unwrap().to_owned();
                self.mp_port = port_after(line, "https://localhost:");
            } else if line.starts_with("Gateway ") && line.contains(" instance 1: ") {
                self.gateway_port = port_after(line, "https://localhost:");
                self.tunnel_port = port_after(line, "(tunnel 127.0.0.1:");
            } else if let Some(rest) = line.strip_prefix("Bulk registration token ") {
                self.guid = rest.split(' ').next().unwrap().to_owned();
            } else if let Some(rest) = line.strip_prefix("cmg client install ") {
                self.install = std::iter::once("client".to_owned())
                    .chain(std::iter::once("install".to_owned()))
                    .chain(rest.split_whitespace().map(str::to_owned))
                    .collect();
            }
        }
        assert!(
            self.mp_port > 0 && self.gateway_port > 0 && self.tunnel_port > 0,
            "{printed:?}"
        );
        self.token = self
            .install
            .iter()
            .find_map(|a| a.strip_prefix("/regtoken:"))
            .unwrap()
            .to_owned();
        self.cmg_url = self
            .install
            .iter()
            .find_map(|a| a.strip_prefix("/mp:"))
            .unwrap()
            .to_owned();
        assert_eq!(
            self.cmg_url,
            format!(
                "https://localhost:{}/CCM_Proxy_MutualAuth/{}",
                self.gateway_port, self.role_id
            )
        );
        self.printed = printed;
    }

    /// The printed install command, installing into `state` instead of `./cmg-client`.
    pub fn install_args(&self, state: &str) -> Vec<String> {
        self.install
            .iter()
            .map(|a| {
                if a == "./cmg-client" {
                    state.to_owned()
                } else {
                    a.clone()
                }
            })
            .collect()
    }

    /// The install command of a roaming client: the intranet MP as `SMSMP`, both the gateway's
    /// and the site's roots trusted, not always on the internet, and every `localhost` name
    /// reached at `127.0.0.2`, where the test's forwarders stand between the device and the
    /// roles (see [`Forwarder`]).
    pub fn roaming_install_args(&self, state: &str) -> Vec<String> {
        let mut args: Vec<String> = self
            .install_args(state)
            .into_iter()
            .filter(|a| a != "CCMALWAYSINF=1")
            .collect();
        args.extend([
            format!("SMSMP={}", self.intranet_url()),
            "--trust-ca".into(),
            format!("./{DATA}/pki/site-root.crt"),
            "--resolve".into(),
            "localhost=127.0.0.2:443".into(),
        ]);
        args
    }

    /// `https://localhost:PORT`: the MP as the site lists it.
    pub fn intranet_url(&self) -> String {
        format!("https://localhost:{}", self.mp_port)
    }

    /// SIGKILL: every role stops at once, without a chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts `cmg up` again on the same data directory and the ports it got the first time.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "cmg up is still running");
        let (mp, gateway, tunnel, url) = (
            self.mp_port,
            self.gateway_port,
            self.tunnel_port,
            self.cmg_url.clone(),
        );
        self.spawn();
        assert_eq!(
            (
                self.mp_port,
                self.gateway_port,
                self.tunnel_port,
                &self.cmg_url
            ),
            (mp, gateway, tunnel, &url)
        );
    }

    /// SIGTERM; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("cmg up is running");
        terminate(&mut child)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("cmg up is running").id()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `cmg client run --state-dir STATE` in `dir`.
pub struct AgentProcess {
    child: Option<Child>,
}

impl AgentProcess {
    pub fn start(dir: &Path, state: &str) -> AgentProcess {
        let name = state.trim_start_matches("./").replace('/', "_");
        let log = |ext: &str| std::fs::File::create(dir.join(format!("{name}.run.{ext}"))).unwrap();
        let child = Command::new(BIN)
            .current_dir(dir)
            .args(["client", "run", "--state-dir", state])
            .stdin(Stdio::null())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .unwrap();
        AgentProcess { child: Some(child) }
    }

    /// SIGTERM; the agent must stop cleanly.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let status = terminate(&mut child);
        assert!(status.success(), "cmg client run exited with {status}");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP forwarder owned by the test: the network path between the device and a role. Started,
/// it accepts on `listen` and relays each connection to `target`; stopped, nothing listens on
/// `listen` (connections are refused) and every relayed connection is cut.
pub struct Forwarder {
    listen: SocketAddr,
    target: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    accept: JoinHandle<()>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    /// A forwarder from `listen` to `target`, not started.
    pub fn new(listen: SocketAddr, target: SocketAddr) -> Forwarder {
        Forwarder {
            listen,
            target,
            running: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.running.is_none());
        let listener = TcpListener::bind(self.listen)
            .unwrap_or_else(|e| panic!("forwarder cannot listen on {}: {e}", self.listen));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (target, flag, open) = (self.target, stop.clone(), connections.clone());
        let accept = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let inbound = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect(target) else {
                    continue;
                };
                let pair = (
                    inbound.try_clone().unwrap(),
                    outbound.try_clone().unwrap(),
                    inbound.try_clone().unwrap(),
                    outbound.try_clone().unwrap(),
                );
                open.lock().unwrap().extend([inbound, outbound]);
                std::thread::spawn(move || pipe(pair.0, pair.1));
                std::thread::spawn(move || pipe(pair.3, pair.2));
            }
        });
        self.running = Some(Running {
            stop,
            accept,
            connections,
        });
    }

    /// Stops listening and cuts every connection it relays.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::SeqCst);
            running.accept.join().unwrap();
            for connection in running.connections.lock().unwrap().drain(..) {
                let _ = connection.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Writes `text` to `path` (replacing it).
pub fn write_file(path: &Path, text: &str) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}
