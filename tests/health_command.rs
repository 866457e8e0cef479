//! `ghmd health`, the probe a container image runs: its exit code follows the server's answer.

mod common;

use std::process::Command;

use common::TestServer;

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
