//! The operator side of the admin port (docs/operations.md#access-log): HTTP requests with any
//! method, headers and body; the admin token in a file that can be rotated
//! the way a Kubernetes Secret is; the wsgate binary started with JSON logs
//! and those logs read back as JSON objects.
//!
//! Not glob re-exported from `support`: a test says `use support::admin;`.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::process::GateProcess;
use crate::support::within;

/// One answer of the admin port.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header (name lowercased, value) pairs, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; fails the test, showing the reply, if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.body))
    }
}

/// `METHOD path` on the admin port with `headers` and `body` (sent with a
/// `Content-Length` when given); one connection per request, read to EOF.
pub async fn request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let mut s = within("admin connect", TcpStream::connect(admin))
        .await
        .expect("connect to the admin port");
    s.write_all(&bytes).await.expect("write the request");
    let mut out = Vec::new();
    // A reset after the answer (a server that did not read the whole body)
    // keeps what was read before it.
    let _ = within("admin reply", async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    parse_reply(&String::from_utf8_lossy(&out))
}

fn parse_reply(text: &str) -> Reply {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// The operator's client for one wsgate: its admin address and the token
/// it sends (`None`: no `Authorization` header).
#[derive(Debug, Clone)]
pub struct Operator {
    pub admin: SocketAddr,
    pub token: Option<String>,
}

impl Operator {
    pub fn new(admin: SocketAddr, token: Option<&str>) -> Operator {
        Operator {
            admin,
            token: token.map(str::to_owned),
        }
    }

    /// The same admin port with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Operator {
        Operator::new(self.admin, token)
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        request(self.admin, method, path, &headers, body).await
    }

    /// `POST /drain` with `body` as it is.
    pub async fn post_drain(&self, body: &str) -> Reply {
        self.send("POST", "/drain", Some(body.as_bytes())).await
    }

    pub async fn get_drain(&self) -> Reply {
        self.send("GET", "/drain", None).await
    }

    pub async fn delete_drain(&self) -> Reply {
        self.send("DELETE", "/drain", None).await
    }
}

/// An admin token in a file of its own directory (dropped with it).
#[derive(Debug)]
pub struct TokenFile {
    dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TokenFile {
    /// A file holding `token` and a newline, as `kubectl create secret` or
    /// an editor leaves it.
    pub fn new(token: &str) -> TokenFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{token}\n")).expect("write the token file");
        TokenFile { dir, path }
    }

    /// The path as an environment value (`WSGATE_ADMIN_TOKEN_FILE`).
    pub fn env(&self) -> String {
        self.path.display().to_string()
    }

    /// Replaces the token the way a Secret update does: a new file written
    /// next to it, renamed over it (a new inode; never a half-written file).
    pub fn rotate(&self, token: &str) {
        let next = self.dir.path().join("token.next");
        std::fs::write(&next, format!("{token}\n")).expect("write the new token");
        std::fs::rename(&next, &self.path).expect("rename over the token file");
    }
}

// ---------------------------------------------------------------- JSON logs

/// Every stderr line of a child that parses as a JSON object.
pub fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(serde_json::Value::is_object)
        .collect()
}

/// A field of a JSON log event: at top level (flattened) or under `fields`.
pub fn event_field<'a>(event: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    event
        .get(name)
        .or_else(|| event.get("fields").and_then(|f| f.get(name)))
}

/// `wsgate` in front of `upstream` with `WSGATE_LOG_FORMAT=json` (on top of
/// `env`); returns it with (proxy, admin) read from its JSON start-up lines.
pub fn start_json(
    upstream: SocketAddr,
    env: &[(&str, String)],
) -> (GateProcess, SocketAddr, SocketAddr) {
    let mut all = vec![
        ("WSGATE_LISTEN", "127.0.0.1:0".to_owned()),
        ("WSGATE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("WSGATE_UPSTREAM", upstream.to_string()),
        ("WSGATE_LOG_FORMAT", "json".to_owned()),
    ];
    all.extend(env.iter().cloned());
    let gate = GateProcess::start(&[], &all, None);
    let text = gate.wait_for(&gate.stderr, "admin listening");
    let addr_of = |what: &str| -> SocketAddr {
        json_lines(&text)
            .iter()
            .find(|e| {
                event_field(e, "message").and_then(serde_json::Value::as_str)
                    == Some(&format!("{what} listening"))
            })
            .and_then(|e| event_field(e, "addr")?.as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no JSON \"{what} listening\" line with an addr in\n{text}"))
    };
    let (proxy, admin) = (addr_of("proxy"), addr_of("admin"));
    (gate, proxy, admin)
}
