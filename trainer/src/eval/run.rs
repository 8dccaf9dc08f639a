//! Running the evaluations of `[eval]` on a model: checked [`EvalInputs`] in, [`EvalResults`]
//! out, the work shared by all ranks as [`split`](super::split) describes (the same results on
//! every rank, equal to one process's). Used during training and by `trainer eval`.
//!
//! A stop signal (SIGTERM/SIGUSR1) ends an evaluation between two batches; the ranks agree on it
//! at the end of each phase, and [`evaluate`] returns `None`, so the caller exits as on preemption.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use ferroclip_data::augment::{EvalTransform, ImageTransform};
use ferroclip_data::loader::{Loader, LoaderOptions, Mode};
use ferroclip_data::rng::SampleRng;
use ferroclip_data::tokenize::Tokenizer;

use super::inputs::{EvalInputs, ImageSet, ZeroShotInputs, LABEL_KEY};
use super::report::EvalResults;
use super::split::Ranks;
use super::{retrieval, zeroshot};
use crate::config::Config;
use crate::dist::{Collective, Control};
use crate::log::Progress;
use crate::loss::{l2_normalize, ClipLoss};
use crate::model::ContrastiveModel;

/// Every evaluation `inputs` holds, on all ranks of `collective` together (a collective call:
/// every rank calls it with the same inputs). `Ok(None)` when a stop signal reached any rank
/// before the end; the results are otherwise the same on every rank.
pub fn evaluate(
    cfg: &Config,
    inputs: &EvalInputs,
    model: &dyn ContrastiveModel,
    collective: &dyn Collective,
    control: &dyn Control,
    device: Device,
    stop: &AtomicBool,
) -> Result<Option<EvalResults>> {
    let arch = cfg.model.arch_config()?;
    let size = arch.image_size() as usize;
    let eval = Evaluation {
        cfg,
        embed_dim: arch.embed_dim,
        model,
        ranks: Ranks { collective, control, device },
        stop,
        transform: Arc::new(EvalTransform::new(size, cfg.data.max_image_pixels)),
        tokenizer: cfg.model.tokenizer()?,
        next_shard: RefCell::new(None),
    };
    let mut results = EvalResults::new();
    let _autocast = cfg.train.precision.autocast(device);
    let _no_grad = tch::no_grad_guard();
    if let Some(z) = &inputs.zero_shot {
        if eval.zero_shot(z, &mut results).context("zero-shot evaluation")?.is_none() {
            return Ok(None);
        }
    }
    if let Some(r) = &inputs.retrieval {
        if eval.retrieval(r, &mut results).context("retrieval evaluation")?.is_none() {
            return Ok(None);
        }
    }
    if let Some(v) = &inputs.val {
        if eval.val_loss(v, &mut results).context("validation loss")?.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(results))
}

struct Evaluation<'a> {
    cfg: &'a Config,
    /// Width of the model's features (`embed_dim`).
    embed_dim: i64,
    model: &'a dyn ContrastiveModel,
    ranks: Ranks<'a>,
    stop: &'a AtomicBool,
    transform: Arc<EvalTransform>,
    tokenizer: Arc<dyn Tokenizer>,
    /// The loader of the next shard this rank reads, opened early so that its first batches
    /// decode while the current shard is evaluated: (shard, label member, loader).
    next_shard: RefCell<Option<(String, Option<String>, Loader)>>,
}

/// One batch of a unit: images `[b, 3, s, s]` on the device, what the set says about each
/// image, and (shards) the caption tokens and sample keys.
struct EvalBatch<T> {
    images: Tensor,
    items: Vec<T>,
    tokens: Option<Tensor>,
    keys: Vec<String>,
}

impl Evaluation<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Units of `set`: batches of `eval.batch_size` files of a folder, or its shards.
    fn num_units<T>(&self, set: &ImageSet<T>) -> usize {
        match set {
            ImageSet::Folder(files) => files.len().div_ceil(self.cfg.eval.batch_size),
            ImageSet::Shards(shards) => shards.len(),
        }
    }

    /// A progress bar on rank 0 for its share of `set`.
    fn progress<T>(&self, name: &str, set: &ImageSet<T>) -> Progress {
        let mine = match set {
            ImageSet::Folder(files) => {
                let b = self.cfg.eval.batch_size;
                (0..self.num_units(set))
                    .filter(|&u| self.ranks.owns(u))
                    .map(|u| files[u * b..].len().min(b) as u64)
                    .sum()
            }
            ImageSet::Shards(_) => 0,
        };
        Progress::task(name, mine, self.ranks.is_main())
    }

    /// Feed unit `u` of `set` to `f` batch by batch; `from_shard` says what a shard batch tells
    /// about each image. Returns false when a stop signal cut the unit short.
    fn each_batch<T: Clone>(
        &self,
        set: &ImageSet<T>,
        u: usize,
        label_key: Option<&str>,
        from_shard: impl Fn(&ferroclip_data::Batch) -> Vec<T>,
        mut f: impl FnMut(EvalBatch<T>) -> Result<()>,
    ) -> Result<bool> {
        let device = self.ranks.device;
        match set {
            ImageSet::Folder(files) => {
                let b = self.cfg.eval.batch_size;
                let chunk = &files[u * b..(u * b + b).min(files.len())];
                let paths: Vec<PathBuf> = chunk.iter().map(|(p, _)| p.clone()).collect();
                let images = load_images(&paths, self.transform.as_ref(), self.cfg.data.workers, device)?;
                let keys = paths.iter().map(|p| p.display().to_string()).collect();
                f(EvalBatch { images, items: chunk.iter().map(|(_, t)| t.clone()).collect(), tokens: None, keys })?;
                Ok(true)
            }
            ImageSet::Shards(shards) => {
                let shard = &shards[u];
                let mut loader = self.shard_loader(shard, label_key)?;
                if let Some(next) = (u + 1..shards.len()).find(|&v| self.ranks.owns(v)) {
                    let opened = self.shard_loader(&shards[next], label_key)?;
                    *self.next_shard.borrow_mut() = Some((shards[next].clone(), label_key.map(String::from), opened));
                }
                while let Some(batch) = loader.next_batch() {
                    if self.stopped() {
                        return Ok(false);
                    }
                    let (images, tokens) = crate::input::to_device(&batch, device);
                    let items = from_shard(&batch);
                    let keys = batch.keys.iter().map(|k| format!("shard `{shard}` key `{k}`")).collect();
                    f(EvalBatch { images, items, tokens: Some(tokens), keys })?;
                }
                if let Some(e) = loader.error() {
                    bail!("shard `{shard}`: {e}");
                }
                // A shard that cannot be read to its end would leave its images out unnoticed.
                if loader.stats().shards_failed > 0 {
                    bail!("shard `{shard}` could not be read to its end (see the warning above)");
                }
                Ok(true)
            }
        }
    }

    /// One ordered pass over one shard. Batches never span shards, so they are the same
    /// whichever rank reads the shard.
    fn shard_loader(&self, shard: &str, label_key: Option<&str>) -> Result<Loader> {
        let pending = self.next_shard.borrow_mut().take();
        if let Some((next, key, loader)) = pending {
            if next == shard && key.as_deref() == label_key {
                return Ok(loader);
            }
        }
        let mut data = self.cfg.data.clone();
        data.readers = 1; // one shard: a second reader would have nothing to read
        Loader::new(
            &data,
            shard,
            LoaderOptions {
                rank: 0,
                world_size: 1,
                seed: self.cfg.seed,
                batch_size: self.cfg.eval.batch_size,
                mode: Mode::Eval,
                transform: self.transform.clone(),
                tokenizer: self.tokenizer.clone(),
                label_key: label_key.map(String::from),
                resume: None,
                host_alloc: None,
            },
        )
        .with_context(|| format!("opening shard `{shard}`"))
    }

    /// OpenCLIP's zero-shot classifier `[embed_dim, classes]`, class chunks shared by the ranks.
    /// A chunk holds as many classes as fit `eval.batch_size` prompts (one class at least).
    fn classifier(&self, classnames: &[String], templates: &[String]) -> Result<Option<Tensor>> {
        let per_chunk = (self.cfg.eval.batch_size / templates.len()).max(1);
        let chunks: Vec<&[String]> = classnames.chunks(per_chunk).collect();
        let progress = Progress::task(
            "zero-shot classifier",
            chunks.len().div_ceil(self.ranks.collective.world_size()) as u64,
            self.ranks.is_main(),
        );
        let mut mine = Vec::new();
        for (u, chunk) in chunks.iter().enumerate().filter(|(u, _)| self.ranks.owns(*u)) {
            if self.stopped() {
                break;
            }
            let columns =
                zeroshot::class_embeddings(self.model, self.tokenizer.as_ref(), chunk, templates, self.ranks.device);
            mine.push((u, columns));
            progress.inc(1);
        }
        progress.finish();
        if self.ranks.any_stopped(self.stop) {
            return Ok(None);
        }
        let embed_dim = self.embed_dim;
        let (rows, _) = self.ranks.gather_rows(chunks.len(), &[embed_dim], Kind::Float, &mine);
        Ok(Some(rows.tr().contiguous())) // [d, classes]
    }

    fn zero_shot(&self, z: &ZeroShotInputs, out: &mut EvalResults) -> Result<Option<()>> {
        let Some(classifier) = self.classifier(&z.classnames, &z.templates)? else { return Ok(None) };
        let classes = z.classnames.len() as i64;
        let units = self.num_units(&z.images);
        let progress = self.progress("zero-shot", &z.images);
        let mut mine = Vec::new();
        for u in (0..units).filter(|&u| self.ranks.owns(u)) {
            if self.stopped() {
                break;
            }
            let mut meter = zeroshot::ZeroShotMeter::new();
            let finished = self.each_batch(
                &z.images,
                u,
                Some(LABEL_KEY),
                |b| b.labels.clone(),
                |b| {
                    if let Some(i) = b.items.iter().position(|&y| !(0..classes).contains(&y)) {
                        bail!(
                        "{}: label {} is not a class index: eval.zeroshot_classnames has {classes} names (index order)",
                        b.keys[i],
                        b.items[i]
                    );
                    }
                    progress.inc(b.items.len() as u64);
                    let labels = Tensor::from_slice(&b.items).to_device(self.ranks.device);
                    meter.update(&self.model.encode_image(&b.images, false), &labels, &classifier);
                    Ok(())
                },
            )?;
            if !finished {
                break;
            }
            mine.push((u, Tensor::from_slice(&meter.counts()).view([1, 3])));
        }
        progress.finish();
        if self.ranks.any_stopped(self.stop) {
            return Ok(None);
        }
        let (rows, _) = self.ranks.gather_rows(units, &[3], Kind::Double, &mine);
        let rows: Vec<f64> = Vec::try_from(rows.to_device(Device::Cpu).flatten(0, -1)).expect("f64 counts");
        let mut total = [0.0; 3];
        for row in rows.chunks(3) {
            for (t, v) in total.iter_mut().zip(row) {
                *t += v;
            }
        }
        let meter = zeroshot::ZeroShotMeter::from_counts(total);
        if meter.count() == 0 {
            bail!("eval.zeroshot_data `{}` yielded no labelled images", self.cfg.eval.zeroshot_data);
        }
        let (top1, top5) = meter.accuracies();
        out.insert("zeroshot_top1", top1);
        out.insert("zeroshot_top5", top5);
        out.insert("zeroshot_images", meter.count() as f64);
        out.insert("zeroshot_classes", classes as f64);
        Ok(Some(()))
    }

    /// Image–text recall@k; several captions per image: one per line of the caption member
    /// (shards) or of `captions.tsv` (folder).
    fn retrieval(&self, set: &ImageSet<Vec<String>>, out: &mut EvalResults) -> Result<Option<()>> {
        let units = self.num_units(set);
        let progress = self.progress("retrieval", set);
        let captions_of = |b: &ferroclip_data::Batch| -> Vec<Vec<String>> {
            b.captions
                .iter()
                .map(|c| c.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
                .collect()
        };
        let (mut images, mut texts, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for u in (0..units).filter(|&u| self.ranks.owns(u)) {
            if self.stopped() {
                break;
            }
            let (mut image_feats, mut text_feats, mut owner) = (Vec::new(), Vec::new(), Vec::<i64>::new());
            let mut image_index = 0i64; // within the unit
            let finished = self.each_batch(set, u, None, captions_of, |b| {
                progress.inc(b.items.len() as u64);
                image_feats.push(l2_normalize(&self.model.encode_image(&b.images, false)));
                let mut batch_texts: Vec<String> = Vec::new();
                for caps in b.items {
                    for c in caps {
                        batch_texts.push(c);
                        owner.push(image_index);
                    }
                    image_index += 1;
                }
                for chunk in batch_texts.chunks(self.cfg.eval.batch_size) {
                    let ids = crate::input::tokens(self.tokenizer.as_ref(), chunk).to_device(self.ranks.device);
                    text_feats.push(l2_normalize(&self.model.encode_text(&ids, false)));
                }
                Ok(())
            })?;
            if !finished {
                break;
            }
            let cat = |v: &[Tensor]| {
                if v.is_empty() {
                    Tensor::zeros([0, 1], (Kind::Float, self.ranks.device))
                } else {
                    Tensor::cat(v, 0)
                }
            };
            images.push((u, cat(&image_feats)));
            texts.push((u, cat(&text_feats)));
            owners.push((u, Tensor::from_slice(&owner)));
        }
        progress.finish();
        if self.ranks.any_stopped(self.stop) {
            return Ok(None);
        }
        let d = self.embed_dim;
        let (image_features, image_counts) = self.ranks.gather_rows(units, &[d], Kind::Float, &images);
        let (text_features, text_counts) = self.ranks.gather_rows(units, &[d], Kind::Float, &texts);
        // Image indices travel as f64 (exact below 2^53): device collectives carry floating point.
        let (owner, _) = self.ranks.gather_rows(units, &[], Kind::Double, &owners);
        if image_features.size()[0] == 0 || text_features.size()[0] == 0 {
            bail!("eval.retrieval_data `{}` yielded no image–caption pairs", self.cfg.eval.retrieval_data);
        }
        // Each unit numbered its images from 0: shift them by the images of the units before.
        let mut owner: Vec<i64> =
            Vec::try_from(owner.to_device(Device::Cpu).to_kind(Kind::Int64)).expect("int64 owners");
        let (mut first_image, mut first_text) = (0i64, 0usize);
        for (&n_images, &n_texts) in image_counts.iter().zip(&text_counts) {
            for o in &mut owner[first_text..first_text + n_texts as usize] {
                *o += first_image;
            }
            first_image += n_images;
            first_text += n_texts as usize;
        }
        let owner = Tensor::from_slice(&owner);
        out.extend(retrieval::recall_at_k(&image_features, &text_features, &owner, &[1, 5, 10]));
        Ok(Some(()))
    }

    /// The CLIP loss over held-out batches, averaged over samples.
    fn val_loss(&self, shards: &[String], out: &mut EvalResults) -> Result<Option<()>> {
        let set: ImageSet<()> = ImageSet::Shards(shards.to_vec());
        let progress = self.progress("validation", &set);
        let loss_fn = ClipLoss { local_loss: false };
        let mut mine = Vec::new();
        for u in (0..shards.len()).filter(|&u| self.ranks.owns(u)) {
            if self.stopped() {
                break;
            }
            let (mut total, mut n) = (0.0f64, 0usize);
            let finished = self.each_batch(
                &set,
                u,
                None,
                |b| vec![(); b.len],
                |b| {
                    progress.inc(b.items.len() as u64);
                    let tokens = b.tokens.expect("shard batches carry tokens");
                    let i = self.model.encode_image(&b.images, false);
                    let t = self.model.encode_text(&tokens, false);
                    total += loss_fn.forward(&i, &t, &self.model.logit_scale(), 0, 1).double_value(&[])
                        * b.items.len() as f64;
                    n += b.items.len();
                    Ok(())
                },
            )?;
            if !finished {
                break;
            }
            mine.push((u, Tensor::from_slice(&[total, n as f64]).view([1, 2])));
        }
        progress.finish();
        if self.ranks.any_stopped(self.stop) {
            return Ok(None);
        }
        let (rows, _) = self.ranks.gather_rows(shards.len(), &[2], Kind::Double, &mine);
        let rows: Vec<f64> = Vec::try_from(rows.to_device(Device::Cpu).flatten(0, -1)).expect("f64 sums");
        let (total, n) = rows.chunks(2).fold((0.0, 0.0), |(t, n), r| (t + r[0], n + r[1]));
        if n == 0.0 {
            bail!("eval.val_data `{}` yielded no samples", self.cfg.eval.val_data);
        }
        out.insert("val_loss", total / n);
        Ok(Some(()))
    }
}

/// Decode and eval-transform image files on up to `threads` threads into `[n, 3, s, s]` f32 on
/// `device`: uint8 pixels travel, normalized there as training batches are ([`crate::input`]).
pub fn load_images(
    paths: &[PathBuf],
    transform: &dyn ImageTransform,
    threads: usize,
    device: Device,
) -> Result<Tensor> {
    let s = transform.output_size();
    let px = 3 * s * s;
    let mut pixels = vec![0u8; paths.len() * px];
    let mut erase = vec![None; paths.len()];
    let per_thread = paths.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| -> Result<()> {
        let jobs: Vec<_> = paths
            .chunks(per_thread)
            .zip(pixels.chunks_mut(per_thread * px))
            .zip(erase.chunks_mut(per_thread))
            .map(|((paths, out), erase)| {
                scope.spawn(move || -> Result<()> {
                    for ((p, out), erase) in paths.iter().zip(out.chunks_mut(px)).zip(erase) {
                        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                        let ext = p.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
                        // The eval transform draws nothing; any stream will do.
                        *erase = transform
                            .apply(&bytes, &ext, &mut SampleRng::from_seed(0), out)
                            .with_context(|| format!("decoding {}", p.display()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| j.join().expect("an image decode thread panicked"))
    })?;
    Ok(crate::input::images_to_device(&pixels, &erase, s, device))
}

/// What a zero-shot result means, printed under the table: the accuracy next to chance, and how
/// the model got it.
pub fn zero_shot_summary(results: &EvalResults) -> Option<String> {
    let top1 = results.get("zeroshot_top1")?;
    let classes = results.get("zeroshot_classes")?;
    let images = results.get("zeroshot_images").unwrap_or(0.0);
    let chance = 1.0 / classes;
    Some(format!(
        "zero-shot top-1 accuracy: {:.1}% on {images:.0} images of {classes:.0} classes; guessing would score {:.1}% \
         (chance), so this is {:.1}x chance.\n  The model was never shown a label: for each image it picked the class \
         whose prompts (the templates filled with the class name) its text tower embeds closest to the image.",
        100.0 * top1,
        100.0 * chance,
        top1 / chance
    ))
}
