//! Which class name each zero-shot label stands for.
//!
//! A class-folder set (`root/<folder>/<image>`) is matched to its class names **by name**: each
//! folder's name is its class name, or `eval.zeroshot_classnames` maps folders to names with
//! `folder<TAB>class name` lines (ImageNet's synset folders: `n01440764<TAB>tench`; a line without
//! a tab names a folder of that very name). Folders and names must match one to one, or it is an
//! error listing the differences, so neither the file's order nor the folders' sorted order can
//! silently put the wrong name on a class (torchvision's `ImageFolder` labels by sorted folder
//! name, and a names file in any other order then scores below chance).
//!
//! Without a file, folders named by ImageNet-1k synset ids get OpenCLIP's ImageNet class names.
//!
//! Shards with a `cls` member carry index labels: there the file's lines are the class names in
//! index order (the part after a tab, when a line has one, so ImageNet's synset file serves both).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The zero-shot classes of a class-folder set, in label order: `names[i]` is the class name of
/// the images in `folders[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderClasses {
    pub names: Vec<String>,
    pub folders: Vec<PathBuf>,
}

/// One line of a class-names file: the folder it names (if the line has a tab) and the name.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    folder: Option<String>,
    name: String,
}

/// Parse a class-names file. Empty lines are an error (for shards the line number is the label,
/// and an empty line would shift every label after it).
fn parse(text: &str, file: &str) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let (folder, name) = match raw.split_once('\t') {
            Some((f, n)) => (Some(f.trim().to_string()), n.trim().to_string()),
            None => (None, raw.trim().to_string()),
        };
        if name.is_empty() || folder.as_deref() == Some("") {
            return Err(format!(
                "{file}:{}: empty class name or folder (one `name` or `folder<TAB>name` per line)",
                i + 1
            ));
        }
        lines.push(Line { folder, name });
    }
    if lines.is_empty() {
        return Err(format!("{file}: no class names"));
    }
    Ok(lines)
}

/// Class names in label order for shards with `cls` labels: line `i` names label `i`.
pub fn for_shards(text: &str, file: &str) -> Result<Vec<String>, String> {
    Ok(parse(text, file)?.into_iter().map(|l| l.name).collect())
}

/// The sub-folders of `root`, sorted by name.
pub fn sub_folders(root: &Path) -> Result<Vec<String>, String> {
    let entries = std::fs::read_dir(root).map_err(|e| format!("cannot list {}: {e}", root.display()))?;
    let mut folders = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", root.display()))?;
        if entry.path().is_dir() {
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| format!("{}: folder name {name:?} is not UTF-8", root.display()))?;
            folders.push(name.to_string());
        }
    }
    folders.sort();
    if folders.is_empty() {
        return Err(format!("{} has no class sub-folders (expected root/<class>/<image>)", root.display()));
    }
    Ok(folders)
}

/// Match the class folders of `root` to class names: without a names file (`names = None`) each
/// folder is its own class name, in sorted order; with one (`Some((text, file))`) its lines give the
/// label order and every folder must be named exactly once.
pub fn for_folders(root: &Path, names: Option<(&str, &str)>) -> Result<FolderClasses, String> {
    let on_disk = sub_folders(root)?;
    let Some((text, file)) = names else {
        let folders = on_disk.iter().map(|f| root.join(f)).collect();
        return Ok(FolderClasses { names: imagenet_names(&on_disk).unwrap_or(on_disk), folders });
    };
    let lines = parse(text, file)?;
    let mut line_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let folder = line.folder.as_deref().unwrap_or(&line.name);
        if let Some(first) = line_of.insert(folder, i) {
            return Err(format!("{file}:{}: folder `{folder}` is already named on line {}", i + 1, first + 1));
        }
    }
    let disk: BTreeSet<&str> = on_disk.iter().map(String::as_str).collect();
    let named: BTreeSet<&str> = line_of.keys().copied().collect();
    let unnamed: Vec<&str> = disk.difference(&named).copied().collect();
    let missing: Vec<&str> = named.difference(&disk).copied().collect();
    if !unnamed.is_empty() || !missing.is_empty() {
        let mut msg = format!(
            "the class folders of {} and the names in {file} do not match one to one ({} folders, {} names)",
            root.display(),
            disk.len(),
            named.len()
        );
        if !unnamed.is_empty() {
            msg += &format!("; folders without a name in {file}: {}", list(&unnamed));
        }
        if !missing.is_empty() {
            msg += &format!("; names in {file} without a folder: {}", list(&missing));
        }
        msg += "; each line is `folder<TAB>class name`, or a class name that is also its folder's name";
        return Err(msg);
    }
    let folders = lines.iter().map(|l| root.join(l.folder.as_deref().unwrap_or(&l.name))).collect();
    Ok(FolderClasses { names: lines.into_iter().map(|l| l.name).collect(), folders })
}

/// OpenCLIP's class names for folders that are all ImageNet-1k synset ids (`val/n01440764/…`,
/// what OpenCLIP's `--imagenet-val` reads), matched by id; `None` for any other folders.
fn imagenet_names(folders: &[String]) -> Option<Vec<String>> {
    let synsets = super::imagenet_synsets();
    let names = super::imagenet_classnames();
    let index: BTreeMap<&str, usize> = synsets.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
    folders.iter().map(|f| index.get(f.as_str()).map(|&i| names[i].clone())).collect()
}

/// `a`, `b`, … with at most 10 shown.
fn list(items: &[&str]) -> String {
    const SHOWN: usize = 10;
    let mut s = items.iter().take(SHOWN).map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        s += &format!(" and {} more", items.len() - SHOWN);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folders(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::create_dir_all(dir.path().join(n)).unwrap();
        }
        // A stray file at the top is not a class.
        std::fs::write(dir.path().join("README.txt"), "x").unwrap();
        dir
    }

    #[test]
    fn without_a_file_folders_name_themselves_in_sorted_order() {
        let d = folders(&["zero", "one", "two"]);
        let c = for_folders(d.path(), None).unwrap();
        assert_eq!(c.names, ["one", "two", "zero"]);
        assert_eq!(c.folders, [d.path().join("one"), d.path().join("two"), d.path().join("zero")]);
    }

    #[test]
    fn imagenet_synset_folders_get_openclip_names_by_id() {
        // A subset, as a quick check on part of ImageNet val would have.
        let d = folders(&["n01443537", "n01440764", "n15075141"]);
        let c = for_folders(d.path(), None).unwrap();
        assert_eq!(c.names, ["tench", "goldfish", "toilet paper"]);
        assert_eq!(c.folders[2], d.path().join("n15075141"));
        // One folder that is no synset: folder names throughout.
        let d = folders(&["n01443537", "n01440764", "extra"]);
        assert_eq!(for_folders(d.path(), None).unwrap().names, ["extra", "n01440764", "n01443537"]);
    }

    #[test]
    fn a_file_in_natural_order_sets_the_label_order_and_keeps_each_folder_with_its_name() {
        let d = folders(&["zero", "one", "two"]);
        let c = for_folders(d.path(), Some(("zero\none\r\ntwo\n", "names.txt"))).unwrap();
        assert_eq!(c.names, ["zero", "one", "two"]);
        assert_eq!(c.folders, [d.path().join("zero"), d.path().join("one"), d.path().join("two")]);
    }

    #[test]
    fn synset_folders_map_to_names_through_tabs() {
        let d = folders(&["n01443537", "n01440764"]);
        let c = for_folders(d.path(), Some(("n01440764\ttench\nn01443537\tgoldfish\n", "map.tsv"))).unwrap();
        assert_eq!(c.names, ["tench", "goldfish"]);
        assert_eq!(c.folders, [d.path().join("n01440764"), d.path().join("n01443537")]);
        // The same file for shards: the names in index order.
        assert_eq!(for_shards("n01440764\ttench\nn01443537\tgoldfish\n", "map.tsv").unwrap(), ["tench", "goldfish"]);
    }

    #[test]
    fn a_mismatch_lists_both_sides() {
        let d = folders(&["zero", "one", "two", "three"]);
        let e = for_folders(d.path(), Some(("zero\none\ntwo\nfour\n", "names.txt"))).unwrap_err();
        assert!(e.contains("folders without a name in names.txt: `three`"), "{e}");
        assert!(e.contains("names in names.txt without a folder: `four`"), "{e}");
        assert!(e.contains("4 folders, 4 names"), "{e}");
        let e = for_folders(d.path(), Some(("zero\none\ntwo\nthree\none\n", "names.txt"))).unwrap_err();
        assert!(e.contains("names.txt:5: folder `one` is already named on line 2"), "{e}");
    }

    #[test]
    fn bad_files_name_file_and_line() {
        assert_eq!(
            for_shards("cat\n\ndog\n", "n.txt").unwrap_err(),
            "n.txt:2: empty class name or folder (one `name` or `folder<TAB>name` per line)"
        );
        assert!(for_shards("cat\n\tdog\n", "n.txt").unwrap_err().starts_with("n.txt:2:"));
        assert_eq!(for_shards("", "n.txt").unwrap_err(), "n.txt: no class names");
        let empty = tempfile::tempdir().unwrap();
        assert!(for_folders(empty.path(), None).unwrap_err().contains("has no class sub-folders"));
    }

    #[test]
    fn long_lists_are_cut() {
        let many: Vec<String> = (0..13).map(|i| format!("f{i:02}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(list(&refs).ends_with("`f09` and 3 more"));
    }
}
