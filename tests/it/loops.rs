//! Loop detection (docs/behaviour.md#loop-detection), with the binary as a
//! user runs it: every request wsgate forwards carries `Via: 1.1
//! wsgate-<id>`, and a request that comes back carrying this process's own
//! entry is answered 508. The loop is one the start-up check cannot see:
//! wsgate's upstream is a plain TCP forwarder that leads back to wsgate's
//! own client port (in the report, one GET became 5,944 requests
//! and 11,901 descriptors).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::access::{http_request, start_gate, upgrade_answer};
use crate::support::*;

/// A TCP forwarder to an address set after it started (wsgate's port,
/// known only once wsgate runs); counts the connections it accepted.
struct Forwarder {
    addr: SocketAddr,
    to: Arc<OnceLock<SocketAddr>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forwarder() -> Forwarder {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let to: Arc<OnceLock<SocketAddr>> = Arc::default();
    let connections = Arc::new(AtomicUsize::new(0));
    let (target, count) = (Arc::clone(&to), Arc::clone(&connections));
    let task = tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            while pipes.try_join_next().is_some() {}
            count.fetch_add(1, Ordering::SeqCst);
            let Some(to) = target.get().copied() else {
                continue;
            };
            pipes.spawn(async move {
                if let Ok(mut onward) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut onward).await;
                }
            });
        }
    });
    Forwarder {
        addr,
        to,
        connections,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_comes_back_round_a_loop_ends_in_one_508() {
    let fwd = forwarder().await;
    let gate = start_gate(fwd.addr, &[], &[]).await;
    fwd.to.set(gate.proxy).expect("set once");
    let baseline = gate.process.stat().fds;
    let rounds = 10;
    for round in 1..=rounds {
        let (status, body) = http_get(gate.proxy, "/some/page").await;
        assert_eq!(status, 508, "round {round}: {body}");
        assert!(body.contains("loop detected"), "{body}");
        let (_s, head) = upgrade_answer(gate.proxy, "/ws", &[], b"").await;
        assert_eq!(status_of(&head), 508, "round {round}: {head}");
        // Exactly one trip round the loop each: one connection through the
        // forwarder per request, never more.
        assert_eq!(
            fwd.connections.load(Ordering::SeqCst),
            2 * round,
            "round {round}"
        );
    }
    let n = f64::from(rounds as u32);
    // Each plain GET: the looped one answered 508, and that 508 passed back.
    assert_eq!(
        metric(gate.admin, "wsgate_http_requests_total{class=\"5xx\"}").await,
        2.0 * n
    );
    // Each upgrade: admitted once, refused once as `loop` when it came back
    // (whose 508 the first one passed on as the upstream's answer).
    assert_eq!(
        metric(
            gate.admin,
            "wsgate_connections_rejected_total{reason=\"loop\"}"
        )
        .await,
        n
    );
    assert_eq!(
        metric(gate.admin, "wsgate_connections_admitted_total").await,
        n
    );
    assert_eq!(metric(gate.admin, "wsgate_connections_active").await, 0.0);
    wait_child_fds(&gate.process, baseline).await;
    // Said in the log with its reason, once a minute at most.
    let log = gate.stderr();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("came back to this wsgate"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("reason=\"loop\""),
        "{log}"
    );
}

/// Dry run does not cover a loop: it is not a limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_is_refused_in_dry_run_too() {
    let fwd = forwarder().await;
    let gate = start_gate(fwd.addr, &[], &[("WSGATE_ENFORCE", "false".to_owned())]).await;
    fwd.to.set(gate.proxy).expect("set once");
    let (_s, head) = upgrade_answer(gate.proxy, "/", &[], b"").await;
    assert_eq!(status_of(&head), 508, "{head}");
    assert_eq!(fwd.connections.load(Ordering::SeqCst), 1);
    let text = scrape(gate.admin).await;
    assert!(
        !text.contains("wsgate_connections_would_reject_total{reason=\"loop\"}"),
        "loop is not a policy: {text}"
    );
}

/// What the upstream sees: `Via` keeps the entries of the proxies in front
/// and gets wsgate's own after them, on plain requests and upgrades alike,
/// the same name on both (one per process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forwarded_request_carries_this_wsgate_via_entry() {
    let (tx, mut heads) = mpsc::unbounded_channel::<String>();
    let up = spawn_raw_upstream(move |mut s: TcpStream| {
        let tx = tx.clone();
        async move {
            let head = read_request_head(&mut s).await;
            let answer = if head.to_ascii_lowercase().contains("upgrade: websocket") {
                switching_response(&head)
            } else {
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = tx.send(head);
            let _ = s.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    let gate = start_gate(up.addr, &[], &[]).await;
    let (status, _) = http_request(
        gate.proxy,
        "GET",
        "/",
        &[("Via", "1.0 edge, 1.1 ingress")],
        "",
    )
    .await;
    assert_eq!(status, 204);
    let (_s, head) = upgrade_answer(gate.proxy, "/", &[], b"").await;
    assert_eq!(status_of(&head), 101, "{head}");
    let mut names = Vec::new();
    for want_edge in [true, false] {
        let head = within("a request head", heads.recv())
            .await
            .expect("the upstream saw a request");
        let via: Vec<&str> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case("via"))
            .map(|(_, v)| v.trim())
            .collect();
        let (last, before) = via.split_last().expect("a Via line");
        assert_eq!(
            before,
            if want_edge {
                &["1.0 edge, 1.1 ingress"][..]
            } else {
                &[][..]
            },
            "{head}"
        );
        let name = last.strip_prefix("1.1 wsgate-").expect("wsgate's entry");
        assert!(
            name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "{head}"
        );
        names.push(name.to_owned());
    }
    assert_eq!(names[0], names[1], "one name per process");
}
