//! `ghmd health`, the probe a container image runs: its exit code follows the server's answer.

use std::process::Command;

use crate::support::TestServer;
use crate::support::tls::ServerTls;

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

#[tokio::test]
async fn a_tls_server_is_checked_with_its_ca() {
    let tls = ServerTls::new();
    let server = TestServer::start_with(|config| tls.configure(config)).await;
    let addr = server.addr.to_string();
    let ca_arg = tls.ca_file.display().to_string();

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
