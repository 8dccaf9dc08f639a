//! Evaluation: zero-shot classification ([`zeroshot`], after OpenCLIP's
//! `open_clip/zero_shot_classifier.py` and `open_clip_train/zero_shot.py`), image–text retrieval
//! ([`retrieval`], after clip_benchmark's `zeroshot_retrieval.py`) and the result table
//! ([`report`]). [`inputs`] opens and checks what `[eval]` names before training starts
//! ([`classes`] matches class folders to class names by name); [`run`] drives the model over
//! them on all ranks together, as [`split`] shares the work out.
//!
//! The ImageNet-1k class names and the 80 OpenAI prompt templates ship in the binary
//! ([`imagenet_classnames`], [`openai_templates`]); a template file loads with [`read_templates`].

pub mod classes;
pub mod inputs;
pub mod report;
pub mod retrieval;
pub mod run;
pub mod split;
pub mod zeroshot;

use std::path::Path;

pub use inputs::EvalInputs;
pub use report::EvalResults;
pub use retrieval::recall_at_k;
pub use zeroshot::{accuracy, build_classifier, zero_shot_logits, ZeroShotMeter};

const IMAGENET_CLASSNAMES: &str = include_str!("../../assets/imagenet_classnames.txt");
const OPENAI_TEMPLATES: &str = include_str!("../../assets/openai_templates.txt");
/// The ImageNet-1k WordNet ids in label order (sorted, as ImageNet's `val/<wnid>/` folders sort;
/// timm's `imagenet_synsets.txt`).
const IMAGENET_SYNSETS: &str = include_str!("../../assets/imagenet_synsets.txt");

/// Errors reading a class-name or template list.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}:{line}: empty line (one entry per line; an empty line would shift every label after it)")]
    EmptyLine { path: String, line: usize },
    #[error("{path}: no entries")]
    Empty { path: String },
    #[error("{path}:{line}: template {template:?} has no `{{}}` for the class name")]
    NoPlaceholder { path: String, line: usize, template: String },
}

/// OpenCLIP's `IMAGENET_CLASSNAMES` (`open_clip/zero_shot_metadata.py`), in label order.
pub fn imagenet_classnames() -> Vec<String> {
    parse_lines(IMAGENET_CLASSNAMES, "imagenet_classnames.txt").expect("embedded class names are valid")
}

/// The ImageNet-1k synset ids (`n01440764`, …), in the label order of [`imagenet_classnames`].
pub fn imagenet_synsets() -> Vec<String> {
    parse_lines(IMAGENET_SYNSETS, "imagenet_synsets.txt").expect("embedded synsets are valid")
}

/// OpenCLIP's `OPENAI_IMAGENET_TEMPLATES`, the 80 prompts of the CLIP paper, with `{}` where the
/// class name goes.
pub fn openai_templates() -> Vec<String> {
    parse_lines(OPENAI_TEMPLATES, "openai_templates.txt").expect("embedded templates are valid")
}

/// One entry per line (a `\r\n` ending and a final newline are fine). Empty lines are an error:
/// a blank template line would be a prompt without the class name.
fn read_lines(path: impl AsRef<Path>) -> Result<Vec<String>, ListError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ListError::Io { path: name.clone(), source })?;
    parse_lines(&text, &name)
}

/// [`read_lines`] for a template file: every line must contain `{}`.
pub fn read_templates(path: impl AsRef<Path>) -> Result<Vec<String>, ListError> {
    let templates = read_lines(&path)?;
    check_templates(&templates, &path.as_ref().display().to_string())?;
    Ok(templates)
}

fn check_templates(templates: &[String], name: &str) -> Result<(), ListError> {
    match templates.iter().position(|t| !t.contains("{}")) {
        Some(i) => {
            Err(ListError::NoPlaceholder { path: name.to_string(), line: i + 1, template: templates[i].clone() })
        }
        None => Ok(()),
    }
}

fn parse_lines(text: &str, name: &str) -> Result<Vec<String>, ListError> {
    let lines: Vec<String> = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect();
    if let Some(i) = lines.iter().position(|l| l.trim().is_empty()) {
        return Err(ListError::EmptyLine { path: name.to_string(), line: i + 1 });
    }
    if lines.is_empty() {
        return Err(ListError::Empty { path: name.to_string() });
    }
    Ok(lines)
}

/// Put `classname` where the template has `{}` (as Python's `template.format(classname)`).
pub fn fill_template(template: &str, classname: &str) -> String {
    template.replace("{}", classname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_lists_load() {
        let names = imagenet_classnames();
        assert_eq!(names.len(), 1000);
        assert_eq!((names[0].as_str(), names[1].as_str(), names[999].as_str()), ("tench", "goldfish", "toilet paper"));
        let synsets = imagenet_synsets();
        assert_eq!((synsets.len(), synsets[0].as_str(), synsets[999].as_str()), (1000, "n01440764", "n15075141"));
        assert!(synsets.windows(2).all(|w| w[0] < w[1]), "label order is sorted order");
        let templates = openai_templates();
        assert_eq!(templates.len(), 80);
        check_templates(&templates, "openai_templates.txt").unwrap();
        assert_eq!(fill_template(&templates[0], "tench"), "a bad photo of a tench.");
        assert_eq!(fill_template(&templates[79], "tench"), "a tattoo of the tench.");
    }

    #[test]
    fn read_lines_rejects_what_would_shift_labels() {
        let dir = std::env::temp_dir().join(format!("ferroclip-lists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("ok.txt");
        std::fs::write(&ok, "cat\r\ndog\n").unwrap();
        assert_eq!(read_lines(&ok).unwrap(), vec!["cat", "dog"]);
        let gap = dir.join("gap.txt");
        std::fs::write(&gap, "cat\n\ndog\n").unwrap();
        assert!(matches!(read_lines(&gap), Err(ListError::EmptyLine { line: 2, .. })));
        let bad = dir.join("templates.txt");
        std::fs::write(&bad, "a photo of a {}.\na photo\n").unwrap();
        assert!(matches!(read_templates(&bad), Err(ListError::NoPlaceholder { line: 2, .. })));
        assert!(matches!(read_lines(dir.join("missing.txt")), Err(ListError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
