//! Crash safety: a real `smithers up` is SIGKILLed in the middle of a task, then the run is
//! resumed. The run must finish, no finished task may run twice, and nothing may be lost.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn smithers(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// `smithers up wf.yaml` in `dir` as a child process (to be killed), its output discarded.
fn spawn_up(dir: &Path, run_id: &str, db: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["up", "wf.yaml", "--run-id", run_id, "--db", db])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `smithers resume RUN`, which must succeed; its output (the run's outputs).
fn resume_ok(dir: &Path, run_id: &str, db: &str) -> Value {
    let out = smithers(dir, &["resume", run_id, "--db", db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_for(path: &Path, needle: &str, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out waiting for `{needle}` in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_mid_task_then_resume_finishes_without_rerunning_finished_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("log");
    let mut yaml = String::from("name: crashy\nsteps:\n");
    // s3 holds until the test creates `release` (after the kill), so the kill always lands
    // while it runs, however slow the machine is
    let release = dir.join("release");
    for i in 1..=5 {
        let wait = if i == 3 {
            format!("while [ ! -e {} ]; do sleep 0.05; done", release.display())
        } else {
            "sleep 0.2".to_string()
        };
        yaml.push_str(&format!(
            "  - task: {{id: s{i}, run: \"echo start-{i} >> {log}; {wait}; echo done-{i} >> {log}; echo '{{\\\"n\\\": {i}}}'\", output: {{type: object}}}}\n",
            log = log.display()
        ));
    }
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());

    let mut child = spawn_up(dir, "crash-1", &db);
    // kill it while s3 is running (s1 and s2 finished)
    wait_for(&log, "start-3", Duration::from_secs(20));
    // a second engine must not take a run whose owner is alive
    let busy = smithers(dir, &["resume", "crash-1", "--db", &db]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("RUN_STILL_RUNNING"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = std::fs::read_to_string(&log).unwrap();
    assert!(
        !at_kill.contains("done-3"),
        "s3 must have been interrupted:\n{at_kill}"
    );
    // an orphaned s3 would now finish and write done-3 a second time
    std::fs::write(&release, "").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let before = smithers(dir, &["inspect", "crash-1", "--json", "--db", &db]);
    let doc: Value = serde_json::from_slice(&before.stdout).unwrap();
    assert_eq!(
        doc["run"]["status"], "running",
        "the killed run is still marked running"
    );
    let s3 = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nodeId"] == "s3")
        .unwrap()
        .clone();
    assert_eq!(s3["state"], "in-progress");
    assert_eq!(
        doc["outputs"].as_array().unwrap().len(),
        2,
        "outputs of s1 and s2 survived"
    );

    let output = resume_ok(dir, "crash-1", &db);
    for i in 1..=5 {
        assert_eq!(output[format!("s{i}")]["n"], i);
    }

    let text = std::fs::read_to_string(&log).unwrap();
    for i in 1..=5 {
        let done = text.lines().filter(|l| *l == format!("done-{i}")).count();
        assert_eq!(done, 1, "s{i} finished {done} times:\n{text}");
    }
    for i in [1, 2, 4, 5] {
        let starts = text.lines().filter(|l| *l == format!("start-{i}")).count();
        assert_eq!(starts, 1, "s{i} started {starts} times:\n{text}");
    }
    assert_eq!(
        text.lines().filter(|l| *l == "start-3").count(),
        2,
        "only the interrupted task runs again"
    );

    let after = smithers(dir, &["inspect", "crash-1", "--json", "--db", &db]);
    let doc: Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(doc["run"]["status"], "finished");
    let attempts: Vec<&Value> = doc["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["nodeId"] == "s3")
        .collect();
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts.iter().any(|a| a["state"] == "cancelled"),
        "the interrupted attempt is closed as cancelled"
    );
    assert!(attempts.iter().any(|a| a["state"] == "finished"));
    assert_eq!(doc["outputs"].as_array().unwrap().len(), 5);

    // frames are numbered without gaps across the crash
    let frames = smithers(dir, &["frames", "crash-1", "--limit", "1000", "--db", &db]);
    let nums: Vec<i64> = String::from_utf8_lossy(&frames.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let mut sorted = nums.clone();
    sorted.sort();
    assert!(!sorted.is_empty());
    assert_eq!(sorted, (1..=sorted.len() as i64).collect::<Vec<_>>());
}

/// Value steps commit with the next step that acts outside the engine: the ones before a
/// command are durable once the command runs, so a SIGKILL then loses none of them.
#[test]
fn value_steps_before_a_command_survive_a_sigkill_while_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (started, release) = (dir.join("started"), dir.join("release"));
    let yaml = format!(
        "name: mixed\nsteps:\n  - task: {{id: v1, value: {{n: 1}}}}\n  - task: {{id: v2, value: {{n: 2}}}}\n  - task: {{id: s3, run: \"touch {s}; while [ ! -e {r} ]; do sleep 0.05; done; echo '{{\\\"n\\\": 3}}'\", output: {{type: object}}}}\n  - task: {{id: v4, value: {{n: 4}}}}\n",
        s = started.display(),
        r = release.display()
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    let mut child = spawn_up(dir, "mixed-1", &db);
    let t0 = Instant::now();
    while !started.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "s3 never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let doc: Value = serde_json::from_slice(
        &smithers(dir, &["inspect", "mixed-1", "--json", "--db", &db]).stdout,
    )
    .unwrap();
    let outputs: Vec<&str> = doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["nodeId"].as_str())
        .collect();
    assert_eq!(
        outputs.len(),
        2,
        "v1 and v2 were committed before s3 ran: {outputs:?}"
    );
    assert!(outputs.contains(&"v1") && outputs.contains(&"v2"));
    std::fs::write(&release, "").unwrap();
    let output = resume_ok(dir, "mixed-1", &db);
    for (id, n) in [("v1", 1), ("v2", 2), ("s3", 3), ("v4", 4)] {
        assert_eq!(output[id]["n"], n, "{output}");
    }
}

#[test]
fn resume_orphans_takes_over_every_run_of_a_killed_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("log");
    let yaml = format!(
        "name: orphan\nsteps:\n  - task: {{id: a, run: \"echo a >> {l}\"}}\n  - task: {{id: slow, run: \"echo slow >> {l}; sleep 0.5\"}}\n  - task: {{id: b, run: \"echo b >> {l}\"}}\n",
        l = log.display()
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    let mut child = spawn_up(dir, "orphan-1", &db);
    wait_for(&log, "slow", Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();

    let out = smithers(dir, &["resume", "--orphans", "--db", &db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("taking over run orphan-1"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().filter(|l| *l == "a").count(), 1, "{text}");
    assert_eq!(text.lines().filter(|l| *l == "b").count(), 1, "{text}");
    // nothing left to take over
    let again = smithers(dir, &["resume", "--orphans", "--db", &db]);
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no orphaned runs"));
}

#[test]
fn fork_reruns_only_what_came_after_the_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("log");
    let yaml = format!(
        "name: f\nsteps:\n  - task: {{id: a, run: \"echo a >> {l}\"}}\n  - task: {{id: b, run: \"echo b >> {l}\"}}\n",
        l = log.display()
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    let out = smithers(dir, &["up", "wf.yaml", "--run-id", "orig", "--db", &db]);
    assert_eq!(out.status.code(), Some(0));
    let out = smithers(
        dir,
        &[
            "fork",
            "orig",
            "--frame",
            "2",
            "--new-run-id",
            "copy",
            "--db",
            &db,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text, "a\nb\nb\n", "only `b` ran again");
    let bad = smithers(dir, &["fork", "orig", "--frame", "99", "--db", &db]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("error[INVALID_INPUT]"));
}

#[test]
fn rewind_needs_yes_and_resume_continues_from_the_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("log");
    let yaml = format!(
        "name: r\nsteps:\n  - task: {{id: a, run: \"echo a >> {l}\"}}\n  - task: {{id: b, run: \"echo b >> {l}\"}}\n",
        l = log.display()
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    assert_eq!(
        smithers(dir, &["up", "wf.yaml", "--run-id", "rw", "--db", &db])
            .status
            .code(),
        Some(0)
    );
    let no = smithers(dir, &["rewind", "rw", "--frame", "2", "--db", &db]);
    assert_eq!(no.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no.stderr).contains("--yes"));
    let out = smithers(dir, &["rewind", "rw", "--frame", "2", "--yes", "--db", &db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["toFrameNo"], 2);
    let resumed = smithers(dir, &["resume", "rw", "--db", &db]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\nb\n");
}

/// A run on a disk that fills up stalls (nothing is lost; it is driven again once storage
/// works). SIGTERM then cannot record the cancellation: `up` must still end, within its grace
/// period, saying how to continue, and the run must continue elsewhere from what was stored.
/// The disk is a 600 KiB tmpfs in a mount namespace of its own (`unshare`).
#[test]
fn sigterm_ends_up_while_a_full_disk_stalls_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("small")).unwrap();
    std::fs::write(
        dir.join("fill.yaml"),
        "name: fill\nsteps:\n  - loop:\n      id: l\n      max_iterations: 60\n      steps:\n        - task: {id: a, run: \"head -c 3000 /dev/zero | tr '\\\\0' x\"}\n",
    )
    .unwrap();
    // the tmpfs exists only inside the namespace: the database is copied out when `up` ends
    let script = r#"mount -t tmpfs -o size=600k tmpfs "$1/small" || exit 99
"$2" up "$1/fill.yaml" --db "$1/small/f.db" --run-id full >/dev/null 2>"$1/err.txt" &
echo $! > "$1/pid"
wait $!
rc=$?
mkdir -p "$1/kept" && cp "$1"/small/f.db* "$1/kept/"
exit $rc"#;
    let root = nix::unistd::Uid::effective().is_root();
    let mut args = vec![if root { "--mount" } else { "--map-root-user" }];
    if !root {
        args.push("--mount");
    }
    let sh = Command::new("unshare")
        .args(&args)
        .args(["sh", "-c", script, "sh"])
        .arg(dir)
        .arg(env!("CARGO_BIN_EXE_smithers"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // a failed assertion must not leave `up` running on its full disk
    struct Cleanup(std::process::Child, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(pid) = std::fs::read_to_string(&self.1)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Cleanup(sh, dir.join("pid"));
    let sh = &mut guard.0;
    let err = dir.join("err.txt");
    let t0 = Instant::now();
    while !dir.join("pid").exists() || !err.exists() {
        if let Some(st) = sh.try_wait().unwrap() {
            assert!(
                root,
                "unshare could not give this user a mount namespace ({st}); run as root"
            );
            panic!("the tmpfs could not be mounted: {st}");
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "up never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(
        &err,
        "driver stopped on a storage error",
        Duration::from_secs(30),
    );
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = sh.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "up did not end after SIGTERM while storage failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("stopping (SIGTERM): cancelling run full"),
        "{text}"
    );
    assert!(
        text.contains("run full left as storage last recorded it (it did not stop within 10 s of the signal); `smithers resume full` continues it"),
        "{text}"
    );
    // a checkpoint that fails every round is logged once, not several times a second
    let checkpoint_warnings = text.matches("checkpoint failed").count();
    assert!(checkpoint_warnings <= 1, "{text}");

    // with room again, the run continues from what was stored and finishes
    let out = resume_ok(&dir.join("kept"), "full", "f.db");
    assert_eq!(out["a"]["exitCode"], 0, "{out}");
    assert_eq!(
        out["a"]["stdout"].as_str().map(str::len),
        Some(3000),
        "{out}"
    );
}
