//! `smithers serve` as a real process: zero-config and --config, SIGTERM, and a run that
//! continues after a restart.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Served, free_port, rpc, serve, serve_env, sigterm, wait_status};

#[test]
fn serve_with_config_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("gated.yaml"),
        "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: ok?}\n  - task: {id: b, value: 2}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://state/db.sqlite\"\n[[workflows]]\nkey = \"gate\"\npath = \"gated.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    let created = rpc(&s.addr, "runs.create", json!({"workflow": "gate"}));
    let run = created["payload"]["runId"].as_str().unwrap().to_string();
    wait_status(&s.addr, &run, "waiting-approval");
    assert_eq!(sigterm(s), 0, "a clean stop");
    assert!(dir.join("state/db.sqlite").exists());
    let s = serve(dir, &["--config", "smithers.toml"]);
    let d = rpc(
        &s.addr,
        "approvals.decide",
        json!({"runId": run, "nodeId": "gate", "approved": true}),
    );
    assert_eq!(d["ok"], true, "{d}");
    wait_status(&s.addr, &run, "finished");
    sigterm(s);
}

#[test]
fn serve_rejects_bad_configs_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("bad.toml"), "[server]\nlisten = 5\n").unwrap();
    for args in [
        &["--config", "bad.toml"][..],
        &["--config", "missing.toml"],
        &[],
        &["nowhere"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_smithers"))
            .current_dir(dir)
            .arg("serve")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // a config file that cannot be used is INVALID_CONFIG; wrong arguments INVALID_INPUT
        let code = if args.first() == Some(&"--config") {
            "INVALID_CONFIG"
        } else {
            "INVALID_INPUT"
        };
        assert!(
            err.starts_with(&format!("error[{code}]: ")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn a_run_in_flight_at_sigterm_finishes_after_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("log");
    std::fs::write(
        dir.join("slow.yaml"),
        format!(
            "name: slow\nsteps:\n  - task: {{id: a, run: \"echo a >> {l}\"}}\n  - task: {{id: s, run: \"echo s >> {l}; sleep 1\"}}\n  - task: {{id: b, run: \"echo b >> {l}\"}}\n",
            l = log.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://db.sqlite\"\n[[workflows]]\nkey = \"slow\"\npath = \"slow.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    let run = rpc(&s.addr, "runs.create", json!({"workflow": "slow"}))["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains('s')
    {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sigterm(s), 0);
    let s = serve(dir, &["--config", "smithers.toml"]);
    wait_status(&s.addr, &run, "finished");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().filter(|l| *l == "a").count(), 1, "{text}");
    assert_eq!(text.lines().filter(|l| *l == "b").count(), 1, "{text}");
    sigterm(s);
}

fn smithers(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cron_commands_locally_and_through_the_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("hello.yaml"),
        "name: hello\nsteps:\n  - task: {id: a, value: 1}\n",
    )
    .unwrap();
    // local: the schedule lands in the database `serve` uses
    let out = smithers(
        dir,
        &[
            "cron",
            "add",
            "hello",
            "0 8 * * 1-5",
            "--cron-id",
            "morning",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["workflowPath"], "gateway:hello");
    let bad = smithers(dir, &["cron", "add", "hello", "not a pattern"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .starts_with("error[INVALID_INPUT]: invalid cron pattern")
    );
    let list = smithers(dir, &["cron", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("morning"));
    let t = smithers(dir, &["cron", "trigger", "morning"]);
    assert_eq!(t.status.code(), Some(1), "trigger needs a gateway");
    // through a served gateway on the same database
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    let url = format!("http://{}", s.addr);
    let list = smithers(dir, &["cron", "list", "--url", &url]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("morning"),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let t = smithers(dir, &["cron", "trigger", "morning", "--url", &url]);
    assert_eq!(
        t.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&t.stderr)
    );
    let started: Value = serde_json::from_slice(&t.stdout).unwrap();
    wait_status(&s.addr, started["runId"].as_str().unwrap(), "finished");
    let rm = smithers(dir, &["cron", "remove", "morning", "--url", &url]);
    assert_eq!(rm.status.code(), Some(0));
    let rm = smithers(dir, &["cron", "remove", "morning", "--url", &url]);
    assert_eq!(rm.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&rm.stderr).contains("Cron not found: morning"));
    sigterm(s);
}

impl Served {
    /// The first line the server printed (before or after its listening line) that `want`
    /// accepts; log lines are written by a logging thread, so they may trail that line.
    fn line(&self, want: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let tail = self.tail.lock().unwrap().clone();
            if let Some(l) = self.head.iter().chain(tail.iter()).find(|l| want(l)) {
                return l.clone();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no such line in {:?} {tail:?}",
                self.head
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn health(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

fn one_workflow(dir: &Path) {
    std::fs::write(
        dir.join("hello.yaml"),
        "name: hello\nsteps:\n  - task: {id: a, value: 1}\n",
    )
    .unwrap();
}

#[test]
fn serve_flags_and_environment_override_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    // the file asks for a port that is taken: the flags must win over it
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        format!(
            "[server]\nlisten = \"{}\"\n[storage]\nurl = \"sqlite://from-file.db\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();

    let port = free_port();
    let s = serve(
        dir,
        &[
            "--config",
            "smithers.toml",
            "--port",
            &port.to_string(),
            "--db",
            "flag.db",
        ],
    );
    assert_eq!(s.addr, format!("127.0.0.1:{port}"));
    assert!(health(&s.addr));
    let created = rpc(&s.addr, "runs.create", json!({"workflow": "hello"}));
    assert_eq!(created["ok"], true, "{created}");
    assert_eq!(sigterm(s), 0);
    assert!(dir.join("flag.db").exists(), "--db PATH is a SQLite file");
    assert!(!dir.join("from-file.db").exists());

    // the environment, when no flag is given
    let listen = format!("127.0.0.1:{}", free_port());
    let s = serve_env(
        dir,
        &["--config", "smithers.toml"],
        &[
            ("SMITHERS_LISTEN", &listen),
            ("SMITHERS_DB", "sqlite://env.db"),
        ],
    );
    assert_eq!(s.addr, listen);
    assert!(health(&s.addr));
    assert_eq!(sigterm(s), 0);
    assert!(dir.join("env.db").exists());

    // a flag beats the environment
    let listen_flag = format!("127.0.0.1:{}", free_port());
    let s = serve_env(
        dir,
        &["hello.yaml", "--listen", &listen_flag],
        &[("SMITHERS_LISTEN", &listen)],
    );
    assert_eq!(s.addr, listen_flag);
    sigterm(s);
    drop(taken);
}

#[test]
fn port_in_use_is_a_clear_error_that_names_the_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["serve", "hello.yaml", "--port", &port])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error[ADDRESS_IN_USE]: "), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("--port") && err.contains("--listen"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let out = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args([
            "serve",
            "hello.yaml",
            "--port",
            "1",
            "--listen",
            "127.0.0.1:2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses both");
}

/// Resident KiB of the code mapping of process `pid`'s executable.
fn code_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe.to_string_lossy().into_owned();
    let mut in_code = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() >= 6 && f[0].contains('-') {
            in_code = f[1] == "r-xp" && f[5] == exe;
        } else if in_code && f.first() == Some(&"Rss:") {
            kib += f[1].parse::<u64>().unwrap();
        }
    }
    kib
}

/// Once settled, the server unmaps the code only start-up ran (startup_pages.rs): what stays
/// resident is what it has run since, and it still answers.
#[test]
fn a_settled_server_hands_its_start_up_code_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    let s = serve_env(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "x.db"],
        &[("SMITHERS_LOG", "info,smithers_gateway::serve=debug")],
    );
    let before = code_rss_kib(s.child.id());
    let line = s.line(|l| l.contains("released start-up code pages"));
    let after = code_rss_kib(s.child.id());
    let released: Value = serde_json::from_str(&line).unwrap();
    assert!(
        released["kib"].as_u64().unwrap() >= before,
        "all read-only segments are released: {line}, {before} KiB resident"
    );
    assert!(
        after < before,
        "resident code {after} KiB after the release, {before} KiB before"
    );
    let ok = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": "r1"}),
    );
    assert_eq!(ok["ok"], true, "{ok}");
    wait_status(&s.addr, "r1", "finished");
}

#[test]
fn serve_logs_its_start_and_each_run_as_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    std::fs::write(
        dir.join("broken.yaml"),
        "name: broken\nsteps:\n  - task: {id: bad, run: \"exit 3\"}\n",
    )
    .unwrap();
    let s = serve(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "x.db"],
    );
    let json_lines = |lines: &[String]| -> Vec<Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    };
    let start: Value =
        serde_json::from_str(&s.line(|l| l.contains("smithers gateway started"))).unwrap();
    assert_eq!(start["level"], "INFO");
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(start["listen"], s.addr.as_str());
    assert_eq!(start["database"], "sqlite://x.db");
    assert_eq!(start["auth"], "none");
    let keys = start["workflows"].as_str().unwrap();
    assert!(
        keys.contains("\"hello\"") && keys.contains("\"broken\""),
        "{keys}"
    );

    let ok = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": "ok-1"}),
    );
    assert_eq!(ok["ok"], true, "{ok}");
    let bad = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "broken", "runId": "bad-1"}),
    );
    assert_eq!(bad["ok"], true, "{bad}");
    wait_status(&s.addr, "ok-1", "finished");
    wait_status(&s.addr, "bad-1", "failed");
    let find = |run: &str, message: &str| -> Value {
        let t0 = Instant::now();
        loop {
            let lines = s.tail.lock().unwrap().clone();
            if let Some(l) = json_lines(&lines)
                .into_iter()
                .find(|l| l["run_id"] == run && l["message"] == message)
            {
                return l;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no `{message}` for {run} in {lines:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(find("ok-1", "run started")["workflow"], "hello");
    let done = find("ok-1", "run finished");
    assert_eq!(done["workflow"], "hello");
    assert!(done["duration_ms"].as_u64().is_some(), "{done}");
    let failed = find("bad-1", "run failed");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["workflow"], "broken");
    assert_eq!(failed["node"], "bad");
    assert!(
        failed["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{failed}"
    );
    sigterm(s);
}

#[test]
fn pretty_log_format_prints_key_value_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    let s = serve(
        dir,
        &[
            "hello.yaml",
            "--port",
            &free_port().to_string(),
            "--db",
            "x.db",
            "--log-format",
            "pretty",
        ],
    );
    let start = s.line(|l| l.contains("smithers gateway started"));
    for want in [
        format!("version={}", env!("CARGO_PKG_VERSION")),
        format!("listen={}", s.addr),
        "database=sqlite://x.db".to_string(),
        "auth=none".to_string(),
        "\"hello\"".to_string(),
    ] {
        assert!(start.contains(&want), "`{want}` missing from: {start}");
    }
    sigterm(s);
}

#[test]
fn remote_approve_of_a_run_the_gateway_does_not_serve_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    std::fs::write(
        dir.join("gated.yaml"),
        "name: gated\nsteps:\n  - approval: {id: gate, title: ok?}\n  - task: {id: b, value: 2}\n",
    )
    .unwrap();
    // a run of `gated`, parked at its approval, in the database the gateway will use
    let up = smithers(
        dir,
        &["up", "gated.yaml", "--run-id", "g-1", "--db", "shared.db"],
    );
    assert_eq!(up.status.code(), Some(3), "{up:?}");
    // the gateway serves only `hello`
    let s = serve(
        dir,
        &[
            "hello.yaml",
            "--port",
            &free_port().to_string(),
            "--db",
            "shared.db",
        ],
    );
    let url = format!("http://{}", s.addr);
    let approve = smithers(dir, &["approve", "g-1", "--node", "gate", "--url", &url]);
    assert_eq!(
        approve.status.code(),
        Some(0),
        "the decision is recorded, so the command succeeds: {}",
        String::from_utf8_lossy(&approve.stderr)
    );
    assert!(!String::from_utf8_lossy(&approve.stderr).contains("SERVER_ERROR"));
    s.line(|l| l.contains("does not serve") && l.contains("g-1"));
    sigterm(s);
    // whoever has the workflow continues the run
    let resumed = smithers(dir, &["resume", "g-1", "--db", "shared.db"]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
}

#[test]
fn workflows_lists_what_a_gateway_serves_and_what_a_directory_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("greet.yaml"),
        "name: greeter\ndescription: Says hello\ninput:\n  type: object\n  required: [who]\nsteps:\n  - task: {id: a, value: 1}\n",
    )
    .unwrap();
    one_workflow(dir);

    // locally: what `smithers serve .` would serve
    let local = smithers(dir, &["workflows", "--json"]);
    assert_eq!(local.status.code(), Some(0), "{local:?}");
    let doc: Value = serde_json::from_slice(&local.stdout).unwrap();
    let keys: Vec<&str> = doc["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["greet", "hello"]);

    let s = serve(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "w.db"],
    );
    // the protocol method
    let listed = rpc(&s.addr, "workflows.list", json!({}));
    assert_eq!(listed["ok"], true, "{listed}");
    let greet = &listed["payload"]["workflows"][0];
    assert_eq!(greet["key"], "greet");
    assert_eq!(greet["name"], "greeter");
    assert_eq!(greet["description"], "Says hello");
    assert_eq!(greet["inputSchema"]["required"], json!(["who"]));
    assert_eq!(
        listed["payload"]["workflows"][1]["description"],
        Value::Null
    );

    // the command, against the gateway
    let url = format!("http://{}", s.addr);
    let table = smithers(dir, &["workflows", "--url", &url]);
    assert_eq!(table.status.code(), Some(0), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("KEY"), "{text}");
    assert!(
        lines[1].starts_with("greet")
            && lines[1].contains("greeter")
            && lines[1].ends_with("Says hello"),
        "{text}"
    );
    assert!(lines[2].starts_with("hello"), "{text}");
    sigterm(s);

    let gone = smithers(dir, &["workflows", "--url", &url]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).starts_with("error[GATEWAY_UNREACHABLE]"));
}

fn smithers_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(args)
        .env_remove("SMITHERS_URL")
        .env_remove("SMITHERS_DB")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The command in backticks after `-- ` on the first stderr line holding `needle`.
fn pasted(o: &std::process::Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no `{needle}` line: {err}"));
    line.split("-- `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .unwrap_or_else(|| panic!("no command in {line}"))
        .to_string()
}

#[test]
fn run_rerun_and_resume_follow_runs_on_a_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    std::fs::write(
        dir.join("ship.yaml"),
        "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: Ship it?}\n  - task: {id: b, value: \"{{ input.n }}\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("zap.yaml"),
        "name: boom\nsteps:\n  - task: {id: x, run: \"echo nope >&2; exit 3\"}\n",
    )
    .unwrap();
    let s = serve(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "r.db"],
    );
    let url = format!("http://{}", s.addr);
    let at = [("SMITHERS_URL", url.as_str())];
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    // serve says how to start a run (of a workflow needing no input); the command works as printed
    let t0 = Instant::now();
    let example = loop {
        let tail = s.tail.lock().unwrap().clone();
        if let Some(l) = tail.iter().find(|l| l.contains("start a run:")) {
            break l.split("start a run:").nth(1).unwrap().trim().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no next steps: {tail:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(example.starts_with("smithers run "), "{example}");
    let sh = Command::new("sh")
        .arg("-c")
        .arg(example.replacen("smithers", env!("CARGO_BIN_EXE_smithers"), 1))
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(sh.status.code(), Some(0), "{example}: {sh:?}");
    // a run id chosen by the command is time-ordered (a version 7 UUID), as the engine's are
    let printed = String::from_utf8_lossy(&sh.stderr).to_string();
    let id = printed
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .unwrap_or_else(|| panic!("no run line: {printed}"));
    assert_eq!((id.len(), id.as_bytes()[14]), (36, b'7'), "{id}");

    // a run that finishes: progress on stderr (ASCII, not a terminal), output on stdout, exit 0
    let o = smithers_env(dir, &["run", "hello", "--url", &url, "--run-id", "h1"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(err(&o).contains("run h1\n"), "{}", err(&o));
    assert!(err(&o).contains("  + a finished in"), "{}", err(&o));
    assert!(err(&o).contains("run h1 finished"), "{}", err(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out, json!({"a": 1}));

    // SMITHERS_URL names the gateway; input reaches the run; the approval stops it with exit 3
    // and a command that, pasted into a shell, lets the gateway finish it
    let o = smithers_env(
        dir,
        &["run", "ship", "--input", r#"{"n": 7}"#, "--run-id", "g1"],
        &at,
    );
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    let approve = pasted(&o, "needs approval: Ship it?");
    assert_eq!(
        approve,
        format!("smithers approve g1 --node gate --url {url}")
    );
    let sh = Command::new("sh")
        .arg("-c")
        .arg(approve.replacen("smithers", env!("CARGO_BIN_EXE_smithers"), 1))
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(sh.status.code(), Some(0), "{sh:?}");
    wait_status(&s.addr, "g1", "finished");

    // rerun: same workflow and input, followed to the same approval
    let o = smithers_env(dir, &["rerun", "g1", "--new-run-id", "g2"], &at);
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    assert!(
        err(&o).contains("run g2 is waiting-approval"),
        "{}",
        err(&o)
    );
    let input = rpc(
        &s.addr,
        "runs.rerun",
        json!({"runId": "g2", "newRunId": "g3"}),
    );
    assert_eq!(input["ok"], true, "{input}");

    // resume a cancelled run: the approval asked before is shown again with its command
    let c = smithers_env(dir, &["cancel", "g2"], &at);
    assert_eq!(c.status.code(), Some(0), "{}", err(&c));
    let o = smithers_env(dir, &["resume", "g2"], &at);
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    assert_eq!(
        pasted(&o, "needs approval"),
        format!("smithers approve g2 --node gate --url {url}")
    );
    // resuming a finished run is refused with the engine's code
    let o = smithers_env(dir, &["resume", "g1"], &at);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).starts_with("error[RUN_NOT_RESUMABLE]"),
        "{}",
        err(&o)
    );

    // a signal no step of the run waits for is refused, not kept forever
    let o = smithers_env(dir, &["signal", "g2", "ci.done"], &at);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).starts_with("error[UNKNOWN_SIGNAL]: no step of run `g2` (workflow `gated`) waits for a signal named `ci.done`; it has no wait_for_event step"),
        "{}",
        err(&o)
    );

    // a failing run: exit 1 with the error
    let o = smithers_env(dir, &["run", "zap"], &at);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("! x failed after"), "{}", err(&o));
    assert!(err(&o).contains("failed: [PROCESS_FAILED]"), "{}", err(&o));

    // --detach: the run id on stdout, the run goes on on the gateway
    let o = smithers_env(dir, &["run", "hello", "--detach"], &at);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    wait_status(&s.addr, &id, "finished");

    // mistakes: an unknown workflow, no gateway, --detach without one
    let o = smithers_env(dir, &["run", "nope"], &at);
    assert!(
        err(&o).starts_with("error[WORKFLOW_NOT_FOUND]: Unknown workflow: nope"),
        "{}",
        err(&o)
    );
    let o = smithers_env(dir, &["run", "hello"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("smithers up FILE"), "{}", err(&o));
    let o = smithers_env(dir, &["rerun", "g1", "--detach"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("--detach"), "{}", err(&o));

    // SMITHERS_URL applies to every remote command unless --db is typed; SMITHERS_DB else
    let o = smithers_env(dir, &["ps"], &at);
    assert!(String::from_utf8_lossy(&o.stdout).contains("g1"), "{o:?}");
    let o = smithers_env(dir, &["ps", "--db", "other.db"], &at);
    assert_eq!(err(&o).trim(), "no runs");
    let o = smithers_env(dir, &["ps"], &[("SMITHERS_DB", "r.db")]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("g1"), "{o:?}");
    let o = smithers_env(dir, &["ps", "--url", &url, "--db", "x.db"], &[]);
    assert_eq!(o.status.code(), Some(2));
    sigterm(s);
}

#[test]
fn rerun_locally_runs_the_same_file_and_input_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("echo.yaml"),
        "name: echo\nsteps:\n  - task: {id: say, value: \"{{ input.word }}\"}\n",
    )
    .unwrap();
    let o = smithers_env(
        dir,
        &[
            "up",
            "echo.yaml",
            "--input",
            r#"{"word": "hi"}"#,
            "--run-id",
            "e1",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = smithers_env(dir, &["rerun", "e1", "--new-run-id", "e2"], &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out, json!({"say": "hi"}));
    let o = smithers_env(dir, &["inspect", "e2", "--json"], &[]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["run"]["status"], "finished");
}

#[test]
fn run_follows_across_a_gateway_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("slow.yaml"),
        "name: slow\nsteps:\n  - task: {id: nap, run: \"sleep 2\"}\n  - task: {id: done, value: 1}\n",
    )
    .unwrap();
    let port = free_port().to_string();
    let s = serve(dir, &[".", "--port", &port, "--db", "f.db"]);
    let url = format!("http://{}", s.addr);
    let mut follower = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["run", "slow", "--run-id", "s1", "--url", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_status(&s.addr, "s1", "running");
    std::thread::sleep(Duration::from_millis(500));
    // SIGTERM leaves the run resumable; the next start takes it up again
    sigterm(s);
    let s = serve(dir, &[".", "--port", &port, "--db", "f.db"]);
    wait_status(&s.addr, "s1", "finished");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = follower.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the follower never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    // each line once, though the events before the restart were replayed on reconnect
    assert_eq!(
        stderr.matches("> nap started (attempt 1)").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("+ done finished").count(), 1, "{stderr}");
    sigterm(s);
}

#[test]
fn logs_through_the_gateway_pages_the_log_and_follows_live_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("chatty.yaml"),
        "name: chatty\nsteps:\n  - task: {id: build, run: \"for i in 1 2 3 4; do echo b$i; sleep 0.2; done\"}\n  - task: {id: test, run: \"echo tested; sleep 0.2; echo warn >&2\"}\n",
    )
    .unwrap();
    let s = serve(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "l.db"],
    );
    let url = format!("http://{}", s.addr);
    let at = [("SMITHERS_URL", url.as_str())];
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    // `run` shows the output lines as they come
    let o = smithers_env(dir, &["run", "chatty", "--run-id", "c1"], &at);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(err(&o).contains("    build | b3\n"), "{}", err(&o));
    assert!(err(&o).contains("    test | warn\n"), "{}", err(&o));

    // runs.events pages the durable log as protocol events
    let p1 = rpc(&s.addr, "runs.events", json!({"runId": "c1", "limit": 3}));
    assert_eq!(p1["ok"], true, "{p1}");
    assert_eq!(p1["payload"]["more"], true);
    let last = p1["payload"]["lastSeq"].as_i64().unwrap();
    let p2 = rpc(
        &s.addr,
        "runs.events",
        json!({"runId": "c1", "afterSeq": last, "limit": 10000, "nodeId": "test"}),
    );
    let events = p2["payload"]["events"].as_array().unwrap();
    assert!(
        events.iter().all(|e| e["payload"]["nodeId"] == "test"),
        "{p2}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "task.output" && e["payload"]["output"] == "tested\n"),
        "{p2}"
    );
    assert_eq!(p2["payload"]["more"], false);
    let bad = rpc(
        &s.addr,
        "runs.events",
        json!({"runId": "c1", "afterSeq": -2}),
    );
    assert_eq!(bad["error"]["code"], "INVALID_INPUT", "{bad}");

    let o = smithers_env(dir, &["logs", "c1"], &at);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "build | b1\nbuild | b2\nbuild | b3\nbuild | b4\ntest | tested\ntest | warn\n"
    );

    // --follow on a detached run: the whole output, then it returns when the run completes
    let o = smithers_env(dir, &["run", "chatty", "--detach", "--run-id", "c2"], &at);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let o = smithers_env(dir, &["logs", "c2", "--follow", "--node", "build"], &at);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "b1\nb2\nb3\nb4\n");
    let o = smithers_env(dir, &["logs", "nope"], &at);
    assert!(err(&o).starts_with("error[RUN_NOT_FOUND]"), "{}", err(&o));
    sigterm(s);
}

#[test]
fn schedules_carry_input_checked_against_the_workflows_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("greet.yaml"),
        "name: greet\ninput:\n  type: object\n  required: [who]\n  properties:\n    who: {type: string}\nsteps:\n  - task: {id: say, value: \"hi {{ input.who }}\"}\n",
    )
    .unwrap();
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();
    let config = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nheartbeat_ms = 1000\n[storage]\nurl = \"g.db\"\n[[workflows]]\nkey = \"greet\"\npath = \"greet.yaml\"\n{extra}"
        )
    };
    // a schedule whose runs the schema would refuse is refused at start, naming the workflow
    std::fs::write(dir.join("no-input.toml"), config("schedule = \"@daily\"\n")).unwrap();
    let o = smithers(dir, &["serve", "--config", "no-input.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).starts_with(
            "error[INVALID_CONFIG]: workflow `greet`: its schedule's input cannot start a run"
        ),
        "{}",
        err(&o)
    );
    std::fs::write(dir.join("orphan.toml"), config("input = { who = \"x\" }\n")).unwrap();
    let o = smithers(dir, &["serve", "--config", "orphan.toml"]);
    assert!(err(&o).starts_with("error[INVALID_CONFIG]"), "{}", err(&o));
    assert!(err(&o).contains("has no schedule"), "{}", err(&o));

    // every second, with its input
    std::fs::write(
        dir.join("smithers.toml"),
        config("schedule = \"* * * * * *\"\ninput = { who = \"cron\" }\n"),
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    let t0 = Instant::now();
    let run = loop {
        let runs = rpc(&s.addr, "runs.list", json!({"status": "finished"}));
        if let Some(r) = runs["payload"].as_array().and_then(|a| a.first()) {
            break r["runId"].as_str().unwrap().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the schedule never fired"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let got = rpc(&s.addr, "runs.get", json!({"runId": run}));
    assert_eq!(got["payload"]["output"], json!({"say": "hi cron"}), "{got}");

    // cron add: the input is checked now, stored, listed and used by trigger
    let url = format!("http://{}", s.addr);
    let o = smithers(
        dir,
        &[
            "cron",
            "add",
            "greet",
            "@daily",
            "--cron-id",
            "bad",
            "--input",
            "{}",
            "--url",
            &url,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).starts_with("error[INVALID_INPUT]: the schedule's runs could not start"),
        "{}",
        err(&o)
    );
    let o = smithers(
        dir,
        &[
            "cron",
            "add",
            "greet",
            "@daily",
            "--cron-id",
            "daily",
            "--input",
            r#"{"who": "cli"}"#,
            "--url",
            &url,
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let row: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(row["input"], json!({"who": "cli"}));
    let list = smithers(dir, &["cron", "list", "--url", &url]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(r#"input: {"who":"cli"}"#),
        "{list:?}"
    );
    let t = smithers(dir, &["cron", "trigger", "daily", "--url", &url]);
    assert_eq!(t.status.code(), Some(0), "{}", err(&t));
    let started: Value = serde_json::from_slice(&t.stdout).unwrap();
    let id = started["runId"].as_str().unwrap();
    wait_status(&s.addr, id, "finished");
    let got = rpc(&s.addr, "runs.get", json!({"runId": id}));
    assert_eq!(got["payload"]["output"], json!({"say": "hi cli"}), "{got}");
    sigterm(s);
}

/// A minimal OTLP/HTTP receiver: every `POST` body it gets, parsed as JSON, answered `200 {}`
/// (keep-alive, as collectors do).
fn otlp_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let store = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut len = 0usize;
                    let mut path = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if path.is_empty() {
                            path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if path == "/v1/traces"
                        && let Ok(v) = serde_json::from_slice::<Value>(&body)
                    {
                        store.lock().unwrap().push(v);
                    }
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                    );
                }
            });
        }
    });
    (url, got)
}

#[test]
fn runs_and_attempts_are_exported_as_otlp_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (collector, got) = otlp_receiver();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/workflows");
    let s = serve_env(
        dir,
        &[
            examples.to_str().unwrap(),
            "--port",
            &free_port().to_string(),
            "--db",
            "t.db",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
            ("OTEL_SERVICE_NAME", "smithers-test"),
        ],
    );
    let url = format!("http://{}", s.addr);
    let o = smithers_env(
        dir,
        &[
            "run",
            "agent-offline",
            "--input",
            r#"{"repo": "demo"}"#,
            "--run-id",
            "traced",
            "--url",
            &url,
        ],
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // spans arrive within a flush interval or two
    let spans = |got: &std::sync::Mutex<Vec<Value>>| -> Vec<(Value, Value)> {
        let mut out = Vec::new();
        for req in got.lock().unwrap().iter() {
            for rs in req["resourceSpans"].as_array().unwrap() {
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    for sp in ss["spans"].as_array().unwrap() {
                        out.push((rs["resource"].clone(), sp.clone()));
                    }
                }
            }
        }
        out
    };
    let attr = |sp: &Value, k: &str| -> Value {
        sp["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
            .unwrap_or(Value::Null)
    };
    let t0 = Instant::now();
    let all = loop {
        let all = spans(&got);
        if all.iter().any(|(_, sp)| sp["name"] == "run agent-offline") {
            break all;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no run span: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (resource, run) = all
        .iter()
        .find(|(_, sp)| sp["name"] == "run agent-offline")
        .unwrap();
    assert_eq!(
        resource["attributes"][0],
        json!({"key": "service.name", "value": {"stringValue": "smithers-test"}})
    );
    assert_eq!(
        attr(run, "smithers.run_id"),
        json!({"stringValue": "traced"})
    );
    assert_eq!(
        attr(run, "smithers.status"),
        json!({"stringValue": "finished"})
    );
    assert_eq!(run["status"]["code"], 1);
    assert!(run.get("parentSpanId").is_none());
    let start: u128 = run["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = run["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start <= end, "{run}");

    // one span per attempt, children of the run's span, with the agent's token usage
    let review: Vec<&Value> = all
        .iter()
        .map(|(_, sp)| sp)
        .filter(|sp| sp["name"] == "attempt review")
        .collect();
    assert_eq!(review.len(), 1, "{all:?}");
    let review = review[0];
    assert_eq!(review["traceId"], run["traceId"]);
    assert_eq!(review["parentSpanId"], run["spanId"]);
    assert_eq!(
        attr(review, "smithers.node_id"),
        json!({"stringValue": "review"})
    );
    assert_eq!(attr(review, "smithers.attempt"), json!({"intValue": "1"}));
    assert_eq!(
        attr(review, "gen_ai.usage.output_tokens"),
        json!({"intValue": "40"})
    );
    let input: u64 = attr(review, "gen_ai.usage.input_tokens")["intValue"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(input > 0);
    assert!(all.iter().any(|(_, sp)| sp["name"] == "attempt report"
        && sp["parentSpanId"] == run["spanId"]
        && attr(sp, "smithers.status") == json!({"stringValue": "finished"})));
    sigterm(s);
}

#[test]
fn a_resumed_run_exports_its_later_execution_as_a_child_span() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (collector, got) = otlp_receiver();
    let marker = dir.join("marker");
    // passes the approval (a resume that continues an execution), fails once, then passes
    std::fs::write(
        dir.join("flaky.yaml"),
        format!(
            "name: flaky\nsteps:\n  - approval: {{id: gate, title: go?}}\n  - task: {{id: once, run: \"test -f {m} || {{ touch {m}; exit 3; }}\"}}\n",
            m = marker.display()
        ),
    )
    .unwrap();
    let s = serve_env(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "t.db"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str())],
    );
    let r = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "flaky", "runId": "fl"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    wait_status(&s.addr, "fl", "waiting-approval");
    let r = rpc(
        &s.addr,
        "approvals.decide",
        json!({"runId": "fl", "nodeId": "gate", "approved": true}),
    );
    assert_eq!(r["ok"], true, "{r}");
    wait_status(&s.addr, "fl", "failed");
    let r = rpc(&s.addr, "runs.resume", json!({"runId": "fl"}));
    assert_eq!(r["ok"], true, "{r}");
    wait_status(&s.addr, "fl", "finished");

    let t0 = Instant::now();
    let runs = loop {
        let mut runs = Vec::new();
        for req in got.lock().unwrap().iter() {
            for sp in req["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .unwrap()
            {
                if sp["name"].as_str().unwrap_or("").starts_with("run flaky") {
                    runs.push(sp.clone());
                }
            }
        }
        if runs.len() >= 2 {
            break runs;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "run spans: {runs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(runs.len(), 2, "{runs:?}");
    let first = runs.iter().find(|sp| sp["name"] == "run flaky").unwrap();
    let later = runs
        .iter()
        .find(|sp| sp["name"] == "run flaky (resumed)")
        .unwrap();
    // the first execution is the run's own span; the one after the resume is its child, with
    // an id of its own
    assert!(first.get("parentSpanId").is_none(), "{first}");
    assert_eq!(first["status"]["code"], 2, "{first}");
    assert_eq!(later["traceId"], first["traceId"]);
    assert_eq!(later["parentSpanId"], first["spanId"], "{later}");
    assert_ne!(later["spanId"], first["spanId"]);
    assert_eq!(later["status"]["code"], 1, "{later}");
    let nanos = |sp: &Value, k: &str| -> u128 { sp[k].as_str().unwrap().parse().unwrap() };
    assert!(
        nanos(later, "startTimeUnixNano") >= nanos(first, "endTimeUnixNano"),
        "the later execution starts at its resume: {first} {later}"
    );
    assert!(
        later["attributes"]
            .as_array()
            .unwrap()
            .contains(&json!({"key": "smithers.execution", "value": {"intValue": "2"}})),
        "{later}"
    );
    sigterm(s);
}

#[test]
fn a_full_anonymous_body_budget_is_logged_at_most_once_a_minute() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 4096\nmax_anonymous_rpc_bytes = 1000\n\
         [storage]\nurl = \"b.db\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    // three bodies, each a byte more than the whole budget: each refused at once
    let body = format!(
        r#"{{"method":"health","params":{{"pad":"{}"}}}}"#,
        "x".repeat(962)
    );
    assert_eq!(body.len(), 1001);
    for _ in 0..3 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        write!(c, "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    }
    let m = get(&s.addr, "/metrics");
    assert!(
        m.contains(r#"smithers_gateway_errors_total{code="SERVICE_UNAVAILABLE",kind="busy",transport="http"} 3"#),
        "{m}"
    );
    // the operator is told once, with the limit to raise; the next two are only counted
    let warned = |tail: &[String]| -> Vec<Value> {
        tail.iter()
            .filter(|l| l.contains("fill their byte budget"))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let t0 = Instant::now();
    while warned(&s.tail.lock().unwrap()).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no warning");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let lines = warned(&s.tail.lock().unwrap());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["level"], "WARN", "{}", lines[0]);
    assert_eq!(lines[0]["max_anonymous_rpc_bytes"], 1000, "{}", lines[0]);
    assert!(
        lines[0]["message"]
            .as_str()
            .unwrap()
            .contains("server.max_anonymous_rpc_bytes"),
        "{}",
        lines[0]
    );
    sigterm(s);
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn console_is_served_with_a_strict_policy_and_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    one_workflow(dir);
    let s = serve(
        dir,
        &[".", "--port", &free_port().to_string(), "--db", "c.db"],
    );
    // serve says where the console is
    let line = s.line(|l| l.contains("console:"));
    assert!(
        line.trim_end()
            .ends_with(&format!("{}/", s.addr.replace("0.0.0.0", "127.0.0.1"))),
        "{line}"
    );
    let page = get(&s.addr, "/");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let head = page.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(page.contains(r#"<script type="module" src="/console/app.js">"#));
    let js = get(&s.addr, "/console/app.js");
    assert!(
        js.starts_with("HTTP/1.1 200") && js.contains("text/javascript"),
        "{js}"
    );
    // no inline script anywhere in the page
    assert!(!page.contains("<script>"), "{page}");
    assert!(get(&s.addr, "/console/nope.js").starts_with("HTTP/1.1 404"));
    sigterm(s);

    std::fs::write(
        dir.join("off.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\nconsole = false\n[storage]\nurl = \"c.db\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "off.toml"]);
    assert!(get(&s.addr, "/").starts_with("HTTP/1.1 404"));
    sigterm(s);
}

#[test]
fn a_subflow_names_a_registered_workflow_by_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    // the key `notify` is registered for a file with another name in another directory
    std::fs::write(
        dir.join("flows/notify-impl.yaml"),
        "name: notify\nsteps:\n  - task: {id: say, value: \"{{ input.text }}!\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("main.yaml"),
        "name: main\nsteps:\n  - subflow: {id: note, workflow: notify, input: {text: shipped}}\n  - task: {id: after, value: \"{{ outputs.note.say }}\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("typo.yaml"),
        "name: typo\nsteps:\n  - subflow: {id: note, workflow: notfy, input: {}}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://k.db\"\n\
         [[workflows]]\nkey = \"main\"\npath = \"main.yaml\"\n\
         [[workflows]]\nkey = \"notify\"\npath = \"flows/notify-impl.yaml\"\n\
         [[workflows]]\nkey = \"typo\"\npath = \"typo.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    let r = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "main", "runId": "k1"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    wait_status(&s.addr, "k1", "finished");
    let run = rpc(&s.addr, "runs.get", json!({"runId": "k1"}));
    assert_eq!(run["payload"]["output"]["after"], "shipped!", "{run}");
    // the child run is the registered workflow's
    let child = rpc(&s.addr, "runs.get", json!({"runId": "k1:child:note:0"}));
    assert_eq!(child["payload"]["workflowName"], "notify", "{child}");
    assert_eq!(child["payload"]["parentRunId"], "k1", "{child}");

    // a key nobody registered: the run fails saying which keys there are
    let r = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "typo", "runId": "k2"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    wait_status(&s.addr, "k2", "failed");
    let run = rpc(&s.addr, "runs.get", json!({"runId": "k2"}));
    let error = run["payload"]["errorJson"].as_str().unwrap_or_default();
    assert!(error.contains("WORKFLOW_NOT_FOUND"), "{error}");
    assert!(
        error.contains(
            "no workflow is registered under the key `notfy` (registered: main, notify, typo)"
        ),
        "{error}"
    );
    sigterm(s);
}
