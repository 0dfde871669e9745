//! Backpressure and amplification (issue 9, items 11–13), over real sockets: clients that do
//! not read, replays that would not fit in memory, and floods of DevTools streams.
//!
//! These tests measure this process's memory (VmRSS, with the allocator's free pages given
//! back first) and CPU time, so they run one at a time (`SERIAL`); figures are printed
//! (`--nocapture`) and only memory has a (generous) bound.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use smithers_gateway::server_config::ServerConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A run that writes `bytes` of output (1,000-character lines on stderr) as fast as it can:
/// task.output events of up to 16 KiB each.
fn chatty(bytes: usize) -> String {
    format!(
        "name: chatty\nsteps:\n  - task: {{id: out, run: \"head -c {bytes} /dev/zero | tr -c x x | fold -w 1000 1>&2\"}}\n"
    )
}

/// A run whose task writes short lines from four loops at once, each line after a short sleep:
/// about 1,200 events over a second or so.
const TRICKLE: &str = "name: trickle\nsteps:\n  - task: {id: out, run: \"for l in 1 2 3 4; do (i=0; while [ $i -lt 300 ]; do echo line $l $i; i=$((i+1)); sleep 0.001; done) & done; wait\"}\n";

async fn create_run(s: &TestServer, workflow: &str, run_id: &str) {
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": workflow, "runId": run_id}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// An event as a test follows it: name, runId, eventSeq (-1 without one).
type Seen = (String, String, i64);

/// Reads every frame of a client in the background and passes its events on.
fn follow(mut w: Ws) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        #[derive(serde::Deserialize)]
        struct Frame<'a> {
            #[serde(borrow)]
            event: Option<&'a str>,
            #[serde(borrow)]
            payload: Option<Payload<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Payload<'a> {
            #[serde(rename = "runId", borrow)]
            run_id: Option<&'a str>,
            #[serde(rename = "eventSeq")]
            event_seq: Option<i64>,
        }
        while let Some(Ok(m)) = w.next().await {
            if let Message::Close(c) = &m {
                eprintln!("a following client was closed: {c:?}");
            }
            let Message::Text(t) = m else { continue };
            // only the fields needed (a following client must keep up with the load)
            let f: Frame = serde_json::from_str(&t).unwrap();
            let (Some(event), Some(p)) = (f.event, f.payload) else {
                continue;
            };
            let seen = (
                event.to_string(),
                p.run_id.unwrap_or_default().to_string(),
                p.event_seq.unwrap_or(-1),
            );
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    rx
}

/// The `eventSeq`s of the task.output events of `runs`, as received until each run completed.
async fn outputs_until_completed(
    events: &mut mpsc::UnboundedReceiver<Seen>,
    runs: &[String],
) -> HashMap<String, Vec<i64>> {
    let mut outputs: HashMap<String, Vec<i64>> = HashMap::new();
    let mut open: std::collections::HashSet<&String> = runs.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (event, run, seq) = tokio::time::timeout(left, events.recv())
            .await
            .expect("runs did not complete in time")
            .expect("the normal client's socket ended");
        match event.as_str() {
            "task.output" => outputs.entry(run).or_default().push(seq),
            "run.completed" => {
                open.remove(&run);
            }
            _ => {}
        }
    }
    outputs
}

/// The eventSeqs of a run's output events in its durable log.
async fn logged_outputs(s: &TestServer, run_id: &str) -> Vec<i64> {
    let rows =
        s.gw.store
            .list_events(run_id, None, 1_000_000)
            .await
            .unwrap();
    rows.iter()
        .filter(|r| r.event_type == "NodeOutput")
        .map(|r| r.seq)
        .collect()
}

/// The eventSeqs of every event of a run's log that is sent to clients.
async fn logged_broadcasts(s: &TestServer, run_id: &str) -> Vec<i64> {
    let rows =
        s.gw.store
            .list_events(run_id, None, 1_000_000)
            .await
            .unwrap();
    rows.iter()
        .filter(|r| {
            let p: Value = serde_json::from_str(&r.payload_json).unwrap();
            smithers_gateway::broadcast::map_event(&r.event_type, run_id, r.seq, &p).is_some()
        })
        .map(|r| r.seq)
        .collect()
}

/// Reads a client that stopped reading until its close frame (`None`: the connection ended
/// without one).
async fn read_until_close(w: &mut Ws) -> Option<CloseFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => return c,
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

const QUEUE_FULL: &str = "smithers_gateway_slow_consumer_disconnects_total{reason=\"queue_full\"}";
const WRITE_TIMEOUT: &str =
    "smithers_gateway_slow_consumer_disconnects_total{reason=\"write_timeout\"}";

/// Starts `n` chatty runs named `prefix-i`.
async fn start_runs(s: &TestServer, prefix: &str, n: usize) -> Vec<String> {
    let mut runs = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        create_run(s, "chatty", &id).await;
        runs.push(id);
    }
    runs
}

/// Once `sample` shows the slow client was cut off, reads it to its close frame.
fn read_when_cut_off(
    s: &TestServer,
    mut slow: Ws,
    sample: &'static str,
) -> tokio::task::JoinHandle<Option<CloseFrame>> {
    let addr = s.addr;
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(240);
        while metric(addr, sample).await < 1.0 {
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        read_until_close(&mut slow).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_client_is_disconnected_not_buffered() {
    let _serial = SERIAL.lock().await;
    // the default bound (16 MiB): room for a reading client's bursts, far less than the load
    let config = ServerConfig::default();
    let s = start(Spec {
        workflows: vec![("chatty", chatty(4 << 20))],
        config,
        ..Default::default()
    })
    .await;
    let mut normal = ws(s.addr).await;
    connect(&mut normal, hello_params()).await;
    let mut events = follow(normal);

    // the same load first with nobody slow, so caches and the allocator reach their steady state
    for round in 0..2 {
        let warm = start_runs(&s, &format!("warm{round}"), 8).await;
        outputs_until_completed(&mut events, &warm).await;
    }
    let before = live_rss_kib();

    let mut slow = ws_small_receive_buffer(s.addr).await;
    connect(&mut slow, hello_params()).await;
    let slow = read_when_cut_off(&s, slow, QUEUE_FULL);
    let t0 = Instant::now();
    // three waves like the warm-up ones, 96 MiB in all
    let mut heavy = Vec::new();
    let mut got = HashMap::new();
    for wave in 0..3 {
        let runs = start_runs(&s, &format!("heavy{wave}"), 8).await;
        got.extend(outputs_until_completed(&mut events, &runs).await);
        heavy.extend(runs);
    }
    let after = live_rss_kib();
    let took = t0.elapsed();

    let mut total = 0;
    for run in &heavy {
        let logged = logged_outputs(&s, run).await;
        total += logged.len();
        assert_eq!(
            got.get(run).cloned().unwrap_or_default(),
            logged,
            "the reading client missed events of {run}"
        );
    }
    let grown = after.saturating_sub(before);
    eprintln!(
        "96 MiB of task.output in {total} events over {took:?}; VmRSS {before} KiB -> {after} KiB (+{grown} KiB)"
    );
    // the bound is 16 MiB, and it is given back once the client is cut off
    assert!(
        grown < 32 * 1024,
        "memory grew by {grown} KiB while a client did not read"
    );
    let close = slow.await.unwrap().expect("no close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("max_outbound_frames"), "{close:?}");
    assert_eq!(metric(s.addr, QUEUE_FULL).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stalled_past_the_write_timeout_is_dropped() {
    let _serial = SERIAL.lock().await;
    let mut config = ServerConfig::default();
    config.limits.write_timeout_ms = 1_000;
    let s = start(Spec {
        // more than the socket buffers hold, less than the queue (16 MiB): only the write
        // timeout can end it
        workflows: vec![("chatty", chatty(12 << 20))],
        config,
        ..Default::default()
    })
    .await;
    let mut normal = ws(s.addr).await;
    connect(&mut normal, hello_params()).await;
    let mut events = follow(normal);
    let mut slow = ws_small_receive_buffer(s.addr).await;
    connect(&mut slow, hello_params()).await;
    let slow = read_when_cut_off(&s, slow, WRITE_TIMEOUT);
    let runs = start_runs(&s, "stall", 1).await;
    let got = outputs_until_completed(&mut events, &runs).await;
    assert_eq!(got[&runs[0]], logged_outputs(&s, &runs[0]).await);
    let close = slow
        .await
        .unwrap()
        .expect("the stalled client was not closed");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("write_timeout_ms"), "{close:?}");
    assert_eq!(metric(s.addr, QUEUE_FULL).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_non_reading_socket_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let mut config = ServerConfig::default();
    config.limits.max_outbound_bytes = 1 << 20;
    config.limits.write_timeout_ms = 3_000;
    let s = start(Spec {
        // about 2,000 events of 16 KiB: each replay could send 1,000 of them (16 MiB)
        workflows: vec![("chatty", chatty(32 << 20))],
        config,
        ..Default::default()
    })
    .await;
    create_run(&s, "chatty", "log").await;
    wait_status(s.addr, "log", "finished").await;
    assert!(logged_outputs(&s, "log").await.len() > 1000);
    let before = live_rss_kib();

    // ten connects asking for the whole log, and not one byte read
    let mut w = ws_small_receive_buffer(s.addr).await;
    for i in 0..10 {
        let mut p = hello_params();
        p["afterSeq"] = json!({"log": -1});
        send(
            &mut w,
            json!({"type": "req", "id": format!("c{i}"), "method": "connect", "params": p}),
        )
        .await;
    }
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dropped = false;
    while Instant::now() < deadline {
        peak = peak.max(live_rss_kib());
        // either bound may cut it off first: the write timeout, or its queue filling up
        if metric(s.addr, WRITE_TIMEOUT).await + metric(s.addr, QUEUE_FULL).await >= 1.0 {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(live_rss_kib());
    let grown = peak.saturating_sub(before);
    eprintln!(
        "10 replays on a socket that never reads: VmRSS {before} KiB, peak {peak} KiB (+{grown} KiB)"
    );
    assert!(grown < 32 * 1024, "memory grew by {grown} KiB");
    assert!(dropped, "the non-reading socket was never dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_leaks_no_runs_outside_the_subscribe_list() {
    let _serial = SERIAL.lock().await;
    let s = start(Spec::default()).await;
    for id in ["mine", "theirs"] {
        create_run(&s, "hello", id).await;
        wait_status(s.addr, id, "finished").await;
    }
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["subscribe"] = json!(["mine"]);
    p["afterSeq"] = json!({"mine": -1, "theirs": -1});
    let hello = connect(&mut w, p).await;
    assert_eq!(hello["ok"], true, "{hello}");
    // requests are answered in order, so the replay is over when this answer arrives
    let mut events = Vec::new();
    call(&mut w, "h", "health", json!({}), &mut events).await;
    let runs: Vec<&str> = events
        .iter()
        .filter_map(|e| e["payload"]["runId"].as_str())
        .collect();
    assert!(runs.iter().all(|r| *r == "mine"), "{runs:?}");
    let seqs: Vec<i64> = events
        .iter()
        .filter_map(|e| e["payload"]["eventSeq"].as_i64())
        .collect();
    assert_eq!(seqs, logged_broadcasts(&s, "mine").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_past_the_window_says_where_it_stopped() {
    let _serial = SERIAL.lock().await;
    let s = start(Spec {
        workflows: vec![("chatty", chatty(24 << 20))],
        ..Default::default()
    })
    .await;
    create_run(&s, "chatty", "long").await;
    wait_status(s.addr, "long", "finished").await;
    // more than 1,000 events after the first one
    let all = logged_broadcasts(&s, "long").await;
    let after = all[0];
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["afterSeq"] = json!({"long": after});
    connect(&mut w, p).await;
    let mut events = Vec::new();
    call(&mut w, "h", "health", json!({}), &mut events).await;
    let seqs: Vec<i64> = events
        .iter()
        .filter(|e| e["event"] != "replay.truncated")
        .filter_map(|e| e["payload"]["eventSeq"].as_i64())
        .collect();
    let expected: Vec<i64> = all.iter().copied().filter(|s| *s > after).collect();
    assert!(expected.len() > 1000, "{} events", expected.len());
    assert_eq!(seqs, expected[..1000]);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "replay.truncated", "{last}");
    assert_eq!(last["payload"]["runId"], "long");
    assert_eq!(last["payload"]["reason"], "window");
    assert_eq!(last["payload"]["lastEventSeq"], json!(expected[999]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_racing_live_events_delivers_each_once_in_order() {
    let _serial = SERIAL.lock().await;
    let s = start(Spec {
        workflows: vec![("trickle", TRICKLE.to_string())],
        ..Default::default()
    })
    .await;
    create_run(&s, "trickle", "live").await;
    // reconnect while the run is writing: half of its events are in the log (reading and
    // sending them takes a while), more are coming
    while s.gw.store.last_event_seq("live").await.unwrap() < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["afterSeq"] = json!({"live": -1});
    connect(&mut w, p).await;
    let mut events = follow(w);
    let mut seqs = Vec::new();
    loop {
        let (event, run, seq) = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("the run did not complete")
            .expect("socket ended");
        if run != "live" {
            continue;
        }
        seqs.push(seq);
        if event == "run.completed" {
            break;
        }
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "events out of order or twice: {seqs:?}"
    );
    assert_eq!(seqs, logged_broadcasts(&s, "live").await);
}

const POLLERS: &str = "smithers_devtools_run_pollers";

/// The sample of a run's open-streams gauge.
fn subscribers(run_id: &str) -> String {
    format!(
        "smithers_devtools_active_subscribers{{runId=\"{}\"}}",
        smithers_gateway::stream_registry::run_label(run_id)
    )
}

/// Sends `n` streamDevTools requests at once and reads the answers: (ok, refused).
async fn open_streams(w: &mut Ws, tag: &str, run_id: &str, n: usize) -> (usize, Vec<Value>) {
    for i in 0..n {
        send(
            w,
            json!({"type": "req", "id": format!("{tag}{i}"), "method": "streamDevTools", "params": {"runId": run_id}}),
        )
        .await;
    }
    let (mut ok, mut refused, mut answered) = (0, Vec::new(), 0);
    while answered < n {
        let f = next(w).await;
        if f["type"] != "res" {
            continue;
        }
        answered += 1;
        if f["ok"] == true {
            ok += 1;
        } else {
            refused.push(f["error"].clone());
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flood_on_one_connection_is_capped() {
    let _serial = SERIAL.lock().await;
    let s = start(Spec::default()).await;
    create_run(&s, "hello", "watched").await;
    wait_status(s.addr, "watched", "finished").await;
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let (ok, refused) = open_streams(&mut w, "s", "watched", 3000).await;
    let c0 = cpu_ticks();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "{ok} idle streams on one run: {} CPU ticks in {:?}",
        cpu_ticks() - c0,
        t0.elapsed()
    );
    assert_eq!(ok, 32);
    assert_eq!(refused.len(), 2968);
    for e in &refused {
        assert_eq!(e["code"], "RateLimited");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("[server] max_streams_per_connection"), "{msg}");
    }
    // the 32 streams of the run share one poller
    assert_eq!(metric(s.addr, POLLERS).await, 1.0);
    assert_eq!(metric(s.addr, &subscribers("watched")).await, 32.0);
    // closing the socket gives every place back and stops the poller
    drop(w);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(s.addr, &subscribers("watched")).await > 0.0 || metric(s.addr, POLLERS).await > 0.0
    {
        assert!(Instant::now() < deadline, "streams or poller left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_connections_hit_the_server_cap() {
    let _serial = SERIAL.lock().await;
    let mut config = ServerConfig::default();
    config.limits.max_streams = 40;
    let s = start(Spec {
        config,
        ..Default::default()
    })
    .await;
    for id in ["r1", "r2"] {
        create_run(&s, "hello", id).await;
        wait_status(s.addr, id, "finished").await;
    }
    let mut a = ws(s.addr).await;
    connect(&mut a, hello_params()).await;
    let mut b = ws(s.addr).await;
    connect(&mut b, hello_params()).await;
    assert_eq!(open_streams(&mut a, "a", "r1", 32).await.0, 32);
    // 8 more reach the server's 40; the 41st is refused
    let (ok, refused) = open_streams(&mut b, "b", "r2", 9).await;
    assert_eq!(ok, 8);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["code"], "RateLimited");
    let msg = refused[0]["message"].as_str().unwrap();
    assert!(msg.contains("[server] max_streams)"), "{msg}");
    // two runs, two pollers, however many streams
    assert_eq!(metric(s.addr, POLLERS).await, 2.0);
    // a socket that goes away gives its places back
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(s.addr, &subscribers("r1")).await > 0.0 || metric(s.addr, POLLERS).await > 1.0 {
        assert!(Instant::now() < deadline, "places were not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open_streams(&mut b, "c", "r2", 1).await.0, 1);
    assert_eq!(metric(s.addr, &subscribers("r2")).await, 9.0);
}
