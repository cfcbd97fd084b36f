//! Admission against the cap, end to end: real upstream, real clients,
//! wsgate started through `wsgate::run` on port 0.

use std::sync::atomic::Ordering;

use crate::support::*;

#[tokio::test]
async fn admits_up_to_cap_then_503_without_touching_upstream() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfigExt::cap(test_config(up.addr), 2)).await;
    let mut a = within("a", connect(&gate.ws_url()))
        .await
        .expect("first admitted");
    let mut b = within("b", connect(&gate.ws_url()))
        .await
        .expect("second admitted");
    echo_text(&mut a, "a").await;
    echo_text(&mut b, "b").await;

    let refused = connect_refused(&gate.ws_url()).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["connection"], "close");

    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 2.0);
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(gate.admin, "wsgate_connections_admitted_total").await,
        2.0
    );
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        2,
        "the refused client never reached the upstream"
    );
}

#[tokio::test]
async fn slot_freed_within_2s_after_client_closes_and_reused() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfigExt::cap(test_config(up.addr), 1)).await;
    let mut a = within("a", connect(&gate.ws_url()))
        .await
        .expect("admitted");
    echo_text(&mut a, "hi").await;
    assert_eq!(connect_refused(&gate.ws_url()).await.status(), 503);
    close_cleanly(a).await;
    let took = time_until_metric(gate.admin, "wsgate_connections_active", 0.0).await;
    assert!(took < RELEASE_BOUND, "slot released after {took:?}");
    let mut b = within("b", connect(&gate.ws_url()))
        .await
        .expect("admitted again");
    echo_text(&mut b, "again").await;
}

#[tokio::test]
async fn no_cap_admits_ten_concurrent_that_all_echo() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(test_config(up.addr)).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(
            within("connect", connect(&gate.ws_url()))
                .await
                .expect("admitted"),
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        echo_text(c, &format!("client {i}")).await;
    }
    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 10.0);
    assert_eq!(metric(gate.admin, "wsgate_connections_max").await, 0.0);
}

#[tokio::test]
async fn negative_cap_is_unlimited_and_max_reads_zero() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfigExt::cap(test_config(up.addr), -3)).await;
    assert_eq!(metric(gate.admin, "wsgate_connections_max").await, 0.0);
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(
            within("connect", connect(&gate.ws_url()))
                .await
                .expect("admitted"),
        );
    }
    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 5.0);
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_against_cap_ten_admit_exactly_ten() {
    let up = spawn_echo_upstream().await;
    let gate = spawn_sidecar(RawConfigExt::cap(test_config(up.addr), 10)).await;
    let url = gate.ws_url();
    let attempts: Vec<_> = (0..200)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { within("upgrade", tokio_tungstenite::connect_async(url)).await },
            )
        })
        .collect();
    let (mut admitted, mut refused, mut other) = (Vec::new(), 0, Vec::new());
    for a in attempts {
        match a.await.expect("join") {
            Ok((ws, _)) => admitted.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                refused += 1
            }
            Err(e) => other.push(e.to_string()),
        }
    }
    assert!(other.is_empty(), "unexpected outcomes: {other:?}");
    assert_eq!(admitted.len(), 10);
    assert_eq!(refused, 190);
    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 10.0);
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        190.0
    );
    assert_eq!(up.accepts.load(Ordering::SeqCst), 10);
    drop(admitted);
    wait_metric(gate.admin, "wsgate_connections_active", 0.0).await;
}
