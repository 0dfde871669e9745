//! The text sent to agents: the task prompt wrapped with the output's JSON Schema (engine-model
//! §7.3), repair requests that feed validation errors back (§7.5), and the flattened
//! conversation for CLIs that cannot resume a session.

use serde_json::Value;

/// A reply longer than this is shortened (head and tail kept) when quoted back to an agent.
const QUOTE_LIMIT: usize = 2_000;
const QUOTE_KEEP: usize = 1_000;

fn pretty(schema: &Value) -> String {
    serde_json::to_string_pretty(schema).unwrap_or_else(|_| schema.to_string())
}

/// The first message of an attempt. Without an output schema the task's prompt goes out as
/// written; with one, the agent is told up front that its reply must end with a JSON object and
/// the schema follows the prompt. `reminder` repeats the instruction at the very end, for CLIs
/// that tend to lose it in long prompts (Gemini).
pub(crate) fn task_prompt(prompt: &str, schema: Option<&Value>, reminder: bool) -> String {
    let Some(schema) = schema else {
        return prompt.to_string();
    };
    let mut s = String::new();
    s.push_str(
        "IMPORTANT: this task has a required output. When you are done, finish your reply with \
         the result as a JSON object inside a ```json code fence. The last such block of your \
         reply is taken as the result and checked against the schema under REQUIRED OUTPUT.\n\n",
    );
    s.push_str(prompt.trim_end());
    s.push_str("\n\n**REQUIRED OUTPUT**\n\nThe result must be valid against this JSON Schema:\n\n```json\n");
    s.push_str(&pretty(schema));
    s.push_str("\n```\n");
    if reminder {
        s.push_str("\nRemember: end your reply with the JSON result in a ```json code fence.\n");
    }
    s
}

/// A repair turn: what was wrong with the last reply and what is still required.
pub(crate) fn repair_prompt(problem: &str, schema: &Value) -> String {
    format!(
        "Your last reply did not give a valid result.\n\nProblem:\n  - {problem}\n\n\
         Reply again with ONLY the corrected result: one JSON object in a ```json code fence, \
         valid against this JSON Schema:\n\n```json\n{}\n```\n",
        pretty(schema)
    )
}

/// Who said something in an attempt's conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    User,
    Assistant,
}

/// One conversation as a single prompt (`ROLE: text` blocks separated by blank lines), for a
/// repair turn of a CLI that has no session to resume. Earlier agent replies are shortened to
/// their head and tail.
pub(crate) fn flatten(history: &[(Role, String)], next: &str) -> String {
    let mut blocks: Vec<String> = history
        .iter()
        .map(|(role, text)| match role {
            Role::User => format!("USER: {text}"),
            Role::Assistant => format!("ASSISTANT: {}", shorten(text)),
        })
        .collect();
    blocks.push(format!("USER: {next}"));
    blocks.join("\n\n")
}

/// Keeps the first and last [`QUOTE_KEEP`] characters of a long text.
pub(crate) fn shorten(text: &str) -> String {
    let n = text.chars().count();
    if n <= QUOTE_LIMIT {
        return text.to_string();
    }
    let head: String = text.chars().take(QUOTE_KEEP).collect();
    let tail: String = text.chars().skip(n - QUOTE_KEEP).collect();
    format!(
        "{head}\n[… {} characters left out …]\n{tail}",
        n - 2 * QUOTE_KEEP
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_follows_the_prompt() {
        let schema = json!({"type": "object", "required": ["ok"]});
        let p = task_prompt("Review {{x}}\n", Some(&schema), false);
        assert!(p.starts_with("IMPORTANT:"));
        let prompt_at = p.find("Review {{x}}").unwrap();
        let req_at = p.find("**REQUIRED OUTPUT**").unwrap();
        assert!(prompt_at < req_at);
        assert!(p.contains("\"required\": [\n"), "{p}");
        assert!(!p.contains("Remember"));
        assert!(task_prompt("x", Some(&schema), true).contains("Remember"));
        assert_eq!(task_prompt("plain", None, true), "plain");
    }

    #[test]
    fn repair_names_the_problem_and_schema() {
        let p = repair_prompt(
            "at `/ok`: \"yes\" is not of type \"boolean\"",
            &json!({"type": "object"}),
        );
        assert!(
            p.contains("/ok") && p.contains("\"type\": \"object\""),
            "{p}"
        );
    }

    #[test]
    fn flattened_conversation() {
        let long = "a".repeat(1500) + &"b".repeat(1500);
        let h = vec![(Role::User, "do it".to_string()), (Role::Assistant, long)];
        let f = flatten(&h, "fix it");
        assert!(f.starts_with("USER: do it\n\nASSISTANT: aaa"));
        assert!(f.ends_with("bbb\n\nUSER: fix it"));
        assert!(f.contains("1000 characters left out"));
    }
}
