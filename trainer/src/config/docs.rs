//! The key reference of the run config, made from the sections' declarations: `trainer
//! config-docs` prints it, and a test checks the README's tables against it, so that the docs
//! cannot drift from the keys, defaults and descriptions in the code.

use ferroclip_data::section::{KeyDoc, Section};

use super::*;

/// One section's table: its TOML name (`""` at the top level), keys and defaults.
pub struct SectionDoc {
    pub name: &'static str,
    pub keys: &'static [KeyDoc],
    pub defaults: toml::Table,
}

fn section<S: Section>(name: &'static str) -> SectionDoc {
    let defaults = match toml::Value::try_from(S::default()) {
        Ok(toml::Value::Table(t)) => t,
        other => panic!("section `{name}`: defaults do not serialize to a TOML table: {other:?}"),
    };
    SectionDoc { name, keys: S::KEYS, defaults }
}

/// Every section of [`Config`], in the README's order.
pub fn sections() -> Vec<SectionDoc> {
    vec![
        section::<Config>(""),
        section::<ModelConfig>("model"),
        section::<DataConfig>("data"),
        section::<AugmentConfig>("data.augment"),
        section::<TrainConfig>("train"),
        section::<OptimConfig>("optim"),
        section::<ScheduleConfig>("schedule"),
        section::<CheckpointConfig>("checkpoint"),
        section::<LogConfig>("log"),
        section::<EvalConfig>("eval"),
        section::<DistConfig>("dist"),
    ]
}

impl SectionDoc {
    /// The README heading above this section's table.
    pub fn heading(&self) -> String {
        match self.name {
            "" => "### Top level".to_string(),
            name => format!("### `[{name}]`"),
        }
    }

    /// `| key | default | range | meaning |` rows; keys that are sections of their own get their
    /// own table. The range is the one the key is checked against when a config is read.
    pub fn table(&self) -> String {
        let mut out = String::from("| key | default | range | meaning |\n| --- | --- | --- | --- |\n");
        for k in self.keys {
            // The serializer leaves out an `Option` that is unset by default; a table is a section.
            let default = match self.defaults.get(k.key) {
                Some(toml::Value::Table(_)) => continue,
                Some(v) => format!("`{v}`"),
                None => "unset".to_string(),
            };
            let range = k.range.map(|r| format!("`{r}`")).unwrap_or_default();
            let meaning = one_line(k.doc).replace('|', "\\|");
            out.push_str(&format!("| `{}` | {default} | {range} | {} |\n", k.key, meaning.trim()));
        }
        out
    }

    /// The full TOML name of a key of this section (`data.batch_size`, `seed`).
    pub fn full_key(&self, key: &str) -> String {
        match self.name {
            "" => key.to_string(),
            name => format!("{name}.{key}"),
        }
    }
}

/// A key's doc as one line: its source lines are wrapped.
pub fn one_line(doc: &str) -> String {
    doc.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// All tables, each under its heading.
pub fn markdown() -> String {
    sections().iter().map(|s| format!("{}\n\n{}", s.heading(), s.table())).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_of_the_config_has_a_table() {
        let docs = sections();
        let names: Vec<&str> = docs.iter().map(|s| s.name).collect();
        for s in &docs {
            for (key, value) in &s.defaults {
                if value.is_table() {
                    let full = s.full_key(key);
                    assert!(
                        names.contains(&full.as_str()),
                        "section `[{full}]` has no table in config::docs::sections"
                    );
                }
            }
        }
    }

    #[test]
    fn readme_tables_match_the_config_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let lines: Vec<&str> = readme.lines().collect();
        for s in sections() {
            let heading = s.heading();
            let at = lines.iter().position(|l| *l == heading).unwrap_or_else(|| panic!("README.md lacks `{heading}`"));
            let table: Vec<&str> = lines[at + 1..]
                .iter()
                .skip_while(|l| !l.starts_with('|'))
                .take_while(|l| l.starts_with('|'))
                .copied()
                .collect();
            let expected = s.table();
            assert_eq!(
                table.join("\n"),
                expected.trim_end(),
                "README.md's table under `{heading}` differs from the config types; `trainer config-docs` prints \
                 the current tables:\n{expected}"
            );
        }
    }
}
