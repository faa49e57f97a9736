//! The ccmsetup command line: the documentation's own example, each property, case-insensitive
//! names, the plain flags, and every refusal (before anything is done, never echoing a token).

use cmg_client::{InstallOptions, SetupError};

/// The example command line of the ConfigMgr documentation, verbatim.
const DOCUMENTED: &str = "ccmsetup.exe /mp:https://CONTOSO.CLOUDAPP.NET/CCM_Proxy_MutualAuth/72186325152220500 CCMHOSTNAME=CONTOSO.CLOUDAPP.NET/CCM_Proxy_MutualAuth/72186325152220500 SMSSiteCode=ABC /regtoken:eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6Ik9Tbzh2Tmd5VldRUjlDYVh5T2lacHFlMDlXNCJ9.eyJTQ0NNVG9rZW5DYXRlZ29yeSI6IlN7Q01QcmVBdXRoVG9rZW4iLCJBdXRob3JpdHkiOiJTQ0NNIiwiTGljZW5zZSI6IlNDQ00iLCJUeXBlIjoiQnVsa1JlZ2lzdHJhdGlvbiIsIlRlbmFudElkIjoiQ0RDQzVFOTEtMEFERi00QTI0LTgyRDAtMTk2NjY3RjFDMDgxIiwiVW5pcXVlSWQiOiJkYjU5MWUzMy1wNmZkLTRjNWItODJmMy1iZjY3M2U1YmQwYTIiLCJpc3MiOiJ1cm46c2NjbTpvYXV0aDI6Y2RjYzVlOTEtMGFkZi00YTI0LTgyZDAtMTk2NjY3ZjFjMDgxIiwiYXVkIjoidXJuOnNjY206c2VydmljZSIsImV4cCI6MTU4MDQxNbUwNSwibmJmIjoxNTgwMTU2MzA1fQ.ZUJkxCX6lxHUZhMH_WhYXFm_tbXenEdpgnbIqI1h8hYIJw7xDk3wv625SCfNfsqxhAwRwJByfkXdVGgIpAcFshzArXUVPPvmiUGaxlbB83etUTQjrLIk-gvQQZiE5NSgJ63LCp5KtqFCZe8vlZxnOloErFIrebjFikxqAgwOO4i5ukJdl3KQ07YPRhwpuXmwxRf1vsiawXBvTMhy40SOeZ3mAyCRypQpQNa7NM3adCBwUtYKwHqiX3r1jQU0y57LvU_brBfLUL6JUpk3ri-LSpwPFarRXzZPJUu4-mQFIgrMmKCYbFk3AaEvvrJienfWSvFYLpIYA7lg-6EVYRcCAA";

fn args(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

fn parse(line: &str) -> Result<InstallOptions, SetupError> {
    InstallOptions::parse(&args(line))
}

fn documented_token() -> &'static str {
    DOCUMENTED.split("/regtoken:").nth(1).unwrap()
}

fn refused(line: &str) -> String {
    let error = parse(line).expect_err(line).to_string();
    for secret in [documented_token(), "aaa.bbb.ccc"] {
        assert!(
            !error.contains(secret),
            "the error shows the token: {error}"
        );
    }
    error
}

#[test]
fn the_documented_example_parses_verbatim() {
    let options = parse(DOCUMENTED).unwrap();
    let gateway = "https://CONTOSO.CLOUDAPP.NET/CCM_Proxy_MutualAuth/72186325152220500";
    assert_eq!(options.mp.as_deref(), Some(gateway));
    assert_eq!(options.cmg_url.as_deref(), Some(gateway));
    assert_eq!(options.gateway_url(), Some(gateway));
    assert_eq!(options.intranet_url(), None);
    assert_eq!(options.site_code, "ABC");
    assert_eq!(
        options.regtoken.as_ref().unwrap().expose(),
        documented_token()
    );
    assert!(!options.always_internet && !options.use_pki_cert && !options.no_crl_check);
    assert_eq!(options.state_dir, std::path::PathBuf::from("cmg-client"));
    // Without the leading ccmsetup.exe, as the CLI passes it.
    let rest = DOCUMENTED.strip_prefix("ccmsetup.exe ").unwrap();
    assert_eq!(parse(rest).unwrap(), options);
    // Debug never shows the token.
    let debug = format!("{options:?}");
    assert!(!debug.contains(documented_token()), "{debug}");
    assert!(!debug.contains("eyJ0eXAi"), "{debug}");
}

#[test]
fn every_property_and_names_in_any_case() {
    let line = "/MP:https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 ccmhostname=cmg.contoso.com/CCM_Proxy_MutualAuth/7 smssitecode=xyz /REGTOKEN:aaa.bbb.ccc SmsMp=https://mp.contoso.com/ ccmalwaysinf=1 /nocrlcheck --state-dir /tmp/x --trust-ca a.pem --trust-ca b.pem --resolve cmg.contoso.com=127.0.0.1:8443 --service /tmp/cmg-client.service";
    let o = parse(line).unwrap();
    assert_eq!(o.site_code, "XYZ");
    assert_eq!(o.intranet_mp.as_deref(), Some("https://mp.contoso.com"));
    assert_eq!(o.intranet_url(), Some("https://mp.contoso.com"));
    assert!(o.always_internet && o.no_crl_check);
    assert_eq!(o.trust_ca.len(), 2);
    assert_eq!(o.resolve[0].1.port(), 8443);
    assert_eq!(o.state_dir, std::path::PathBuf::from("/tmp/x"));
    assert!(o.service.is_some());
    assert_eq!(o.regtoken.unwrap().expose(), "aaa.bbb.ccc");
    // CCMALWAYSINF=0 and an intranet-only client need no token.
    let o = parse("SMSMP=https://mp.contoso.com SMSSiteCode=ABC CCMALWAYSINF=0").unwrap();
    assert!(!o.always_internet && o.regtoken.is_none() && o.gateway_url().is_none());
    // /mp: naming an intranet MP.
    let o = parse("/mp:https://mp.contoso.com SMSSiteCode=ABC").unwrap();
    assert_eq!(o.intranet_url(), Some("https://mp.contoso.com"));
}

#[test]
fn plain_flags_mean_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.txt");
    std::fs::write(&token_file, "aaa.bbb.ccc\n").unwrap();
    let o = InstallOptions::parse(&[
        "--mp".into(),
        "https://cmg.contoso.com/CCM_Proxy_MutualAuth/7".into(),
        "--cmg=cmg.contoso.com/CCM_Proxy_MutualAuth/7".into(),
        "--site-code".into(),
        "abc".into(),
        "--regtoken-file".into(),
        token_file.display().to_string(),
        "--always-internet".into(),
    ])
    .unwrap();
    assert_eq!(
        o.gateway_url(),
        Some("https://cmg.contoso.com/CCM_Proxy_MutualAuth/7")
    );
    assert_eq!(o.regtoken.unwrap().expose(), "aaa.bbb.ccc");
    assert!(o.always_internet);
    let o = parse(
        "--cmg cmg.contoso.com/CCM_Proxy_MutualAuth/7 --site-code ABC --regtoken aaa.bbb.ccc",
    )
    .unwrap();
    assert_eq!(
        o.gateway_url(),
        Some("https://cmg.contoso.com/CCM_Proxy_MutualAuth/7")
    );
    let o = parse("--cmg cmg.contoso.com/CCM_Proxy_MutualAuth/7 --site-code ABC --pki-cert c.pem --pki-key k.pem").unwrap();
    assert!(o.use_pki_cert);
    let o = parse("--cmg cmg.contoso.com/CCM_Proxy_MutualAuth/7 SMSSiteCode=ABC /UsePKICert --pki-cert c.pem --pki-key k.pem").unwrap();
    assert!(o.use_pki_cert && o.regtoken.is_none());
}

#[test]
fn unknown_and_conflicting_properties_are_refused_with_a_fix() {
    let gw = "/mp:https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 SMSSiteCode=ABC";
    let cases: Vec<(String, &[&str])> = vec![
        (format!("{gw} /regtoken:aaa.bbb.ccc /frobnicate"), &["/frobnicate", "unknown"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc FOO=bar"), &["FOO=", "unknown"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc --bogus x"), &["--bogus"]),
        (format!("{gw} /regtokn:aaa.bbb.ccc"), &["/regtokn", "unknown"]),
        (format!("{gw} stray"), &["stray"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc --regtoken-file /nonexistent/t"), &["--regtoken-file"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc --regtoken aaa.bbb.ccc"), &["/regtoken", "--regtoken", "once"]),
        (format!("{gw} /regtoken:not-a-token"), &["/regtoken", "not a token"]),
        (gw.to_string(), &["/regtoken", "bulk registration token"]),
        ("/mp:https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 SMSSiteCode=ABCD /regtoken:aaa.bbb.ccc".into(), &["SMSSiteCode", "ABCD", "three"]),
        ("/mp:https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 SMSSiteCode=A-C /regtoken:aaa.bbb.ccc".into(), &["SMSSiteCode"]),
        ("/mp:https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 SMSSiteCode=AUTO /regtoken:aaa.bbb.ccc".into(), &["SMSSiteCode", "AUTO"]),
        ("/mp:https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 /regtoken:aaa.bbb.ccc".into(), &["SMSSiteCode", "missing"]),
        ("SMSSiteCode=ABC /regtoken:aaa.bbb.ccc".into(), &["/mp", "missing"]),
        (format!("{gw} SMSSiteCode=XYZ /regtoken:aaa.bbb.ccc"), &["SMSSiteCode", "site codes"]),
        (format!("{gw} CCMHOSTNAME=other.contoso.com/CCM_Proxy_MutualAuth/7 /regtoken:aaa.bbb.ccc"), &["/mp", "CCMHOSTNAME", "different"]),
        (format!("{gw} --mp https://cmg2.contoso.com/CCM_Proxy_MutualAuth/7 /regtoken:aaa.bbb.ccc"), &["/mp", "--mp", "different"]),
        ("/mp:https://mp1.contoso.com SMSMP=https://mp2.contoso.com SMSSiteCode=ABC".into(), &["/mp", "SMSMP", "different"]),
        (format!("{gw} /UsePKICert"), &["--pki-cert", "/UsePKICert"]),
        (format!("{gw} /UsePKICert --pki-cert c.pem"), &["--pki-key"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc --pki-key k.pem"), &["--pki-key", "--pki-cert"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc /UsePKICert --pki-cert c.pem --pki-key k.pem"), &["/regtoken", "/UsePKICert"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc CCMALWAYSINF=yes"), &["CCMALWAYSINF", "1 or 0"]),
        ("SMSMP=https://mp.contoso.com SMSSiteCode=ABC CCMALWAYSINF=1".into(), &["CCMHOSTNAME", "always"]),
        ("/mp:http://mp.contoso.com SMSSiteCode=ABC".into(), &["/mp", "HTTPS"]),
        (format!("{gw} CCMHOSTNAME=cmg.contoso.com /regtoken:aaa.bbb.ccc"), &["CCMHOSTNAME", "CCM_Proxy_MutualAuth"]),
        ("SMSMP=https://cmg.contoso.com/CCM_Proxy_MutualAuth/7 SMSSiteCode=ABC".into(), &["SMSMP", "CCMHOSTNAME"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc /NoCRLCheck:yes"), &["/nocrlcheck", "no value"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc --state-dir"), &["--state-dir", "value"]),
        (format!("{gw} /regtoken:aaa.bbb.ccc --resolve nonsense"), &["--resolve", "HOST=IP:PORT"]),
    ];
    for (line, needles) in cases {
        let error = refused(&line);
        for needle in needles {
            assert!(
                error.to_lowercase().contains(&needle.to_lowercase()),
                "{line}\n  -> {error}\n  should mention {needle}"
            );
        }
    }
    // An unknown property whose value is a token does not echo it.
    let error = refused(&format!(
        "{gw} /regtoken:aaa.bbb.ccc REGTOKEN={}",
        documented_token()
    ));
    assert!(error.contains("REGTOKEN="), "{error}");
}
