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

    /// Asks `probe` every 100 ms until it has an answer, for up to `UI_WAIT`; then fails with
    /// `what` (given the last answer) and the page.
    async fn poll<T, L: std::fmt::Debug>(
        &self,
        what: impl Fn(&L) -> String,
        mut probe: impl AsyncFnMut() -> Result<T, L>,
    ) -> T {
        let t0 = Instant::now();
        loop {
            let last = match probe().await {
                Ok(v) => return v,
                Err(last) => last,
            };
            if t0.elapsed() > UI_WAIT {
                panic!("{} within {UI_WAIT:?}\n{}", what(&last), self.dump().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first element matching `css`, polling up to 15 s.
    async fn wait_for(&self, css: &str) -> Element {
        self.poll(
            |_: &()| format!("no element `{css}`"),
            async || self.find(css).await.ok_or(()),
        )
        .await
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
        self.poll(
            |got: &Option<String>| format!("`{css}` never held {what} (last: {got:?})"),
            async || match self.text(css).await {
                Some(t) if ok(t.trim()) => Ok(t.trim().to_string()),
                got => Err(got),
            },
        )
        .await
    }

    /// Whether an element matching `css` is displayed (false when there is none).
    async fn shown(&self, css: &str) -> bool {
        match self.find(css).await {
            Some(e) => e.is_displayed().await.unwrap_or(false),
            None => false,
        }
    }

    /// Polls until no element matching `css` is displayed (absent or hidden).
    async fn wait_hidden(&self, css: &str) {
        self.poll(
            |_: &()| format!("`{css}` still shown"),
            async || {
                if self.shown(css).await {
                    Err(())
                } else {
                    Ok(())
                }
            },
        )
        .await
    }

    /// Polls until an element matching `css` is displayed.
    async fn wait_shown(&self, css: &str) {
        self.poll(
            |_: &()| format!("`{css}` not shown"),
            async || {
                if self.shown(css).await {
                    Ok(())
                } else {
                    Err(())
                }
            },
        )
        .await
    }

    /// Clicks the first element matching `css`. Live pages redraw lists, so an element found a
    /// moment ago may be gone (stale) or covered; it is looked up again until `UI_WAIT`.
    async fn click(&self, css: &str) {
        let t0 = Instant::now();
        loop {
            let e = self.wait_for(css).await;
            match e.click().await {
                Ok(_) => return,
                Err(_) if t0.elapsed() < UI_WAIT => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("click `{css}`: {err}\n{}", self.dump().await),
            }
        }
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

    /// A screenshot of the page as it is. Always taken (a PNG is checked for); written to
    /// `$SMITHERS_CONSOLE_SHOTS/<name>.png` when that is set, which is how the pictures in
    /// docs/console.md are made (`SMITHERS_CONSOLE_SHOTS=docs/console cargo test --test console`).
    async fn shot(&self, name: &str) {
        // let the last event's redraw land
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        assert!(
            png.starts_with(b"\x89PNG"),
            "screenshot {name} is not a PNG"
        );
        if let Some(dir) = std::env::var_os("SMITHERS_CONSOLE_SHOTS") {
            let dir = PathBuf::from(dir);
            let dir = if dir.is_absolute() {
                dir
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../..")
                    .join(dir)
            };
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }

    /// Presses keys on whatever has the focus (WebDriver key codes, e.g. [`TAB`]).
    async fn keys(&self, keys: &str) {
        let e = self
            .client
            .active_element()
            .await
            .unwrap_or_else(|e| panic!("no focused element: {e}"));
        e.send_keys(keys)
            .await
            .unwrap_or_else(|e| panic!("keys {keys:?}: {e}"));
    }

    /// The id (or tag and class) of the focused element.
    async fn focused(&self) -> String {
        self.js("const e = document.activeElement; return e ? (e.id || (e.tagName.toLowerCase() + '.' + e.className)) : ''")
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Presses Tab until the focused element matches `css` (at most 60 times).
    async fn tab_to(&self, css: &str) {
        self.press_until(TAB, css).await;
    }

    /// Presses Shift+Tab until the focused element matches `css` (at most 60 times).
    async fn tab_to_back(&self, css: &str) {
        self.press_until(SHIFT_TAB, css).await;
    }

    async fn press_until(&self, keys: &str, css: &str) {
        for _ in 0..60 {
            let here = self
                .js(&format!(
                    "return document.activeElement ? document.activeElement.matches({}) : false",
                    serde_json::to_string(css).unwrap()
                ))
                .await;
            if here == json!(true) {
                return;
            }
            self.keys(keys).await;
        }
        panic!("{keys:?} never reached `{css}`\n{}", self.dump().await);
    }

    /// Waits until the run page shows the run in status `want`.
    async fn wait_run_status(&self, want: &str) {
        self.wait_text("section#run [data-field=\"status\"]", want, |t| t == want)
            .await;
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

const TAB: &str = "\u{e004}";
const ENTER: &str = "\u{e007}";
/// Shift down, Tab, all modifiers up.
const SHIFT_TAB: &str = "\u{e008}\u{e004}\u{e000}";

// ---------------------------------------------------------------------------------------------
// Workflows

const HELLO: &str =
    "name: hello\nsteps:\n  - task: {id: warm, run: \"sleep 1\"}\n  - task: {id: done, value: 1}\n";
const GATED: &str = "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: \"Ship it?\"}\n  - task: {id: b, value: 2}\n";
const GREET: &str = "name: greet\ninput:\n  type: object\n  required: [who]\n  properties:\n    who: {type: string}\nsteps:\n  - task: {id: say, value: \"hi {{ input.who }}\"}\n";
const STEPS: &str = "name: steps\nsteps:\n  - task: {id: one, run: \"sleep 1\"}\n  - task: {id: two, run: \"sleep 1\"}\n  - task: {id: three, value: 3}\n";
const TREE: &str = "name: tree\noutputs:\n  result:\n    type: object\n    required: [n]\n    properties:\n      n: {type: integer}\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: \"Ship it?\"}\n  - task: {id: b, value: {n: 2}, output: result}\n";
const WAITER: &str = "name: waiter\ninput:\n  type: object\n  properties:\n    sha: {type: string}\nsteps:\n  - wait_for_event: {id: ci, event: ci.done, correlation_id: \"{{ input.sha }}\"}\n  - task: {id: after, value: \"{{ outputs.ci.ok }}\"}\n";
const QUICK: &str = "name: quick\nsteps:\n  - task: {id: v, value: 1}\n";
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
    // the accessibility audit finds what it looks for
    b.goto("data:text/html,<p style='color:%23aaa'>faint</p><input id=i><button></button><p style='width:5000px'>wide</p><p>null</p>")
        .await;
    let found = b.js(AUDIT).await;
    let found: Vec<String> = serde_json::from_value(found).unwrap();
    assert_eq!(found.len(), 5, "{found:?}");
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("placeholder text \"null\"")),
        "{found:?}"
    );
    assert!(found[0].starts_with("contrast 2.32"), "{found:?}");
    assert!(found.iter().any(|f| f == "no label: input#i"), "{found:?}");
    assert!(
        found.iter().any(|f| f.starts_with("no name: button")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|f| f.starts_with("wider than the window")),
        "{found:?}"
    );
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
    b.wait_run_status("finished").await;
    for node in ["a", "gate", "b"] {
        b.wait_for(&format!("#tree li[data-node-id=\"{node}\"] .state"))
            .await;
    }
    b.wait_text(
        "#tree li[data-node-id=\"b\"] > .node .state",
        "finished",
        |t| t == "finished",
    )
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
    b.wait_run_status("finished").await;
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

/// Serves `workflows` with token auth: `let-me-in` (admin, every scope, user `tester`) and
/// `just-looking` (scope `read` only, user `rita`).
fn serve_with_tokens(workflows: &[(&str, &str)]) -> (tempfile::TempDir, Served) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut toml = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://x.db\"\n[auth]\nmode = \"token\"\n\
         [auth.tokens.let-me-in]\nrole = \"admin\"\nscopes = [\"*\"]\nuser_id = \"tester\"\n\
         [auth.tokens.just-looking]\nrole = \"viewer\"\nscopes = [\"read\"]\nuser_id = \"rita\"\n",
    );
    for (key, yaml) in workflows {
        std::fs::write(dir.join(format!("{key}.yaml")), yaml).unwrap();
        toml.push_str(&format!(
            "[[workflows]]\nkey = \"{key}\"\npath = \"{key}.yaml\"\n"
        ));
    }
    std::fs::write(dir.join("smithers.toml"), toml).unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    (tmp, s)
}

async fn sign_in(b: &Browser, s: &Served, token: &str) {
    b.goto(&s.url("/")).await;
    b.type_into("form#signin input#token", token).await;
    b.click("form#signin [type=\"submit\"]").await;
    b.wait_for("table#runs").await;
}

/// Waits until the page's address is `#/runs/<id>` for another run than `not`; returns the id.
async fn landed_on_run(b: &Browser, not: &str) -> String {
    let t0 = Instant::now();
    loop {
        let hash = b.hash().await;
        if let Some(id) = hash.strip_prefix("/runs/")
            && !id.is_empty()
            && id != not
        {
            return id.to_string();
        }
        if t0.elapsed() > UI_WAIT {
            panic!("never landed on a new #/runs/<id>\n{}", b.dump().await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The live tree on a run's page: it arrives from `streamDevTools` with each node's state;
/// while the page is open the run is approved (outside the page) and the tree advances: the
/// gate and the step after it finish and the frame count grows, without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_page_shows_the_tree_advancing() {
    let (tmp, s) = serve_workflows(&[("tree", TREE)]);
    cli_start(tmp.path(), &s, "tree", "tree-1");
    wait_status(&s.addr, "tree-1", "waiting-approval").await;
    let b = Browser::open().await;
    b.goto(&s.url("/#/runs/tree-1")).await;
    let node = |id: &str| format!("#tree li[data-node-id=\"{id}\"] > .node .state");
    b.wait_for("#tree li[data-type=\"workflow\"]").await;
    b.wait_text(&node("a"), "a finished", |t| t == "finished")
        .await;
    b.wait_text(&node("b"), "b pending", |t| t == "pending")
        .await;
    b.wait_text(&node("gate"), "the gate waiting", |t| {
        t == "waiting-approval"
    })
    .await;
    assert!(
        !b.find("a#signal-link")
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "no signal link for a run waiting for an approval"
    );
    let frame_then = b
        .wait_text("#frame-view", "a frame", |t| t.starts_with("Live"))
        .await;
    b.js("window.__noReload = 1; return null").await;
    b.shot("run").await;
    let r = rpc(
        &s.addr,
        "approvals.decide",
        json!({"runId": "tree-1", "nodeId": "gate", "approved": true}),
    );
    assert_eq!(r["ok"], json!(true), "{r}");
    b.wait_text(&node("b"), "b finished", |t| t == "finished")
        .await;
    b.wait_text(&node("gate"), "the gate decided", |t| t == "finished")
        .await;
    b.wait_run_status("finished").await;
    let frame_now = b
        .wait_text("#frame-view", "a later frame", |t| t != frame_then)
        .await;
    assert!(frame_now.starts_with("Live"), "{frame_now}");
    assert_eq!(
        b.js("return window.__noReload || 0").await,
        json!(1),
        "reloaded"
    );
    // node details: attempts, the output and its schema; a task without a schema shows what
    // it produced all the same
    b.click("#tree li[data-node-id=\"b\"] button.node-pick")
        .await;
    b.wait_text("#node-output", "the output", |t| {
        t.replace(char::is_whitespace, "") == "{\"n\":2}"
    })
    .await;
    b.wait_text("table#schema tbody tr td", "the schema's field", |t| {
        t == "n"
    })
    .await;
    b.wait_for("table#attempts tbody tr").await;
    b.click("#tree li[data-node-id=\"a\"] button.node-pick")
        .await;
    b.wait_text("#node-output", "a's output", |t| t == "1")
        .await;
    b.close().await;
}

/// Picking an older frame shows the tree as it was (later nodes pending again); forking from
/// it starts a new run from that frame; rewinding the original asks first, says what it
/// deletes, and the run then finishes again from that frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_frame_can_be_forked_and_rewound_to() {
    let (tmp, s) = serve_workflows(&[("steps", STEPS)]);
    cli_start(tmp.path(), &s, "steps", "old-1");
    wait_status(&s.addr, "old-1", "finished").await;
    let frames = rpc(&s.addr, "frames.list", json!({"runId": "old-1"}));
    let latest = frames["payload"][0]["frameNo"].as_i64().unwrap();
    assert!(latest >= 3, "{frames}");

    let b = Browser::open().await;
    b.goto(&s.url("/#/runs/old-1")).await;
    let node = |id: &str| format!("#tree li[data-node-id=\"{id}\"] > .node .state");
    b.wait_text(&node("three"), "finished", |t| t == "finished")
        .await;
    // frame 2: `one` had finished, nothing later had
    b.click("#frames button[data-frame-no=\"2\"]").await;
    b.wait_text("#frame-view", "frame 2", |t| t.starts_with("Frame 2 of"))
        .await;
    b.wait_text(&node("three"), "pending then", |t| t == "pending")
        .await;
    b.wait_shown("button#fork").await;
    b.click("button#fork").await;
    let forked = landed_on_run(&b, "old-1").await;
    let got = wait_status(&s.addr, &forked, "finished").await;
    assert_eq!(got["payload"]["parentRunId"], "old-1", "{got}");
    b.wait_run_status("finished").await;

    // rewind the original to frame 2, through the confirmation
    b.goto(&s.url("/#/runs/old-1")).await;
    b.wait_text(&node("three"), "finished", |t| t == "finished")
        .await;
    b.type_into("input#frame-no", "2").await;
    b.click("button#show-frame").await;
    b.wait_text("#frame-view", "frame 2", |t| t.starts_with("Frame 2 of"))
        .await;
    b.click("button#rewind").await;
    let what = b
        .wait_text(
            "dialog#rewind-dialog #rewind-what",
            "what is deleted",
            |t| t.contains("deletes"),
        )
        .await;
    let frames_gone = latest - 2;
    assert!(
        what.contains(&format!("deletes {frames_gone} frame"))
            && what.contains(&format!("(3–{latest})")),
        "the confirmation names the frames it deletes: {what}"
    );
    // "… and N attempt(s) …": what the gateway must report deleting
    let attempts_gone: i64 = what
        .split(" and ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempt count in {what:?}"));
    b.shot("rewind").await;
    // nothing happens until confirmed
    b.click("button#rewind-cancel").await;
    b.wait_hidden("dialog#rewind-dialog").await;
    let still = rpc(
        &s.addr,
        "frames.list",
        json!({"runId": "old-1", "limit": 1}),
    );
    assert_eq!(still["payload"][0]["frameNo"].as_i64(), Some(latest));
    b.click("button#rewind").await;
    b.click("button#rewind-confirm").await;
    let note = b
        .wait_text("#run-note", "rewound", |t| {
            t.starts_with("rewound to frame 2")
        })
        .await;
    assert_eq!(
        note,
        format!("rewound to frame 2: {frames_gone} frames and {attempts_gone} attempts deleted"),
        "the confirmation said what the rewind did"
    );
    wait_status(&s.addr, "old-1", "finished").await;
    b.wait_text(&node("three"), "finished again", |t| t == "finished")
        .await;
    b.close().await;
}

/// A read-only token: the pages still show everything, but approving, starting, cancelling,
/// signalling and schedule changes are disabled with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_cannot_approve_or_start() {
    let (tmp, s) = serve_with_tokens(&[("gated", GATED), ("hello", HELLO)]);
    smithers(
        tmp.path(),
        &[
            "run",
            "gated",
            "--url",
            &s.url(""),
            "--token",
            "let-me-in",
            "--detach",
            "--run-id",
            "ro-1",
        ],
    );
    let b = Browser::open().await;
    sign_in(&b, &s, "just-looking").await;
    b.wait_text("#conn", "signed in as rita", |t| t.contains("rita"))
        .await;
    b.wait_for("table#runs tr[data-run-id=\"ro-1\"]").await;

    b.goto(&s.url("/#/approvals")).await;
    let item = "ul#approvals li[data-run-id=\"ro-1\"][data-node-id=\"gate\"]";
    b.wait_for(item).await;
    for btn in ["button.approve", "button.deny"] {
        let e = b.wait_for(&format!("{item} {btn}")).await;
        assert!(!e.is_enabled().await.unwrap(), "{btn} is enabled");
        let why = e.attr("title").await.unwrap().unwrap_or_default();
        assert!(why.contains("approve scope"), "{btn} title {why:?}");
    }
    b.shot("approvals-read-only").await;

    b.goto(&s.url("/#/start")).await;
    b.wait_for("select#workflow option[value=\"hello\"]").await;
    let submit = b.wait_for("form#start-form button[type=\"submit\"]").await;
    assert!(!submit.is_enabled().await.unwrap(), "start is enabled");

    b.goto(&s.url("/#/runs/ro-1")).await;
    b.wait_run_status("waiting-approval").await;
    for btn in ["button#cancel", "button#resume", "button#rerun"] {
        let e = b.wait_for(btn).await;
        assert!(!e.is_enabled().await.unwrap(), "{btn} is enabled");
    }
    b.goto(&s.url("/#/schedules")).await;
    let save = b.wait_for("form#cron-form button[type=\"submit\"]").await;
    assert!(
        !save.is_enabled().await.unwrap(),
        "save schedule is enabled"
    );
    b.goto(&s.url("/#/signals")).await;
    let send = b.wait_for("form#signal-form button[type=\"submit\"]").await;
    assert!(!send.is_enabled().await.unwrap(), "send is enabled");
    // the run still waits: nothing was decided or cancelled
    b.goto(&s.url("/#/runs/ro-1")).await;
    b.wait_run_status("waiting-approval").await;
    b.close().await;
}

/// Signals page: a run waiting for an event is listed; choosing it fills in the event name and
/// correlation id it waits for; sending the signal lets the run finish with the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_is_prefilled_from_the_wait_and_sent() {
    let (tmp, s) = serve_workflows(&[("waiter", WAITER)]);
    smithers(
        tmp.path(),
        &[
            "run",
            "waiter",
            "--url",
            &s.url(""),
            "--detach",
            "--run-id",
            "sig-1",
            "--input",
            "{\"sha\": \"abc123\"}",
        ],
    );
    wait_status(&s.addr, "sig-1", "waiting-event").await;
    let b = Browser::open().await;
    b.goto(&s.url("/#/runs/sig-1")).await;
    b.wait_shown("a#signal-link").await;
    b.click("a#signal-link").await;
    b.wait_text("#sig-note", "prefilled", |t| t.starts_with("prefilled"))
        .await;
    let value = |css: &'static str| {
        let b = &b;
        async move {
            b.wait_for(css)
                .await
                .prop("value")
                .await
                .unwrap()
                .unwrap_or_default()
        }
    };
    assert_eq!(value("#sig-run").await, "sig-1");
    assert_eq!(value("#sig-name").await, "ci.done");
    assert_eq!(value("#sig-corr").await, "abc123");
    b.wait_for("ul#waiting-runs li[data-run-id=\"sig-1\"]")
        .await;
    b.type_into("#sig-data", "{\"ok\": true}").await;
    b.shot("signals").await;
    b.click("form#signal-form button[type=\"submit\"]").await;
    b.wait_text("#sig-note", "sent", |t| t.starts_with("sent"))
        .await;
    let got = wait_status(&s.addr, "sig-1", "finished").await;
    assert_eq!(got["payload"]["output"]["after"], json!(true), "{got}");
    b.close().await;
}

/// Schedules page: add a schedule from the form, disable and enable it, start a run from it
/// now, and remove it (after a confirmation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_added_toggled_triggered_and_removed() {
    let (_tmp, s) = serve_workflows(&[("quick", QUICK)]);
    let b = Browser::open().await;
    b.goto(&s.url("/#/schedules")).await;
    b.wait_for("select#cron-workflow option[value=\"quick\"]")
        .await;
    b.type_into("#cron-pattern", "0 3 1 1 *").await;
    b.type_into("#cron-id", "yearly").await;
    b.click("form#cron-form button[type=\"submit\"]").await;
    let row = "table#schedules tr[data-cron-id=\"yearly\"]";
    b.wait_text(&format!("{row} [data-field=\"enabled\"]"), "enabled", |t| {
        t == "yes"
    })
    .await;
    b.click(&format!("{row} button.toggle")).await;
    b.wait_text(
        &format!("{row} [data-field=\"enabled\"]"),
        "disabled",
        |t| t == "no",
    )
    .await;
    let listed = rpc(&s.addr, "cron.list", json!({}));
    assert_eq!(listed["payload"][0]["enabled"], json!(false), "{listed}");
    b.click(&format!("{row} button.toggle")).await;
    b.wait_text(&format!("{row} [data-field=\"enabled\"]"), "enabled", |t| {
        t == "yes"
    })
    .await;
    b.click(&format!("{row} button.trigger")).await;
    b.wait_text("#cron-note", "started", |t| t.starts_with("started"))
        .await;
    let runs = rpc(&s.addr, "runs.list", json!({"workflow": "quick"}));
    assert_eq!(runs["payload"].as_array().map(Vec::len), Some(1), "{runs}");
    b.shot("schedules").await;
    b.click(&format!("{row} button.remove")).await;
    b.client.accept_alert().await.unwrap();
    b.wait_hidden(row).await;
    let listed = rpc(&s.addr, "cron.list", json!({}));
    assert_eq!(listed["payload"], json!([]), "{listed}");
    b.close().await;
}

/// Paging: 120 runs over pages of 50 (newest first, each run once), back again, the workflow
/// filter and the run id search on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_list_pages_through_many_runs() {
    let (_tmp, s) = serve_workflows(&[("quick", QUICK), ("hello", HELLO)]);
    for i in 0..120 {
        let r = rpc(
            &s.addr,
            "runs.create",
            json!({"workflow": "quick", "runId": format!("p-{i:03}")}),
        );
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    let r = rpc(
        &s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": "other-1"}),
    );
    assert_eq!(r["ok"], json!(true), "{r}");
    let b = Browser::open().await;
    b.goto(&s.url("/#/runs")).await;
    b.wait_for("select#workflow-filter option[value=\"quick\"]")
        .await;
    let wf = b.wait_for("select#workflow-filter").await;
    wf.select_by_value("quick").await.unwrap();
    let ids = async || -> Vec<String> {
        let v = b
            .js("return [...document.querySelectorAll('table#runs tbody tr')].map(r => r.dataset.runId)")
            .await;
        serde_json::from_value(v).unwrap_or_default()
    };
    let mut seen = Vec::new();
    for (page, want) in [(1, 50), (2, 50), (3, 20)] {
        b.wait_text("#page-no", "the page", |t| t == format!("page {page}"))
            .await;
        let t0 = Instant::now();
        let rows = loop {
            let rows = ids().await;
            if rows.len() == want && !seen.contains(&rows[0]) {
                break rows;
            }
            assert!(t0.elapsed() < UI_WAIT, "page {page}: {rows:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(rows.iter().all(|r| r.starts_with("p-")), "{rows:?}");
        seen.extend(rows);
        let older = b.wait_for("button#older").await;
        if page < 3 {
            older.click().await.unwrap();
        } else {
            assert!(!older.is_enabled().await.unwrap(), "older on the last page");
        }
    }
    let mut expect: Vec<String> = (0..120).rev().map(|i| format!("p-{i:03}")).collect();
    let mut got = seen.clone();
    got.sort();
    expect.sort();
    assert_eq!(got, expect, "every run once");
    b.click("button#newer").await;
    b.wait_text("#page-no", "page 2", |t| t == "page 2").await;
    b.type_into("input#run-search", "p-11").await;
    b.wait_text("#page-no", "page 1", |t| t == "page 1").await;
    let t0 = Instant::now();
    loop {
        let rows = ids().await;
        if rows.len() == 10 && rows.iter().all(|r| r.starts_with("p-11")) {
            break;
        }
        assert!(t0.elapsed() < UI_WAIT, "search: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.close().await;
}

/// What an accessibility audit of the current page finds wrong: a leaked `null`/`undefined`
/// shown as text, text below WCAG AA contrast
/// (4.5:1, 3:1 for large text) against its effective background, form controls without a
/// label, buttons without a name, and content wider than the window.
const AUDIT: &str = r#"
const out = [];
const rgb = (c) => { const m = /rgba?\(([^)]+)\)/.exec(c); if (!m) return null; const p = m[1].split(',').map((x) => parseFloat(x)); return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 }; };
const lum = (c) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
const bgOf = (el) => { for (let e = el; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c && c.a > 0) return c; } return { r: 255, g: 255, b: 255, a: 1 }; };
const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.className && typeof el.className === 'string' ? '.' + el.className.split(' ').join('.') : '');
for (const el of document.querySelectorAll('body *')) {
  const cs = getComputedStyle(el);
  if (cs.visibility === 'hidden' || cs.display === 'none' || !el.getClientRects().length) continue;
  if (el.closest(':disabled') || el.closest('.sr-only') || el.closest('.skip')) continue;
  const texts = [...el.childNodes].filter((n) => n.nodeType === 3 && n.textContent.trim());
  const text = texts.length > 0;
  for (const t of texts) if (/^(null|undefined|NaN|\[object Object\])$/.test(t.textContent.trim())) out.push('placeholder text "' + t.textContent.trim() + '" in ' + name(el));
  if (text) {
    const fg = rgb(cs.color), bg = bgOf(el);
    const hi = Math.max(lum(fg), lum(bg)), lo = Math.min(lum(fg), lum(bg));
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(cs.fontSize), bold = parseInt(cs.fontWeight, 10) >= 700;
    const need = size >= 24 || (size >= 18.66 && bold) ? 3 : 4.5;
    if (ratio < need) out.push('contrast ' + ratio.toFixed(2) + ' < ' + need + ': ' + name(el) + ' "' + el.textContent.trim().slice(0, 40) + '"');
  }
  if (/^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName) && el.type !== 'hidden') {
    if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby')) out.push('no label: ' + name(el));
  }
  if (el.tagName === 'BUTTON' && !el.textContent.trim() && !el.getAttribute('aria-label')) out.push('no name: ' + name(el));
}
if (document.documentElement.scrollWidth > window.innerWidth + 1) out.push('wider than the window: ' + document.documentElement.scrollWidth + ' > ' + window.innerWidth);
return out;
"#;

/// Accessibility: every page passes the audit above, wide and in a narrow (360 px) window; the
/// console is usable from the keyboard alone: Tab reaches the navigation, Enter follows it,
/// and an approval is decided with Tab, typing and Enter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_an_accessibility_audit_and_works_from_the_keyboard() {
    let (tmp, s) = serve_workflows(&[("gated", GATED), ("waiter", WAITER), ("greet", GREET)]);
    cli_start(tmp.path(), &s, "gated", "kb-1");
    wait_status(&s.addr, "kb-1", "waiting-approval").await;
    let b = Browser::open().await;
    let pages = [
        ("/#/runs", "table#runs tr[data-run-id=\"kb-1\"]", "runs"),
        ("/#/runs/kb-1", "#tree li[data-node-id=\"gate\"]", ""),
        (
            "/#/approvals",
            "ul#approvals li[data-run-id=\"kb-1\"]",
            "approvals",
        ),
        ("/#/start", "select#workflow option[value=\"greet\"]", ""),
        ("/#/signals", "form#signal-form", ""),
        ("/#/schedules", "form#cron-form", ""),
    ];
    for (width, height) in [(1280, 900), (360, 740)] {
        b.client.set_window_size(width, height).await.unwrap();
        for (path, ready, shot) in pages {
            b.goto(&s.url(path)).await;
            b.wait_for(ready).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let found = b.js(AUDIT).await;
            assert_eq!(
                found,
                json!([]),
                "{path} at {width} px: {found:#}\n{}",
                b.dump().await
            );
            if width == 1280 && !shot.is_empty() {
                b.shot(shot).await;
            }
        }
    }
    b.client.set_window_size(1280, 900).await.unwrap();
    // a form's validation error in place, for the start page's picture
    b.goto(&s.url("/#/start")).await;
    let select = b.wait_for("select#workflow").await;
    select.select_by_value("greet").await.unwrap();
    b.click("form#start-form button[type=\"submit\"]").await;
    b.wait_text(".error[data-for=\"who\"]", "a validation message", |t| {
        !t.is_empty()
    })
    .await;
    assert_eq!(
        b.focused().await,
        "in-who",
        "focus goes to the field in error"
    );
    b.shot("start").await;

    // keyboard only: the skip link is the first stop of the page; a route focuses its heading,
    // and Shift+Tab from there reaches the navigation
    b.goto(&s.url("/#/runs")).await;
    b.wait_for("table#runs tr[data-run-id=\"kb-1\"]").await;
    let first = b
        .js("return [...document.querySelectorAll('a[href], button, input, select, textarea')].find((e) => e.tabIndex >= 0 && !e.disabled && e.getClientRects().length).className")
        .await;
    assert_eq!(first, json!("skip"), "the first stop of the tab order");
    assert_eq!(b.focused().await, "h1.", "the route focused its heading");
    b.tab_to_back("a#nav-approvals").await;
    b.keys(ENTER).await;
    let item = "ul#approvals li[data-run-id=\"kb-1\"]";
    b.wait_for(item).await;
    b.tab_to(&format!("{item} input.note")).await;
    b.keys("from the keyboard").await;
    b.keys(TAB).await;
    let on = b
        .js(&format!(
            "return document.activeElement.matches('{item} button.approve')"
        ))
        .await;
    assert_eq!(on, json!(true), "Tab after the note: {}", b.focused().await);
    b.keys(ENTER).await;
    wait_status(&s.addr, "kb-1", "finished").await;
    b.close().await;
}

/// Sign-in page picture and a 401 shown as such (not a blank page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_shown_as_unauthorized() {
    let (_tmp, s) = serve_with_tokens(&[("hello", HELLO)]);
    let b = Browser::open().await;
    b.goto(&s.url("/")).await;
    b.type_into("form#signin input#token", "not-a-token").await;
    b.click("form#signin [type=\"submit\"]").await;
    let err = b
        .wait_text("#auth-error", "the refusal", |t| !t.is_empty())
        .await;
    assert!(err.contains("UNAUTHORIZED"), "{err}");
    let found = b.js(AUDIT).await;
    assert_eq!(found, json!([]), "sign-in page: {found:#}");
    b.shot("signin").await;
    b.close().await;
}

/// First paint of the console on localhost and the size of its files, as figures for
/// docs/benchmarks.md (not a timed test: it prints and asserts nothing about time).
/// `cargo test -p smithers-cli --test console -- --ignored --nocapture console_first_paint`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand for docs/benchmarks.md"]
async fn console_first_paint_figures() {
    let (_tmp, s) = serve_workflows(&[("hello", HELLO)]);
    let b = Browser::open().await;
    let mut fcp = Vec::new();
    let mut ready = Vec::new();
    for _ in 0..20 {
        b.goto("about:blank").await;
        b.goto(&s.url("/#/runs")).await;
        b.wait_for("table#runs").await;
        let v = b
            .js("const p = performance.getEntriesByName('first-contentful-paint')[0]; const t = performance.getEntriesByType('resource').reduce((s, r) => s + r.transferSize, 0); return [p ? p.startTime : -1, performance.now(), t]")
            .await;
        fcp.push(v[0].as_f64().unwrap_or(-1.0));
        ready.push(v[1].as_f64().unwrap_or(-1.0));
    }
    fcp.sort_by(f64::total_cmp);
    ready.sort_by(f64::total_cmp);
    let total: usize = smithers_gateway::console::files().map(|(_, n)| n).sum();
    println!(
        "first contentful paint: median {:.0} ms, max {:.0} ms (20 loads); runs table shown by {:.0} ms median; files {} bytes",
        fcp[10], fcp[19], ready[10], total
    );
    b.close().await;
}

/// A reverse proxy of the kind trusted-proxy mode expects: every request head it forwards gets
/// `inject` (identity headers) after its request line; after a WebSocket upgrade the bytes flow
/// through untouched. The browser only sends bodiless GETs and upgrades here.
async fn identity_proxy(target: String, inject: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                });
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match cr.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head: Vec<u8> = buf.drain(..end + 4).collect();
                    let line = head.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
                    let mut out = head[..line].to_vec();
                    out.extend_from_slice(inject.as_bytes());
                    out.extend_from_slice(&head[line..]);
                    if uw.write_all(&out).await.is_err() {
                        return;
                    }
                    let upgrade = String::from_utf8_lossy(&head)
                        .to_ascii_lowercase()
                        .contains("upgrade: websocket");
                    if upgrade {
                        let _ = uw.write_all(&buf).await;
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Trusted-proxy mode: behind a proxy that asserts who the user is, the console needs no
/// sign-in, says who is connected, and disables what the asserted scopes do not allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_console_uses_its_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("gated.yaml"), GATED).unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://x.db\"\n[auth]\nmode = \"trusted-proxy\"\n\
         default_scopes = []\n[[workflows]]\nkey = \"gated\"\npath = \"gated.yaml\"\n",
    )
    .unwrap();
    let s = serve(dir, &["--config", "smithers.toml"]);
    let proxy = identity_proxy(
        s.addr.clone(),
        "x-user-id: rita\r\nx-user-scopes: read\r\nx-user-role: viewer\r\n",
    )
    .await;
    let admin = identity_proxy(
        s.addr.clone(),
        "x-user-id: ann\r\nx-user-scopes: *\r\nx-user-role: admin\r\n",
    )
    .await;
    let b = Browser::open().await;
    // ann starts a gated run through the console
    b.goto(&format!("http://{admin}/#/start")).await;
    b.wait_text("#conn", "ann", |t| t.contains("as ann")).await;
    b.wait_for("select#workflow option[value=\"gated\"]").await;
    b.click("form#start-form button[type=\"submit\"]").await;
    let run = landed_on_run(&b, "").await;
    b.wait_run_status("waiting-approval").await;
    // rita only reads
    b.goto(&format!("http://{proxy}/#/approvals")).await;
    b.wait_text("#conn", "rita", |t| t.contains("as rita (viewer)"))
        .await;
    let item = format!("ul#approvals li[data-run-id=\"{run}\"]");
    b.wait_for(&item).await;
    let approve = b.wait_for(&format!("{item} button.approve")).await;
    assert!(!approve.is_enabled().await.unwrap(), "rita may not approve");
    assert!(
        b.find("form#signin").await.is_none(),
        "no sign-in behind the proxy"
    );
    // straight to the gateway, without the proxy's headers: no scopes, so a clear refusal
    b.goto(&s.url("/#/runs")).await;
    b.wait_text("#app .error", "the refusal", |t| t.contains("FORBIDDEN"))
        .await;
    b.close().await;
}
