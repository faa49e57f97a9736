//! The real `cmg` binary: `cmg admin cmg create` takes the CMG server authentication certificate
//! as a PFX file, the way ConfigMgr admins export it, with the password from a file or
//! `CMG_PFX_PASSWORD` — and refuses a wrong or missing password, a legacy file and conflicting
//! flags without creating anything.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;

const OPENSSL: &str = "/usr/bin/openssl";
const FQDN: &str = "granitefalls.contoso.com";
const PASSWORD: &str = "c0rrect horse";

struct Site {
    dir: tempfile::TempDir,
    data: PathBuf,
}

impl Site {
    /// `cmg site init` in a temporary directory, and a CA-issued server certificate for
    /// [`FQDN`] made with openssl: `ca.crt`, `server.crt`, `server.key`.
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("cmg-data");
        let site = Site { dir, data };
        let out = site.cmg(&["site", "init", "--site-code", "PFX"], None);
        assert!(out.status.success(), "init: {}", stderr(&out));

        site.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=Contoso Issuing CA",
        ]);
        site.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={FQDN}"),
        ]);
        std::fs::write(
            site.path("ext.cnf"),
            format!("subjectAltName=DNS:{FQDN}\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        site.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ]);
        std::fs::write(site.path("password"), format!("{PASSWORD}\n")).unwrap();
        std::fs::write(site.path("wrong-password"), "not the password\n").unwrap();
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new(OPENSSL)
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    }

    /// `openssl pkcs12 -export` of server.crt, its key and the CA into `name`.
    fn pfx(&self, name: &str, password: &str, extra: &[&str]) -> PathBuf {
        let passout = format!("pass:{password}");
        let mut args = vec![
            "pkcs12",
            "-export",
            "-in",
            "server.crt",
            "-inkey",
            "server.key",
            "-certfile",
            "ca.crt",
            "-out",
            name,
            "-passout",
            &passout,
        ];
        args.extend_from_slice(extra);
        self.openssl(&args);
        self.path(name)
    }

    /// Runs `cmg --data DIR …`, with `CMG_PFX_PASSWORD` set to `env_password` or unset.
    fn cmg(&self, args: &[&str], env_password: Option<&str>) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cmg"));
        command
            .current_dir(self.dir.path())
            .arg("--data")
            .arg(&self.data)
            .args(args);
        match env_password {
            Some(password) => command.env("CMG_PFX_PASSWORD", password),
            None => command.env_remove("CMG_PFX_PASSWORD"),
        };
        command.output().unwrap()
    }

    fn create(
        &self,
        name: &str,
        cert: &Path,
        extra: &[&str],
        env_password: Option<&str>,
    ) -> Output {
        let mut args = vec!["admin", "cmg", "create", "--name", name, "--fqdn", FQDN];
        let cert = cert.to_str().unwrap();
        args.extend_from_slice(&["--server-cert", cert]);
        args.extend_from_slice(extra);
        self.cmg(&args, env_password)
    }

    fn password_file(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    /// The names `cmg admin cmg list` shows.
    fn listed(&self) -> Vec<String> {
        let out = self.cmg(&["admin", "cmg", "list"], None);
        assert!(out.status.success(), "list: {}", stderr(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.data.join("cmg").join(name)
    }

    /// The refusal left nothing behind: no CMG listed, no instance folder.
    fn assert_nothing_created(&self, name: &str) {
        assert!(
            !self.listed().contains(&name.to_owned()),
            "{name} was recorded"
        );
        assert!(
            !self.instance_dir(name).exists(),
            "{name}'s folder was written"
        );
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The DER of every PEM block with this label.
fn pem_ders(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after.find(&end).expect("PEM end line");
        let body: String = after[..stop].split_whitespace().collect();
        out.push(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap(),
        );
        rest = &after[stop + end.len()..];
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The instance folder holds exactly the PFX's chain (server certificate, then the CA) and key.
fn assert_written_from_pfx(site: &Site, name: &str) {
    let dir = site.instance_dir(name);
    let written_chain = pem_ders(&read(&dir.join("server.crt")), "CERTIFICATE");
    let expected_chain = [
        pem_ders(&read(&site.path("server.crt")), "CERTIFICATE"),
        pem_ders(&read(&site.path("ca.crt")), "CERTIFICATE"),
    ]
    .concat();
    assert_eq!(
        written_chain, expected_chain,
        "server.crt is the PFX's chain, leaf first"
    );
    let written_key = pem_ders(&read(&dir.join("server.key")), "PRIVATE KEY");
    let expected_key = pem_ders(&read(&site.path("server.key")), "PRIVATE KEY");
    assert_eq!(written_key.len(), 1);
    assert_eq!(
        written_key, expected_key,
        "server.key is the PFX's key (PKCS#8)"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let config = read(&dir.join("instance-1.toml"));
    assert!(config.contains("server_cert = \"server.crt\""), "{config}");
    assert!(config.contains("server_key = \"server.key\""), "{config}");
}

#[test]
fn a_pfx_with_a_password_file_creates_the_cmg() {
    let site = Site::new();
    let pfx = site.pfx("server.pfx", PASSWORD, &[]);
    let pw = site.password_file("password");
    let out = site.create(
        "GraniteFalls",
        &pfx,
        &["--server-cert-password-file", &pw],
        None,
    );
    assert!(out.status.success(), "create: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CMG GraniteFalls created"));
    assert_eq!(site.listed(), vec!["GraniteFalls".to_owned()]);
    assert_written_from_pfx(&site, "GraniteFalls");
}

#[test]
fn the_password_may_come_from_the_environment_and_the_pfx_from_any_file_name() {
    let site = Site::new();
    // Not named .pfx: recognised because it is not PEM. AES-128 and a SHA-1 MAC.
    let pfx = site.pfx(
        "server-certificate.bin",
        PASSWORD,
        &[
            "-keypbe",
            "AES-128-CBC",
            "-certpbe",
            "AES-128-CBC",
            "-macalg",
            "sha1",
        ],
    );
    let out = site.create("EnvPassword", &pfx, &[], Some(PASSWORD));
    assert!(out.status.success(), "create: {}", stderr(&out));
    assert_written_from_pfx(&site, "EnvPassword");

    // A PFX exported without a password needs none.
    let pfx = site.pfx("open.p12", "", &[]);
    let out = site.create("NoPassword", &pfx, &[], None);
    assert!(out.status.success(), "create: {}", stderr(&out));
    assert_written_from_pfx(&site, "NoPassword");
}

#[test]
fn a_wrong_or_missing_password_creates_nothing() {
    let site = Site::new();
    let pfx = site.pfx("server.pfx", PASSWORD, &[]);

    let wrong = site.password_file("wrong-password");
    let out = site.create(
        "GraniteFalls",
        &pfx,
        &["--server-cert-password-file", &wrong],
        Some(PASSWORD),
    );
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("wrong password"), "{message}");
    assert!(message.contains("server.pfx"), "{message}");
    assert!(
        !message.contains("not the password"),
        "the password leaked: {message}"
    );
    site.assert_nothing_created("GraniteFalls");

    let out = site.create("GraniteFalls", &pfx, &[], Some("also wrong"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wrong password"), "{}", stderr(&out));
    site.assert_nothing_created("GraniteFalls");

    let out = site.create("GraniteFalls", &pfx, &[], None);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("needs a password"), "{message}");
    assert!(message.contains("--server-cert-password-file"), "{message}");
    assert!(message.contains("CMG_PFX_PASSWORD"), "{message}");
    site.assert_nothing_created("GraniteFalls");
}

#[test]
fn legacy_files_and_conflicting_flags_are_refused() {
    let site = Site::new();
    let pw = site.password_file("password");

    let legacy = site.pfx("legacy.pfx", PASSWORD, &["-legacy"]);
    let out = site.create(
        "Legacy",
        &legacy,
        &["--server-cert-password-file", &pw],
        None,
    );
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("legacy algorithm"), "{message}");
    assert!(message.contains("AES256-SHA256"), "{message}");
    site.assert_nothing_created("Legacy");

    let pfx = site.pfx("server.pfx", PASSWORD, &[]);
    let out = site.create(
        "TwoKeys",
        &pfx,
        &[
            "--server-cert-password-file",
            &pw,
            "--server-key",
            "server.key",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("leave --server-key out"),
        "{}",
        stderr(&out)
    );
    site.assert_nothing_created("TwoKeys");

    let pem = site.path("server.crt");
    let out = site.create("NoKey", &pem, &[], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--server-key FILE is required"),
        "{}",
        stderr(&out)
    );
    site.assert_nothing_created("NoKey");

    let out = site.create(
        "PemWithPassword",
        &pem,
        &[
            "--server-key",
            "server.key",
            "--server-cert-password-file",
            &pw,
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("only for a PFX"), "{}", stderr(&out));
    site.assert_nothing_created("PemWithPassword");

    // PEM with its key still works as before.
    let key = site.path("server.key");
    let out = site.create("Pem", &pem, &["--server-key", key.to_str().unwrap()], None);
    assert!(out.status.success(), "create: {}", stderr(&out));
}
