//! Helpers shared by the test binaries that run `smithers serve` as a real process: start it
//! on a free port and wait for its listening line, call `/rpc`, stop it with SIGTERM.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `smithers serve` process; killed when dropped (also when a test fails half-way).
pub struct Served {
    pub child: Child,
    pub addr: String,
    /// What the server printed before its listening line (its start log).
    pub head: Vec<String>,
    /// What it printed after.
    pub tail: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Served {
    /// A test that fails half-way must not leave a server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(dir: &Path, args: &[&str]) -> Served {
    serve_env(dir, args, &[])
}

pub fn serve_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
    let child = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .arg("serve")
        .args(args)
        .env_remove("SMITHERS_LOG")
        .env_remove("RUST_LOG")
        .env_remove("SMITHERS_LISTEN")
        .env_remove("SMITHERS_DB")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // owned right away, so a failure below still stops the server
    let mut served = Served {
        child,
        addr: String::new(),
        head: Vec::new(),
        tail: Default::default(),
    };
    let stderr = served.child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let t0 = Instant::now();
    loop {
        let line = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            served.addr = rest.split_whitespace().next().unwrap().to_string();
            let tail = served.tail.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if let Ok(mut t) = tail.lock() {
                        t.push(line);
                    }
                }
            });
            return served;
        }
        served.head.push(line);
        assert!(t0.elapsed() < Duration::from_secs(20), "no listening line");
    }
}

pub fn rpc(addr: &str, method: &str, params: Value) -> Value {
    let body = json!({"id": "1", "method": method, "params": params}).to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

pub fn wait_status(addr: &str, run: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let r = rpc(addr, "runs.get", json!({"runId": run}));
        if r["payload"]["status"] == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "run never became {want}: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sigterm(s: Served) -> i32 {
    let mut s = s;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Served {
    /// `http://ADDR` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
