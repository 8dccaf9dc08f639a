//! Evaluation results as flat `key → value` pairs with stable names users script against
//! (`zeroshot_top1`, `i2t_recall@5`, `val_loss`, …; accuracies and recalls as fractions in
//! [0, 1]), printed as an aligned table and written as JSON.

use std::collections::BTreeMap;
use std::fmt;

/// The keys in the order the table shows them; other keys follow alphabetically.
const KEY_ORDER: [&str; 9] = [
    "zeroshot_top1",
    "zeroshot_top5",
    "i2t_recall@1",
    "i2t_recall@5",
    "i2t_recall@10",
    "t2i_recall@1",
    "t2i_recall@5",
    "t2i_recall@10",
    "val_loss",
];

/// Whatever an evaluation computed, by flat key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalResults {
    pub metrics: BTreeMap<String, f64>,
}

impl EvalResults {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, value: f64) {
        self.metrics.insert(key.into(), value);
    }

    /// Add many results, e.g. the map [`recall_at_k`](super::recall_at_k) returns.
    pub fn extend(&mut self, results: impl IntoIterator<Item = (String, f64)>) {
        self.metrics.extend(results);
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.metrics.is_empty()
    }

    /// `(key, value)` in table order: the standard keys first, then the rest alphabetically.
    pub fn ordered(&self) -> Vec<(&str, f64)> {
        let known = KEY_ORDER.iter().filter_map(|&k| self.metrics.get(k).map(|&v| (k, v)));
        let rest = self.metrics.iter().filter(|(k, _)| !KEY_ORDER.contains(&k.as_str())).map(|(k, &v)| (k.as_str(), v));
        known.chain(rest).collect()
    }

    /// A flat JSON object (`{"zeroshot_top1": 0.71, ...}`); non-finite values become `null`.
    pub fn to_json(&self) -> String {
        let object: serde_json::Map<String, serde_json::Value> =
            self.metrics.iter().map(|(k, &v)| (k.clone(), serde_json::Value::from(v))).collect();
        serde_json::to_string_pretty(&object).expect("a map of numbers serializes")
    }
}

impl fmt::Display for EvalResults {
    /// ```text
    /// metric         value
    /// zeroshot_top1  0.7123
    /// val_loss       1.2345
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.ordered();
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max("metric".len());
        write!(f, "{:<width$}  value", "metric")?;
        for (key, value) in rows {
            write!(f, "\n{key:<width$}  {value:.4}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EvalResults {
        let mut r = EvalResults::new();
        r.insert("val_loss", 1.23456);
        r.insert("zeroshot_top1", 0.5);
        r.insert("custom_metric", 2.0);
        r.extend([("i2t_recall@10".to_string(), 0.875), ("i2t_recall@1".to_string(), 0.25)]);
        r
    }

    #[test]
    fn table_is_aligned_in_standard_order() {
        let table = sample().to_string();
        assert_eq!(
            table,
            "metric         value\n\
             zeroshot_top1  0.5000\n\
             i2t_recall@1   0.2500\n\
             i2t_recall@10  0.8750\n\
             val_loss       1.2346\n\
             custom_metric  2.0000"
        );
    }

    #[test]
    fn json_is_flat_and_round_trips() {
        let mut r = sample();
        r.insert("t2i_recall@5", f64::NAN);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 6);
        assert_eq!(obj["zeroshot_top1"], 0.5);
        assert_eq!(obj["i2t_recall@10"], 0.875);
        assert_eq!(obj["val_loss"], 1.23456);
        assert!(obj["t2i_recall@5"].is_null());
    }
}
