//! Network limits of `smithers serve` as a real process with a real file-descriptor limit
//! (issue 9, item 6): a flood of idle sockets must not exhaust descriptors.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Longest the test waits for something that must happen (a hang guard, not a speed check).
const GUARD: Duration = Duration::from_secs(20);
/// The descriptor limit the server runs under.
const SERVER_NOFILE: u64 = 512;

struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `smithers serve --config` with RLIMIT_NOFILE lowered to `nofile` (soft and hard, so the
/// server cannot raise it).
fn serve_with_nofile(dir: &std::path::Path, nofile: u64) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smithers"));
    cmd.current_dir(dir)
        .args(["serve", "--config", "smithers.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                nofile,
                nofile,
            )
            .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().unwrap();
    let mut served = Served {
        child,
        addr: "127.0.0.1:0".parse().unwrap(),
    };
    let stderr = served.child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            served.addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            std::thread::spawn(move || for _ in lines {});
            return served;
        }
    }
}

/// Raises this process's own descriptor limit (it opens the flood) and returns it.
fn raise_own_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// One HTTP request on a fresh connection; the status and body, or why there was none.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, GUARD).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(GUARD)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text frame.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(GUARD, ws.next())
            .await
            .expect("no frame from the server")
            .expect("socket ended")
            .expect("socket error");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_socket_flood_does_not_lock_out_health() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("hello.yaml"),
        "name: hello\nsteps:\n  - task: {id: a, value: 1}\n",
    )
    .unwrap();
    // long timeouts: only the connection cap may save the server here
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout_ms = 600000\nidle_timeout_ms = 600000\n\
         [storage]\nurl = \"sqlite://db.sqlite\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
    )
    .unwrap();
    let own = raise_own_nofile();
    let flood_size = 3000.min(own.saturating_sub(200) as usize);
    assert!(
        flood_size as u64 > 2 * SERVER_NOFILE,
        "this test needs a descriptor limit of at least {} (ulimit -n)",
        2 * SERVER_NOFILE + 200
    );
    let server = serve_with_nofile(dir, SERVER_NOFILE);
    let addr = server.addr;
    let pid = server.child.id();

    // an authenticated client, connected before the flood
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap();
    assert_eq!(recv(&mut client).await["event"], "connect.challenge");
    client
        .send(Message::Text(
            json!({"type": "req", "id": "c", "method": "connect", "params": {"minProtocol": 1, "maxProtocol": 1}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    loop {
        let f = recv(&mut client).await;
        if f["id"] == "c" {
            assert_eq!(f["ok"], true, "{f}");
            break;
        }
    }

    // the flood: idle sockets that never send a byte, all connecting at once (a connect the
    // server's backlog cannot take is given up after 2 s)
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..flood_size {
        connecting.spawn(tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr),
        ));
    }
    let mut flood = (Vec::new(), 0);
    while let Some(r) = connecting.join_next().await {
        match r.unwrap() {
            Ok(Ok(s)) => flood.0.push(s),
            _ => flood.1 += 1,
        }
    }
    let fds = open_fds(pid);

    // /health still answers
    let health = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let r = request(addr, "GET", "/health", "");
        (r, t0.elapsed())
    })
    .await
    .unwrap();
    eprintln!(
        "flood of {} idle sockets ({} failed to connect): server holds {fds} descriptors (limit {SERVER_NOFILE}); /health took {:?}",
        flood.0.len(),
        flood.1,
        health.1
    );
    let (status, body) = health.0.expect("/health did not answer during the flood");
    assert_eq!(status, 200, "{body}");
    assert!(
        fds < SERVER_NOFILE as usize,
        "the server ran out of descriptors ({fds})"
    );

    // the authenticated client still receives events
    let created = tokio::task::spawn_blocking(move || {
        request(
            addr,
            "POST",
            "/rpc",
            &json!({"id": "1", "method": "runs.create", "params": {"workflow": "hello"}})
                .to_string(),
        )
    })
    .await
    .unwrap()
    .expect("runs.create did not answer during the flood");
    let created: Value = serde_json::from_str(&created.1).unwrap();
    let run_id = created["payload"]["runId"].as_str().unwrap().to_string();
    loop {
        let f = recv(&mut client).await;
        if f["event"] == "run.completed" && f["payload"]["runId"] == run_id.as_str() {
            assert_eq!(f["payload"]["status"], "finished", "{f}");
            break;
        }
    }
    drop(flood);
    drop(server);
}
