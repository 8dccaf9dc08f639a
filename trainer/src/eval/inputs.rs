//! Everything `[eval]` names, opened and checked at start-up: before the first training step
//! (and before `trainer eval` loads a model), so a wrong path or a bad list ends the job in
//! seconds with exit status 2 and the key named, instead of after the last step. The checks
//! read what evaluation will read: class-names and template files, the class folders and their
//! images, `captions.tsv`, every local shard's existence and the first sample of each set's
//! first shard.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ferroclip_data::sample::{SampleGrouper, SampleSpec, SkipReason};
use ferroclip_data::source::{expand_shards, open_shard, Activity};
use ferroclip_data::DataConfig;

use super::classes;
use crate::config::{Config, ConfigError};

/// Image files evaluation reads from a folder, by extension (lower-cased).
const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// The member of a zero-shot shard sample that holds its class index.
pub const LABEL_KEY: &str = "cls";

/// Images with what evaluation needs to know about each: a folder's files, or shards.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSet<T> {
    /// Files (sorted within each class folder / in `captions.tsv` order) with their label or captions.
    Folder(Vec<(PathBuf, T)>),
    /// Shard URLs (brace-expanded), read in order; labels or captions come from the samples.
    Shards(Vec<String>),
}

/// Zero-shot classification: class names in label order, prompt templates, labelled images.
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroShotInputs {
    pub classnames: Vec<String>,
    pub templates: Vec<String>,
    pub images: ImageSet<i64>,
}

/// What `[eval]` evaluates, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalInputs {
    pub zero_shot: Option<ZeroShotInputs>,
    /// Image–text retrieval: images with their captions (several per image).
    pub retrieval: Option<ImageSet<Vec<String>>>,
    /// Validation-loss shards.
    pub val: Option<Vec<String>>,
}

/// A problem with what `key` names; `what` is the path (or pattern) at fault.
fn bad(what: impl Display, key: &str, message: impl Display) -> ConfigError {
    ConfigError { file: what.to_string(), message: format!("key `eval.{key}`: {message}") }
}

impl EvalInputs {
    /// Open and check everything `cfg.eval` names; `Ok` with all fields `None` when it names
    /// nothing.
    pub fn open(cfg: &Config) -> Result<EvalInputs, ConfigError> {
        let e = &cfg.eval;
        let mut inputs = EvalInputs::default();
        if !e.zeroshot_data.is_empty() {
            inputs.zero_shot = Some(zero_shot(cfg)?);
        }
        if !e.retrieval_data.is_empty() {
            let data = &e.retrieval_data;
            inputs.retrieval = Some(if Path::new(data).is_dir() {
                ImageSet::Folder(folder_captions(Path::new(data))?)
            } else {
                ImageSet::Shards(shards(&cfg.data, "retrieval_data", data, None)?)
            });
        }
        if !e.val_data.is_empty() {
            inputs.val = Some(shards(&cfg.data, "val_data", &e.val_data, None)?);
        }
        Ok(inputs)
    }
}

fn zero_shot(cfg: &Config) -> Result<ZeroShotInputs, ConfigError> {
    let e = &cfg.eval;
    let templates = if e.zeroshot_templates.is_empty() {
        super::openai_templates()
    } else {
        super::read_templates(&e.zeroshot_templates).map_err(|m| bad(&e.zeroshot_templates, "zeroshot_templates", m))?
    };
    let names_file = if e.zeroshot_classnames.is_empty() {
        None
    } else {
        let text = std::fs::read_to_string(&e.zeroshot_classnames)
            .map_err(|err| bad(&e.zeroshot_classnames, "zeroshot_classnames", format!("cannot read: {err}")))?;
        Some(text)
    };
    let names_key = |m: String| bad(&e.zeroshot_classnames, "zeroshot_classnames", m);
    let root = Path::new(&e.zeroshot_data);
    if root.is_dir() {
        let classes = classes::for_folders(root, names_file.as_deref().map(|t| (t, e.zeroshot_classnames.as_str())))
            .map_err(|m| if names_file.is_some() { names_key(m) } else { bad(&e.zeroshot_data, "zeroshot_data", m) })?;
        let mut files = Vec::new();
        for (label, folder) in classes.folders.iter().enumerate() {
            let images = image_files(folder).map_err(|m| bad(&e.zeroshot_data, "zeroshot_data", m))?;
            if images.is_empty() {
                return Err(bad(
                    folder.display(),
                    "zeroshot_data",
                    format!("class folder without images ({})", IMAGE_EXTENSIONS.join(", ")),
                ));
            }
            files.extend(images.into_iter().map(|p| (p, label as i64)));
        }
        return Ok(ZeroShotInputs { classnames: classes.names, templates, images: ImageSet::Folder(files) });
    }
    let classnames = match &names_file {
        Some(text) => classes::for_shards(text, &e.zeroshot_classnames).map_err(names_key)?,
        None => super::imagenet_classnames(),
    };
    let shards = shards(&cfg.data, "zeroshot_data", &e.zeroshot_data, Some(LABEL_KEY))?;
    Ok(ZeroShotInputs { classnames, templates, images: ImageSet::Shards(shards) })
}

/// Expand a shard pattern; every local shard must exist, and the first local one must start
/// with a sample evaluation can use (image, caption and, with `label_key`, a label).
fn shards(data: &DataConfig, key: &str, pattern: &str, label_key: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let list = expand_shards(pattern, &[]).map_err(|err| {
        bad(
            pattern,
            key,
            format!("{err} (a folder{}, or WebDataset shards)", if key == "val_data" { "" } else { " of images" }),
        )
    })?;
    let local: Vec<_> = list.iter().filter(|s| !s.url.starts_with("pipe:")).collect();
    let missing: Vec<&str> = local.iter().filter(|s| !Path::new(&s.url).is_file()).map(|s| s.url.as_str()).collect();
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(5).map(|m| format!("`{m}`")).collect();
        let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
        return Err(bad(
            pattern,
            key,
            format!("{} of {} shards do not exist: {}{more}", missing.len(), list.len(), shown.join(", ")),
        ));
    }
    if let Some(first) = local.first() {
        let url = &first.url;
        let reader = open_shard(first, Arc::new(AtomicU64::new(0)), Arc::new(Activity::default()))
            .map_err(|err| bad(url, key, format!("cannot open: {err}")))?;
        let raw = SampleGrouper::new(reader, data.max_member_bytes)
            .next_sample()
            .map_err(|err| bad(url, key, format!("not a readable tar shard: {err}")))?
            .ok_or_else(|| bad(url, key, "the shard holds no sample"))?;
        let members: Vec<String> = raw.members.keys().cloned().collect();
        let sample_key = raw.key.clone();
        let spec = SampleSpec::new(data, label_key);
        if let Err(reason) = spec.select(raw) {
            let need = match reason {
                SkipReason::MissingImage => format!("an image member ({})", spec.image_exts.join(", ")),
                SkipReason::MissingLabel => {
                    format!("an integer class label in a `{}` member", label_key.unwrap_or_default())
                }
                SkipReason::MemberTooLarge => "members of a sane size".to_string(),
                _ => format!("a caption in `{}` (data.caption_key)", data.caption_key),
            };
            return Err(bad(
                url,
                key,
                format!("the first sample (`{sample_key}`, members {}) lacks {need}", members.join(", ")),
            ));
        }
    }
    Ok(list.into_iter().map(|s| s.url).collect())
}

/// A retrieval folder: images plus `captions.tsv` with `file<TAB>caption` lines (several lines per
/// image allowed), in file order of first appearance.
fn folder_captions(root: &Path) -> Result<Vec<(PathBuf, Vec<String>)>, ConfigError> {
    let index = root.join("captions.tsv");
    let what = index.display();
    let text = std::fs::read_to_string(&index).map_err(|err| {
        bad(&what, "retrieval_data", format!("a retrieval folder needs captions.tsv (file<TAB>caption lines): {err}"))
    })?;
    let mut pairs: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let mut position: std::collections::HashMap<PathBuf, usize> = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{what}:{}", n + 1);
        let (file, caption) =
            line.split_once('\t').ok_or_else(|| bad(&at, "retrieval_data", "expected file<TAB>caption"))?;
        if caption.trim().is_empty() {
            return Err(bad(&at, "retrieval_data", "empty caption"));
        }
        let path = root.join(file.trim());
        if !path.is_file() {
            return Err(bad(&at, "retrieval_data", format!("no image {}", path.display())));
        }
        let i = *position.entry(path.clone()).or_insert_with(|| {
            pairs.push((path, Vec::new()));
            pairs.len() - 1
        });
        pairs[i].1.push(caption.trim().to_string());
    }
    if pairs.is_empty() {
        return Err(bad(&what, "retrieval_data", "no file<TAB>caption lines"));
    }
    Ok(pairs)
}

/// Image files of a folder, sorted by file name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?.path();
        let ext = path.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclip_data::tar::write_tar;

    fn cfg(dir: &Path, eval: &[(&str, String)]) -> Config {
        let mut c = Config::default();
        c.data.train = dir.join("train.tar").display().to_string();
        for (k, v) in eval {
            match *k {
                "zeroshot_data" => c.eval.zeroshot_data = v.clone(),
                "zeroshot_classnames" => c.eval.zeroshot_classnames = v.clone(),
                "zeroshot_templates" => c.eval.zeroshot_templates = v.clone(),
                "retrieval_data" => c.eval.retrieval_data = v.clone(),
                "val_data" => c.eval.val_data = v.clone(),
                _ => unreachable!(),
            }
        }
        c
    }

    fn err(c: &Config) -> String {
        EvalInputs::open(c).unwrap_err().to_string()
    }

    #[test]
    fn nothing_named_is_nothing_opened() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(EvalInputs::open(&cfg(d.path(), &[])).unwrap(), EvalInputs::default());
    }

    #[test]
    fn class_folders_are_labelled_in_names_file_order() {
        let d = tempfile::tempdir().unwrap();
        for (class, files) in [("b", vec!["2.jpg", "1.PNG", "notes.txt"]), ("a", vec!["3.jpg"])] {
            std::fs::create_dir_all(d.path().join("set").join(class)).unwrap();
            for f in files {
                std::fs::write(d.path().join("set").join(class).join(f), "x").unwrap();
            }
        }
        std::fs::write(d.path().join("names.txt"), "b\tbee\na\tant\n").unwrap();
        std::fs::write(d.path().join("t.txt"), "a {}.\n").unwrap();
        let set = d.path().join("set");
        let c = cfg(
            d.path(),
            &[
                ("zeroshot_data", set.display().to_string()),
                ("zeroshot_classnames", d.path().join("names.txt").display().to_string()),
                ("zeroshot_templates", d.path().join("t.txt").display().to_string()),
            ],
        );
        let z = EvalInputs::open(&c).unwrap().zero_shot.unwrap();
        assert_eq!(z.classnames, ["bee", "ant"]);
        assert_eq!(z.templates, ["a {}."]);
        assert_eq!(
            z.images,
            ImageSet::Folder(vec![(set.join("b/1.PNG"), 0), (set.join("b/2.jpg"), 0), (set.join("a/3.jpg"), 1)])
        );
        // A class folder without images is an error naming it.
        std::fs::create_dir_all(set.join("c")).unwrap();
        std::fs::write(d.path().join("names.txt"), "b\tbee\na\tant\nc\tcat\n").unwrap();
        let e = err(&c);
        assert!(
            e.contains("eval.zeroshot_data") && e.contains("class folder without images") && e.contains("/c:"),
            "{e}"
        );
        // A name mismatch is the class-names key's error.
        std::fs::write(d.path().join("names.txt"), "b\tbee\na\tant\n").unwrap();
        let e = err(&c);
        assert!(
            e.contains("eval.zeroshot_classnames") && e.contains("folders without a name") && e.contains("`c`"),
            "{e}"
        );
    }

    #[test]
    fn missing_paths_and_bad_lists_name_their_key() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("imagenet/val").display().to_string();
        let e = err(&cfg(d.path(), &[("zeroshot_data", missing.clone())]));
        assert!(e.starts_with(&missing) && e.contains("key `eval.zeroshot_data`"), "{e}");
        let e = err(&cfg(d.path(), &[("val_data", d.path().join("val-{000..003}.tar").display().to_string())]));
        assert!(e.contains("key `eval.val_data`") && e.contains("matches no file"), "{e}");

        std::fs::write(d.path().join("0.tar"), write_tar(&[("k.jpg", b"j"), ("k.txt", b"a cat"), ("k.cls", b"3")]))
            .unwrap();
        let two = d.path().join("{0..1}.tar").display().to_string();
        let e = err(&cfg(d.path(), &[("retrieval_data", two)]));
        assert!(
            e.contains("key `eval.retrieval_data`") && e.contains("1 of 2 shards do not exist") && e.contains("1.tar"),
            "{e}"
        );

        let shard = d.path().join("0.tar").display().to_string();
        let t = d.path().join("t.txt");
        std::fs::write(&t, "a {}.\na photo\n").unwrap();
        let e =
            err(&cfg(d.path(), &[("zeroshot_data", shard.clone()), ("zeroshot_templates", t.display().to_string())]));
        assert!(e.contains("key `eval.zeroshot_templates`") && e.contains(":2:"), "{e}");
        let n = d.path().join("n.txt");
        std::fs::write(&n, "cat\n\ndog\n").unwrap();
        let e =
            err(&cfg(d.path(), &[("zeroshot_data", shard.clone()), ("zeroshot_classnames", n.display().to_string())]));
        assert!(e.contains("key `eval.zeroshot_classnames`") && e.contains("n.txt:2"), "{e}");
        let e = err(&cfg(
            d.path(),
            &[("zeroshot_data", shard), ("zeroshot_classnames", d.path().join("no.txt").display().to_string())],
        ));
        assert!(e.contains("key `eval.zeroshot_classnames`") && e.contains("cannot read"), "{e}");

        // Shards without the member evaluation needs, and a folder without captions.tsv.
        std::fs::write(d.path().join("nolabel.tar"), write_tar(&[("k.jpg", b"j"), ("k.txt", b"a cat")])).unwrap();
        let e = err(&cfg(d.path(), &[("zeroshot_data", d.path().join("nolabel.tar").display().to_string())]));
        assert!(e.contains("lacks an integer class label in a `cls` member") && e.contains("members jpg, txt"), "{e}");
        std::fs::create_dir_all(d.path().join("pairs")).unwrap();
        let e = err(&cfg(d.path(), &[("retrieval_data", d.path().join("pairs").display().to_string())]));
        assert!(e.contains("key `eval.retrieval_data`") && e.contains("captions.tsv"), "{e}");
        std::fs::write(d.path().join("pairs/captions.tsv"), "a.jpg\ta cat\n").unwrap();
        let e = err(&cfg(d.path(), &[("retrieval_data", d.path().join("pairs").display().to_string())]));
        assert!(e.contains("captions.tsv:1") && e.contains("no image"), "{e}");
    }
}
