//! The web console at `/`, end to end: a real `smithers serve`, a real headless Chromium driven
//! over WebDriver (chromedriver), and the `smithers` CLI starting runs beside it.
//!
//! Chromium and chromedriver come from the Debian packages `chromium` and `chromium-driver`
//! (`.ci/run` installs them). When either is missing the tests fail, they never skip.
//!
//! Every test has its own temp dir, server, chromedriver and browser profile, so the tests run in
//! parallel. The console's DOM contract (ids, classes, data attributes, hash routes) is what the
//! selectors below name; keep the two in step.

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Served, free_port, rpc, serve};

/// How long a page gets to show what a test waits for.
const UI_WAIT: Duration = Duration::from_secs(15);
/// How long a run gets to reach a status (through `/rpc`).
const RUN_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The server and the CLI

/// A temp dir holding `wf/<name>.yaml` for each workflow, served as `smithers serve wf --port 0
/// --db x.db` (the key of each workflow is its file stem).
fn serve_workflows(workflows: &[(&str, &str)]) -> (tempfile::TempDir, Served) {
    let tmp = tempfile::tempdir().unwrap();
    let wf = tmp.path().join("wf");
    std::fs::create_dir(&wf).unwrap();
    for (name, yaml) in workflows {
        std::fs::write(wf.join(format!("{name}.yaml")), yaml).unwrap();
    }
    let s = serve(tmp.path(), &["wf", "--port", "0", "--db", "x.db"]);
    (tmp, s)
}

/// One raw HTTP/1.1 exchange: (status line, lower-cased headers, body).
fn http(addr: &str, request: &str) -> (String, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

async fn wait_status(addr: &str, run: &str, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let r = rpc(addr, "runs.get", json!({"runId": run}));
        if r["payload"]["status"] == want {
            return r;
        }
        assert!(
            t0.elapsed() < RUN_WAIT,
            "run {run} never became {want}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `smithers ARGS` in `dir`; panics unless it exits 0.
fn smithers(dir: &Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(args)
        .env_remove("SMITHERS_URL")
        .env_remove("SMITHERS_DB")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "smithers {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `smithers run KEY --url URL --detach --run-id ID`, from the CLI as a user would.
fn cli_start(dir: &Path, s: &Served, key: &str, run_id: &str) {
    let out = smithers(
        dir,
        &[
            "run",
            key,
            "--url",
            &s.url(""),
            "--detach",
            "--run-id",
            run_id,
        ],
    );
    assert!(out.contains(run_id), "run --detach printed {out:?}");
}

// ---------------------------------------------------------------------------------------------
// The browser

/// `name` on PATH, else the first of `fallbacks` that exists; a clear failure otherwise.
fn find_program(name: &str, fallbacks: &[&str]) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name));
    on_path
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found (PATH or {fallbacks:?}): the console tests need headless Chromium; \
                 install the Debian packages `chromium` and `chromium-driver` \
                 (apt-get install --no-install-recommends chromium chromium-driver; .ci/run does this)"
            )
        })
}

/// A chromedriver child in its own process group; dropping it kills the group, so the
/// browser it started goes too even when a test fails half-way.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(log: &Path) -> Driver {
        let exe = find_program("chromedriver", &["/usr/bin/chromedriver"]);
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(&exe)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
            let mut d = Driver { child, port };
            let t0 = Instant::now();
            while t0.elapsed() < UI_WAIT {
                if let Ok(Some(_)) = d.child.try_wait() {
                    break; // the port was taken after all: try another one
                }
                if d.ready() {
                    return d;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last = std::fs::read_to_string(log).unwrap_or_default();
        }
        panic!("chromedriver never answered on /status; its log:\n{last}");
    }

    fn ready(&self) -> bool {
        let addr = format!("127.0.0.1:{}", self.port);
        let Ok(mut s) = TcpStream::connect(&addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.starts_with("HTTP/1.1 200") && text.contains("\"ready\":true")
    }
}

/// A fresh headless Chromium session (its own chromedriver and profile).
struct Browser {
    client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn open() -> Browser {
        let chromium = find_program("chromium", &["/usr/bin/chromium"]);
        let profile = tempfile::tempdir().unwrap();
        let driver = Driver::start(&profile.path().join("chromedriver.log"));
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    "--no-first-run",
                    "--no-default-browser-check",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            }),
        );
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        let webdriver = format!("http://127.0.0.1:{}", driver.port);
        let connect = builder.connect(&webdriver);
        let client = match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!(
                "chromedriver could not start {}: {e}\n{}",
                chromium.display(),
                std::fs::read_to_string(profile.path().join("chromedriver.log"))
                    .unwrap_or_default()
            ),
            Err(_) => panic!("no browser session within 60 s"),
        };
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    /// Ends the session (the browser quits); the driver goes on drop.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    async fn find(&self, css: &str) -> Option<Element> {
        self.client.find(Locator::Css(css)).await.ok()
    }

    /// Where the page is and what it shows, for failure messages.
    async fn dump(&self) -> String {
        let url = self
            .client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default();
        let body = self
            .js("return document.body ? document.body.outerHTML : document.documentElement.outerHTML")
            .await;
        let body = body.as_str().unwrap_or("");
        let cut: String = body.chars().take(4000).collect();
        format!("url: {url}\npage: {cut}")
    }

    /// The first element matching `css`, polling up to 15 s.
    async fn wait_for(&self, css: &str) -> Element {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            if t0.elapsed() > UI_WAIT {
                panic!(
                    "no element `{css}` within {UI_WAIT:?}\n{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The visible text of the first element matching `css`, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        match self.find(css).await {
            Some(e) => e.text().await.ok(),
            None => None,
        }
    }

    /// Polls (up to 15 s) until the element `css` exists and its trimmed text satisfies `ok`;
    /// returns that text. `what` says what was expected, for the failure message.
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let got = self.text(css).await;
            if let Some(t) = &got
                && ok(t.trim())
            {
                return t.trim().to_string();
            }
            if t0.elapsed() > UI_WAIT {
                panic!(
                    "`{css}` never held {what} within {UI_WAIT:?} (last: {got:?})\n{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until no element matching `css` is displayed (absent or hidden).
    async fn wait_hidden(&self, css: &str) {
        let t0 = Instant::now();
        loop {
            let shown = match self.find(css).await {
                Some(e) => e.is_displayed().await.unwrap_or(false),
                None => false,
            };
            if !shown {
                return;
            }
            if t0.elapsed() > UI_WAIT {
                panic!(
                    "`{css}` still shown after {UI_WAIT:?}\n{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until an element matching `css` is displayed.
    async fn wait_shown(&self, css: &str) {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self.find(css).await
                && e.is_displayed().await.unwrap_or(false)
            {
                return;
            }
            if t0.elapsed() > UI_WAIT {
                panic!(
                    "`{css}` not shown within {UI_WAIT:?}\n{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        let e = self.wait_for(css).await;
        e.click()
            .await
            .unwrap_or_else(|err| panic!("click `{css}`: {err}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.wait_for(css).await;
        e.clear()
            .await
            .unwrap_or_else(|err| panic!("clear `{css}`: {err}"));
        e.send_keys(text)
            .await
            .unwrap_or_else(|err| panic!("type into `{css}`: {err}"));
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// The URL fragment without its `#`.
    async fn hash(&self) -> String {
        self.client
            .current_url()
            .await
            .ok()
            .and_then(|u| u.fragment().map(str::to_string))
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Workflows

const HELLO: &str =
    "name: hello\nsteps:\n  - task: {id: warm, run: \"sleep 1\"}\n  - task: {id: done, value: 1}\n";
const GATED: &str = "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: \"Ship it?\"}\n  - task: {id: b, value: 2}\n";
const GREET: &str = "name: greet\ninput:\n  type: object\n  required: [who]\n  properties:\n    who: {type: string}\nsteps:\n  - task: {id: say, value: \"hi {{ input.who }}\"}\n";
const XSS_TEXT: &str = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>";
const XSS: &str = "name: xss\nsteps:\n  - task:\n      id: say\n      run: \"sleep 1; echo '<script>window.pwned=1</script><img src=x onerror=window.pwned=2>'\"\n";

// ---------------------------------------------------------------------------------------------
// Tests

/// The harness itself: chromedriver starts, the browser opens a page, finds and reads elements
/// and runs scripts. Independent of the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_drives_a_headless_chromium() {
    let b = Browser::open().await;
    b.goto("data:text/html,<p id=x>hi</p>").await;
    assert_eq!(b.wait_text("#x", "hi", |t| t == "hi").await, "hi");
    assert_eq!(b.js("return 1 + 1").await, json!(2));
    assert_eq!(b.js("return typeof window.pwned").await, json!("undefined"));
    assert!(b.find("#nope").await.is_none());
    b.close().await;
}

/// `GET /` serves the console as HTML with a strict Content-Security-Policy.
#[test]
fn console_page_is_served_with_a_strict_csp() {
    let (_tmp, s) = serve_workflows(&[("hello", HELLO)]);
    let (status, headers, body) = http(
        &s.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let header = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(
        header("content-type").starts_with("text/html"),
        "{headers:?}"
    );
    let csp = header("content-security-policy");
    assert!(csp.contains("default-src 'none'"), "CSP: {csp:?}");
    assert!(csp.contains("script-src 'self'"), "CSP: {csp:?}");
    assert!(body.to_ascii_lowercase().contains("<html"), "{body}");
}

/// (a) A run started from the CLI shows up in the runs list without a reload and reaches
/// `finished` there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_from_the_cli_appears_live_and_finishes() {
    let (tmp, s) = serve_workflows(&[("hello", HELLO)]);
    let b = Browser::open().await;
    b.goto(&s.url("/")).await;
    b.wait_for("table#runs").await;
    for (id, route) in [
        ("nav-runs", "#/runs"),
        ("nav-approvals", "#/approvals"),
        ("nav-start", "#/start"),
    ] {
        let a = b.wait_for(&format!("a#{id}")).await;
        let href = a.attr("href").await.unwrap().unwrap_or_default();
        assert!(href.ends_with(route), "a#{id} href={href:?}");
    }
    // a reload would drop this
    b.js("window.__noReload = 'still here'; return null").await;

    cli_start(tmp.path(), &s, "hello", "live-1");
    let row = "table#runs tr[data-run-id=\"live-1\"]";
    b.wait_for(row).await;
    b.wait_text(&format!("{row} td.status"), "finished", |t| t == "finished")
        .await;
    assert_eq!(
        b.js("return window.__noReload || null").await,
        json!("still here"),
        "the page reloaded"
    );
    wait_status(&s.addr, "live-1", "finished").await;
    b.close().await;
}

/// The runs list's status filter and run id search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_list_filters_by_status_and_run_id() {
    let (tmp, s) = serve_workflows(&[("hello", HELLO), ("gated", GATED)]);
    cli_start(tmp.path(), &s, "hello", "done-1");
    cli_start(tmp.path(), &s, "gated", "wait-1");
    wait_status(&s.addr, "done-1", "finished").await;
    wait_status(&s.addr, "wait-1", "waiting-approval").await;

    let b = Browser::open().await;
    b.goto(&s.url("/#/runs")).await;
    let done = "table#runs tr[data-run-id=\"done-1\"]";
    let wait = "table#runs tr[data-run-id=\"wait-1\"]";
    b.wait_shown(done).await;
    b.wait_shown(wait).await;
    b.wait_text(&format!("{wait} td.status"), "waiting-approval", |t| {
        t == "waiting-approval"
    })
    .await;

    let filter = b.wait_for("select#status-filter").await;
    filter.select_by_value("waiting-approval").await.unwrap();
    b.wait_hidden(done).await;
    b.wait_shown(wait).await;
    let filter = b.wait_for("select#status-filter").await;
    filter.select_by_value("").await.unwrap();
    b.wait_shown(done).await;
    b.wait_shown(wait).await;

    b.type_into("input#run-search", "done").await;
    b.wait_hidden(wait).await;
    b.wait_shown(done).await;
    b.close().await;
}

/// (b) A gated run started from the CLI is in the approvals inbox; approving it there (with a
/// note) lets the run finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_from_the_inbox_lets_the_run_finish() {
    let (tmp, s) = serve_workflows(&[("gated", GATED)]);
    cli_start(tmp.path(), &s, "gated", "gate-1");
    wait_status(&s.addr, "gate-1", "waiting-approval").await;

    let b = Browser::open().await;
    b.goto(&s.url("/#/approvals")).await;
    let item = "ul#approvals li[data-run-id=\"gate-1\"][data-node-id=\"gate\"]";
    b.wait_for(item).await;
    b.type_into(&format!("{item} input.note"), "looks good")
        .await;
    b.click(&format!("{item} button.approve")).await;

    wait_status(&s.addr, "gate-1", "finished").await;
    b.goto(&s.url("/#/runs/gate-1")).await;
    b.wait_text("section#run [data-field=\"status\"]", "finished", |t| {
        t == "finished"
    })
    .await;
    for node in ["a", "gate", "b"] {
        b.wait_for(&format!("ul#nodes li[data-node-id=\"{node}\"] .state"))
            .await;
    }
    b.wait_text("ul#nodes li[data-node-id=\"b\"] .state", "finished", |t| {
        t == "finished"
    })
    .await;
    b.close().await;
}

/// (c) Starting a run from `#/start`: a required input left empty is refused in the form; once
/// filled, the run starts with it and the page lands on the new run, which finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_run_from_the_form_validates_and_lands_on_the_run() {
    let (_tmp, s) = serve_workflows(&[("greet", GREET), ("hello", HELLO)]);
    let b = Browser::open().await;
    b.goto(&s.url("/#/start")).await;
    b.wait_for("select#workflow option[value=\"greet\"]").await;
    b.wait_for("select#workflow option[value=\"hello\"]").await;
    let select = b.wait_for("select#workflow").await;
    select.select_by_value("greet").await.unwrap();
    let who = "form#start-form [name=\"who\"]";
    b.wait_for(who).await;
    let submit = "form#start-form button[type=\"submit\"]";

    b.click(submit).await;
    b.wait_text(".error[data-for=\"who\"]", "a validation message", |t| {
        !t.is_empty()
    })
    .await;
    assert!(b.hash().await.starts_with("/start"), "{}", b.hash().await);
    let runs = rpc(&s.addr, "runs.list", json!({}));
    assert_eq!(
        runs["payload"],
        json!([]),
        "no run for an invalid form: {runs}"
    );

    b.type_into(who, "web").await;
    b.click(submit).await;
    let t0 = Instant::now();
    let run = loop {
        let hash = b.hash().await;
        if let Some(id) = hash.strip_prefix("/runs/")
            && !id.is_empty()
        {
            break id.to_string();
        }
        if t0.elapsed() > UI_WAIT {
            panic!("never landed on #/runs/<id>\n{}", b.dump().await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    b.wait_text("section#run [data-field=\"status\"]", "finished", |t| {
        t == "finished"
    })
    .await;
    let got = wait_status(&s.addr, &run, "finished").await;
    assert_eq!(got["payload"]["output"], json!({"say": "hi web"}), "{got}");
    b.close().await;
}

/// (d) Task output is shown as text: markup in it never runs, live or after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_output_is_text_never_markup() {
    let (tmp, s) = serve_workflows(&[("xss", XSS)]);
    let b = Browser::open().await;
    b.goto(&s.url("/")).await;
    b.wait_for("table#runs").await;
    cli_start(tmp.path(), &s, "xss", "xss-1");
    // live: the page is open before the task prints
    b.goto(&s.url("/#/runs/xss-1")).await;
    let check = async || {
        b.wait_text("pre#output", "the task's output as text", |t| {
            t.contains(XSS_TEXT)
        })
        .await;
        assert_eq!(
            b.js("return typeof window.pwned").await,
            json!("undefined"),
            "output ran as markup"
        );
        assert_eq!(
            b.js("return document.querySelectorAll('pre#output *').length")
                .await,
            json!(0),
            "output became elements\n{}",
            b.dump().await
        );
    };
    check().await;
    wait_status(&s.addr, "xss-1", "finished").await;
    // and from history, for a finished run
    b.client.refresh().await.unwrap();
    check().await;
    b.close().await;
}

/// With token auth, the console asks for a token: a wrong one shows the error, the right one
/// opens the runs list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_with_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("hello.yaml"), HELLO).unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://x.db\"\n[auth]\nmode = \"token\"\n[auth.tokens.let-me-in]\nrole = \"admin\"\nscopes = [\"*\"]\nuser_id = \"tester\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    smithers(
        dir,
        &[
            "run",
            "hello",
            "--url",
            &s.url(""),
            "--token",
            "let-me-in",
            "--detach",
            "--run-id",
            "auth-1",
        ],
    );
    let b = Browser::open().await;
    b.goto(&s.url("/")).await;
    b.wait_for("form#signin").await;
    assert!(
        b.find("table#runs tr[data-run-id=\"auth-1\"]")
            .await
            .is_none()
    );
    b.type_into("form#signin input#token", "wrong").await;
    b.click("form#signin [type=\"submit\"]").await;
    b.wait_text("#auth-error", "an error", |t| !t.is_empty())
        .await;
    b.type_into("form#signin input#token", "let-me-in").await;
    b.click("form#signin [type=\"submit\"]").await;
    b.wait_for("table#runs tr[data-run-id=\"auth-1\"]").await;
    b.close().await;
}
