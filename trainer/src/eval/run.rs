//! Running the evaluations of `[eval]` on a model: data in, [`EvalResults`] out. Used during
//! training (rank 0) and by `trainer eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use ferroclip_data::augment::{EvalTransform, ImageTransform};
use ferroclip_data::loader::{Loader, LoaderOptions, Mode};
use ferroclip_data::rng::SampleRng;

use super::report::EvalResults;
use super::{retrieval, zeroshot};
use crate::config::Config;
use crate::log::Progress;
use crate::loss::{l2_normalize, ClipLoss};
use crate::model::ContrastiveModel;
use crate::session;

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// Every evaluation `[eval]` configures.
pub fn evaluate(cfg: &Config, model: &dyn ContrastiveModel, device: Device) -> Result<EvalResults> {
    let size = session::model_config(cfg).image_size() as usize;
    let transform = Arc::new(EvalTransform::new(size, cfg.data.max_image_pixels));
    let mut results = EvalResults::new();
    let _autocast = session::autocast(cfg.train.precision, device);
    tch::no_grad(|| -> Result<()> {
        if !cfg.eval.zeroshot_data.is_empty() {
            zero_shot(cfg, model, device, transform.clone(), &mut results).context("zero-shot evaluation")?;
        }
        if !cfg.eval.retrieval_data.is_empty() {
            retrieval_eval(cfg, model, device, transform.clone(), &mut results).context("retrieval evaluation")?;
        }
        if !cfg.eval.val_data.is_empty() {
            val_loss(cfg, model, device, transform.clone(), &mut results).context("validation loss")?;
        }
        Ok(())
    })?;
    Ok(results)
}

fn read_lines(path: &str, what: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("eval.{what}: reading `{path}`"))?;
    Ok(text.lines().map(str::trim_end).filter(|l| !l.is_empty()).map(String::from).collect())
}

fn eval_loader(cfg: &Config, pattern: &str, transform: Arc<EvalTransform>, label_key: Option<&str>) -> Result<Loader> {
    Ok(Loader::new(
        &cfg.data,
        pattern,
        LoaderOptions {
            rank: 0,
            world_size: 1,
            seed: cfg.seed,
            batch_size: cfg.eval.batch_size,
            mode: Mode::Eval,
            transform,
            tokenizer: session::tokenizer(cfg)?,
            label_key: label_key.map(String::from),
            resume: None,
            host_alloc: None,
        },
    )?)
}

fn images_tensor(batch: &ferroclip_data::Batch, device: Device) -> Tensor {
    crate::train::to_device(batch, device).0
}

fn zero_shot(cfg: &Config, model: &dyn ContrastiveModel, device: Device, transform: Arc<EvalTransform>, out: &mut EvalResults) -> Result<()> {
    let e = &cfg.eval;
    let data = Path::new(&e.zeroshot_data);
    let classnames = if e.zeroshot_classnames.is_empty() {
        if data.is_dir() {
            folder_classes(data)?
        } else {
            super::imagenet_classnames()
        }
    } else {
        read_lines(&e.zeroshot_classnames, "zeroshot_classnames")?
    };
    let templates =
        if e.zeroshot_templates.is_empty() { super::openai_templates() } else { read_lines(&e.zeroshot_templates, "zeroshot_templates")? };
    let tokenizer = session::tokenizer(cfg)?;
    let classifier = zeroshot::build_classifier(model, tokenizer.as_ref(), &classnames, &templates, device, e.batch_size);

    let mut meter = zeroshot::ZeroShotMeter::new();
    let mut max_label = -1i64;
    let progress = Progress::task("zero-shot", 0, true);
    let mut feed = |images: Tensor, y: Vec<i64>| {
        progress.inc(y.len() as u64);
        max_label = y.iter().copied().fold(max_label, i64::max);
        meter.update(&model.encode_image(&images, false), &Tensor::from_slice(&y).to_device(device), &classifier);
    };
    if data.is_dir() {
        let folders = folder_classes(data)?;
        let files = labelled_files(data, &folders)?;
        for chunk in files.chunks(e.batch_size) {
            let paths: Vec<PathBuf> = chunk.iter().map(|(p, _)| p.clone()).collect();
            let images = load_images(&paths, transform.as_ref())?;
            feed(images.to_device(device), chunk.iter().map(|(_, y)| *y).collect());
        }
    } else {
        let mut loader = eval_loader(cfg, &e.zeroshot_data, transform, Some("cls"))?;
        while let Some(b) = loader.next_batch() {
            feed(images_tensor(&b, device), b.labels.clone());
        }
    }
    progress.finish();
    if meter.count() == 0 {
        bail!("eval.zeroshot_data `{}` yielded no labelled images", e.zeroshot_data);
    }
    if max_label >= classnames.len() as i64 {
        bail!("eval: label {max_label} has no class name ({} names given)", classnames.len());
    }
    let (top1, top5) = meter.accuracies();
    out.insert("zeroshot_top1", top1);
    out.insert("zeroshot_top5", top5);
    out.insert("zeroshot_images", meter.count() as f64);
    out.insert("zeroshot_classes", classnames.len() as f64);
    Ok(())
}

fn retrieval_eval(cfg: &Config, model: &dyn ContrastiveModel, device: Device, transform: Arc<EvalTransform>, out: &mut EvalResults) -> Result<()> {
    let tokenizer = session::tokenizer(cfg)?;
    let progress = Progress::task("retrieval", 0, true);
    let mut image_features = Vec::new();
    let mut text_features = Vec::new();
    let mut text_to_image: Vec<i64> = Vec::new();
    let mut image_index = 0i64;
    // Several captions per image: one per line of the caption member (shards) or one line each in
    // captions.tsv (folder).
    let mut feed = |images: Tensor, captions: Vec<Vec<String>>| {
        progress.inc(captions.len() as u64);
        image_features.push(l2_normalize(&model.encode_image(&images.to_device(device), false)).to_device(Device::Cpu));
        let mut texts: Vec<String> = Vec::new();
        for caps in captions {
            for c in caps {
                texts.push(c);
                text_to_image.push(image_index);
            }
            image_index += 1;
        }
        for chunk in texts.chunks(cfg.eval.batch_size) {
            let ids = crate::commands::tokens(tokenizer.as_ref(), chunk);
            text_features.push(l2_normalize(&model.encode_text(&ids.to_device(device), false)).to_device(Device::Cpu));
        }
    };
    let data = Path::new(&cfg.eval.retrieval_data);
    if data.is_dir() {
        let pairs = folder_captions(data)?;
        for chunk in pairs.chunks(cfg.eval.batch_size) {
            let paths: Vec<PathBuf> = chunk.iter().map(|(p, _)| p.clone()).collect();
            feed(load_images(&paths, transform.as_ref())?, chunk.iter().map(|(_, c)| c.clone()).collect());
        }
    } else {
        let mut loader = eval_loader(cfg, &cfg.eval.retrieval_data, transform, None)?;
        while let Some(b) = loader.next_batch() {
            let captions = b.captions.iter().map(|c| c.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()).collect();
            feed(images_tensor(&b, device), captions);
        }
    }
    progress.finish();
    if image_features.is_empty() || text_features.is_empty() {
        bail!("eval.retrieval_data `{}` yielded no image–caption pairs", cfg.eval.retrieval_data);
    }
    let text_to_image = Tensor::from_slice(&text_to_image);
    out.extend(retrieval::recall_at_k(&Tensor::cat(&image_features, 0), &Tensor::cat(&text_features, 0), &text_to_image, &[1, 5, 10]));
    Ok(())
}

/// A retrieval folder: images plus `captions.tsv` with `file<TAB>caption` lines (several lines per
/// image allowed), in file order of first appearance.
fn folder_captions(root: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let index = root.join("captions.tsv");
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("eval.retrieval_data is a folder, so it needs {} (file<TAB>caption per line)", index.display()))?;
    let mut pairs: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let mut position: std::collections::HashMap<PathBuf, usize> = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (file, caption) =
            line.split_once('\t').with_context(|| format!("{}:{}: expected file<TAB>caption", index.display(), n + 1))?;
        let path = root.join(file.trim());
        if !path.is_file() {
            bail!("{}:{}: no image {}", index.display(), n + 1, path.display());
        }
        let i = *position.entry(path.clone()).or_insert_with(|| {
            pairs.push((path, Vec::new()));
            pairs.len() - 1
        });
        pairs[i].1.push(caption.trim().to_string());
    }
    Ok(pairs)
}

fn val_loss(cfg: &Config, model: &dyn ContrastiveModel, device: Device, transform: Arc<EvalTransform>, out: &mut EvalResults) -> Result<()> {
    let mut loader = eval_loader(cfg, &cfg.eval.val_data, transform, None)?;
    let loss_fn = ClipLoss { local_loss: false };
    let (mut total, mut n) = (0.0, 0usize);
    while let Some(b) = loader.next_batch() {
        let (images, tokens) = crate::train::to_device(&b, device);
        let i = model.encode_image(&images, false);
        let t = model.encode_text(&tokens, false);
        let l = loss_fn.forward(&i, &t, &model.logit_scale(), 0, 1).double_value(&[]);
        total += l * b.len as f64;
        n += b.len;
    }
    if n == 0 {
        bail!("eval.val_data `{}` yielded no samples", cfg.eval.val_data);
    }
    out.insert("val_loss", total / n as f64);
    Ok(())
}

/// Class sub-folders of an image-folder dataset, sorted (torchvision `ImageFolder` label order).
fn folder_classes(root: &Path) -> Result<Vec<String>> {
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("listing {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!("{} has no class sub-folders", root.display());
    }
    Ok(classes)
}

fn labelled_files(root: &Path, classes: &[String]) -> Result<Vec<(PathBuf, i64)>> {
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        for p in image_files(&root.join(class))? {
            out.push((p, label as i64));
        }
    }
    Ok(out)
}

/// Image files of a folder, sorted by file name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().map(|x| IMAGE_EXTENSIONS.contains(&x.to_string_lossy().to_ascii_lowercase().as_str())).unwrap_or(false)
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Decode and eval-transform image files into `[n, 3, s, s]`.
pub fn load_images(paths: &[PathBuf], transform: &dyn ImageTransform) -> Result<Tensor> {
    let s = transform.output_size();
    let mut pixels = vec![0u8; paths.len() * 3 * s * s];
    let mut erase = Vec::with_capacity(paths.len());
    for (p, out) in paths.iter().zip(pixels.chunks_mut(3 * s * s)) {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let ext = p.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        // The eval transform draws nothing; any stream will do.
        erase.push(transform.apply(&bytes, &ext, &mut SampleRng::from_seed(0), out).with_context(|| format!("decoding {}", p.display()))?);
    }
    let mut buf = vec![0f32; pixels.len()];
    ferroclip_data::normalize::normalize_and_erase(&pixels, &erase, &mut buf);
    Ok(Tensor::from_slice(&buf).view([paths.len() as i64, 3, s as i64, s as i64]).to_kind(Kind::Float))
}

/// The one-line zero-shot verdict printed under the table, with chance level for comparison.
pub fn zero_shot_summary(results: &EvalResults) -> Option<String> {
    let top1 = results.get("zeroshot_top1")?;
    let classes = results.get("zeroshot_classes")?;
    let images = results.get("zeroshot_images").unwrap_or(0.0);
    Some(format!(
        "zero-shot top-1 accuracy: {:.1}% on {images:.0} images, {classes:.0} classes (chance {:.1}%)",
        100.0 * top1,
        100.0 / classes
    ))
}
