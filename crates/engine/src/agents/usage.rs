//! Token and cost accounting: what an agent or provider reports about one call, summed over the
//! turns of an attempt and stored in the attempt's `metaJson.usage`.

use serde_json::{Map, Value, json};

/// Usage as reported by the agent. Counts are taken as the agent states them (Claude and
/// Anthropic report cache tokens apart from `input`; OpenAI-style APIs include cached tokens in
/// `input`). No price is computed: `cost_usd` is only set when the agent reports one.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
    pub reasoning: Option<u64>,
    pub cost_usd: Option<f64>,
}

fn add_opt<T: std::ops::Add<Output = T> + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x + y),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Usage {
    /// Adds another call's usage (the attempt total).
    pub fn add(&mut self, o: &Usage) {
        self.input += o.input;
        self.output += o.output;
        self.cache_read = add_opt(self.cache_read, o.cache_read);
        self.cache_write = add_opt(self.cache_write, o.cache_write);
        self.reasoning = add_opt(self.reasoning, o.reasoning);
        self.cost_usd = add_opt(self.cost_usd, o.cost_usd);
    }

    /// The stored shape: `{inputTokens, outputTokens, cacheReadTokens?, cacheWriteTokens?,
    /// reasoningTokens?, costUsd?}` (absent keys were not reported).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("inputTokens".into(), json!(self.input));
        m.insert("outputTokens".into(), json!(self.output));
        let opt = [
            ("cacheReadTokens", self.cache_read),
            ("cacheWriteTokens", self.cache_write),
            ("reasoningTokens", self.reasoning),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        if let Some(c) = self.cost_usd {
            m.insert("costUsd".into(), json!(c));
        }
        Value::Object(m)
    }
}

/// A non-negative integer field of a JSON object.
pub(crate) fn count(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_keeps_unreported_fields_absent() {
        let mut u = Usage {
            input: 10,
            output: 2,
            cache_read: Some(5),
            ..Default::default()
        };
        u.add(&Usage {
            input: 1,
            output: 1,
            cost_usd: Some(0.5),
            ..Default::default()
        });
        assert_eq!(
            u.to_json(),
            json!({"inputTokens": 11, "outputTokens": 3, "cacheReadTokens": 5, "costUsd": 0.5})
        );
    }
}
