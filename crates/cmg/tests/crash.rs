//! Crash safety of registration (DESIGN §9): kill the site server with SIGKILL while many
//! registrations are in flight; after a restart every device that received a token is in the
//! database, and no client ID was handed out twice.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cmg_testkit::TestDevice;
use serde_json::Value;

const DEVICES: usize = 300;

/// Starts `cmg site run` on a free port; returns the process and the MP's base URL.
fn start_site(data: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cmg"))
        .arg("--data")
        .arg(data)
        .args(["site", "run", "--mp-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "{first}");
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_registration_wave_loses_no_registered_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("site");
    let init = Command::new(env!("CARGO_BIN_EXE_cmg"))
        .arg("--data")
        .arg(&data)
        .args(["site", "init", "--site-code", "CRS"])
        .output()
        .unwrap();
    assert!(init.status.success());
    let root = std::fs::read_to_string(data.join("pki/site-root.crt")).unwrap();
    let (mut site, url) = start_site(&data);

    // Every device registers over and over with new hardware IDs until the site dies.
    let issued = Arc::new(std::sync::Mutex::new(Vec::<(String, String, String)>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..DEVICES {
        let (root, url, issued, done) = (root.clone(), url.clone(), issued.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0.. {
                let device = TestDevice::new(&root, &url, &format!("crash-{n}-{round}"));
                match device.try_register(None).await {
                    Ok((status, body)) if status == 200 => {
                        let id = body["client_id"].as_str().unwrap().to_owned();
                        assert!(body["client_token"].is_string());
                        issued.lock().unwrap().push((
                            id,
                            device.hardware_id.clone(),
                            device.thumbprint(),
                        ));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return, // the site is gone
                }
            }
        }));
    }
    // Let the wave build up, then kill the server mid-flight.
    let wave = async {
        while done.load(Ordering::Relaxed) < 500 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wave)
        .await
        .expect("500 registrations within 2 minutes");
    site.kill().unwrap();
    site.wait().unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let issued = issued.lock().unwrap().clone();
    assert!(issued.len() >= 500);

    // Restart and compare with the database.
    let (mut site, _) = start_site(&data);
    let out = Command::new(env!("CARGO_BIN_EXE_cmg"))
        .arg("--data")
        .arg(&data)
        .args(["admin", "device", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let stored: HashMap<&str, &Value> = rows
        .iter()
        .map(|r| (r["client_id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(stored.len(), rows.len(), "a client ID is stored twice");
    let mut seen = HashSet::new();
    for (id, hardware_id, thumbprint) in &issued {
        assert!(
            seen.insert(id.clone()),
            "client ID {id} was handed out twice"
        );
        let row = stored
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} got a token but is not in the database"));
        assert_eq!(row["hardware_id"], hardware_id.as_str());
        assert_eq!(row["certificate_thumbprint"], thumbprint.as_str());
    }
    site.kill().unwrap();
    site.wait().unwrap();
}
