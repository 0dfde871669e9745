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
    let roots: Vec<u32> = order_b
        .iter()
        .filter(|id| added.contains(id))
        .filter(|id| ib[id].parent.is_none_or(|p| !added.contains(&p)))
        .copied()
        .collect();
    for id in add_order(&roots, &ia, &ib, &order_a, &added) {
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

/// The order of the `addNode` operations (subtree roots only). As upstream: nodes that moved
/// first, in the old tree's order, then new nodes, shallowest first in the new tree's order.
/// Clients insert at `index` as JavaScript's `splice` does (an index past the end appends), so
/// that order rebuilds the new tree in the usual cases (siblings inserted before or between
/// moved nodes); where it would not for some parent, every addition goes shallowest first in the
/// new tree's order, which always does (each parent's children then arrive by rising index).
fn add_order(
    roots: &[u32],
    ia: &HashMap<u32, Info<'_>>,
    ib: &HashMap<u32, Info<'_>>,
    order_a: &[u32],
    added: &HashSet<u32>,
) -> Vec<u32> {
    let by_depth = |ids: &mut Vec<u32>| ids.sort_by_key(|id| ib[id].node.depth);
    let mut fallback = roots.to_vec();
    by_depth(&mut fallback);
    if roots.iter().all(|id| !ia.contains_key(id)) {
        return fallback;
    }
    let root_set: HashSet<u32> = roots.iter().copied().collect();
    let mut candidate: Vec<u32> = order_a
        .iter()
        .filter(|id| root_set.contains(id))
        .copied()
        .collect();
    let mut fresh: Vec<u32> = roots
        .iter()
        .filter(|id| !ia.contains_key(id))
        .copied()
        .collect();
    by_depth(&mut fresh);
    candidate.extend(fresh);
    // replay the insertions per parent, as a client does, and keep the order only if each
    // parent ends with the new tree's children
    let mut per_parent: HashMap<u32, Vec<u32>> = HashMap::new();
    for id in &candidate {
        if let Some(p) = ib[id].parent {
            per_parent.entry(p).or_default().push(*id);
        }
    }
    let rebuilds = per_parent.iter().all(|(p, inserts)| {
        let want: Vec<u32> = ib[p].node.children.iter().map(|c| c.id).collect();
        let mut kids: Vec<u32> = want
            .iter()
            .filter(|c| !added.contains(c))
            .copied()
            .collect();
        for id in inserts {
            kids.insert(ib[id].index.min(kids.len()), *id);
        }
        kids == want
    });
    if rebuilds { candidate } else { fallback }
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
                // as JavaScript's `splice`, which upstream's client uses: past the end appends
                kids.insert(index.min(kids.len()), node);
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

    fn adds(d: &[Value]) -> Vec<(u64, u64)> {
        d.iter()
            .filter(|o| o["op"] == "addNode")
            .map(|o| {
                (
                    o["node"]["id"].as_u64().unwrap(),
                    o["index"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn moved_nodes_are_added_before_new_ones_in_the_old_order() {
        let a = build(&wf(vec![task("a::0", "x"), task("b::0", "x")]));
        let b = build(&wf(vec![
            task("n::0", "x"),
            task("a::0", "x"),
            task("m::0", "x"),
            task("b::0", "x"),
        ]));
        let d = js(&ops(&a, &b));
        let id = |i: usize| u64::from(b.children[i].id);
        // a and b moved (index 0→1, 1→3): they come first, a before b as in the old tree;
        // then the new n and m
        assert_eq!(
            adds(&d),
            vec![(id(1), 1), (id(3), 3), (id(0), 0), (id(2), 2)]
        );
        assert_eq!(apply(&a.to_json(), &d).unwrap(), b.to_json());
    }

    #[test]
    fn an_order_that_would_not_rebuild_the_tree_falls_back_to_rising_indexes() {
        // moved-first inserts a at 3, b at 2, c at 1, d at 0 as splice does: [d, a, c, b]
        let names = ["a::0", "b::0", "c::0", "d::0"];
        let a = build(&wf(names.iter().map(|n| task(n, "x")).collect()));
        let b = build(&wf(names.iter().rev().map(|n| task(n, "x")).collect()));
        let d = js(&ops(&a, &b));
        let idx: Vec<u64> = adds(&d).iter().map(|p| p.1).collect();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        assert_eq!(apply(&a.to_json(), &d).unwrap(), b.to_json());
    }

    #[test]
    fn a_sibling_that_stays_keeps_moved_first_valid() {
        // b stays at index 1; a and c swap around it
        let a = build(&wf(vec![
            task("a::0", "x"),
            task("b::0", "x"),
            task("c::0", "x"),
        ]));
        let b = build(&wf(vec![
            task("c::0", "x"),
            task("b::0", "x"),
            task("a::0", "x"),
        ]));
        let d = js(&ops(&a, &b));
        let id = |i: usize| u64::from(b.children[i].id);
        assert_eq!(adds(&d), vec![(id(2), 2), (id(0), 0)]);
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
