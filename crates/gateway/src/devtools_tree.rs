//! DevTools trees (gateway-protocol §1.12): a frame's tree as `DevToolsNode`s with stable
//! 31-bit ids. Pure functions of the frame, so snapshots, streams and the diff share them.

use serde::Serialize;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};

/// Deeper children are replaced by a `[MaxDepth]` marker.
pub const MAX_DEPTH: usize = 256;

/// FNV-1a 32-bit over UTF-16 code units, masked to 31 bits.
pub fn fnv31(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for unit in s.encode_utf16() {
        // one step per UTF-16 code unit, as the reference implementation does with charCodeAt
        h ^= u32::from(unit);
        h = h.wrapping_mul(16_777_619);
    }
    h & 0x7fff_ffff
}

/// The empty tree of a run with no frames, as JSON.
pub fn empty_root() -> Value {
    empty_node().to_json()
}

/// The tag a node is rendered under. Approvals are stored as `smithers:approval` but shown as
/// upstream renders `<Approval>`: a `smithers:task` (same type, name and identity), so clients
/// that collect task nodes find them.
fn shown_tag(tag: &str) -> &str {
    match tag {
        "smithers:approval" => "smithers:task",
        t => t,
    }
}

fn node_type(tag: &str) -> &'static str {
    match tag {
        "smithers:workflow" => "workflow",
        "smithers:task" => "task",
        "smithers:sequence" => "sequence",
        "smithers:parallel" => "parallel",
        "smithers:merge-queue" => "merge-queue",
        "smithers:branch" => "branch",
        "smithers:ralph" => "loop",
        "smithers:worktree" => "worktree",
        "smithers:approval" => "approval",
        "smithers:timer" => "timer",
        "smithers:subflow" => "subflow",
        "smithers:wait-for-event" => "wait-for-event",
        "smithers:saga" => "saga",
        "smithers:try-catch-finally" => "try-catch",
        _ => "unknown",
    }
}

/// A frame prop string read back as the value it was written from.
fn parse_prop(s: &str) -> Value {
    match s {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        "null" => return Value::Null,
        _ => {}
    }
    let numeric = {
        let t = s.strip_prefix('-').unwrap_or(s);
        let (int, frac) = t.split_once('.').map_or((t, None), |(a, b)| (a, Some(b)));
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
    };
    if numeric
        && let Ok(n) = s.parse::<f64>()
        && let Some(v) = serde_json::Number::from_f64(n)
    {
        return if n.fract() == 0.0 && n.abs() < 9.0e15 {
            json!(n as i64)
        } else {
            Value::Number(v)
        };
    }
    if ((s.starts_with('{') && s.ends_with('}')) || (s.starts_with('[') && s.ends_with(']')))
        && let Ok(v) = serde_json::from_str(s)
    {
        return v;
    }
    Value::String(s.to_string())
}

/// A DevTools node (gateway-protocol §1.12). Typed rather than a JSON map so building, diffing
/// and serializing a large tree stay cheap, and fields serialize in the reference order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevNode {
    pub id: u32,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    pub props: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskInfo>,
    pub children: Vec<DevNode>,
    pub depth: usize,
}

/// The `task` field of task nodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskInfo {
    pub node_id: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_table_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iteration: Option<i64>,
}

impl DevNode {
    /// The tree as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The empty tree of a run with no frames.
pub fn empty_node() -> DevNode {
    DevNode {
        id: 0,
        kind: "workflow",
        name: "(empty)".into(),
        props: Map::new(),
        task: None,
        children: Vec::new(),
        depth: 0,
    }
}

struct Builder {
    used: HashSet<u32>,
}

fn str_prop(props: &Map<String, Value>, k: &str) -> Option<String> {
    props.get(k).and_then(Value::as_str).map(str::to_string)
}

impl Builder {
    fn id_for(&mut self, path: &str) -> u32 {
        let mut id = fnv31(path);
        let mut salt = 1;
        while self.used.contains(&id) && salt <= 1024 {
            id = fnv31(&format!("{path}\u{0}{salt}"));
            salt += 1;
        }
        self.used.insert(id);
        id
    }

    fn node(&mut self, el: &Value, path: &str, depth: usize) -> DevNode {
        let stored_tag = el.get("tag").and_then(Value::as_str).unwrap_or("");
        let approval = stored_tag == "smithers:approval";
        let tag = shown_tag(stored_tag);
        let ty = node_type(tag);
        let empty = Map::new();
        let raw_props = el.get("props").and_then(Value::as_object).unwrap_or(&empty);
        let mut props = Map::new();
        for (k, v) in raw_props {
            props.insert(
                k.clone(),
                v.as_str().map(parse_prop).unwrap_or_else(|| v.clone()),
            );
        }
        let name = match (ty, props.get("name").and_then(Value::as_str)) {
            ("workflow", Some(n)) => n.to_string(),
            _ => tag
                .strip_prefix("smithers:")
                .filter(|t| !t.is_empty())
                .unwrap_or(if tag.is_empty() { "unknown" } else { tag })
                .to_string(),
        };
        let id = self.id_for(path);
        let task = (ty == "task").then(|| {
            let node_id = raw_props
                .get("id")
                .or_else(|| raw_props.get("nodeId"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let (node_id, iteration) = match node_id.rsplit_once("::") {
                Some((n, i)) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
                    (n, i.parse::<i64>().ok())
                }
                _ => (node_id, None),
            };
            // an approval is a compute task whose label defaults to its title, as upstream's
            let kind = match props.get("kind").and_then(Value::as_str) {
                Some("agent") => "agent",
                Some("run") | Some("compute") => "compute",
                _ if approval => "compute",
                _ => "static",
            };
            let label = str_prop(&props, "label")
                .or_else(|| approval.then(|| str_prop(&props, "title")).flatten());
            TaskInfo {
                node_id: node_id.to_string(),
                kind,
                agent: str_prop(&props, "agent"),
                label,
                output_table_name: str_prop(&props, "outputTableName")
                    .or_else(|| str_prop(&props, "output")),
                iteration: props.get("iteration").and_then(Value::as_i64).or(iteration),
            }
        });
        let mut children = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let kids: &[Value] = el
            .get("children")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for (index, c) in kids
            .iter()
            .filter(|c| c.get("kind").and_then(Value::as_str) == Some("element"))
            .enumerate()
        {
            if depth + 1 > MAX_DEPTH {
                let p = format!("{path}/__maxdepth__{index}");
                let mut marker = empty_node();
                marker.id = self.id_for(&p);
                marker.kind = "unknown";
                marker.name = "[MaxDepth]".into();
                marker.props.insert("value".into(), json!("[MaxDepth]"));
                marker.depth = MAX_DEPTH + 1;
                children.push(marker);
                continue;
            }
            let frag = fragment(c);
            let k = seen.entry(frag.clone()).or_insert(0);
            let child_path = if *k == 0 {
                format!("{path}/{frag}")
            } else {
                format!("{path}/{frag}[{k}]")
            };
            *k += 1;
            children.push(self.node(c, &child_path, depth + 1));
        }
        DevNode {
            id,
            kind: ty,
            name,
            props,
            task,
            children,
            depth,
        }
    }
}

fn fragment(el: &Value) -> String {
    let tag = shown_tag(el.get("tag").and_then(Value::as_str).unwrap_or(""));
    let props = el.get("props");
    match props
        .and_then(|p| p.get("id").or_else(|| p.get("nodeId")))
        .and_then(Value::as_str)
    {
        Some(id) => format!("{tag}#{id}"),
        None => tag.to_string(),
    }
}

/// Builds the DevTools tree of a frame's tree JSON.
pub fn build(frame: &Value) -> DevNode {
    if frame.get("kind").and_then(Value::as_str) != Some("element") {
        return empty_node();
    }
    let mut b = Builder {
        used: HashSet::new(),
    };
    b.node(frame, &fragment(frame), 0)
}

/// The root tag of every frame since frames gained a workflow root, as upstream's.
pub const WORKFLOW_TAG: &str = "smithers:workflow";

/// [`build`] for a frame of a run of workflow `workflow_name`. Frames stored before frames had a
/// `smithers:workflow` root hold the steps' element at the top; they are shown under the root
/// that later frames have, so their ids and shape match the frames after them.
pub fn build_frame(frame: &Value, workflow_name: &str) -> DevNode {
    let is_element = frame.get("kind").and_then(Value::as_str) == Some("element");
    if !is_element || frame.get("tag").and_then(Value::as_str) == Some(WORKFLOW_TAG) {
        return build(frame);
    }
    build(&json!({
        "kind": "element",
        "tag": WORKFLOW_TAG,
        "props": {"name": workflow_name},
        "children": [frame],
    }))
}

/// [`build`], as JSON.
pub fn tree(frame: &Value) -> Value {
    build(frame).to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_test_vectors() {
        assert_eq!(fnv31("smithers:workflow"), 1_753_301_139);
        assert_eq!(
            fnv31("smithers:workflow/smithers:task#task-a::0"),
            502_254_470
        );
        assert_eq!(fnv31("smithers:workflow/smithers:task#a::0"), 2_079_356_704);
        assert_eq!(fnv31("smithers:workflow/smithers:task#b::0"), 304_353_751);
        assert_eq!(fnv31("unknown"), 460_693_433);
    }

    #[test]
    fn ids_are_stable_when_siblings_move() {
        let task = |id: &str| json!({"kind": "element", "tag": "smithers:task", "props": {"id": id}, "children": []});
        let a = json!({"kind": "element", "tag": "smithers:workflow", "props": {"name": "w"}, "children": [task("a::0"), task("b::0")]});
        let b = json!({"kind": "element", "tag": "smithers:workflow", "props": {"name": "w"}, "children": [task("b::0"), task("a::0")]});
        let (ta, tb) = (tree(&a), tree(&b));
        assert_eq!(ta["id"], 1_753_301_139);
        assert_eq!(ta["name"], "w");
        assert_eq!(ta["children"][0]["id"], 2_079_356_704);
        assert_eq!(
            ta["children"][0]["task"],
            json!({"nodeId": "a", "kind": "static", "iteration": 0})
        );
        assert_eq!(ta["children"][0]["id"], tb["children"][1]["id"]);
        assert_eq!(tb["children"][1]["depth"], 1);
    }

    #[test]
    fn approvals_are_task_nodes_labelled_by_their_title() {
        let gate = json!({"kind": "element", "tag": "smithers:approval",
            "props": {"id": "ship-gate", "kind": "approval", "title": "Ship it?", "mode": "decision"}, "children": []});
        let root = json!({"kind": "element", "tag": "smithers:workflow", "props": {"name": "w"}, "children": [gate]});
        let t = tree(&root);
        let n = &t["children"][0];
        assert_eq!(
            (n["type"].as_str(), n["name"].as_str()),
            (Some("task"), Some("task"))
        );
        assert_eq!(
            n["task"],
            json!({"nodeId": "ship-gate", "kind": "compute", "label": "Ship it?"})
        );
        // the id upstream gives `<Approval id="ship-gate">`, a smithers:task
        assert_eq!(n["id"], fnv31("smithers:workflow/smithers:task#ship-gate"));
    }

    #[test]
    fn frames_without_the_workflow_root_are_shown_under_one() {
        let task = json!({"kind": "element", "tag": "smithers:task", "props": {"id": "a"}, "children": []});
        let steps =
            json!({"kind": "element", "tag": "smithers:sequence", "props": {}, "children": [task]});
        let old = build_frame(&steps, "hello");
        let new = build_frame(
            &json!({"kind": "element", "tag": "smithers:workflow", "props": {"name": "hello"}, "children": [steps]}),
            "hello",
        );
        assert_eq!(old, new);
        assert_eq!(old.name, "hello");
        assert_eq!(old.id, 1_753_301_139);
        assert_eq!(build_frame(&json!(null), "hello"), empty_node());
    }

    #[test]
    fn props_are_read_back_and_repeats_get_distinct_ids() {
        let el = |props: Value| json!({"kind": "element", "tag": "smithers:sequence", "props": props, "children": []});
        let root = json!({"kind": "element", "tag": "smithers:parallel", "props": {"maxConcurrency": "2", "x": "true", "j": "[1,2]", "s": "hi"},
            "children": [el(json!({})), el(json!({})), {"kind": "text", "text": "ignored"}]});
        let t = tree(&root);
        assert_eq!(
            t["props"],
            json!({"j": [1, 2], "maxConcurrency": 2, "s": "hi", "x": true})
        );
        assert_eq!(t["children"].as_array().unwrap().len(), 2);
        assert_ne!(t["children"][0]["id"], t["children"][1]["id"]);
        assert_eq!(tree(&json!("null")), empty_root());
    }
}
