//! DevTools deltas (gateway-protocol §1.12): the operations that turn one DevTools tree into
//! the next, so a client watching a run receives only what changed.

use crate::devtools_tree::{DevNode, TaskInfo};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// One delta operation, serialized as `{"op": "removeNode", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Op<'a> {
    RemoveNode {
        id: u32,
    },
    #[serde(rename_all = "camelCase")]
    AddNode {
        parent_id: u32,
        index: usize,
        node: &'a DevNode,
    },
    UpdateProps {
        id: u32,
        props: &'a Map<String, Value>,
    },
    UpdateTask {
        id: u32,
        task: Option<&'a TaskInfo>,
    },
    ReplaceRoot {
        node: &'a DevNode,
    },
}

struct Info<'a> {
    parent: Option<u32>,
    index: usize,
    node: &'a DevNode,
}

fn shape(n: &DevNode) -> (&str, &str, usize) {
    (n.kind, &n.name, n.depth)
}

fn index(root: &DevNode) -> (HashMap<u32, Info<'_>>, Vec<u32>) {
    let mut map = HashMap::new();
    let mut order = Vec::new();
    let mut stack = vec![(root, None, 0usize)];
    while let Some((n, parent, i)) = stack.pop() {
        order.push(n.id);
        map.insert(
            n.id,
            Info {
                parent,
                index: i,
                node: n,
            },
        );
        for (ci, c) in n.children.iter().enumerate().rev() {
            stack.push((c, Some(n.id), ci));
        }
    }
    (map, order)
}

/// Operations turning tree `a` into tree `b`: removals deepest first, then additions of whole
/// subtrees shallowest first, then prop and task updates (gateway-protocol §1.12).
pub fn ops<'b>(a: &DevNode, b: &'b DevNode) -> Vec<Op<'b>> {
    if a.id != b.id || shape(a) != shape(b) {
        return vec![Op::ReplaceRoot { node: b }];
    }
    let (ia, order_a) = index(a);
    let (ib, order_b) = index(b);
    let moved = |x: &Info, y: &Info| {
        x.parent != y.parent || x.index != y.index || shape(x.node) != shape(y.node)
    };
    let mut removed: Vec<(usize, u32)> = Vec::new();
    for id in &order_a {
        let x = &ia[id];
        match ib.get(id) {
            Some(y) if !moved(x, y) => {}
            _ => removed.push((x.node.depth, *id)),
        }
    }
    // stable: among equal depths keep document order
    removed.sort_by_key(|p| std::cmp::Reverse(p.0));
    let mut added = HashSet::new();
    for id in &order_b {
        let y = &ib[id];
        match ia.get(id) {
            Some(x) if !moved(x, y) => {}
            _ => {
                added.insert(*id);
            }
        }
    }
    let mut out: Vec<Op<'b>> = removed
        .iter()
        .map(|(_, id)| Op::RemoveNode { id: *id })
        .collect();
    let mut adds: Vec<(usize, u32)> = order_b
        .iter()
        .filter(|id| added.contains(id))
        .filter(|id| ib[id].parent.is_none_or(|p| !added.contains(&p)))
        .map(|id| (ib[id].node.depth, *id))
        .collect();
    adds.sort_by_key(|p| p.0);
    for (_, id) in adds {
        let y = &ib[&id];
        if let Some(parent_id) = y.parent {
            out.push(Op::AddNode {
                parent_id,
                index: y.index,
                node: y.node,
            });
        }
    }
    for id in &order_b {
        if added.contains(id) {
            continue;
        }
        let (Some(x), Some(y)) = (ia.get(id), ib.get(id)) else {
            continue;
        };
        if x.node.props != y.node.props {
            out.push(Op::UpdateProps {
                id: *id,
                props: &y.node.props,
            });
        }
        if x.node.task != y.node.task {
            out.push(Op::UpdateTask {
                id: *id,
                task: y.node.task.as_ref(),
            });
        }
    }
    out
}

fn id_of(n: &Value) -> u64 {
    n.get("id").and_then(Value::as_u64).unwrap_or(0)
}

/// Applies operations to a tree (what a client does); used to check [`ops`] round-trips.
pub fn apply(root: &Value, ops: &[Value]) -> Result<Value, String> {
    let mut root = root.clone();
    for op in ops {
        match op.get("op").and_then(Value::as_str) {
            Some("replaceRoot") => {
                root = op.get("node").cloned().ok_or("replaceRoot without node")?;
            }
            Some("removeNode") => {
                let id = op
                    .get("id")
                    .and_then(Value::as_u64)
                    .ok_or("removeNode id")?;
                remove(&mut root, id);
            }
            Some("addNode") => {
                let parent = op
                    .get("parentId")
                    .and_then(Value::as_u64)
                    .ok_or("addNode parentId")?;
                let index = op
                    .get("index")
                    .and_then(Value::as_u64)
                    .ok_or("addNode index")? as usize;
                let node = op.get("node").cloned().ok_or("addNode node")?;
                let p = find_mut(&mut root, parent).ok_or(format!("no parent {parent}"))?;
                let kids = p
                    .get_mut("children")
                    .and_then(Value::as_array_mut)
                    .ok_or("parent without children")?;
                if index > kids.len() {
                    return Err(format!("index {index} past {} children", kids.len()));
                }
                kids.insert(index, node);
            }
            Some(k @ ("updateProps" | "updateTask")) => {
                let id = op.get("id").and_then(Value::as_u64).ok_or("update id")?;
                let field = if k == "updateProps" { "props" } else { "task" };
                let n = find_mut(&mut root, id).ok_or(format!("no node {id}"))?;
                let v = op.get(field).cloned().unwrap_or(Value::Null);
                if let Some(o) = n.as_object_mut() {
                    if v.is_null() {
                        o.remove(field);
                    } else {
                        o.insert(field.into(), v);
                    }
                }
            }
            other => return Err(format!("unknown op {other:?}")),
        }
    }
    Ok(root)
}

fn remove(n: &mut Value, id: u64) -> bool {
    let Some(kids) = n.get_mut("children").and_then(Value::as_array_mut) else {
        return false;
    };
    if let Some(i) = kids.iter().position(|c| id_of(c) == id) {
        kids.remove(i);
        return true;
    }
    kids.iter_mut().any(|c| remove(c, id))
}

fn find_mut(n: &mut Value, id: u64) -> Option<&mut Value> {
    if id_of(n) == id {
        return Some(n);
    }
    n.get_mut("children")?
        .as_array_mut()?
        .iter_mut()
        .find_map(|c| find_mut(c, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devtools_tree::build;
    use serde_json::json;

    fn task(id: &str, label: &str) -> Value {
        json!({"kind": "element", "tag": "smithers:task", "props": {"id": id, "label": label}, "children": []})
    }
    fn wf(children: Vec<Value>) -> Value {
        json!({"kind": "element", "tag": "smithers:workflow", "props": {"name": "w"}, "children": children})
    }

    fn js(ops: &[Op]) -> Vec<Value> {
        ops.iter()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect()
    }

    #[test]
    fn identical_trees_have_no_ops() {
        let t = build(&wf(vec![task("a::0", "x")]));
        assert!(ops(&t, &t).is_empty());
    }

    #[test]
    fn label_change_is_a_prop_and_task_update() {
        let a = build(&wf(vec![task("a::0", "x")]));
        let b = build(&wf(vec![task("a::0", "y")]));
        let d = js(&ops(&a, &b));
        let kinds: Vec<&str> = d.iter().filter_map(|o| o["op"].as_str()).collect();
        assert_eq!(kinds, vec!["updateProps", "updateTask"]);
        assert_eq!(apply(&a.to_json(), &d).unwrap(), b.to_json());
    }

    #[test]
    fn removals_come_first_and_additions_carry_subtrees() {
        let seq = |kids: Vec<Value>| json!({"kind": "element", "tag": "smithers:sequence", "props": {"id": "s"}, "children": kids});
        let a = build(&wf(vec![task("a::0", "x"), task("b::0", "x")]));
        let b = build(&wf(vec![
            task("b::0", "x"),
            seq(vec![task("c::0", "x"), task("d::0", "x")]),
        ]));
        let d = js(&ops(&a, &b));
        let kinds: Vec<&str> = d.iter().filter_map(|o| o["op"].as_str()).collect();
        // a removed; b moved from index 1 to 0 (remove + add); the sequence added with its kids
        assert_eq!(
            kinds,
            vec!["removeNode", "removeNode", "addNode", "addNode"]
        );
        assert_eq!(apply(&a.to_json(), &d).unwrap(), b.to_json());
    }

    #[test]
    fn a_different_root_is_replaced() {
        let a = build(&wf(vec![]));
        let b = crate::devtools_tree::empty_node();
        assert_eq!(
            js(&ops(&a, &b)),
            vec![json!({"op": "replaceRoot", "node": b.to_json()})]
        );
    }
}
