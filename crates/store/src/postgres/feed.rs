//! Events across nodes. A batch that appends events also sends, on commit, a notice on the
//! `smithers_events` channel (`pg_notify` inside the transaction, so a rolled-back batch
//! announces nothing): `<store instance> <first seq> <last seq> <run id>`, followed by a
//! newline and the events as a JSON array of `[seq, timestamp_ms, type, payload_json]` when
//! they fit in a notice. Other nodes then broadcast them without reading the log, which under
//! load had cost a query per notice and fallen seconds behind (issue 13). Each store that was
//! asked for [`crate::Store::foreign_events`] keeps one extra connection that `LISTEN`s on the
//! channel and forwards the notices of other instances. The connection is opened again when
//! it is lost; notices sent meanwhile are lost (the events stay in the log).

use super::now_ms;
use crate::{EventRef, EventRow};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{OnceCell, broadcast, oneshot};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Config, Connection, NoTls, Socket};

/// The channel notices travel on.
const CHANNEL: &str = "smithers_events";
/// Sends, for each run a transaction appended events to, the notice of those events
/// (delivered when the transaction commits): `$1` the instance, then per run `$2` its id, `$3`
/// how many events, `$4` whether the events may ride along. The transaction holds the runs'
/// event locks, so a run's events are its last `$3`. The events are left out when the notice
/// would pass [`MAX_NOTICE`] bytes; the payload stays a JSON string, so a stored payload that
/// is not JSON cannot fail the batch.
pub(crate) const NOTIFY_SQL: &str = "SELECT pg_notify('smithers_events',
     CASE WHEN r.carry AND octet_length(n.h) + 1 + octet_length(n.e) <= 7900
          THEN n.h || E'\\n' || n.e ELSE n.h END)
     FROM unnest($2::TEXT[], $3::BIGINT[], $4::BOOLEAN[]) AS r(run_id, count, carry)
     CROSS JOIN LATERAL
          (SELECT $1::TEXT || ' ' || MIN(seq) || ' ' || MAX(seq) || ' ' || r.run_id AS h,
                  json_agg(json_build_array(seq, timestamp_ms, type, payload_json) ORDER BY seq)::TEXT AS e
           FROM (SELECT seq, timestamp_ms, type, payload_json FROM _smithers_events
                 WHERE run_id = r.run_id ORDER BY seq DESC LIMIT r.count) AS last) AS n";
/// PostgreSQL refuses payloads of 8000 bytes or more (the literal in [`NOTIFY_SQL`]).
const MAX_NOTICE: usize = 7900;
/// Notices buffered per receiver before a slow one lags.
const CAPACITY: usize = 4096;
/// Pause before opening a lost listening connection again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// How long the first `foreign_events` call waits for `LISTEN` to be in place.
const READY_WAIT: Duration = Duration::from_secs(3);
/// How often an idle listener checks whether its store is gone.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// The notice for events `first..=last` of `run_id`; None when it would be too long to send
/// (then other nodes do not hear of these events).
pub(crate) fn notice(instance: &str, run_id: &str, first: i64, last: i64) -> Option<String> {
    let s = format!("{instance} {first} {last} {run_id}");
    (s.len() <= MAX_NOTICE).then_some(s)
}

/// Whether notices of `run_id` are short enough to send, whatever their seqs.
pub(crate) fn fits(instance: &str, run_id: &str) -> bool {
    notice(instance, run_id, i64::MIN, i64::MIN).is_some()
}

/// Whether a notice of `run_id` may carry its events: the newline before them must be the
/// first one in the notice.
pub(crate) fn may_carry(run_id: &str) -> bool {
    !run_id.contains('\n')
}

/// Whether a notice was sent by `instance` (its first word).
fn from_instance(payload: &str, instance: &str) -> bool {
    payload
        .strip_prefix(instance)
        .is_some_and(|rest| rest.starts_with(' '))
}

/// The sender's instance and what it committed; None for a malformed notice. Events that do
/// not parse or do not match the seqs are dropped (the receiver reads them from the log).
fn parse(payload: &str) -> Option<(&str, EventRef)> {
    let (head, body) = match payload.split_once('\n') {
        Some((h, b)) => (h, Some(b)),
        None => (payload, None),
    };
    let mut parts = head.splitn(4, ' ');
    let instance = parts.next()?;
    let first_seq = parts.next()?.parse().ok()?;
    let last_seq = parts.next()?.parse().ok()?;
    let run_id = parts.next()?.to_string();
    let events = body
        .and_then(|b| carried(&run_id, first_seq, last_seq, b))
        .unwrap_or_default();
    Some((
        instance,
        EventRef {
            run_id,
            first_seq,
            last_seq,
            events,
        },
    ))
}

/// The events a notice carried, if they are exactly `first..=last` in order.
fn carried(run_id: &str, first: i64, last: i64, body: &str) -> Option<Vec<EventRow>> {
    let rows: Vec<(i64, i64, String, String)> = serde_json::from_str(body).ok()?;
    let in_order = rows
        .iter()
        .enumerate()
        .all(|(i, r)| r.0 == first + i as i64);
    if !in_order || rows.last().map(|r| r.0) != Some(last) {
        return None;
    }
    Some(
        rows.into_iter()
            .map(|(seq, timestamp_ms, event_type, payload_json)| EventRow {
                run_id: run_id.to_string(),
                seq,
                timestamp_ms,
                event_type,
                payload_json,
            })
            .collect(),
    )
}

/// One store's side of the channel.
pub(crate) struct Feed {
    /// Signs this store's notices so its own listener skips them.
    pub(crate) instance: String,
    config: Config,
    tx: broadcast::Sender<EventRef>,
    started: OnceCell<()>,
}

impl Feed {
    pub(crate) fn new(config: Config) -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Feed {
            instance: format!("{}-{}", now_ms(), uuid::Uuid::new_v4().simple()),
            config,
            tx,
            started: OnceCell::new(),
        }
    }

    /// A receiver of other instances' notices; the first call starts the listener and waits
    /// (briefly) until it listens.
    pub(crate) async fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<EventRef> {
        let rx = self.tx.subscribe();
        self.started.get_or_init(|| self.start()).await;
        rx
    }

    async fn start(self: &Arc<Self>) {
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(listen_loop(
            Arc::downgrade(self),
            self.config.clone(),
            ready_tx,
        ));
        let _ = tokio::time::timeout(READY_WAIT, ready_rx).await;
    }
}

/// Why a listening connection stopped.
enum Ended {
    StoreDropped,
    Lost,
}

async fn listen_loop(feed: Weak<Feed>, config: Config, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    loop {
        if let Ended::StoreDropped = listen_once(&feed, &config, &mut ready).await {
            return;
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
        if feed.strong_count() == 0 {
            return;
        }
    }
}

/// One listening connection, until it is lost or the store is dropped.
async fn listen_once(
    feed: &Weak<Feed>,
    config: &Config,
    ready: &mut Option<oneshot::Sender<()>>,
) -> Ended {
    let Ok((client, mut connection)) = config.connect(NoTls).await else {
        return Ended::Lost;
    };
    {
        // The connection must be driven while LISTEN runs.
        let listen = client.batch_execute("LISTEN smithers_events");
        tokio::pin!(listen);
        loop {
            tokio::select! {
                r = &mut listen => match r {
                    Ok(()) => break,
                    Err(_) => return Ended::Lost,
                },
                m = next_message(&mut connection) => {
                    if let Some(end) = forward(feed, m) {
                        return end;
                    }
                }
            }
        }
    }
    if let Some(r) = ready.take() {
        let _ = r.send(());
    }
    loop {
        match tokio::time::timeout(IDLE_CHECK, next_message(&mut connection)).await {
            Ok(m) => {
                if let Some(end) = forward(feed, m) {
                    return end;
                }
            }
            Err(_) if feed.strong_count() == 0 => return Ended::StoreDropped,
            Err(_) => {}
        }
    }
}

/// The next message from the server; None when the connection is closed or broken.
async fn next_message(connection: &mut Connection<Socket, NoTlsStream>) -> Option<AsyncMessage> {
    std::future::poll_fn(|cx| connection.poll_message(cx))
        .await
        .and_then(Result::ok)
}

/// Passes a notice of another instance on; says why to stop, if the listener must.
fn forward(feed: &Weak<Feed>, message: Option<AsyncMessage>) -> Option<Ended> {
    let Some(message) = message else {
        return Some(Ended::Lost);
    };
    let Some(feed) = feed.upgrade() else {
        return Some(Ended::StoreDropped);
    };
    // this store's own notices are skipped before their events are parsed
    if let AsyncMessage::Notification(n) = message
        && n.channel() == CHANNEL
        && !from_instance(n.payload(), &feed.instance)
        && let Some((_, event)) = parse(n.payload())
    {
        // No receiver is not an error: nobody is watching right now.
        let _ = feed.tx.send(event);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_notices_are_told_by_their_first_word() {
        assert!(from_instance("me 1 2 run", "me"));
        assert!(!from_instance("meet 1 2 run", "me"));
        assert!(!from_instance("you 1 2 me", "me"));
        assert!(!from_instance("me", "me"));
    }

    #[test]
    fn notices_round_trip_and_run_ids_may_contain_spaces() {
        let n = notice("me", "run with spaces", 3, 5).unwrap_or_default();
        let parsed = parse(&n);
        assert_eq!(
            parsed,
            Some((
                "me",
                EventRef {
                    run_id: "run with spaces".into(),
                    first_seq: 3,
                    last_seq: 5,
                    events: vec![],
                }
            ))
        );
        assert_eq!(parse("me x 5 run"), None);
        assert_eq!(parse("me 1 2"), None);
        assert_eq!(notice("me", &"r".repeat(8000), 0, 0), None);
    }

    #[test]
    fn carried_events_are_kept_only_when_they_match_the_seqs() {
        let body = r#"[[3,10,"NodeStarted","{\"a\":1}"],[4,11,"NodeFinished","x"]]"#;
        let Some((_, r)) = parse(&format!("me 3 4 run-1\n{body}")) else {
            panic!("notice with events did not parse");
        };
        let got: Vec<(i64, i64, &str, &str)> = r
            .events
            .iter()
            .map(|e| {
                (
                    e.seq,
                    e.timestamp_ms,
                    e.event_type.as_str(),
                    e.payload_json.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (3, 10, "NodeStarted", r#"{"a":1}"#),
                (4, 11, "NodeFinished", "x")
            ]
        );
        assert!(r.events.iter().all(|e| e.run_id == "run-1"));
        // a gap, a wrong range or a body that is not the array: the seqs only
        for bad in [
            format!("me 3 5 run-1\n{body}"),
            format!("me 2 4 run-1\n{body}"),
            r#"me 3 4 run-1
[[4,11,"a","b"],[3,10,"a","b"]]"#
                .to_string(),
            "me 3 4 run-1\nnot json".to_string(),
        ] {
            let parsed = parse(&bad);
            assert!(
                matches!(&parsed, Some((_, r)) if r.events.is_empty() && r.run_id == "run-1"),
                "{bad}: {parsed:?}"
            );
        }
        assert!(NOTIFY_SQL.contains(&MAX_NOTICE.to_string()));
        assert!(!may_carry("a\nb") && may_carry("a b"));
    }
}
