//! HTTPS through rustls with a self-signed certificate made here: pages, login cookie naming,
//! webhooks, plain HTTP refused, HSTS on every answer, stalled handshakes and bodies from one
//! address, certificate renewal on SIGHUP, and the start refused with a clear message for each
//! broken file.

use crate::harness::*;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Cert {
    pem: String,
    key: String,
    der: Vec<u8>,
}

fn make_cert(cn: &str) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    Cert {
        pem: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn write_cert(dir: &Path, c: &Cert) {
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::write(dir.join("tls/cert.pem"), &c.pem).unwrap();
    std::fs::write(dir.join("tls/key.pem"), &c.key).unwrap();
}

fn tls_conf() -> serde_json::Value {
    json!({"use_ssl": true, "ssl": {"cert_file": "tls/cert.pem", "private_file": "tls/key.pem"}})
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection that trusts only `trust`; returns the stream and the certificate served.
fn connect(addr: &str, trust: &[u8]) -> Tls {
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tls_over(tcp, trust)
}

/// TLS over a connection already made (the handshake runs at the first write).
fn tls_over(tcp: std::net::TcpStream, trust: &[u8]) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(trust.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn https(
    addr: &str,
    trust: &[u8],
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    exchange(connect(addr, trust), addr, method, path, headers, body)
}

fn served_cert(addr: &str, trust: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut s = connect(addr, trust);
    // Writing drives the handshake; its failure is the answer.
    s.write_all(b"GET /ams-build/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .and_then(|_| s.flush())
        .map_err(|e| e.to_string())?;
    let certs = s.conn.peer_certificates().ok_or("no certificate")?;
    Ok(certs[0].to_vec())
}

#[test]
fn https_serves_pages_sessions_and_webhooks_and_refuses_plain_http() {
    let mut h = TestHost::with_conf(tls_conf());
    let cert = make_cert("first");
    write_cert(&h.data, &cert);
    h.project(
        "mine",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(&h, "dev", "4", "mine", "correct horse battery");
    h.start();
    assert!(
        h.host_log().contains("web interface listening on https://"),
        "{}",
        h.host_log()
    );
    let addr = h.web_addr();

    // The login page over HTTPS, with the certificate we made.
    let (st, _, body) = https(&addr, &cert.der, "GET", "/ams-build/login", &[], b"");
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("password"));

    // Under TLS the session cookie is __Host- prefixed and Secure.
    let (st, head, _) = https(
        &addr,
        &cert.der,
        "POST",
        "/ams-build/login",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded".to_string(),
        )],
        &form(&[("username", "dev"), ("password", "correct horse battery")]),
    );
    assert_eq!(st, 303, "{head}");
    let line = head.lines().find(|l| l.starts_with("set-cookie:")).unwrap();
    assert!(line.contains("__host-ams_session="), "{line}");
    assert!(
        line.contains("; secure") && line.contains("httponly") && line.contains("path=/"),
        "{line}"
    );
    assert!(
        !line.contains("domain="),
        "__Host- cookies carry no Domain: {line}"
    );
    // The harness lower-cases headers; cookie names are case-sensitive.
    let cookie = set_cookie(&head).replacen("__host-", "__Host-", 1);
    let (st, _, me) = https(
        &addr,
        &cert.der,
        "GET",
        "/ams-build/api/user",
        &[("Cookie", cookie.clone())],
        b"",
    );
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&me).contains("\"dev\""));
    // The plain-HTTP cookie name means nothing under TLS.
    let plain_name = cookie.replacen("__Host-", "", 1);
    let (st, _, _) = https(
        &addr,
        &cert.der,
        "GET",
        "/ams-build/api/user",
        &[("Cookie", plain_name)],
        b"",
    );
    assert_eq!(st, 401);

    // Webhooks are HTTPS too: a delivery without an event header is refused, over TLS.
    let (st, _, _) = https(
        &h.webhook_addr(),
        &cert.der,
        "POST",
        "/ams-build/request",
        &[("Content-Type", "application/json".to_string())],
        b"{}",
    );
    assert_eq!(st, 400);

    // Plain HTTP on the HTTPS port gets no HTTP answer at all.
    let (st, head, _) = http_raw(&addr, "/ams-build/login", &[]);
    assert_eq!(st, 0, "plain HTTP must not be served: {head}");

    // A client that does not trust the certificate fails the handshake.
    let other = make_cert("other");
    assert!(served_cert(&addr, &other.der).is_err());

    // Renewal: new files, SIGHUP, and the new certificate is served without a restart.
    let renewed = make_cert("renewed");
    write_cert(&h.data, &renewed);
    std::process::Command::new("kill")
        .args(["-HUP", &h.pid().to_string()])
        .status()
        .unwrap();
    let got = wait_for(
        "the renewed certificate to be served",
        Duration::from_secs(20),
        || served_cert(&addr, &renewed.der).ok(),
    );
    assert_eq!(got, renewed.der);
    assert!(h.host_log().contains("reloaded the TLS certificate"));

    // A broken renewal keeps the certificate in use.
    std::fs::write(h.data.join("tls/key.pem"), "not a key").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &h.pid().to_string()])
        .status()
        .unwrap();
    wait_for(
        "the failed reload to be logged",
        Duration::from_secs(20),
        || {
            h.host_log()
                .contains("kept the old TLS certificate")
                .then_some(())
        },
    );
    assert_eq!(served_cert(&addr, &renewed.der).unwrap(), renewed.der);
}

/// A started HTTPS host with the project `mine` and its ADMIN `dev`, and its certificate.
fn https_host() -> (TestHost, Cert) {
    let mut h = TestHost::with_conf(tls_conf());
    let cert = make_cert("first");
    write_cert(&h.data, &cert);
    h.project(
        "mine",
        &pipeline_with(json!([stage("s", &["true"])]), json!({"dummy-build": true})),
    );
    add_user(&h, "dev", "4", "mine", "correct horse battery");
    h.start();
    (h, cert)
}

/// The Strict-Transport-Security lines of a (lower-cased) header block.
fn hsts(head: &str) -> Vec<&str> {
    head.lines()
        .filter(|l| l.starts_with("strict-transport-security:"))
        .map(str::trim)
        .collect()
}

#[test]
fn every_https_answer_tells_browsers_to_stay_on_https() {
    let (h, cert) = https_host();
    let addr = h.web_addr();
    let form_type = [(
        "Content-Type",
        "application/x-www-form-urlencoded".to_string(),
    )];
    let wrong = form(&[("username", "dev"), ("password", "wrong")]);
    let right = form(&[("username", "dev"), ("password", "correct horse battery")]);
    let answers = [
        (
            "the login page",
            https(&addr, &cert.der, "GET", "/ams-build/login", &[], b""),
        ),
        (
            "a failed login",
            https(
                &addr,
                &cert.der,
                "POST",
                "/ams-build/login",
                &form_type,
                &wrong,
            ),
        ),
        (
            "a login",
            https(
                &addr,
                &cert.der,
                "POST",
                "/ams-build/login",
                &form_type,
                &right,
            ),
        ),
        (
            "an unknown page",
            https(&addr, &cert.der, "GET", "/ams-build/nope", &[], b""),
        ),
        (
            "the root, which leads to the dashboard",
            https(&addr, &cert.der, "GET", "/", &[], b""),
        ),
        (
            "a page outside web_root",
            https(&addr, &cert.der, "GET", "/nope", &[], b""),
        ),
        (
            "the API without a token",
            https(&addr, &cert.der, "GET", "/ams-build/api/user", &[], b""),
        ),
        (
            "a refused webhook",
            https(
                &h.webhook_addr(),
                &cert.der,
                "POST",
                "/ams-build/request",
                &[],
                b"{}",
            ),
        ),
    ];
    let statuses: Vec<u16> = answers.iter().map(|(_, (st, _, _))| *st).collect();
    assert_eq!(statuses, [200, 401, 303, 404, 303, 404, 401, 400]);
    for (what, (_, head, _)) in &answers {
        assert_eq!(
            hsts(head),
            ["strict-transport-security: max-age=31536000"],
            "{what}: {head}"
        );
    }
}

#[test]
fn stalled_handshakes_and_bodies_from_one_address_leave_https_to_everyone_else() {
    use crate::edge::{
        partial_login, wait_all, Stalled, BODY_TIMEOUT, PER_ADDRESS, PROMPTLY, STALLED,
    };
    // A TLS client has this long to finish its handshake (`ams_web::HEADER_TIMEOUT`).
    const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    use std::io::{ErrorKind, Read, Write};
    let (h, cert) = https_host();
    let addr = h.web_addr();
    // Two requests from a third address that stop half-way through their body.
    let mut partial: Vec<Tls> = (0..2)
        .map(|_| {
            let mut s = tls_over(connect_from("127.0.0.3", &addr), &cert.der);
            s.write_all(&partial_login(&addr)).unwrap();
            s.flush().unwrap();
            s
        })
        .collect();
    let sent = std::time::Instant::now();
    // More connections from 127.0.0.1 than the host has slots, none of which says hello.
    let started = std::time::Instant::now();
    let mut stalled: Vec<Stalled<std::net::TcpStream>> = (0..STALLED)
        .map(|_| {
            let s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_nonblocking(true).unwrap();
            Stalled::new(s)
        })
        .collect();

    // Another client gets its page at once.
    let t = std::time::Instant::now();
    let tcp = connect_from("127.0.0.2", &addr);
    tcp.set_read_timeout(Some(PROMPTLY)).unwrap();
    let (st, head, page) = exchange(
        tls_over(tcp, &cert.der),
        &addr,
        "GET",
        "/ams-build/login",
        &[],
        b"",
    );
    assert_eq!(st, 200, "the login page during the attack: {head}");
    assert!(String::from_utf8_lossy(&page).contains("password"));
    assert!(t.elapsed() < PROMPTLY, "answered in {:?}", t.elapsed());
    assert!(
        started.elapsed() < HEADER_TIMEOUT,
        "answered only after the handshake timeout could free slots"
    );

    // Over the address's cap, connections were closed before any TLS; the rest wait for the
    // handshake timeout.
    wait_all(
        &mut stalled,
        "the connections over the address's cap to be closed",
        PROMPTLY,
        |c| c.iter().filter(|s| s.closed).count() >= STALLED - PER_ADDRESS,
    );
    assert_eq!(stalled.iter().filter(|s| !s.closed).count(), PER_ADDRESS);
    assert!(stalled.iter().all(|s| s.got.is_empty()));
    wait_all(
        &mut stalled,
        "the handshake timeout to end the silent connections",
        Duration::from_secs(25),
        |c| c.iter().all(|s| s.closed),
    );

    // The partial bodies are answered 408, with HSTS, and their connections closed.
    for s in &mut partial {
        s.sock
            .set_read_timeout(Some(Duration::from_secs(25)))
            .unwrap();
        let mut got = Vec::new();
        // A close without close_notify is an error after the data; a timeout is not a close.
        if let Err(e) = s.read_to_end(&mut got) {
            assert!(
                !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                "the connection stayed open: {e}"
            );
        }
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 408"), "{text}");
        assert_eq!(hsts(&text), ["strict-transport-security: max-age=31536000"]);
    }
    assert!(sent.elapsed() >= BODY_TIMEOUT - Duration::from_secs(1));
}

fn start_fails(conf: serde_json::Value, setup: impl FnOnce(&Path)) -> String {
    let h = TestHost::with_conf(conf);
    setup(&h.data);
    let out = h
        .cmd()
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the host must not start");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !h.data.join("amsbuild.sock").exists(),
        "nothing may listen: {err}"
    );
    err
}

#[test]
fn a_missing_or_broken_certificate_stops_the_start_with_a_clear_message() {
    let cert = make_cert("c");
    // Missing certificate file.
    let err = start_fails(tls_conf(), |_| {});
    assert!(
        err.contains("web_conf.json")
            && err.contains("ssl.cert_file")
            && err.contains("tls/cert.pem")
            && err.contains("cannot read"),
        "{err}"
    );
    // A key path that is not set at all.
    let err = start_fails(
        json!({"use_ssl": true, "ssl": {"cert_file": "tls/cert.pem"}}),
        |d| write_cert(d, &cert),
    );
    assert!(
        err.contains("ssl.private_file") && err.contains("use_ssl to false"),
        "{err}"
    );
    // A certificate file without a certificate.
    let err = start_fails(tls_conf(), |d| {
        write_cert(d, &cert);
        std::fs::write(d.join("tls/cert.pem"), "hello").unwrap();
    });
    assert!(
        err.contains("ssl.cert_file") && err.contains("holds no certificate"),
        "{err}"
    );
    // A key file without a key.
    let err = start_fails(tls_conf(), |d| {
        write_cert(d, &cert);
        std::fs::write(d.join("tls/key.pem"), "garbage").unwrap();
    });
    assert!(
        err.contains("ssl.private_file") && err.contains("no usable private key"),
        "{err}"
    );
    // A key that belongs to another certificate.
    let other = make_cert("other");
    let err = start_fails(tls_conf(), |d| {
        write_cert(d, &cert);
        std::fs::write(d.join("tls/key.pem"), &other.key).unwrap();
    });
    assert!(err.contains("does not fit ssl.cert_file"), "{err}");
    // A CA bundle that is named but missing.
    let err = start_fails(
        json!({"use_ssl": true, "ssl": {"cert_file": "tls/cert.pem",
               "private_file": "tls/key.pem", "ca_bundle_file": "tls/bundle.pem"}}),
        |d| write_cert(d, &cert),
    );
    assert!(
        err.contains("ssl.ca_bundle_file") && err.contains("bundle.pem"),
        "{err}"
    );
}
