//! `ghmd health`, the probe a container image runs: its exit code follows the server's answer.

mod common;
mod ops_support;

use std::process::Command;

use common::TestServer;
use ops_support::TempDir;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

fn health(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ghmd"))
        .arg("health")
        .args(args)
        .output()
        .expect("run ghmd health");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn exit_code_follows_the_health_service() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();

    let (ok, text) = tokio::task::spawn_blocking({
        let uri = server.uri();
        move || health(&["--addr", &uri])
    })
    .await
    .expect("probe");
    assert!(ok, "{text}");
    assert!(text.contains("SERVING"), "{text}");

    // host:port without a scheme, as a probe passes the listen address.
    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || health(&["--addr", &addr, "--service", ""])
    })
    .await
    .expect("probe");
    assert!(ok, "{text}");

    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || health(&["--addr", &addr, "--service", "no.such.Service"])
    })
    .await
    .expect("probe");
    assert!(!ok, "{text}");
    assert!(text.contains("NotFound"), "{text}");
    server.stop().await;

    // Nobody listens there any more.
    let (ok, text) =
        tokio::task::spawn_blocking(move || health(&["--addr", &addr, "--timeout", "2s"]))
            .await
            .expect("probe");
    assert!(!ok, "{text}");
    assert!(text.contains("cannot connect"), "{text}");
}

/// A CA and a server certificate for localhost signed by it, as PEM: (ca, cert, key).
fn server_certificates() -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ghmd health test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().expect("key");
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("signed");
    (ca_pem, cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn a_tls_server_is_checked_with_its_ca() {
    let dir = TempDir::new("health-tls");
    let (ca, cert, key) = server_certificates();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    };
    let (ca_path, cert_path, key_path) = (
        write("ca.pem", &ca),
        write("server.pem", &cert),
        write("server.key", &key),
    );
    let server = TestServer::start_with(move |config| {
        config.tls_cert = Some(cert_path);
        config.tls_key = Some(key_path);
    })
    .await;
    let addr = server.addr.to_string();
    let ca_arg = ca_path.display().to_string();

    let (ok, text) = tokio::task::spawn_blocking({
        let (addr, ca_arg) = (addr.clone(), ca_arg.clone());
        move || {
            health(&[
                "--addr",
                &addr,
                "--tls-ca",
                &ca_arg,
                "--tls-domain",
                "localhost",
            ])
        }
    })
    .await
    .expect("probe");
    assert!(ok, "{text}");
    assert!(text.contains("SERVING"), "{text}");

    // Plaintext to a TLS port gets no answer.
    let (ok, text) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || health(&["--addr", &addr, "--timeout", "2s"])
    })
    .await
    .expect("probe");
    assert!(!ok, "{text}");
    server.stop().await;
}
