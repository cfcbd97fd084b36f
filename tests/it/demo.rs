//! `wsgate demo` as a newcomer meets it, through the proxy of the real
//! binary: `GET /` is the demo page (HTML, self-contained), WebSockets echo,
//! the one over the cap of 2 gets 503, closing one lets the next in, and any
//! other path is 404. A `curl` of the proxy must never meet a 502 here.

use crate::support::*;

/// One `GET` on a fresh connection; (status, headers as written, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let text = raw_exchange(addr, request.as_bytes()).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn demo_serves_its_page_echoes_and_refuses_the_third_through_the_proxy() {
    let (gate, _echo, proxy, admin) = GateProcess::demo(&[]);
    let banner = gate.wait_for(&gate.stdout, "in a browser");
    assert!(
        banner.contains(&format!("open http://{proxy}/ in a browser")),
        "{banner}"
    );

    let (status, head, page) = get(proxy, "/").await;
    assert_eq!(status, 200, "{head}\n{page}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(page.contains("<title>wsgate demo</title>"), "{page}");
    assert!(page.contains("open one more") && page.contains("close one"));
    assert!(page.contains("new WebSocket(url)"), "opens sockets back");
    // Self-contained: the demo must work on a machine without a network.
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let (status, head, body) = get(proxy, "/nope").await;
    assert_eq!(status, 404, "{head}\n{body}");
    assert!(head.contains("content-type: text/plain"), "{head}");

    let url = format!("ws://{proxy}/");
    let mut a = within("first", connect(&url))
        .await
        .expect("first admitted");
    let mut b = within("second", connect(&url))
        .await
        .expect("second admitted");
    echo_text(&mut a, "hello from a").await;
    echo_text(&mut b, "hello from b").await;
    assert_eq!(connect_refused(&url).await.status(), 503);

    // What the page's "close one" does: the slot comes back, the next gets in.
    close_cleanly(a).await;
    wait_metric(admin, ACTIVE, 1.0).await;
    let mut c = within("third", connect(&url))
        .await
        .expect("admitted after a close");
    echo_text(&mut c, "hello from c").await;
    assert_eq!(
        metric(
            admin,
            "wsgate_connections_rejected_total{reason=\"capacity\"}"
        )
        .await,
        1.0
    );
}
