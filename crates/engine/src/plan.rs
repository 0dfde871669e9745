//! The plan: a rendered tree flattened for scheduling, and the walk that picks runnable tasks
//! (engine-model §2.5): a sequence stops at its first unfinished child, a parallel walks all
//! children within its `max_concurrency`, a branch runs its chosen side as a sequence, a loop
//! runs its body until `until` holds or it reaches `max_iterations`.

use smithers_core::SmithersError;
use smithers_core::tree::{LoopNode, Node, NodeRef, OnMaxReached, Task};
use std::collections::HashMap;

/// A task instance: node id and loop iteration.
pub type TaskKey = (String, u32);

/// `nodeId::iteration`, the in-memory and snapshot key of a task instance.
pub fn key_string(k: &TaskKey) -> String {
    format!("{}::{}", k.0, k.1)
}

/// Scheduling state of a task instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TState {
    Pending,
    InProgress,
    Finished,
    Failed,
    Cancelled,
    Skipped,
    WaitingApproval,
    WaitingEvent,
    WaitingTimer,
}

impl TState {
    pub fn as_str(self) -> &'static str {
        use smithers_store::node_state as s;
        match self {
            TState::Pending => s::PENDING,
            TState::InProgress => s::IN_PROGRESS,
            TState::Finished => s::FINISHED,
            TState::Failed => s::FAILED,
            TState::Cancelled => s::CANCELLED,
            TState::Skipped => s::SKIPPED,
            TState::WaitingApproval => s::WAITING_APPROVAL,
            TState::WaitingEvent => s::WAITING_EVENT,
            TState::WaitingTimer => s::WAITING_TIMER,
        }
    }

    pub fn parse(s: &str) -> Option<TState> {
        use smithers_store::node_state as n;
        Some(match s {
            n::PENDING => TState::Pending,
            n::IN_PROGRESS => TState::InProgress,
            n::FINISHED => TState::Finished,
            n::FAILED => TState::Failed,
            n::CANCELLED => TState::Cancelled,
            n::SKIPPED => TState::Skipped,
            n::WAITING_APPROVAL => TState::WaitingApproval,
            n::WAITING_EVENT => TState::WaitingEvent,
            n::WAITING_TIMER => TState::WaitingTimer,
            _ => return None,
        })
    }
}

/// A mounted task.
#[derive(Debug, Clone)]
pub struct PTask {
    pub key: TaskKey,
    /// The `Node::Task` this instance was rendered from.
    pub node: NodeRef,
    /// Innermost enclosing parallel group.
    pub group: Option<usize>,
    /// Index into the driver's runtime-state table (filled by the driver).
    pub rt: usize,
}

impl PTask {
    pub fn task(&self) -> &Task {
        match &*self.node {
            Node::Task(t) => t,
            // the plan only ever stores task nodes here
            _ => unreachable_task(),
        }
    }
}

fn unreachable_task() -> &'static Task {
    static FALLBACK: std::sync::OnceLock<Task> = std::sync::OnceLock::new();
    FALLBACK.get_or_init(|| {
        Task::new(
            "invalid",
            smithers_core::TaskKind::Value(serde_json::Value::Null),
        )
    })
}

#[derive(Debug, Clone)]
pub struct PLoop {
    pub id: String,
    /// `until` held at this render (it ends the loop once the current iteration's body is
    /// complete).
    pub until: bool,
    /// Why `until` could not be evaluated at this render.
    pub until_error: Option<SmithersError>,
    /// The loop ended (its stored row says so, or it reached `max_iterations`).
    pub finished: bool,
    pub max_iterations: u32,
    pub on_max_reached: OnMaxReached,
    pub iteration: u32,
}

#[derive(Debug, Clone)]
enum PNode {
    /// Children, and how many leading children are known to be complete. Within one plan a
    /// complete child stays complete, so later walks start there (keeps long sequences O(1)).
    Seq(Vec<usize>, AtomicCursor),
    Par(Vec<usize>),
    Loop {
        idx: usize,
        children: Vec<usize>,
    },
    Task(usize),
}

/// A monotone cursor shared by walks of one plan (atomic only so the plan stays `Sync`).
#[derive(Debug, Default)]
struct AtomicCursor(std::sync::atomic::AtomicUsize);

impl AtomicCursor {
    fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn set(&self, v: usize) {
        self.0.store(v, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Clone for AtomicCursor {
    fn clone(&self) -> Self {
        AtomicCursor(std::sync::atomic::AtomicUsize::new(self.get()))
    }
}

/// A flattened render.
#[derive(Debug, Clone)]
pub struct Plan {
    pub root: NodeRef,
    nodes: Vec<PNode>,
    root_idx: usize,
    pub tasks: Vec<PTask>,
    pub loops: Vec<PLoop>,
    group_max: Vec<Option<usize>>,
    /// Mounted task index by node id.
    pub by_id: HashMap<String, usize>,
    /// Ids mounted twice in one render.
    pub duplicates: Vec<String>,
}

impl Plan {
    /// Flattens a tree. `loop_state` gives each loop's current iteration and whether it is
    /// done, by scoped id.
    pub fn build(root: NodeRef, loop_state: &dyn Fn(&str) -> (u32, bool)) -> Plan {
        let mut p = Plan {
            root: root.clone(),
            nodes: Vec::new(),
            root_idx: 0,
            tasks: Vec::new(),
            loops: Vec::new(),
            group_max: Vec::new(),
            by_id: HashMap::new(),
            duplicates: Vec::new(),
        };
        let mut stack: Vec<(String, u32)> = Vec::new();
        p.root_idx = p.add(&root, None, &mut stack, loop_state);
        p
    }

    fn add(
        &mut self,
        n: &NodeRef,
        group: Option<usize>,
        loops: &mut Vec<(String, u32)>,
        it: &dyn Fn(&str) -> (u32, bool),
    ) -> usize {
        let pn = match &**n {
            Node::Sequence { children } | Node::Branch { children, .. } => {
                let c = children
                    .iter()
                    .map(|c| self.add(c, group, loops, it))
                    .collect();
                PNode::Seq(c, AtomicCursor::default())
            }
            Node::Parallel {
                max_concurrency,
                children,
                ..
            } => {
                let g = self.group_max.len();
                self.group_max.push(*max_concurrency);
                let c = children
                    .iter()
                    .map(|c| self.add(c, Some(g), loops, it))
                    .collect();
                PNode::Par(c)
            }
            Node::Loop(LoopNode {
                id,
                until,
                until_error,
                max_iterations,
                on_max_reached,
                children,
            }) => {
                let (iteration, done) = it(id);
                let idx = self.loops.len();
                self.loops.push(PLoop {
                    id: id.clone(),
                    until: *until,
                    until_error: until_error.as_deref().cloned(),
                    finished: done,
                    max_iterations: *max_iterations,
                    on_max_reached: *on_max_reached,
                    iteration,
                });
                loops.push((id.clone(), iteration));
                let c = children
                    .iter()
                    .map(|c| self.add(c, group, loops, it))
                    .collect();
                loops.pop();
                PNode::Loop { idx, children: c }
            }
            Node::Task(t) => {
                let (node_id, iteration) = match loops.len() {
                    0 => (t.id.clone(), 0),
                    1 => (t.id.clone(), loops[0].1),
                    // a renderer that scopes ids itself (the YAML loader does) is taken as is
                    n if t.id.contains("@@") => (t.id.clone(), loops[n - 1].1),
                    n => {
                        let outer: Vec<String> = loops[..n - 1]
                            .iter()
                            .map(|(l, i)| format!("{}={i}", l.split("@@").next().unwrap_or(l)))
                            .collect();
                        (format!("{}@@{}", t.id, outer.join(",")), loops[n - 1].1)
                    }
                };
                let ti = self.tasks.len();
                if self.by_id.insert(t.id.clone(), ti).is_some() {
                    self.duplicates.push(t.id.clone());
                }
                self.tasks.push(PTask {
                    key: (node_id, iteration),
                    node: n.clone(),
                    group,
                    rt: usize::MAX,
                });
                PNode::Task(ti)
            }
        };
        self.nodes.push(pn);
        self.nodes.len() - 1
    }

    /// Walks the plan and decides what can run now.
    pub fn schedule(&self, view: &dyn SchedView) -> Schedule {
        let mut usage: Vec<usize> = vec![0; self.group_max.len()];
        if self.group_max.iter().any(Option::is_some) {
            for t in &self.tasks {
                if let (Some(g), TState::InProgress) = (t.group, view.state(t.rt)) {
                    usage[g] += 1;
                }
            }
        }
        let mut s = Schedule::default();
        let mut w = Walker {
            plan: self,
            view,
            usage,
            out: &mut s,
        };
        let done = w.walk(self.root_idx);
        s.done = done;
        s
    }

    /// Whether a task counts as done for sequences and dependencies.
    pub fn is_terminal(&self, ti: usize, view: &dyn SchedView) -> bool {
        let t = &self.tasks[ti];
        match view.state(t.rt) {
            TState::Finished | TState::Skipped => true,
            TState::Failed => t.task().continue_on_fail,
            _ => false,
        }
    }
}

/// What the walk needs to know about runtime state.
pub trait SchedView {
    fn state(&self, rt: usize) -> TState;
    /// Whether a pending task's retry backoff has passed.
    fn ready(&self, rt: usize) -> bool;
}

/// Result of a walk.
#[derive(Debug, Default)]
pub struct Schedule {
    /// Plan task indices that may start now, in document order.
    pub runnable: Vec<usize>,
    /// Loops whose body is complete for this iteration and whose `until` did not hold (or could
    /// not be evaluated: see [`PLoop::until_error`]).
    pub ready_loops: Vec<usize>,
    /// Pending tasks blocked only by a dependency that is not mounted.
    pub blocked_on_unmounted: Vec<(usize, String)>,
    /// The whole tree is complete.
    pub done: bool,
}

struct Walker<'a> {
    plan: &'a Plan,
    view: &'a dyn SchedView,
    usage: Vec<usize>,
    out: &'a mut Schedule,
}

impl Walker<'_> {
    fn walk(&mut self, idx: usize) -> bool {
        match &self.plan.nodes[idx] {
            PNode::Seq(children, done) => {
                for (i, &c) in children.iter().enumerate().skip(done.get()) {
                    if !self.walk(c) {
                        done.set(i);
                        return false;
                    }
                }
                done.set(children.len());
                true
            }
            PNode::Par(children) => {
                let mut all = true;
                for &c in children {
                    all &= self.walk(c);
                }
                all
            }
            PNode::Loop { idx: li, children } => {
                if self.plan.loops[*li].finished {
                    return true;
                }
                // `until` is checked after an iteration, never before the first one
                for &c in children {
                    if !self.walk(c) {
                        return false;
                    }
                }
                if self.plan.loops[*li].until {
                    return true;
                }
                self.out.ready_loops.push(*li);
                false
            }
            PNode::Task(ti) => self.task(*ti),
        }
    }

    fn task(&mut self, ti: usize) -> bool {
        if self.plan.is_terminal(ti, self.view) {
            return true;
        }
        let t = &self.plan.tasks[ti];
        let st = self.view.state(t.rt);
        if !matches!(st, TState::Pending | TState::Cancelled) || !self.view.ready(t.rt) {
            return false;
        }
        for d in &t.task().depends_on {
            match self.plan.by_id.get(d) {
                None => {
                    self.out.blocked_on_unmounted.push((ti, d.clone()));
                    return false;
                }
                Some(&di) if !self.plan.is_terminal(di, self.view) => return false,
                Some(_) => {}
            }
        }
        if let Some(g) = t.group {
            if let Some(max) = self.plan.group_max[g]
                && self.usage[g] >= max.max(1)
            {
                return false;
            }
            self.usage[g] += 1;
        }
        self.out.runnable.push(ti);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use smithers_core::TaskKind;
    use std::sync::Arc;

    fn task(id: &str) -> NodeRef {
        Arc::new(Node::Task(Box::new(Task::new(
            id,
            TaskKind::Value(json!(1)),
        ))))
    }

    struct View(HashMap<usize, TState>);
    impl SchedView for View {
        fn state(&self, rt: usize) -> TState {
            self.0.get(&rt).copied().unwrap_or(TState::Pending)
        }
        fn ready(&self, _: usize) -> bool {
            true
        }
    }

    fn plan(root: NodeRef) -> Plan {
        let mut p = Plan::build(root, &|_| (0, false));
        for (i, t) in p.tasks.iter_mut().enumerate() {
            t.rt = i;
        }
        p
    }

    #[test]
    fn sequence_stops_at_first_unfinished() {
        let p = plan(Arc::new(Node::Sequence {
            children: vec![task("a"), task("b")],
        }));
        let s = p.schedule(&View(HashMap::new()));
        assert_eq!(s.runnable, vec![0]);
        let s = p.schedule(&View(HashMap::from([(0, TState::Finished)])));
        assert_eq!(s.runnable, vec![1]);
        let s = p.schedule(&View(HashMap::from([
            (0, TState::Finished),
            (1, TState::Finished),
        ])));
        assert!(s.done);
    }

    #[test]
    fn parallel_respects_max_concurrency() {
        let p = plan(Arc::new(Node::Parallel {
            id: None,
            max_concurrency: Some(2),
            children: vec![task("a"), task("b"), task("c")],
        }));
        assert_eq!(p.schedule(&View(HashMap::new())).runnable, vec![0, 1]);
        let s = p.schedule(&View(HashMap::from([(0, TState::InProgress)])));
        assert_eq!(s.runnable, vec![1]);
    }

    #[test]
    fn depends_on_waits_and_reports_unmounted() {
        let mut b = Task::new("b", TaskKind::Value(json!(1)));
        b.depends_on = vec!["a".into()];
        let mut c = Task::new("c", TaskKind::Value(json!(1)));
        c.depends_on = vec!["zzz".into()];
        let p = plan(Arc::new(Node::Parallel {
            id: None,
            max_concurrency: None,
            children: vec![
                task("a"),
                Arc::new(Node::Task(Box::new(b))),
                Arc::new(Node::Task(Box::new(c))),
            ],
        }));
        let s = p.schedule(&View(HashMap::new()));
        assert_eq!(s.runnable, vec![0]);
        assert_eq!(s.blocked_on_unmounted.len(), 1);
    }

    #[test]
    fn nested_loop_tasks_get_scoped_ids() {
        let inner = Arc::new(Node::Loop(LoopNode {
            id: "in".into(),
            until: false,
            until_error: None,
            max_iterations: 3,
            on_max_reached: OnMaxReached::ReturnLast,
            children: vec![task("t")],
        }));
        let outer = Arc::new(Node::Loop(LoopNode {
            id: "out".into(),
            until: false,
            until_error: None,
            max_iterations: 3,
            on_max_reached: OnMaxReached::ReturnLast,
            children: vec![inner],
        }));
        let p = Plan::build(outer, &|id| {
            if id == "out" { (2, false) } else { (1, false) }
        });
        assert_eq!(p.tasks[0].key, ("t@@out=2".to_string(), 1));
    }
}
