//! Finding the JSON result in an agent's reply (engine-model §7.4, steps 1–6). Agents answer in
//! prose with the result somewhere in it; the order below prefers the most explicit signal:
//! structured output, then a reply that is JSON, then the last fenced block, then the
//! intermediate messages, then any object in the text.

use super::Reply;
use serde_json::Value;

/// The reply's JSON result, or None when there is none (a repair turn asks again).
pub(crate) fn extract(reply: &Reply) -> Option<Value> {
    if let Some(v) = reply.structured.as_ref().filter(|v| !v.is_null()) {
        return Some(v.clone());
    }
    let text = reply.text.trim_start_matches('\u{feff}').trim();
    if (text.starts_with('{') || text.starts_with('['))
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        return Some(v);
    }
    if let Some(v) = last_fence(text) {
        return Some(v);
    }
    for step in reply.steps.iter().rev() {
        if let Some(v) = last_fence(step) {
            return Some(v);
        }
    }
    for step in reply.steps.iter().rev() {
        if let Some(v) = first_object(step) {
            return Some(v);
        }
    }
    last_object(text)
}

/// The last ```` ```json ```` fence (or a bare ```` ``` ```` fence whose content starts with `{`):
/// its whole content when that parses, else the first balanced object after the fence.
fn last_fence(text: &str) -> Option<Value> {
    let mut best: Option<usize> = None;
    let mut search = 0;
    while let Some(i) = text[search..].find("```") {
        let at = search + i;
        let after = &text[at + 3..];
        let tagged = after.starts_with("json") || after.starts_with("JSON");
        let bare = after.trim_start().starts_with('{');
        if tagged || bare {
            best = Some(at);
        }
        search = at + 3;
    }
    let at = best?;
    let body_start = text[at + 3..]
        .find('\n')
        .map(|n| at + 3 + n + 1)
        .unwrap_or(at + 3);
    let body_start = if text[at + 3..].trim_start().starts_with('{') {
        // a bare fence may hold the object on the fence line itself
        at + 3
    } else {
        body_start
    };
    let rest = text.get(body_start..)?;
    let body = match rest.find("```") {
        Some(end) => &rest[..end],
        None => rest,
    };
    if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
        return Some(v);
    }
    first_object(rest)
}

/// The first balanced `{…}` in `text` that parses as JSON.
fn first_object(text: &str) -> Option<Value> {
    let mut from = 0;
    while let Some(i) = text[from..].find('{') {
        let start = from + i;
        if let Some(end) = balanced_end(text, start)
            && let Ok(v) = serde_json::from_str::<Value>(&text[start..end])
        {
            return Some(v);
        }
        from = start + 1;
    }
    None
}

/// The last top-level balanced `{…}` in `text` that parses (an object nested inside a later
/// one does not win over the object containing it).
fn last_object(text: &str) -> Option<Value> {
    let mut found = None;
    let mut from = 0;
    while let Some(i) = text[from..].find('{') {
        let start = from + i;
        match balanced_end(text, start)
            .and_then(|end| Some((end, serde_json::from_str::<Value>(&text[start..end]).ok()?)))
        {
            Some((end, v)) => {
                found = Some(v);
                from = end;
            }
            None => from = start + 1,
        }
    }
    found
}

/// The byte index just past the `}` that closes the `{` at `start`, honouring JSON strings.
fn balanced_end(text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(text: &str) -> Reply {
        Reply {
            text: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn structured_output_wins() {
        let mut r = reply("{\"a\": 1}");
        r.structured = Some(json!({"b": 2}));
        assert_eq!(extract(&r), Some(json!({"b": 2})));
    }

    #[test]
    fn whole_text_with_bom() {
        assert_eq!(
            extract(&reply("\u{feff} {\"a\": 1}\n")),
            Some(json!({"a": 1}))
        );
        assert_eq!(extract(&reply("[1, 2]")), Some(json!([1, 2])));
    }

    #[test]
    fn last_json_fence() {
        let t = "First try:\n```json\n{\"a\": 1}\n```\nBetter:\n```json\n{\"a\": 2, \"s\": \"}```\"}\n```\nDone.";
        assert_eq!(extract(&reply(t)), Some(json!({"a": 2, "s": "}```"})));
        // a bare fence holding an object counts; a fence of another language does not
        let t = "```sh\nls {a,b}\n```\n```\n{\"ok\": true}\n```";
        assert_eq!(extract(&reply(t)), Some(json!({"ok": true})));
        // broken content inside the fence: the first balanced object after it
        let t = "```json\nresult: {\"ok\": false}\n```";
        assert_eq!(extract(&reply(t)), Some(json!({"ok": false})));
    }

    #[test]
    fn steps_from_last_to_first() {
        let r = Reply {
            text: "all done, see above".into(),
            steps: vec![
                "```json\n{\"n\": 1}\n```".into(),
                "then {\"n\": 2} and {\"n\": 3}".into(),
            ],
            ..Default::default()
        };
        // fenced objects first (step 4), from the last step backwards
        assert_eq!(extract(&r), Some(json!({"n": 1})));
        let r = Reply {
            text: "no json".into(),
            steps: vec!["{\"n\": 1}".into(), "then {\"n\": 2} and {\"n\": 3}".into()],
            ..Default::default()
        };
        // then the first balanced object of the last step that has one (step 5)
        assert_eq!(extract(&r), Some(json!({"n": 2})));
    }

    #[test]
    fn last_balanced_object_in_prose() {
        let t = "I {think} the answer is {\"x\": {\"y\": 1}} and finally {\"z\": \"{\"} ok";
        assert_eq!(extract(&reply(t)), Some(json!({"z": "{"})));
        let t = "outer {\"x\": {\"y\": 1}} trailing";
        assert_eq!(extract(&reply(t)), Some(json!({"x": {"y": 1}})));
    }

    #[test]
    fn nothing_found() {
        assert_eq!(extract(&reply("{\"approved\": yes}")), None);
        assert_eq!(extract(&reply("no braces here")), None);
        assert_eq!(extract(&reply("```json\n{\"a\": \n```")), None);
    }
}
